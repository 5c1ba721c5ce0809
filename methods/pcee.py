"""PCEE-BERT (Zhang et al., Findings of NAACL 2022): exit after t consecutive CONFIDENT layers.

Spec: ../shared/docs/methods/pcee.md. The network and its training are PABEE's, unchanged (shared pooler,
linear exits, sum_j j * L_j / sum_j j), so PCEE reuses PABEE's `attach`/`fit` and declares the same
training signature: on the same job settings the runner trains that network once and both methods load it.
Only the exit rule is PCEE's own: normalised entropy H(softmax(z_i)) / ln C < tau makes layer i confident;
a counter of consecutive confident layers starts at layer 1 (so the earliest exit is layer t, not t + 1
as in PABEE) and the predicted class may change inside the streak. The output is the exiting layer's
logits (`do_ensemble = 0`, as in the released inference script).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from eebench.methods.exits import RuleState, entropy, entropy_row
from eebench.methods.pabee import PABEE
from eebench.methods.protocol import Batch, ExitOutput, Knob


@dataclass
class PCEEConfig:
    patience_grid: tuple[int, ...] = (1, 2, 3)                       # the release script uses t = 2
    # Normalised entropy in (0, 1]: the release sweeps k/18 up to 0.5, its commented-out grids reach 1.0;
    # 1.0 makes almost every layer confident, so the curve spans the whole speed-up range.
    threshold_grid: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


class ConfidenceStreakRule:
    """Exit when the last t layers (counting from layer 1) all had normalised entropy < tau."""

    def __init__(self, patience: int, threshold: float, num_labels: int):
        self.patience, self.threshold, self.log_classes = patience, threshold, math.log(num_labels)

    def start(self, batch_size: int, device: torch.device) -> RuleState:
        return {"streak": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def decide(self, layer: int, logits: torch.Tensor, state: RuleState,
               pooled: torch.Tensor | None = None) -> tuple[torch.Tensor, RuleState]:
        confident = entropy(logits) / self.log_classes < self.threshold
        streak = torch.where(confident, state["streak"] + 1, torch.zeros_like(state["streak"]))
        return streak >= self.patience, {"streak": streak}

    def decide_row(self, layer: int, logits: list[float], state: dict, pooled=None) -> bool:
        """`decide` for one example on Python floats."""
        confident = entropy_row(logits) / self.log_classes < self.threshold
        state["streak"] = state.get("streak", 0) + 1 if confident else 0
        return state["streak"] >= self.patience


class PCEE(PABEE):
    """Patient and confident early exit: t consecutive layers with normalised entropy below tau (PABEE's network)."""

    name = "pcee"
    task_kinds = frozenset({"classification"})  # entropy needs C >= 2; the release has no regression path
    knob_names = ("patience", "threshold")

    def __init__(self, **overrides):
        super().__init__()  # PABEE's modules and training, with its default (training-irrelevant) settings
        self.config = PCEEConfig(**overrides)
        self.num_labels = 2

    def attach(self, backbone, task):
        self.num_labels = task.num_labels
        return super().attach(backbone, task)

    def knobs(self, task, num_layers: int) -> list[Knob]:
        # tau = 0 is never confident (strict <): the full model, the largest budget, comes first.
        first = {"patience": max(self.config.patience_grid), "threshold": 0.0}
        return [first] + [{"patience": t, "threshold": tau}
                          for t in self.config.patience_grid for tau in self.config.threshold_grid]

    def exit_rule(self, knob: Knob) -> ConfidenceStreakRule:
        return ConfidenceStreakRule(int(knob["patience"]), float(knob["threshold"]), self.num_labels)

    def predict(self, batch: Batch, knob: Knob | None) -> ExitOutput:
        if knob is None:
            return self.model.full(batch)
        return self.model.early_exit(batch, self.exit_rule(knob))

    # training_signature() is inherited on purpose: PCEE trains exactly PABEE's network.
