"""DeeBERT (Xin et al., ACL 2020): off-ramps after every layer, exit when the off-ramp is confident.

Spec: ../shared/docs/methods/deebert.md. In one paragraph: every layer i < L gets an off-ramp (its OWN
pooler, copied from the pre-trained pooler, + dropout + linear); the exit at layer L is the backbone's final
classifier. Training has two stages: (1) ordinary fine-tuning of backbone + final classifier; (2) the
backbone frozen, the off-ramps trained on the unweighted sum of their cross-entropies. At inference an
example stops at the first off-ramp whose softmax entropy (nats, not normalised) is below S.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from eebench.methods.exits import ExitHead, MultiExitModel, StatelessRule, entropy, entropy_row, exit_loss
from eebench.methods.protocol import Batch, ExitOutput, Knob, Trainer

# scripts/eval_entropy.sh of the original repository.
ENTROPY_GRID = (0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


CLIP_SCOPES = ("off_ramps", "model")


@dataclass
class DeeBERTConfig:
    entropy_grid: tuple[float, ...] = ENTROPY_GRID
    # Stage 2's gradient clipping (max norm 1.0 either way). "off_ramps" (eebench): the frozen backbone runs
    # without autograd and the norm is the off-ramps' own. "model" (run_highway_glue.py): the off-ramp loss is
    # back-propagated through the frozen backbone (never detached there) and clip_grad_norm_(model.parameters())
    # counts those backbone gradients in the norm, so the off-ramp steps are clipped harder; the backbone is
    # still not updated. Clipping model.parameters() WITHOUT the backbone gradients would change nothing.
    stage2_clip_scope: str = "off_ramps"

    def __post_init__(self):
        check_clip_scope(self.stage2_clip_scope)


def check_clip_scope(scope: str) -> None:
    """A stage-2 clip scope (DeeBERT's, and BERxiT's two_stage routine) is one of CLIP_SCOPES."""
    if scope not in CLIP_SCOPES:
        raise ValueError(f"stage2_clip_scope must be one of {CLIP_SCOPES}, not {scope!r}")


def entropy_rule(threshold: float) -> StatelessRule:
    """Exit when H(softmax(z_i)) < S. S = 0 never exits (entropy >= 0 and the test is strict)."""
    return StatelessRule(lambda layer, logits: entropy(logits) < threshold,
                         lambda layer, logits: entropy_row(logits) < threshold)


class DeeBERT:
    """Entropy-thresholded off-ramps with per-layer poolers; two-stage training (backbone, then off-ramps)."""

    name = "deebert"
    granularity = "layer"
    task_kinds = frozenset({"classification"})
    knob_names = ("entropy_threshold",)

    def __init__(self, **overrides):
        self.config = DeeBERTConfig(**overrides)
        self.model: MultiExitModel | None = None
        self.task_kind = "classification"

    def attach(self, backbone, task) -> MultiExitModel:
        config = backbone.model.config
        dropout, std = config.hidden_dropout_prob, config.initializer_range
        # Off-ramp poolers are copies of the PRE-TRAINED pooler, made before any fine-tuning (spec §2).
        offramps = [ExitHead(copy.deepcopy(backbone.pooler), backbone.hidden_size, task.num_labels, dropout, std)
                    for _ in range(backbone.num_layers - 1)]
        final = ExitHead(backbone.pooler, backbone.hidden_size, task.num_labels, dropout, std)
        self.model = MultiExitModel(backbone, [*offramps, final])
        self.task_kind = task.kind
        return self.model

    def fit(self, trainer: Trainer) -> None:
        two_stage_fit(self.model, trainer, self.task_kind, clip_scope=self.config.stage2_clip_scope)

    def knobs(self, task, num_layers: int) -> list[Knob]:
        grid = list(self.config.entropy_grid)
        # The binary grid stops at 0.7 ~ ln 2; with C classes entropy reaches ln C, so extend the sweep.
        max_entropy = math.log(task.num_labels)
        grid += [round(0.8 + 0.1 * k, 2) for k in range(int((max_entropy - 0.8) / 0.1) + 1) if 0.8 + 0.1 * k < max_entropy]
        return [{"entropy_threshold": s} for s in sorted(set(grid))]

    def exit_rule(self, knob: Knob) -> StatelessRule:
        return entropy_rule(knob["entropy_threshold"])

    def predict(self, batch: Batch, knob: Knob | None) -> ExitOutput:
        if knob is None:
            return self.model.full(batch)
        return self.model.early_exit(batch, self.exit_rule(knob))

    def training_signature(self) -> dict:
        # The entropy grid is an exit-rule setting, not a training one. The clip scope only when it is the
        # release's: checkpoints trained before the switch existed keep their keys.
        scope = self.config.stage2_clip_scope
        return {"recipe": "deebert-two-stage", **({"stage2_clip_scope": scope} if scope != "off_ramps" else {})}


def two_stage_fit(model: MultiExitModel, trainer: Trainer, kind: str, clip_scope: str = "off_ramps") -> None:
    """DeeBERT's training (also BERxiT's 2STG routine): (1) backbone + final classifier on the final loss;
    (2) off-ramps only, on the unweighted SUM of their losses (spec pitfall 2), over the frozen backbone
    with its dropout still on; a fresh AdamW and schedule with the same epochs and lr per stage (spec section 3).
    `clip_scope`: see `DeeBERTConfig.stage2_clip_scope`."""
    last = model.num_layers
    release_clip = clip_scope == "model"

    def final_loss(batch: Batch) -> torch.Tensor:
        (logits,) = model.all_exit_logits(batch, layers=[last])
        return exit_loss(logits, batch["labels"], kind)

    def offramp_loss(batch: Batch) -> torch.Tensor:
        logits = model.all_exit_logits(batch, layers=range(1, last), backbone_grad=release_clip)
        return sum(exit_loss(z, batch["labels"], kind) for z in logits)

    trainer.train([*model.backbone.parameters(), *model.heads[-1].parameters()], final_loss,
                  stage="stage1: backbone + final classifier")
    trainer.train([p for head in model.heads[:-1] for p in head.parameters()], offramp_loss,
                  stage="stage2: off-ramps, backbone frozen", clip_params=model.parameters() if release_clip else None)
