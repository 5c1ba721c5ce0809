"""Classification and regression metrics, computed with scikit-learn / scipy (no hand-written formulas).

Accuracy and F1 are fractions in [0, 1]; MCC, Pearson and Spearman are correlations in [-1, 1].
Classification predictions and labels are class ids, shape (N,); regression ones are floats, shape (N,).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.stats import pearsonr, rankdata, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from ..tasks import TaskSpec

METRIC_DESCRIPTIONS: dict[str, str] = {
    "accuracy": "fraction of exact class matches, mean(pred == label); sklearn.metrics.accuracy_score",
    "f1": "F1 = 2PR/(P+R) of class 1 for binary tasks (macro average otherwise); sklearn.metrics.f1_score",
    "mcc": "Matthews correlation (TP*TN-FP*FN)/sqrt(...), in [-1, 1]; sklearn.metrics.matthews_corrcoef",
    "pearson": "Pearson linear correlation of prediction and target, in [-1, 1]; scipy.stats.pearsonr "
               "(0.0 when undefined, e.g. constant predictions)",
    "spearman": "Spearman rank correlation of prediction and target, in [-1, 1]; scipy.stats.spearmanr "
                "(0.0 when undefined, e.g. constant predictions)",
}


def _correlation(fn: Callable[..., Any], pred: np.ndarray, gold: np.ndarray) -> float:
    """scipy's pearsonr/spearmanr statistic; 0.0 where it is undefined (constant input or N < 2)."""
    if len(pred) < 2:
        return 0.0
    with warnings.catch_warnings():  # constant input: scipy warns and returns NaN
        warnings.simplefilter("ignore")
        value = float(fn(pred, gold).statistic)
    # An undefined correlation (e.g. a constant predictor) carries no signal: score it 0, not NaN.
    return 0.0 if math.isnan(value) else value


def _f1(pred: np.ndarray, gold: np.ndarray, num_labels: int) -> float:
    if num_labels == 2:
        return float(f1_score(gold, pred, average="binary", pos_label=1, zero_division=0.0))
    return float(f1_score(gold, pred, average="macro", labels=list(range(num_labels)), zero_division=0.0))


def _as_1d(values: Sequence | np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{what} must have shape (N,), got {arr.shape}; "
                         "turn logits into predictions with predictions_from_logits")
    return arr


def _class_ids(values: np.ndarray, what: str, num_labels: int) -> np.ndarray:
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)
            or values.dtype == bool):
        raise ValueError(f"{what} must be integer class ids, got dtype {values.dtype}")
    ids = values.astype(np.int64)
    if not np.array_equal(ids, values):
        raise ValueError(f"{what} must be integer class ids, got non-integer values")
    if ids.min() < 0 or ids.max() >= num_labels:
        raise ValueError(f"{what} must be class ids in 0..{num_labels - 1}, got {ids.min()}..{ids.max()}")
    return ids


def trivial_floor(spec: TaskSpec, labels: Sequence | np.ndarray) -> tuple[float, str]:
    """The task's trivial floor on these labels: the best primary metric a constant prediction reaches, and
    what that prediction is. Classification: every class tried (accuracy -> the majority class; binary F1 ->
    often all-positive, e.g. MRPC's all-"paraphrase" F1 81.2; MCC -> 0, ties to the first class). Regression: a constant has no rank,
    so its correlation is 0. An operating point at or below the floor has learned nothing a constant lacks."""
    gold = _as_1d(labels, "labels")
    if spec.kind != "classification":
        return 0.0, "a constant prediction"
    scores = {c: compute_metrics(spec, np.full(len(gold), c), gold)[spec.primary_metric] for c in range(spec.num_labels)}
    best = max(scores, key=lambda c: (scores[c], -c))
    name = spec.labels[best] if getattr(spec, "labels", None) else str(best)
    return scores[best], f"always class {best}" + ("" if name == str(best) else f" ('{name}')")


def compute_metrics(spec: TaskSpec, predictions: Sequence | np.ndarray,
                    labels: Sequence | np.ndarray) -> dict[str, float]:
    """Every metric in ``spec.metric_names``, as {name: float}.

    ``predictions`` and ``labels``: shape (N,), class ids (classification) or floats (regression).
    Raises ValueError on empty or mismatched inputs, or ids out of range.
    """
    pred, gold = _as_1d(predictions, "predictions"), _as_1d(labels, "labels")
    if len(pred) == 0:
        raise ValueError("cannot compute metrics on zero examples")
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions but {len(gold)} labels")
    if spec.kind == "classification":
        pred = _class_ids(pred, "predictions", spec.num_labels)
        gold = _class_ids(gold, "labels", spec.num_labels)
    else:
        pred, gold = pred.astype(np.float64), gold.astype(np.float64)
        if not (np.isfinite(pred).all() and np.isfinite(gold).all()):
            raise ValueError("regression predictions and labels must be finite (got NaN or inf)")

    metrics: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "accuracy": lambda p, g: float(accuracy_score(g, p)),
        "f1": lambda p, g: _f1(p, g, spec.num_labels),
        "mcc": lambda p, g: float(matthews_corrcoef(g, p)),
        "pearson": lambda p, g: _correlation(pearsonr, p, g),
        "spearman": lambda p, g: _correlation(spearmanr, p, g),
    }
    unknown = [m for m in spec.metric_names if m not in metrics]
    if unknown:
        raise ValueError(f"task '{spec.name}' asks for unknown metric(s) {unknown}; known: {sorted(metrics)}")
    return {name: metrics[name](pred, gold) for name in spec.metric_names}


def predictions_from_logits(spec: TaskSpec, logits: np.ndarray) -> np.ndarray:
    """Logits (N, C) -> class ids (N,) by argmax; regression outputs (N, 1) or (N,) -> floats (N,)."""
    arr = np.asarray(logits)
    if spec.kind == "regression":
        if not (arr.ndim == 1 or (arr.ndim == 2 and arr.shape[1] == 1)):
            raise ValueError(f"regression logits must have shape (N, 1) or (N,), got {arr.shape}")
        return arr.reshape(-1).astype(np.float64)
    if arr.ndim != 2 or arr.shape[1] != spec.num_labels:
        raise ValueError(f"task '{spec.name}' logits must have shape (N, {spec.num_labels}), got {arr.shape}")
    return arr.argmax(axis=1)


def resampled_metric(spec: TaskSpec, predictions: np.ndarray, labels: np.ndarray, resamples: np.ndarray) -> np.ndarray:
    """`spec.primary_metric` on every bootstrap resample: `resamples` (R, N) int indices into the N examples
    -> (R,). Row r equals `compute_metrics(spec, predictions[resamples[r]], labels[resamples[r]])` (tested);
    accuracy, binary F1, Pearson and Spearman are computed for all rows at once (a 1,000-draw interval of
    one STS-B point: scipy row by row took seconds), the other metrics row by row."""
    name = spec.primary_metric
    pred, gold = np.asarray(predictions)[resamples], np.asarray(labels)[resamples]
    if name == "accuracy":
        return (pred == gold).mean(1)
    if name == "f1" and spec.num_labels == 2:
        true_pos = ((pred == 1) & (gold == 1)).sum(1)
        wrong = (pred != gold).sum(1)  # false positives + false negatives
        # no true positive: F1 is 0 (sklearn's zero_division=0); the maximum only avoids dividing by 0
        return np.where(true_pos > 0, 2 * true_pos / np.maximum(2 * true_pos + wrong, 1), 0.0)
    if name in ("pearson", "spearman") and resamples.shape[1] >= 2:
        if name == "spearman":  # Spearman = Pearson of average ranks, which is how scipy defines it with ties
            pred, gold = rankdata(pred, axis=1), rankdata(gold, axis=1)
        with warnings.catch_warnings():  # a constant resample: undefined, scored 0 as in compute_metrics
            warnings.simplefilter("ignore")
            values = pearsonr(pred.astype(np.float64), gold.astype(np.float64), axis=1).statistic
        return np.nan_to_num(values, nan=0.0)
    return np.array([compute_metrics(spec, p, g)[name] for p, g in zip(pred, gold, strict=True)])
