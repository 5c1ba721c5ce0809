"""Leaderboard: hand-built records with hand-computed scores (see the comments next to the numbers)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eebench.leaderboard import (
    frontier_auc,
    leaderboard,
    load_records,
    operating_points,
    per_seed_scores,
    points_markdown,
    points_table,
    split_by_config,
    to_markdown,
    write_leaderboard,
)

from conftest import curve, make_record

# alpha seed 0: 1.5x@89, 2.5x@80 -> AUC[1,3] = (0.5*.89 + 1.0*.80 + 0.5*0) / 2 = 0.6225
# alpha seed 1: 1.6x@90.5, 2.0x@85 -> AUC = (0.6*.905 + 0.4*.85) / 2 = 0.4415
# beta seed 0: 1.2x@91, 1.8x@90 -> AUC = (0.2*.91 + 0.6*.90) / 2 = 0.361
# beta seed 1: 1.3x@90.5, 1.9x@88 -> AUC = (0.3*.905 + 0.6*.88) / 2 = 0.39975
RECORDS = [
    *curve("alpha", 0, 0.90, [(1.5, 0.89), (2.5, 0.80)]),
    *curve("alpha", 1, 0.92, [(1.6, 0.905), (2.0, 0.85)]),
    *curve("beta", 0, 0.91, [(1.2, 0.91), (1.8, 0.90)]),
    *curve("beta", 1, 0.91, [(1.3, 0.905), (1.9, 0.88)]),
]


@pytest.fixture
def records() -> pd.DataFrame:
    return pd.DataFrame(RECORDS)


def write_store(tmp_path: Path, rows: list[dict]) -> Path:
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_frontier_auc_by_hand():
    assert frontier_auc([1.0, 1.5, 2.5], [0.90, 0.89, 0.80]) == pytest.approx(0.6225)
    # A dominated point (slower and worse) changes nothing; nothing reaching past 3x is integrated.
    assert frontier_auc([1.0, 1.5, 1.4, 2.5], [0.90, 0.89, 0.5, 0.80]) == pytest.approx(0.6225)
    assert frontier_auc([1.0, 4.0], [0.9, 0.7]) == pytest.approx(0.7)
    assert frontier_auc([1.0], [0.9]) == 0.0  # only the full model: nothing beyond 1.0x
    with pytest.raises(ValueError, match="a < b"):
        frontier_auc([1.0], [0.9], 3.0, 1.0)


def test_per_seed_scores_by_hand(records):
    scores = per_seed_scores(records).set_index(["method", "seed"])
    a0, a1, b0 = scores.loc[("alpha", 0)], scores.loc[("alpha", 1)], scores.loc[("beta", 0)]
    assert a0["metric_at_1.5x"] == pytest.approx(0.89)
    assert a0["metric_at_2x"] == pytest.approx(0.80)
    assert a0["best_speedup_within_1pt"] == pytest.approx(1.5)  # 0.89 >= 0.90 - 0.01
    assert a0["auc"] == pytest.approx(0.6225)
    assert a1["metric_at_2x"] == pytest.approx(0.85)  # exactly 2.0x counts
    assert a1["best_speedup_within_1pt"] == 1.0  # nothing >= 0.91: only the full model qualifies
    assert a1["auc"] == pytest.approx(0.4415)
    assert b0["best_speedup_within_1pt"] == pytest.approx(1.8)  # 0.90 is exactly on the tolerance
    assert math.isnan(b0["metric_at_2x"])


def test_leaderboard_averages_seeds(records):
    board = leaderboard(records)
    assert list(board.columns) == [
        "task", "method", "backbone", "metric_name", "seeds", "full_model_metric", "full_model_metric_std",
        "standard_finetune_metric", "floor_metric", "heldout_pick_speedup", "heldout_pick_metric",
        "heldout_pick_metric_std", "metric_at_1.5x", "metric_at_2x", "best_speedup_within_1pt",
        "best_speedup_within_1pt_of_standard", "auc", "auc_std",
    ]  # fmt: skip
    assert board["floor_metric"].isna().all() and board["standard_finetune_metric"].isna().all()  # not in these records
    assert board["heldout_pick_speedup"].isna().all()  # these records have no selection set
    assert list(board["method"]) == ["alpha", "beta"]  # AUC 0.532 > 0.380
    alpha, beta = board.iloc[0], board.iloc[1]
    assert alpha["seeds"] == 2 and alpha["metric_name"] == "accuracy"
    assert alpha["full_model_metric"] == pytest.approx(0.91)
    assert alpha["full_model_metric_std"] == pytest.approx(np.std([0.90, 0.92], ddof=1))
    assert alpha["metric_at_1.5x"] == pytest.approx((0.89 + 0.905) / 2)
    assert alpha["metric_at_2x"] == pytest.approx((0.80 + 0.85) / 2)
    assert alpha["best_speedup_within_1pt"] == pytest.approx((1.5 + 1.0) / 2)
    assert alpha["auc"] == pytest.approx((0.6225 + 0.4415) / 2)
    assert alpha["auc_std"] == pytest.approx(np.std([0.6225, 0.4415], ddof=1))
    assert beta["full_model_metric_std"] == pytest.approx(0.0)
    assert beta["metric_at_1.5x"] == pytest.approx((0.90 + 0.88) / 2)
    assert math.isnan(beta["metric_at_2x"])  # beta never reaches 2x
    assert beta["best_speedup_within_1pt"] == pytest.approx((1.8 + 1.3) / 2)
    assert beta["auc"] == pytest.approx((0.361 + 0.39975) / 2)


def test_score_missing_in_one_seed_is_nan_not_a_partial_mean():
    rows = [*curve("alpha", 0, 0.9, [(2.2, 0.8)]), *curve("alpha", 1, 0.9, [(1.7, 0.85)])]
    board = leaderboard(pd.DataFrame(rows))
    assert math.isnan(board.loc[0, "metric_at_2x"])
    assert board.loc[0, "metric_at_1.5x"] == pytest.approx(0.825)


def test_full_model_is_the_1x_point():
    # The full model's measured wall-clock ratio is 0.95 (noise); it must count as exactly 1.0x.
    rows = curve("alpha", 0, 0.90, [(1.5, 0.89), (2.5, 0.80)])
    rows[0]["wallclock_speedup"] = 0.95
    board = leaderboard(pd.DataFrame(rows), speedup="wallclock_speedup", auc_range=(0.5, 3.0), tolerance=0.0)
    # [0.5,1]: 0.90 (the full model) ; (1,1.5]: 0.89 ; (1.5,2.5]: 0.80 ; (2.5,3]: 0 -> 1.695 / 2.5
    assert board.loc[0, "auc"] == pytest.approx(0.678)
    assert board.loc[0, "best_speedup_within_1pt"] == 1.0
    assert math.isnan(board.loc[0, "auc_std"])  # one seed


def test_floor_points_never_count_and_extend_the_frontier():
    """MRPC-like: a constant all-positive answer scores F1 0.81. A method whose fastest points sit at the floor
    gets no credit for them, and its AUC beyond its fastest point is the floor, not 0."""
    rows = [*curve("floorish", 0, 0.84, [(1.5, 0.835), (2.5, 0.8139), (3.7, 0.81)], floor_metric=0.81),
            *curve("broken", 0, 0.223, [(3.7, 0.223)], floor_metric=0.81),  # HashEE's forced-full F1 22.3
            *curve("short", 0, 0.84, [(2.0, 0.84)], floor_metric=0.81)]
    board = leaderboard(pd.DataFrame(rows)).set_index("method")
    assert board.loc["floorish", "best_speedup_within_1pt"] == 1.5  # 2.5x, 3.7x are floor-level (< 1 pt above)
    assert math.isnan(board.loc["broken", "best_speedup_within_1pt"])  # even its full model is below the floor
    assert board.loc["broken", "auc"] == pytest.approx(0.81)  # a constant answer at every speed-up
    # short: 0.84 on [1, 2], the floor on (2, 3] -> (0.84 + 0.81) / 2
    assert board.loc["short", "auc"] == pytest.approx((0.84 + 0.81) / 2)
    assert board.loc["short", "floor_metric"] == 0.81
    text = to_markdown(board.reset_index())
    assert "22.30 (floor)" in text and "| floor |" in text and "never counted as within tolerance" in text and "1 pt above it" in text
    # (1, 1.5]: 0.9; (1.5, 2]: max(0.5, floor 0.6); (2, 3]: the floor -> (0.5 * 0.9 + 0.5 * 0.6 + 0.6) / 2
    assert frontier_auc(np.array([1.5, 2.0]), np.array([0.9, 0.5]), 1, 3, floor=0.6) == pytest.approx(0.675)


def test_standard_fine_tune_is_the_second_reference():
    rows = [*curve("deebert", 0, 0.90, [(1.5, 0.895)]), *curve("pabee", 0, 0.86, [(1.4, 0.855), (1.8, 0.89)]),
            *curve("pabee", 1, 0.86, [(1.4, 0.855)])]
    board = leaderboard(pd.DataFrame(rows)).set_index("method")
    assert board.loc["deebert", "standard_finetune_metric"] == 0.90
    assert math.isnan(board.loc["pabee", "standard_finetune_metric"])  # seed 1 has no standard fine-tune
    seed0 = per_seed_scores(pd.DataFrame(rows)).set_index(["method", "seed"])
    assert seed0.loc[("pabee", 0), "standard_finetune_metric"] == 0.90
    assert seed0.loc[("pabee", 0), "best_speedup_within_1pt"] == 1.8  # within 1 pt of its own 0.86
    assert seed0.loc[("pabee", 0), "best_speedup_within_1pt_of_standard"] == 1.8  # 0.89 >= 0.90 - 0.01
    assert "standard fine-tune" in to_markdown(leaderboard(pd.DataFrame(rows)))


def test_backbones_are_separate_rows():
    rows = [*curve("alpha", 0, 0.9, [(2.0, 0.9)]), *curve("alpha", 0, 0.8, [(2.0, 0.1)], backbone="bert")]
    board = leaderboard(pd.DataFrame(rows))
    assert sorted(board["backbone"]) == ["bert", "minilm"]
    assert board.set_index("backbone").loc["minilm", "metric_at_2x"] == pytest.approx(0.9)


def test_batch_size_selection_and_fallback(records):
    both = pd.concat(
        [records, records.assign(batch_size=32, wallclock_speedup=records["wallclock_speedup"] / 2)]
    )
    assert set(operating_points(both, 1)["batch_size"]) == {1}
    assert len(operating_points(both, 32)) == len(records)
    only32 = records.assign(batch_size=32)
    assert set(operating_points(only32, 1)["batch_size"]) == {32}  # requested 1 is absent -> smallest
    assert len(leaderboard(only32)) == 2
    # Wall-clock scores follow the chosen batch size: halved speed-ups at 32 lose the 2x points.
    assert not leaderboard(both, speedup="wallclock_speedup", batch_size=1)["metric_at_2x"].isna().all()
    assert leaderboard(both, speedup="wallclock_speedup", batch_size=32)["metric_at_2x"].isna().all()
    # The fallback is per task: a task measured only at 32 is not dropped because another has 1.
    other = only32.assign(task="mrpc")
    assert set(leaderboard(pd.concat([records, other]))["task"]) == {"sst2", "mrpc"}


def test_operating_points_sorted_and_rerun_wins(records):
    rerun = make_record(method="alpha", seed=0, speedup=1.5, knob_label="t=0.1", metric=0.5)
    pts = operating_points(pd.concat([records, pd.DataFrame([rerun])], ignore_index=True))
    alpha0 = pts[(pts["method"] == "alpha") & (pts["seed"] == 0)]
    assert list(alpha0["saved_layer_speedup"]) == [1.0, 1.5, 2.5]
    assert alpha0.loc[alpha0["knob_label"] == "t=0.1", "metric"].item() == 0.5
    assert "config" not in pts.columns


def test_load_records_roundtrip(tmp_path, records):
    loaded = load_records(write_store(tmp_path, RECORDS))
    assert len(loaded) == len(RECORDS)
    assert loaded.loc[1, "knob"] == {"t": 0.1}  # knob stays a dict
    pd.testing.assert_frame_equal(leaderboard(loaded), leaderboard(records))


def test_load_records_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"neither records\.jsonl nor jobs/\*\.jsonl.*eebench run --out"):
        load_records(tmp_path / "nowhere")


def test_load_records_reads_the_job_files_of_a_checkout_without_records_jsonl(tmp_path):
    """results/*/records.jsonl is not tracked in git (it is rebuilt from jobs/): a fresh clone's folder reads
    the same from its jobs/ files as the store's rebuilt file, read-only, and a bad line names its job file."""
    from eebench.store import ResultsStore

    store = ResultsStore(tmp_path)
    for job_id, rows in {"b2": RECORDS[2:], "a1": RECORDS[:2]}.items():
        store.commit(job_id, [dict(row, job_id=job_id) for row in rows])
    rebuilt = load_records(tmp_path)
    (tmp_path / "records.jsonl").unlink()
    from_jobs = load_records(tmp_path)
    pd.testing.assert_frame_equal(from_jobs, rebuilt)
    assert not (tmp_path / "records.jsonl").exists()  # reading never writes
    assert list(from_jobs["job_id"]) == ["a1"] * 2 + ["b2"] * (len(RECORDS) - 2)
    (tmp_path / "jobs" / "b2.jsonl").write_text('{"method": "alpha"\n')
    with pytest.raises(ValueError, match=r"jobs/b2\.jsonl, line 1: malformed JSON"):
        load_records(tmp_path)


def test_load_records_malformed_line_names_line(tmp_path):
    path = write_store(tmp_path, RECORDS[:2]) / "records.jsonl"
    path.write_text(path.read_text() + "\n" + '{"method": "alpha", "task"\n')  # line 3 blank, line 4 cut off
    with pytest.raises(ValueError, match=r"records\.jsonl, line 4: malformed JSON"):
        load_records(tmp_path)
    bad = dict(RECORDS[0])
    del bad["metric"]
    write_store(tmp_path, [RECORDS[0], bad])
    with pytest.raises(ValueError, match="line 2: missing field.*metric"):
        load_records(tmp_path)


def test_to_markdown_formats(records):
    text = to_markdown(leaderboard(records))
    lines = text.strip().splitlines()
    assert lines[0].startswith("| task | method |")
    assert (
        "| sst2 | alpha | minilm | accuracy | 2 | 91.00 ± 1.41 | 89.75 | 82.50 | 1.25x | 53.20 ± 12.80 |"
        in lines
    )
    assert (
        "| sst2 | beta | minilm | accuracy | 2 | 91.00 ± 0.00 | 89.00 | — | 1.55x | 38.04 ± 2.74 |" in lines
    )
    legend = text.split("\n\n", 1)[1]
    assert all(line.startswith("- ") and len(line) < 240 for line in legend.strip().splitlines())  # short lines
    assert "saved_layer_speedup" in legend and "1 pt" in legend and "1–3x" in legend and "± std over seeds" in legend
    one_seed = to_markdown(leaderboard(records[records.seed == records.seed.min()]))
    assert "one seed (no spread)" in one_seed and "± std" not in one_seed.split("\n\n", 1)[1]
    assert "| 91.0 ± 1.4 | 89.8 | 82.5 | 1.25x | 53.2 ± 12.8 |" in to_markdown(leaderboard(records), digits=1)
    custom = to_markdown(leaderboard(records, tolerance=0.02, auc_range=(1.0, 2.0), speedup="flops_speedup"))
    assert "flops_speedup" in custom and "2 pt" in custom and "1–2x" in custom


def test_write_leaderboard(tmp_path, records):
    write_store(tmp_path, RECORDS)
    board, path = write_leaderboard(tmp_path, tolerance=0.02, digits=1)
    assert path == tmp_path / "leaderboard.md"
    assert path.read_text() == (to_markdown(leaderboard(records, tolerance=0.02), digits=1)
                                + "\nCommit not recorded (4 jobs, written without one).\n")  # these records have none
    assert list(board["method"]) == ["alpha", "beta"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leaderboard.md", "records.jsonl"]  # no temp left


def test_empty_store(tmp_path):
    (tmp_path / "records.jsonl").write_text("\n")
    board, path = write_leaderboard(tmp_path)
    assert board.empty and path.read_text().startswith("| task |")


def test_held_out_pick_is_chosen_on_the_selection_set_not_on_dev():
    rows = curve("alpha", 0, 0.90, [(1.5, 0.80), (2.0, 0.895)], selection_metric=0.0)
    # held-out: the full model scores 0.90, point 1 (1.5x) 0.895 (within 1 pt), point 2 (2x) 0.85 (not).
    for row, held_out in zip(rows, [(0.90, 1.0), (0.895, 1.5), (0.85, 2.0)], strict=True):
        row["selection_metric"], row["selection_saved_layer_speedup"] = held_out
    board = leaderboard(pd.DataFrame(rows))
    pick = board.iloc[0]
    # dev would pick 2x (0.895 within 1 pt of 0.90); the held-out set picks 1.5x, whose dev metric is 0.80.
    assert (pick.heldout_pick_speedup, pick.heldout_pick_metric) == (1.5, 0.80)
    assert pick.best_speedup_within_1pt == 2.0
    assert "held-out pick" in to_markdown(board) and "| 1.50x / 80.00 |" in to_markdown(board)
    assert "held-out pick" not in to_markdown(leaderboard(pd.DataFrame(curve("beta", 0, 0.9, [(1.5, 0.9)]))))


def test_a_generation_jobs_held_out_pick_is_its_learn_then_test_choice(tmp_path):
    # calm's Learn-then-Test chose 1.5x for risk at delta 0.1 and the full model for textual at 0.1; dev alone
    # would take 2x (within 1 pt). Each record names the rules that chose it (`ltt_picks`), as the runner stores.
    rows = curve("calm", 0, 0.25, [(1.5, 0.24), (2.0, 0.248)])
    for row, picks in zip(rows, [["textual delta=0.1"], ["risk delta=0.1"], []], strict=True):
        row["ltt_picks"] = picks
    board = leaderboard(pd.DataFrame(rows))
    assert (board.iloc[0].heldout_pick_speedup, board.iloc[0].heldout_pick_metric) == (1.5, 0.24)
    assert board.iloc[0].best_speedup_within_1pt == 2.0
    text = to_markdown(board)
    assert "| 1.50x / 24.00 |" in text and "Learn-then-Test chose for `risk delta=0.1`" in text
    assert "chosen on held-out training examples" not in text  # no classification row here
    textual = leaderboard(pd.DataFrame(rows), ltt_pick="textual delta=0.1").iloc[0]
    assert (textual.heldout_pick_speedup, textual.heldout_pick_metric) == (1.0, 0.25)  # the full model
    with pytest.raises(ValueError, match=r"'risk delta=0.2' .*calibrated: risk delta=0.1, textual delta=0.1\). Fix"):
        leaderboard(pd.DataFrame(rows), ltt_pick="risk delta=0.2")
    # the CLI writes a non-default rule's table beside the default one
    from eebench.cli import main

    write_store(tmp_path, rows)
    assert main(["leaderboard", "--results", str(tmp_path), "--ltt-pick", "textual delta=0.1"]) == 0
    assert (tmp_path / "leaderboard_ltt_textual_delta0.1.md").is_file() and not (tmp_path / "leaderboard.md").exists()


def test_points_table_keeps_each_sweep_jobs_full_model_apart():
    rows = [*curve("sweep", 0, 0.90, [(1.5, 0.89)], job_id="a", method_config={"alpha": 0.1, "k": 8}),
            *curve("sweep", 0, 0.80, [(2.0, 0.70)], job_id="b", method_config={"alpha": 0.2, "k": 8})]
    for row in rows:
        row["knob_label"] = f"{row['job_id']}:{row['knob_label']}" if not row["is_full_model"] else row["knob_label"]
    table = points_table(pd.DataFrame(rows)).set_index("knob_label")
    assert table.loc["full model (alpha=0.1)", "metric"] == 0.90 and table.loc["full model (alpha=0.2)", "metric"] == 0.80
    assert len(table) == 4


def test_a_training_time_sweep_is_one_row_unless_split_by_config(tmp_path):
    """Two alphas of one method on a task: by default one row whose pick chooses among both settings' points
    (alpha 0.2's 2.0x point is within 1 pt of its full model); split, each alpha is its own row with its own
    pick, and a method with one setting keeps its name."""
    rows = [*curve("sweep", 0, 0.90, [(1.5, 0.895)], job_id="a", method_config={"alpha": 0.1, "k": 8}),
            *curve("sweep", 0, 0.90, [(2.0, 0.895)], job_id="b", method_config={"alpha": 0.2, "k": 8}),
            *curve("beta", 0, 0.91, [(1.2, 0.91)], method_config={"k": 8})]
    pooled = leaderboard(pd.DataFrame(rows)).set_index("method")
    assert list(pooled.index) == ["sweep", "beta"] and pooled.loc["sweep", "best_speedup_within_1pt"] == 2.0
    split = split_by_config(pd.DataFrame(rows))
    assert sorted(split.method.unique()) == ["beta", "sweep[alpha=0.1]", "sweep[alpha=0.2]"]
    board = leaderboard(split).set_index("method")
    assert board.loc["sweep[alpha=0.1]", "best_speedup_within_1pt"] == 1.5
    assert board.loc["sweep[alpha=0.2]", "best_speedup_within_1pt"] == 2.0
    written, path = write_leaderboard(write_store(tmp_path, rows), by_config=True, filename="by_config.md")
    assert "sweep[alpha=0.1]" in path.read_text() and len(written) == 3


def test_points_table_reports_realization_per_batch_size():
    rows = [make_record(is_full_model=True), make_record(speedup=1.5, wallclock_speedup=1.2),
            make_record(speedup=1.5, wallclock_speedup=1.35, batch_size=32),
            make_record(is_full_model=True, batch_size=32)]
    table = points_table(pd.DataFrame(rows)).set_index("knob_label")
    assert table.loc["t=0.1", "realization_bs1"] == pytest.approx(0.8)
    assert table.loc["t=0.1", "realization_bs32"] == pytest.approx(0.9)


def test_points_markdown_marks_flagged_timings_and_lists_why():
    rows = [make_record(is_full_model=True, timing_flag=""), make_record(speedup=1.0, wallclock_speedup=3.8,
            timing_flag="realization 3.80 > 1.15: faster than the saved layers allow"),
            make_record(is_full_model=True, batch_size=32, timing_flag=""),
            make_record(speedup=1.0, wallclock_speedup=1.0, batch_size=32, timing_flag="")]
    text = points_markdown(points_table(pd.DataFrame(rows)))
    row = next(line for line in text.splitlines() if "| t=0.1 |" in line)
    assert "3.80x †1" in row and "1.00x †" not in row  # only the flagged batch size is marked
    assert "- †1: sst2 / alpha / t=0.1 at batch size 1: realization 3.80 > 1.15" in text
    assert "†" not in points_markdown(points_table(pd.DataFrame(rows[2:])))


def test_leaderboard_intervals_recompute_each_score_per_draw_and_average_seeds(records):
    """Three hand-made draws: each score is recomputed per draw (the best point at >= 1.5x may change) and
    averaged over the two seeds, then the 2.5 / 97.5 percentiles of those three values are taken."""
    from eebench.leaderboard import leaderboard_intervals

    draws = {}
    for row in records.to_dict("records"):
        knob = "full model" if row["is_full_model"] else row["knob_label"]
        draws[(row["job_id"], knob)] = np.array([row["metric"], row["metric"] - 0.1, row["metric"] + 0.05])
    # alpha seed 0 draw 2: make the 2.5x point (0.80 -> 0.95) beat the 1.5x point (0.89 -> 0.94) at >= 1.5x
    draws[("alpha-sst2-0-minilm", "t=0.2")][2] = 0.95
    table = leaderboard_intervals(records, draws, confidence=0.5).set_index("method")
    # alpha metric@1.5x per draw: seed 0 {.89, .79, .95}, seed 1 {.905, .805, .955} -> means {.8975, .7975, .9525}
    expected = np.quantile([0.8975, 0.7975, 0.9525], [0.25, 0.75])
    assert table.loc["alpha", ["metric_at_1.5x_ci_low", "metric_at_1.5x_ci_high"]].tolist() == pytest.approx(expected)
    # full model: alpha means {.91, .81, .96}
    assert table.loc["alpha", "full_model_metric_ci_low"] == pytest.approx(np.quantile([0.91, 0.81, 0.96], 0.25))
    board = leaderboard(records, draws={k: v for k, v in draws.items()})
    assert "auc_ci_high" in board and "[" in to_markdown(board)
    with pytest.raises(ValueError, match="per-example"):
        leaderboard_intervals(records, {k: v for k, v in draws.items() if k[0] != "beta-sst2-1-minilm"})


def test_every_score_of_every_draw_equals_the_scores_recomputed_on_that_draws_metrics():
    """draw_seed_scores computes all draws at once; per draw it must give what per_seed_scores gives on records
    whose metrics are that draw's: floors, the standard fine-tune, held-out picks (of a point and of the full
    model) and NaN metrics included."""
    from eebench.leaderboard import CI_SCORES, draw_seed_scores

    rows = [*curve("deebert", 0, 0.90, [(1.5, 0.895), (2.6, 0.83)], floor_metric=0.81),
            *curve("pabee", 0, 0.86, [(1.4, 0.855), (1.8, 0.89), (3.5, 0.81)], floor_metric=0.81),
            *curve("pcee", 0, 0.88, [(1.2, 0.87)], floor_metric=0.81)]
    held_out = {("pabee", "t=0.2"): (0.86, 1.8), ("pabee", "full model"): (0.87, 1.0),
                ("pcee", "t=0.1"): (0.5, 1.2), ("pcee", "full model"): (0.88, 1.0)}
    for row in rows:
        label = "full model" if row["is_full_model"] else row["knob_label"]
        row["selection_metric"], row["selection_saved_layer_speedup"] = held_out.get((row["method"], label), (0.0, 1.1))
    records = pd.DataFrame(rows)
    rng = np.random.default_rng(0)
    draws = {}
    for row in rows:
        label = "full model" if row["is_full_model"] else row["knob_label"]
        draws[(row["job_id"], label)] = np.clip(row["metric"] + rng.normal(0, 0.03, 6), 0, 1)
    draws[("pabee-sst2-0-minilm", "t=0.2")][3] = np.nan  # a point whose metric is undefined in one draw
    per_draw = draw_seed_scores(records, draws).set_index(["method", "draw"])
    for draw in range(6):
        labels = records["knob_label"].where(~records["is_full_model"], "full model")
        drawn = records.assign(metric=[draws[(j, k)][draw] for j, k in zip(records.job_id, labels, strict=True)])
        expected = per_seed_scores(drawn).set_index("method")
        for method in ("deebert", "pabee", "pcee"):
            assert per_draw.loc[(method, draw), CI_SCORES].to_numpy(float) == pytest.approx(
                expected.loc[method, CI_SCORES].to_numpy(float), nan_ok=True), (method, draw)


def test_wallclock_leaderboard_counts_flagged_timings_per_row_and_says_so():
    """A flagged point (realization 3.8 for a point that saves no layer) is counted in its row of a wall-clock
    board at that batch size and named in the legend; other batch sizes and the saved-layer board carry no count."""
    flag = "realization 3.80 > 1.15: faster than the saved layers allow"
    rows = [make_record(is_full_model=True, timing_flag=""), make_record(speedup=1.0, wallclock_speedup=3.8, timing_flag=flag),
            make_record(speedup=2.0, knob={"t": 0.2}, knob_label="t=0.2", timing_flag=""),
            make_record(method="beta", is_full_model=True, timing_flag=""),
            make_record(method="beta", speedup=1.5, timing_flag=""),
            *[make_record(method=m, is_full_model=m == "alpha", batch_size=32, timing_flag="") for m in ("alpha", "beta")]]
    records = pd.DataFrame(rows)
    board = leaderboard(records, speedup="wallclock_speedup").set_index("method")
    assert board.loc["alpha", ["flagged_timings", "timed_points"]].tolist() == [1, 3]
    assert board.loc["beta", ["flagged_timings", "timed_points"]].tolist() == [0, 2]
    text = to_markdown(board.reset_index())
    assert "| flagged timings |" in text.splitlines()[0]
    assert "| 1 of 3 † |" in next(line for line in text.splitlines() if "| alpha |" in line)
    assert "| 0 of 2 |" in next(line for line in text.splitlines() if "| beta |" in line)
    assert "flagged timings: of the row's timed points" in text
    assert leaderboard(records, speedup="wallclock_speedup", batch_size=32)["flagged_timings"].eq(0).all()
    assert "flagged_timings" not in leaderboard(records) and "flagged timings" not in to_markdown(leaderboard(records))
