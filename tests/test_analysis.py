"""Per-example analyses on a hand-built results directory: bootstrap intervals and difficulty tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from eebench.analysis import bootstrap_intervals, difficulty_table
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
