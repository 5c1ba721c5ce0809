"""Metrics: classification and regression (:mod:`.classification`), text generation (:mod:`.generation`).

``METRIC_DESCRIPTIONS`` merges both modules' descriptions: one place to look up what a metric name means.
"""

from __future__ import annotations

from .classification import METRIC_DESCRIPTIONS as CLASSIFICATION_METRIC_DESCRIPTIONS
from .classification import compute_metrics, predictions_from_logits, resampled_metric, trivial_floor
from .generation import (
    GENERATION_METRIC_DESCRIPTIONS,
    SKIP_BERTSCORE,
    bertscore_f1,
    generation_metrics,
    local_minilm_dir,
    rouge_l,
    token_agreement,
)

METRIC_DESCRIPTIONS: dict[str, str] = {**CLASSIFICATION_METRIC_DESCRIPTIONS, **GENERATION_METRIC_DESCRIPTIONS}

__all__ = [
    "CLASSIFICATION_METRIC_DESCRIPTIONS", "GENERATION_METRIC_DESCRIPTIONS", "METRIC_DESCRIPTIONS", "SKIP_BERTSCORE",
    "bertscore_f1", "compute_metrics", "generation_metrics", "local_minilm_dir", "predictions_from_logits",
    "resampled_metric", "rouge_l", "token_agreement", "trivial_floor",
]
