"""Method differences: paired bootstrap intervals of the seed-mean difference, checked against the leaderboard
recomputed draw by draw, and the three verdicts on hand-made curves."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from eebench.differences import DEV_ONLY, NOT_RESOLVED, RESOLVED, differences_markdown, method_differences
from eebench.leaderboard import leaderboard, write_leaderboard

from conftest import curve

# AUC 1-3x: alpha 0.6225 (seed 0), 0.4415 (seed 1); beta 0.361, 0.39975 (see test_leaderboard.py)
ALPHA_AHEAD_IN_BOTH = [
    *curve("alpha", 0, 0.90, [(1.5, 0.89), (2.5, 0.80)]),
    *curve("alpha", 1, 0.92, [(1.6, 0.905), (2.0, 0.85)]),
    *curve("beta", 0, 0.91, [(1.2, 0.91), (1.8, 0.90)]),
    *curve("beta", 1, 0.91, [(1.3, 0.905), (1.9, 0.88)]),
]
# beta seed 1 now reaches 2.5x: AUC (0.3 * .905 + 1.2 * .88) / 2 = 0.66375 beats alpha's 0.4415 in seed 1,
# while alpha keeps the higher mean (0.532 vs 0.512)
SEEDS_DISAGREE = [*ALPHA_AHEAD_IN_BOTH[:12], *curve("beta", 1, 0.91, [(1.3, 0.905), (2.5, 0.88)])]


def draws_for(records: pd.DataFrame, offsets: list[float]) -> dict[tuple[str, str], np.ndarray]:
    """Draw r shifts every point of every job by offsets[r] (paired: the same shift for all), except that
    alpha's seed-0 2.5x point moves by -2 * offsets[r], which makes the AUC difference vary per draw."""
    draws = {}
    for row in records.to_dict("records"):
        knob = "full model" if row["is_full_model"] else row["knob_label"]
        shift = np.array(offsets) * (-2 if (row["method"], row["seed"], knob) == ("alpha", 0, "t=0.2") else 1)
        draws[(row["job_id"], knob)] = row["metric"] + shift
    return draws


def test_interval_is_the_paired_difference_of_seed_means_recomputed_per_draw():
    records = pd.DataFrame(ALPHA_AHEAD_IN_BOTH)
    offsets = [0.0, -0.05, 0.03, 0.01, -0.02]
    draws = draws_for(records, offsets)
    table = method_differences(records, draws, scores=("auc",), confidence=0.5)
    assert len(table) == 1
    row = table.iloc[0]
    assert (row.better, row.worse) == ("alpha", "beta")
    assert row.difference == pytest.approx((0.6225 + 0.4415) / 2 - (0.361 + 0.39975) / 2)
    # the same differences through the public leaderboard, with each draw written into the metrics
    per_draw = []
    for r in range(len(offsets)):
        labels = records["knob_label"].where(~records["is_full_model"], "full model")
        drawn = records.assign(metric=[draws[(j, k)][r] for j, k in zip(records.job_id, labels, strict=True)])
        auc = leaderboard(drawn).set_index("method")["auc"]
        per_draw.append(auc["alpha"] - auc["beta"])
    assert [row.diff_low, row.diff_high] == pytest.approx(np.quantile(per_draw, [0.25, 0.75]))
    assert (row.seeds_ahead, row.seeds, row.rank_gap, row.verdict) == (2, 2, 1, RESOLVED)
    # no selection set in these records: no held-out pick, so no pair for it
    assert method_differences(records, draws, scores=("heldout_pick_metric",)).empty


def test_verdicts_need_the_interval_and_every_seed():
    records = pd.DataFrame(SEEDS_DISAGREE)
    steady = draws_for(records, [0.0, 0.0, 0.0])
    row = method_differences(records, steady, scores=("auc",)).iloc[0]
    assert (row.better, row.seeds_ahead, row.seeds, row.verdict) == ("alpha", 1, 2, DEV_ONLY)
    # one draw lifts every beta point by 0.6 (beta's AUC ahead), another lowers them by 0.1: 0 is inside
    records = pd.DataFrame(ALPHA_AHEAD_IN_BOTH)
    noisy = {key: values + (np.array([0.6, -0.1, 0.0]) if key[0].startswith("beta") else 0.0)
             for key, values in draws_for(records, [0.0, 0.0, 0.0]).items()}
    row = method_differences(records, noisy, scores=("auc",)).iloc[0]
    assert row.diff_low < 0 < row.diff_high and row.verdict == NOT_RESOLVED
    with pytest.raises(ValueError, match="no interval for score"):
        method_differences(records, steady, scores=("seeds",))


def test_three_methods_give_three_pairs_and_adjacent_ones_in_markdown():
    gamma = curve("gamma", 0, 0.90, [(3.0, 0.90)]) + curve("gamma", 1, 0.90, [(3.0, 0.90)])
    records = pd.DataFrame([*ALPHA_AHEAD_IN_BOTH, *gamma])
    table = method_differences(records, draws_for(records, [0.0, 0.01]), scores=("auc",))
    assert list(zip(table.better, table.worse, table.rank_gap, strict=True)) == [
        ("gamma", "alpha", 1), ("gamma", "beta", 2), ("alpha", "beta", 1)]
    text = differences_markdown(table, adjacent_only=True)
    assert "gamma (90.00)" in text and text.count("\n| sst2") == 2 and "| 2/2 | resolved |" in text


def test_leaderboard_file_gets_the_section_only_with_intervals(tmp_path):
    """write_leaderboard(ci=True) reads per-example tables; here the draws come from a stub store of
    examples written like the runner's, so the whole path from files to the section runs."""
    rows = ALPHA_AHEAD_IN_BOTH
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "examples").mkdir()
    labels = np.array([0, 1] * 50)
    for job_id in sorted({r["job_id"] for r in rows}):
        frames = []
        for r in (r for r in rows if r["job_id"] == job_id):
            correct = int(round(r["metric"] * 100))  # the first `correct` examples right, the rest wrong
            predictions = np.where(np.arange(100) < correct, labels, 1 - labels)
            frames.append(pd.DataFrame({"job_id": job_id, "knob_label": r["knob_label"], "example": np.arange(100),
                                        "prediction": predictions, "label": labels}))
        pd.concat(frames).to_parquet(tmp_path / "examples" / f"{job_id}.parquet")
    board, path = write_leaderboard(tmp_path)
    assert "Which differences" not in path.read_text() and "differences" not in board.attrs
    board, path = write_leaderboard(tmp_path, ci=True)
    text = path.read_text()
    assert "## Which differences the intervals resolve" in text and "| sst2 | AUC | alpha" in text
    assert set(board.attrs["differences"].score) == {"auc"}  # no selection set, so no held-out pick pair


def test_a_method_with_an_extra_seed_is_compared_on_the_seeds_both_have():
    # alpha has seeds 0 and 1, beta only seed 0 (a folder still being filled): alpha's seed-1 AUC (0.4415)
    # must not enter the pair, which is seed 0 alone: 0.6225 vs 0.361
    records = pd.DataFrame(ALPHA_AHEAD_IN_BOTH[:9])
    row = method_differences(records, draws_for(records, [0.0, 0.01, -0.01]), scores=("auc",)).iloc[0]
    assert (row.better, row.worse, row.seeds, row.seeds_ahead, row.seeds_differ) == ("alpha", "beta", 1, 1, True)
    assert row.better_value == pytest.approx(0.6225) and row.difference == pytest.approx(0.6225 - 0.361)
    assert row.diff_low > 0 and row.verdict == RESOLVED
    assert "| 1/1 (shared seeds) | resolved |" in differences_markdown(method_differences(records, draws_for(
        records, [0.0]), scores=("auc",)))
    # with every seed on both sides there is no mark
    full = pd.DataFrame(ALPHA_AHEAD_IN_BOTH)
    assert not method_differences(full, draws_for(full, [0.0]), scores=("auc",)).iloc[0].seeds_differ
