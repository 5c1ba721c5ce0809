"""One evaluator per task kind; the runner asks `evaluator_for(spec)` and stays kind-agnostic.

An evaluator encodes a job's training data for the method's `fit` (`encode_train`), may prepare the model
before training (`before_training`), and evaluates the trained model over the method's knob grid
(`evaluate` -> records + per-example rows). `memo`: a dict the runner keeps for one `run_jobs` call, in
which an evaluator may keep outputs that depend only on the checkpoint and the prompts (the full model's
generations), so the jobs sharing a checkpoint do not recompute them. Kinds: classification / regression (`classification.py`,
encoder backbones) and generation (`generation.py`, decoder backbones).
"""

from __future__ import annotations

from typing import Protocol

import pandas as pd

from eebench.evaluation.classification import ClassificationEvaluator, is_traceable, knob_label


class Evaluator(Protocol):
    kinds: tuple[str, ...]
    backbone_kind: str  # "encoder" or "decoder": what the task needs

    def encode_train(self, examples, backbone, job, spec): ...

    def before_training(self, model, train, spec) -> None: ...

    def evaluate(self, job, spec, method, model, backbone, data, base: dict, progress: bool,
                 memo: dict | None = None) -> tuple[list[dict], pd.DataFrame]: ...


def evaluator_for(spec) -> Evaluator:
    """The evaluator of a task spec's kind."""
    if spec.kind == "generation":
        from eebench.evaluation.generation import GenerationEvaluator  # imports the decoding stack
        return GenerationEvaluator()
    if spec.kind in ClassificationEvaluator.kinds:
        return ClassificationEvaluator()
    raise ValueError(f"task '{spec.name}' has kind '{spec.kind}', which no evaluator handles "
                     "(known: classification, regression, generation)")


__all__ = ["ClassificationEvaluator", "Evaluator", "evaluator_for", "is_traceable", "knob_label"]
