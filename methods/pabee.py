"""PABEE, "BERT Loses Patience" (Zhou et al., NeurIPS 2020): exit when the prediction stops changing.

Spec: ../shared/docs/methods/pabee.md. One linear classifier per layer on ONE shared pooler (the
pre-trained one, fine-tuned); the classifier at layer L is the final classifier. Joint training: every layer
computed, loss = sum_j j * L_j / sum_j j (weights = 1-based layer index). Inference with patience t: a
counter of "same prediction as the previous layer" events, reset on a change; exit when it reaches t, so
the earliest exit is layer t + 1. Regression (STS-B): "same" means |z_i - z_{i-1}| < tau_reg.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eebench.methods.exits import ExitHead, MultiExitModel, RuleState, exit_loss
from eebench.methods.protocol import Batch, ExitOutput, Knob, Trainer


@dataclass
class PABEEConfig:
    # The code default 0 never fires (strict <); the HF README suggests 0.1 for STS-B's 0-5 scale.
    regression_threshold: float = 0.1
    max_patience: int | None = None   # default: L - 1, the largest patience that can still exit


class PatienceRule:
    """Per-example patience counter (the released code couples it across the batch; we do not)."""

    def __init__(self, patience: int, regression_threshold: float | None):
        self.patience = patience
        self.regression_threshold = regression_threshold  # None for classification

    def start(self, batch_size: int, device: torch.device) -> RuleState:
        return {"counter": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def decide(self, layer: int, logits: torch.Tensor, state: RuleState,
               pooled: torch.Tensor | None = None) -> tuple[torch.Tensor, RuleState]:
        current = logits[:, 0] if self.regression_threshold is not None else logits.argmax(-1)
        if "previous" not in state:  # layer 1 has nothing to agree with
            same = torch.zeros_like(state["counter"], dtype=torch.bool)
        elif self.regression_threshold is not None:
            same = (current - state["previous"]).abs() < self.regression_threshold
        else:
            same = current == state["previous"]
        counter = torch.where(same, state["counter"] + 1, torch.zeros_like(state["counter"]))
        return counter >= self.patience, {"counter": counter, "previous": current}

    def decide_row(self, layer: int, logits: list[float], state: dict, pooled=None) -> bool:
        """`decide` for one example on Python floats (argmax: the first maximum, as torch's)."""
        current = logits[0] if self.regression_threshold is not None else logits.index(max(logits))
        previous = state.get("previous")
        if previous is None:
            same = False
        elif self.regression_threshold is not None:
            same = abs(current - previous) < self.regression_threshold
        else:
            same = current == previous
        state["counter"] = state.get("counter", 0) + 1 if same else 0
        state["previous"] = current
        return state["counter"] >= self.patience


def layer_weighted_loss(model: MultiExitModel, batch: Batch, kind: str) -> torch.Tensor:
    """sum_j j * loss_j / sum_j j over every exit j = 1..L (also ConsistentEE's stage 1)."""
    losses = torch.stack([exit_loss(z, batch["labels"], kind) for z in model.all_exit_logits(batch)])
    weights = torch.arange(1, len(losses) + 1, dtype=losses.dtype, device=losses.device)
    return (weights * losses).sum() / weights.sum()


class PABEE:
    """Patience-based early exit: linear exits on a shared pooler, layer-index-weighted joint loss."""

    name = "pabee"
    granularity = "layer"
    task_kinds = frozenset({"classification", "regression"})
    knob_names = ("patience",)

    def __init__(self, **overrides):
        self.config = PABEEConfig(**overrides)
        self.model: MultiExitModel | None = None
        self.task_kind = "classification"

    def attach(self, backbone, task) -> MultiExitModel:
        config = backbone.model.config
        heads = [ExitHead(backbone.pooler, backbone.hidden_size, task.num_labels,
                          config.hidden_dropout_prob, config.initializer_range)
                 for _ in range(backbone.num_layers)]
        self.model = MultiExitModel(backbone, heads)
        self.task_kind = task.kind
        return self.model

    def fit(self, trainer: Trainer) -> None:
        model, kind = self.model, self.task_kind
        trainer.train(model.parameters(), lambda batch: layer_weighted_loss(model, batch, kind),
                      stage="joint: all exits, weights = layer index")

    def knobs(self, task, num_layers: int) -> list[Knob]:
        # Patience t exits at layer t + 1 at the earliest, so t = L - 1 is the full model (largest budget).
        largest = min(self.config.max_patience or num_layers - 1, num_layers - 1)
        return [{"patience": t} for t in range(largest, 0, -1)]

    def exit_rule(self, knob: Knob) -> PatienceRule | None:
        if knob["patience"] == 0:  # t = 0 is the full model in the released code
            return None
        threshold = self.config.regression_threshold if self.task_kind == "regression" else None
        return PatienceRule(int(knob["patience"]), threshold)

    def predict(self, batch: Batch, knob: Knob | None) -> ExitOutput:
        rule = None if knob is None else self.exit_rule(knob)
        return self.model.full(batch) if rule is None else self.model.early_exit(batch, rule)

    def training_signature(self) -> dict:
        return {"recipe": "pabee-joint-layer-weighted"}
