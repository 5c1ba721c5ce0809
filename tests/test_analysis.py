"""Per-example analyses on hand-built results directories: bootstrap intervals, paired comparisons, difficulty tables."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from eebench.analysis import bootstrap_intervals, compare_points, difficulty_table
from eebench.store import ResultsStore

from conftest import make_record


def _store(tmp_path, correct: np.ndarray, difficulty: np.ndarray | None = None):
    n = len(correct)
    labels = np.arange(n) % 2
    predictions = np.where(correct, labels, 1 - labels)
    examples = pd.DataFrame({"job_id": "j", "knob_label": "t=0.1", "example": np.arange(n), "exit_layer": 3,
                             "prediction": predictions, "label": labels, "n_tokens": 10,
                             "difficulty": difficulty if difficulty is not None else -1})
    ResultsStore(tmp_path).commit("j", [make_record(job_id="j", metric=float(correct.mean()))], examples)
    return predictions, labels


def test_bootstrap_interval_is_the_seeded_percentile_bootstrap(tmp_path):
    correct = np.arange(100) % 5 != 0  # 80 % accuracy
    predictions, labels = _store(tmp_path, correct)
    table = bootstrap_intervals(tmp_path, n_resamples=500, seed=3)
    row = table.iloc[0]
    assert row.metric == pytest.approx(0.8)
    resamples = np.random.default_rng(3).integers(0, 100, size=(500, 100))
    expected = np.quantile((predictions[resamples] == labels[resamples]).mean(axis=1), [0.025, 0.975])
    assert (row.ci_low, row.ci_high) == pytest.approx(tuple(expected))
    assert 0.70 < row.ci_low < 0.8 < row.ci_high < 0.9  # about +-1.96 * sqrt(0.8 * 0.2 / 100)
    pd.testing.assert_frame_equal(table, bootstrap_intervals(tmp_path, n_resamples=500, seed=3))
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_intervals(tmp_path, confidence=95)


def test_difficulty_table_counts_per_level(tmp_path):
    correct = np.array([True, True, False, True])
    _store(tmp_path, correct, difficulty=np.array([0, 0, 1, 1]))
    table = difficulty_table(tmp_path)
    assert table[["acc@0", "acc@1"]].iloc[0].tolist() == [1.0, 0.5]
    assert table[["exit@0", "exit@1"]].iloc[0].tolist() == [3.0, 3.0]


def test_paired_difference_from_the_full_model_resolves_what_overlapping_intervals_do_not(tmp_path):
    """A point wrong on 10 of the full model's 80 right answers: its own interval overlaps the full model's,
    but the paired interval of the difference (same resamples) excludes 0."""
    n = 100
    labels = np.arange(n) % 2
    full_correct = np.arange(n) % 5 != 0
    point_correct = full_correct.copy()
    point_correct[np.flatnonzero(full_correct)[:10]] = False
    rows = [pd.DataFrame({"job_id": "j", "knob_label": knob, "example": np.arange(n), "exit_layer": 3,
                          "prediction": np.where(correct, labels, 1 - labels), "label": labels, "n_tokens": 10,
                          "difficulty": -1})
            for knob, correct in (("full model", full_correct), ("t=0.1", point_correct))]
    ResultsStore(tmp_path).commit("j", [make_record(job_id="j", metric=0.8)], pd.concat(rows))
    table = bootstrap_intervals(tmp_path, n_resamples=500, seed=3).set_index("knob_label")
    point, full = table.loc["t=0.1"], table.loc["full model"]
    assert point.metric == pytest.approx(0.70) and full.metric == pytest.approx(0.80)
    assert point.ci_high > full.ci_low  # the marginal intervals overlap ...
    resamples = np.random.default_rng(3).integers(0, n, size=(500, n))
    expected = np.quantile(point_correct[resamples].mean(1) - full_correct[resamples].mean(1), [0.025, 0.975])
    assert (point.diff_low, point.diff_high) == pytest.approx(tuple(expected))
    assert point.diff_high < 0  # ... the paired difference does not
    assert (full.diff_low, full.diff_high) == (0.0, 0.0)


def _job(folder, method: str, points: dict[str, tuple[float, np.ndarray]], n: int = 100):
    """One job of `method` in `folder`: per knob label (saved-layer speed-up, per-example correctness)."""
    labels = np.arange(n) % 2
    records = [make_record(method=method, is_full_model=True, metric=1.0, timed_saved_layer_speedup=1.0)]
    rows = [pd.DataFrame({"job_id": method, "knob_label": "full model", "example": np.arange(n), "exit_layer": 12,
                          "prediction": labels, "label": labels, "n_tokens": 10, "difficulty": -1})]
    for label, (speedup, correct) in points.items():
        records.append(make_record(method=method, speedup=speedup, metric=float(correct.mean()), knob_label=label,
                                   timed_saved_layer_speedup=speedup))
        rows.append(pd.DataFrame({"job_id": method, "knob_label": label, "example": np.arange(len(correct)),
                                  "exit_layer": 3, "prediction": np.where(correct, labels[:len(correct)],
                                                                          1 - labels[:len(correct)]),
                                  "label": labels[:len(correct)], "n_tokens": 10, "difficulty": -1}))
    ResultsStore(folder).commit(method, [{**r, "job_id": method} for r in records], pd.concat(rows))


def test_compare_points_pairs_each_point_with_the_best_rival_at_least_as_fast(tmp_path):
    """mine@2x (70 %) against calm[x]: its 1.5x point (90 %) is slower, so the rival is the 2.5x point (75 %);
    the interval is the paired bootstrap of the difference on the same resamples. mine@3x has no calm[x] point
    as fast; `calm` also matches calm[oracle], whose 4x point then answers it."""
    n = 100
    index = np.arange(n)
    mine_2x, mine_3x = index % 10 >= 3, index % 10 >= 5           # 70 %, 50 %
    rival_slow, rival_fast, oracle = index % 10 >= 1, index % 4 != 0, index % 20 != 0  # 90 %, 75 %, 95 %
    _job(tmp_path / "a", "mine", {"t=0.2": (2.0, mine_2x), "t=0.3": (3.0, mine_3x)})
    _job(tmp_path / "b", "calm[x]", {"t=0.1": (1.5, rival_slow), "t=0.25": (2.5, rival_fast)})
    _job(tmp_path / "b", "calm[oracle]", {"oracle": (4.0, oracle)})
    folders = [tmp_path / "a", tmp_path / "b"]

    table = compare_points(folders, "sst2", "mine", ["calm[x]"], n_resamples=400, seed=1)
    first, second = table.iloc[0], table.iloc[1]
    assert (first.point, first.comparator, first.comparator_speedup) == ("t=0.2", "calm[x] t=0.25", 2.5)
    resamples = np.random.default_rng(1).integers(0, n, size=(400, n))
    expected = np.quantile(mine_2x[resamples].mean(1) - rival_fast[resamples].mean(1), [0.025, 0.975])
    assert (first.diff_low, first.diff_high) == pytest.approx(tuple(expected))
    assert first.difference == pytest.approx(-0.05)
    assert first.verdict == "not resolved" and expected[0] < 0 < expected[1]  # 5 points on 100 examples: noise
    assert second.verdict == "no comparator at least as fast" and pd.isna(second.comparator)

    with_oracle = compare_points(folders, "sst2", "mine", ["calm"], n_resamples=400, seed=1)
    assert with_oracle.iloc[1].comparator == "calm[oracle] oracle"
    assert with_oracle.iloc[1].verdict == "worse, resolved"  # 50 % vs 95 % on the same 100 examples

    with pytest.raises(ValueError, match=r"no operating point of deebert on task 'sst2'.*calm\[oracle\], calm\[x\], mine"):
        compare_points(folders, "sst2", "mine", ["deebert"])
    assert compare_points([*folders, tmp_path / "a"], "sst2", "mine", ["calm[x]"], n_resamples=400,
                          seed=1).equals(table)  # a folder named twice counts once
    shutil.copytree(tmp_path / "a", tmp_path / "a-copy")
    with pytest.raises(ValueError, match=r"job mine is in more than one of the folders .*a-copy.*Fix: pass each"):
        compare_points([*folders, tmp_path / "a-copy"], "sst2", "mine", ["calm[x]"])
    _job(tmp_path / "c", "short", {"t=0.9": (9.0, index[:50] % 2 == 0)}, n=50)
    with pytest.raises(ValueError, match="scored different sst2 examples"):
        compare_points([tmp_path / "a", tmp_path / "c"], "sst2", "mine", ["short"])


def test_compare_command_prints_the_paired_table(tmp_path, capsys):
    from eebench.cli import main

    index = np.arange(100)
    _job(tmp_path / "a", "mine", {"t=0.2": (2.0, index % 10 >= 3)})
    _job(tmp_path / "b", "calm[x]", {"t=0.25": (2.5, index % 4 != 0)})
    assert main(["compare", "--results", str(tmp_path / "a"), str(tmp_path / "b"), "--task", "sst2",
                 "--method", "mine", "--against", "calm"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].startswith("| mine | t=0.2 | 2.00x | 70.00 | calm[x] t=0.25 | 2.50x | 75.00 | -5.00 (")
    assert table[2].endswith("| not resolved |")


def test_compare_takes_any_timed_batch_size_and_names_the_ones_there(tmp_path, capsys):
    """Classification suites time batch sizes 1 and 32: `--speedup wallclock_bs<N>` accepts any N the jobs
    timed, and an N they did not time is refused with the ones they did."""
    from eebench.cli import main

    index = np.arange(100)
    _job(tmp_path / "a", "mine", {"t=0.2": (2.0, index % 10 >= 3)})
    _job(tmp_path / "b", "rival", {"t=0.25": (2.5, index % 4 != 0)})
    common = ["compare", "--results", str(tmp_path / "a"), str(tmp_path / "b"), "--task", "sst2", "--method", "mine",
              "--against", "rival", "--speedup"]
    assert main([*common, "wallclock_bs1"]) == 0
    assert "| mine | t=0.2 | 2.00x |" in capsys.readouterr().out
    assert main([*common, "wallclock_bs32"]) != 0
    assert "'wallclock_bs32'; choose from saved_layer_speedup, flops_speedup, wallclock_bs1 (wall-clock" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "wallclock"])
    assert "wallclock_bs<N>" in capsys.readouterr().err
