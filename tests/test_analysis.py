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
