"""Metrics: hand-computed small cases, agreement with sklearn/scipy on random data, and edge cases."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from eebench.metrics import (
    METRIC_DESCRIPTIONS,
    compute_metrics,
    predictions_from_logits,
    resampled_metric,
    trivial_floor,
)
from eebench.tasks import get_task, task_names


def test_hand_computed_classification():
    # preds/labels: TP=2 (idx 0,1), FP=1 (idx 2), TN=1 (idx 3), FN=0.
    preds, labels = [1, 1, 1, 0], [1, 1, 0, 0]
    m = compute_metrics(get_task("mrpc"), preds, labels)
    assert list(m) == ["f1", "accuracy"]
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))  # P=2/3, R=1 -> 0.8
    assert m["f1"] == pytest.approx(0.8)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 2 / sqrt(3*2*2*1)
    assert compute_metrics(get_task("cola"), preds, labels) == {"mcc": pytest.approx(2 / math.sqrt(12))}
    assert compute_metrics(get_task("mnli-m"), [0, 1, 2, 2], [0, 1, 1, 2]) == {"accuracy": 0.75}
    # A perfectly wrong binary predictor.
    assert compute_metrics(get_task("cola"), [1, 0], [0, 1])["mcc"] == pytest.approx(-1.0)


def test_hand_computed_regression():
    # x=[1,2,3], y=[2,4,7]: cov sum = 5, sum dx^2 = 2, sum dy^2 = 114/9 -> r = 5 / sqrt(2 * 114 / 9)
    m = compute_metrics(get_task("stsb"), [1.0, 2.0, 3.0], [2.0, 4.0, 7.0])
    assert list(m) == ["spearman", "pearson"]
    assert m["pearson"] == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert m["spearman"] == pytest.approx(1.0)
    # One swapped rank pair: rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 60 = 0.8
    assert compute_metrics(get_task("stsb"), [1, 2, 3, 4], [1, 3, 2, 4])["spearman"] == pytest.approx(0.8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_sklearn_and_scipy(seed):
    rng = np.random.default_rng(seed)
    n = 500
    p, y = rng.integers(0, 2, n), rng.integers(0, 2, n)
    assert compute_metrics(get_task("qqp"), p, y) == pytest.approx(
        {"f1": f1_score(y, p), "accuracy": accuracy_score(y, p)})
    assert compute_metrics(get_task("cola"), p, y)["mcc"] == pytest.approx(matthews_corrcoef(y, p))
    p3, y3 = rng.integers(0, 16, n), rng.integers(0, 16, n)
    assert compute_metrics(get_task("mcid"), p3, y3)["accuracy"] == pytest.approx(np.mean(p3 == y3))
    x = rng.normal(size=n)
    t = 0.5 * x + rng.normal(size=n)
    m = compute_metrics(get_task("stsb"), x, t)
    assert m["pearson"] == pytest.approx(pearsonr(x, t)[0])
    assert m["spearman"] == pytest.approx(spearmanr(x, t)[0])


def test_constant_predictions_score_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics(get_task("stsb"), [2.5] * 10, np.linspace(0, 5, 10))
        assert m == {"spearman": 0.0, "pearson": 0.0}
        assert compute_metrics(get_task("stsb"), [1.0], [3.0]) == {"spearman": 0.0, "pearson": 0.0}
        assert compute_metrics(get_task("cola"), [1] * 8, [0, 1] * 4) == {"mcc": 0.0}
        assert compute_metrics(get_task("mrpc"), [0] * 4, [0, 1, 0, 1]) == {"f1": 0.0, "accuracy": 0.5}


def test_bad_inputs():
    with pytest.raises(ValueError, match="zero examples"):
        compute_metrics(get_task("sst2"), [], [])
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        compute_metrics(get_task("sst2"), [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="0..1"):
        compute_metrics(get_task("sst2"), [0, 2], [0, 1])
    with pytest.raises(ValueError, match="predictions_from_logits"):
        compute_metrics(get_task("sst2"), np.zeros((2, 2)), [0, 1])
    with pytest.raises(ValueError, match="non-integer"):
        compute_metrics(get_task("sst2"), [0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match="finite"):
        compute_metrics(get_task("stsb"), [float("nan"), 1.0], [0.0, 1.0])


def test_predictions_from_logits():
    logits = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    assert predictions_from_logits(get_task("mnli-m"), logits).tolist() == [1, 0]
    out = predictions_from_logits(get_task("stsb"), np.array([[1.5], [2.0]]))
    assert out.shape == (2,) and out.tolist() == [1.5, 2.0]
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        predictions_from_logits(get_task("sst2"), logits)
    with pytest.raises(ValueError):
        predictions_from_logits(get_task("stsb"), logits)


def test_every_metric_is_described():
    used = {m for name in task_names() for m in get_task(name).metric_names}
    assert used <= set(METRIC_DESCRIPTIONS)
    assert all(isinstance(v, str) and "\n" not in v for v in METRIC_DESCRIPTIONS.values())


@pytest.mark.parametrize("task,metrics", [("sst2", None), ("mrpc", None), ("cola", None), ("stsb", None),
                                          ("stsb", ("pearson", "spearman"))])
def test_resampled_metric_equals_compute_metrics_row_by_row(task, metrics):
    spec = get_task(task) if metrics is None else dataclasses.replace(get_task(task), metric_names=metrics)
    rng = np.random.default_rng(3)
    n = 40
    if spec.kind == "regression":  # rounded, so that ranks have ties
        labels, predictions = rng.integers(0, 6, n).astype(float), np.round(rng.normal(2.5, 1, n), 1)
    else:
        labels, predictions = rng.integers(0, spec.num_labels, n), rng.integers(0, spec.num_labels, n)
    resamples = rng.integers(0, n, (50, n))
    resamples[0] = 7                                   # one example repeated: constant input
    resamples[1] = np.flatnonzero(labels == labels[0])[0]
    if spec.kind == "classification":
        resamples[2] = rng.choice(np.flatnonzero(predictions == 0), n)  # no predicted positives: F1's zero division
    expected = [compute_metrics(spec, predictions[r], labels[r])[spec.primary_metric] for r in resamples]
    assert resampled_metric(spec, predictions, labels, resamples) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("task, floor, prediction", [
    ("mrpc", 0.8122, "always class 1"),          # 1 = paraphrase   # binary F1: the all-positive answer, not the majority's 0
    ("sst2", 0.5092, "always class 1"),          # 1 = positive     # accuracy: the majority class (444 of 872)
    ("cola", 0.0, "always class 0"),    # MCC of any constant is 0 (ties: the first class)
    ("stsb", 0.0, "a constant prediction"),    # a constant has no rank
])
def test_trivial_floor_on_real_dev_sets(task, floor, prediction):
    from eebench.tasks import load_split

    from conftest import GLUE

    spec = get_task(task)
    labels = np.array([e.label for e in load_split(spec, "dev", GLUE).examples])
    value, what = trivial_floor(spec, labels)
    assert value == pytest.approx(floor, abs=5e-5) and what == prediction
