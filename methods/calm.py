"""CALM, "Confident Adaptive Language Modeling" (Schuster et al., NeurIPS 2022): exit a token when confident.

Spec: ../shared/docs/methods/calm.md. Every exit reads the model's OWN final norm + LM head (no per-layer
heads), so the backbone is first fine-tuned with the "anytime" loss sum_i w_i CE_i / sum_i w_i, w_i = i
(§3.1). A token exits at the first exit point i >= min_exit_layer whose confidence c_t^i reaches the decayed
threshold lambda_t (§5-§6); the layers it skips get keys/values from its exit state (§7, in the shared
`eebench.methods.decoding.decode`). Confidence measures (§4), one per job (`confidence`), all sharing one
fine-tuned checkpoint:
  softmax     top-1 minus top-2 probability of the shared head at layer i (costs an LM head per exit point);
  saturation  cos(h_t^i, h_t^i') with i' the previous exit point, raw states; never exits at the first point;
  classifier  softmax(M norm(h_t^i))[consistent], M = Linear(d, 2) shared by all layers, trained in a second stage
              on the frozen model to predict "layer i's argmax equals layer L's" (class-balanced CE per layer, §3.2).
              It reads the final-normed state (what the shared head reads), not the paper's raw h_t^i
              (`classifier_input="raw"`): raw residual norms grow with depth, so one linear map for all layers
              fitted poorly (README, fidelity notes; `benchmarks/micro/calm_classifier_input.py` measures it);
  oracle      the local-consistency oracle (§9): the first exit point whose argmax is the full model's; an upper
              bound that needs the full model to know it (its wall-clock is the full model's, by construction).
`variant="cee_baseline"` is what the ConsistentEE authors ran as "CALM" (§13): saturation between
final-normed states of consecutive layers, fixed threshold 0.975 (no decay, no calibration), K/V propagated
from the raw state. Calibration of lambda for a tolerance (Learn-then-Test, §8) is done by the runner for
any decoder method from per-prompt outputs on a held-out split (`eebench.calibration`).

Anytime fine-tuning on a CPU budget: each step computes the LM loss at the last layer and at `exits_per_step`
exit points drawn uniformly without replacement, each scaled by |E| / exits_per_step, so the expected loss
is exactly the all-exit weighted loss (an unbiased estimate; the LM head is ~9 layers' cost per exit here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eebench.methods.decoding import DecodeLimits, LayerView, RuleState, decode
from eebench.methods.protocol import Knob, PromptBatch, Trainer

DEFAULT_THRESHOLDS = {
    "softmax": (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1),
    "saturation": (0.999, 0.995, 0.99, 0.98, 0.97, 0.95, 0.9, 0.8),
    "classifier": (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3),
    "cee_baseline": (0.995, 0.99, 0.975, 0.95, 0.9),  # 0.975 is the released code's fixed value
}
MEASURES = ("softmax", "saturation", "classifier", "oracle")


@dataclass
class CALMConfig:
    confidence: str = "softmax"
    variant: str = "paper"            # "paper" or "cee_baseline" (§13)
    thresholds: tuple[float, ...] | None = None  # default: DEFAULT_THRESHOLDS of the measure, safest first
    decay: str = "paper"              # "paper": clip(0.9 l + 0.1 exp(-tau t / N)); "code" (t5x): 0.9 l + 0.1 l exp(..); "off"
    temperature: float = 4.0          # tau
    min_exit_layer: int = 1
    exit_interval: int = 1            # exit points at layers k, 2k, ... below L
    propagation: str = "calm"         # "calm", "raw" (no norm) or "copy" (exit layer's K/V)
    exits_per_step: int = 4           # anytime loss: sampled exit points per step besides the last layer
    classifier_epochs: float = 1.0
    classifier_lr: float = 1e-3
    classifier_positions: int = 256   # response positions per batch that label the classifier stage
    classifier_input: str = "normed"  # "normed" (the final norm first, as the head) or "raw" (the paper's h_t^i)


def decayed_threshold(threshold: float, step: int, max_steps: int, form: str, temperature: float) -> float:
    """lambda_t of §6 at decoding step t of at most N = max_steps."""
    if form == "off" or temperature == 0:
        return threshold
    decay = math.exp(-temperature * step / max(max_steps, 1))
    if form == "paper":
        return min(1.0, max(0.0, 0.9 * threshold + 0.1 * decay))
    if form == "code":
        return 0.9 * threshold + 0.1 * threshold * decay
    raise ValueError(f"unknown decay form '{form}': use 'paper', 'code' or 'off'")


def balanced_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE of logits (n, 2) against 0/1 labels (n,), each class weighted by the other's share of this batch."""
    positives = labels.float().mean()
    weights = torch.stack([positives, 1 - positives]).clamp_min(1e-3)  # w_neg = 1 - n_neg/n = n_pos/n
    return F.cross_entropy(logits, labels, weight=weights)


def anytime_loss(backbone, batch, exits_per_step: int, picked: list[int] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """sum_i w_i CE_i / sum_i w_i over layers 1..L of the shared head, w_i = i, estimated from a random subset
    of `exits_per_step` layers below L (`picked` fixes the subset, for tests). Training covers every layer
    below L whatever a job's exit set, so exit sets are inference choices sharing one checkpoint."""
    last = backbone.num_layers
    points = list(range(1, last))
    k = min(exits_per_step, len(points))
    if picked is None:
        picked = [points[i] for i in torch.randperm(len(points))[:k].tolist()] if k else []
    states = dict(backbone.forward_states(batch["input_ids"], batch["attention_mask"], {*picked, last}))
    targets, valid = batch["labels"][:, 1:], batch["labels"][:, 1:] != -100
    total_weight = float(last + sum(points))
    loss, stats = 0.0, {}
    for layer in [last, *picked]:
        scale = 1.0 if layer == last else len(points) / k
        logits = backbone.logits(states[layer][:, :-1][valid])
        ce = F.cross_entropy(logits.float(), targets[valid])
        loss = loss + scale * layer * ce
        if layer == last:
            stats["ce_last"] = ce.item()
    return loss / total_weight, stats


def anytime_stage(trainer: Trainer, backbone, exits_per_step: int) -> bool:
    """Anytime fine-tuning of the model's `backbone` submodule, cached under one name for every method that
    starts from it (CALM; ConsistentEE with `backbone_init="calm-anytime"`): the jobs of one task, seed and
    training settings train it once. True when restored from the cache."""
    return trainer.cached(
        "calm-anytime", {"exits_per_step": exits_per_step, "training_points": "every layer"},
        lambda: trainer.train(backbone.parameters(), lambda batch: anytime_loss(backbone, batch, exits_per_step),
                              stage="anytime: weighted per-exit LM loss, w_i = i"),
        part="backbone")


class CALMModel(nn.Module):
    """The decoder plus CALM's one extra module, the shared early-exit classifier Linear(d, 2)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.exit_classifier = nn.Linear(backbone.hidden_size, 2)

    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers

    def classify(self, hidden: torch.Tensor, reads: str) -> torch.Tensor:
        """Exit-classifier logits (..., 2) [inconsistent, consistent] from states (..., d)."""
        return self.exit_classifier(self.backbone.model.model.norm(hidden) if reads == "normed" else hidden)


class ConfidenceRule:
    """Exit when c_t^i >= lambda_t at an exit point (a `TokenExitRule`)."""

    def __init__(self, model: CALMModel, config: CALMConfig, threshold: float, exit_points: tuple[int, ...],
                 max_steps: int):
        self.model, self.config, self.threshold, self.max_steps = model, config, threshold, max_steps
        self.exit_points = exit_points
        self.measure = "cee_baseline" if config.variant == "cee_baseline" else config.confidence
        d = model.backbone.hidden_size
        norm = 2.0 * d  # an RMSNorm: sum of squares, then the scale by rms and weight
        classifier = 2.0 * d + (norm if config.classifier_input == "normed" else 0.0)
        self.extra_macs = {"softmax": 0.0, "saturation": 3.0 * d, "cee_baseline": 3.0 * d + norm,
                           "classifier": classifier}[self.measure]

    def start(self, batch_size: int, device: torch.device) -> RuleState:
        return {"previous": torch.zeros(batch_size, self.model.backbone.hidden_size, device=device),
                "previous_layer": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def decide(self, layer: int, step: int, view: LayerView, state: RuleState) -> torch.Tensor:
        hidden = view.hidden
        defined = torch.ones(len(view.rows), dtype=torch.bool, device=hidden.device)
        if layer == self.exit_points[0]:  # saturation compares states of ONE token: no previous state yet
            state["previous_layer"][view.rows] = 0
        if self.measure == "softmax":
            top2 = F.softmax(view.logits().float(), dim=-1).topk(2, dim=-1).values
            confidence = top2[:, 0] - top2[:, 1]
        elif self.measure == "classifier":
            confidence = F.softmax(self.model.classify(hidden, self.config.classifier_input).float(), dim=-1)[:, 1]
        else:  # saturation: undefined at a row's first exit point of this token (no previous state)
            current = self.model.backbone.model.model.norm(hidden) if self.measure == "cee_baseline" else hidden
            previous_layer = state["previous_layer"][view.rows]
            defined = previous_layer > 0
            confidence = F.cosine_similarity(current.float(), state["previous"][view.rows].float(), dim=-1)
            state["previous"][view.rows] = current
            state["previous_layer"][view.rows] = layer
        if self.measure == "cee_baseline":
            return (confidence > self.threshold) & defined  # strict, fixed: no decay (§13)
        lam = decayed_threshold(self.threshold, step, self.max_steps, self.config.decay, self.config.temperature)
        return (confidence >= lam) & defined


class CALM:
    """Confident adaptive LM: anytime-fine-tuned shared head, confidence >= decayed lambda, K/V propagation."""

    name = "calm"
    granularity = "token"
    task_kinds = frozenset({"generation"})
    knob_names = ("threshold",)

    def __init__(self, **overrides):
        self.config = CALMConfig(**overrides)
        if self.config.confidence not in MEASURES:
            raise ValueError(f"calm: unknown confidence '{self.config.confidence}'; choose one of {MEASURES}")
        if self.config.classifier_input not in ("normed", "raw"):
            raise ValueError(f"calm: unknown classifier_input '{self.config.classifier_input}'; choose 'normed' or 'raw'")
        if self.config.variant not in ("paper", "cee_baseline"):
            raise ValueError(f"calm: unknown variant '{self.config.variant}'; choose 'paper' or 'cee_baseline'")
        if self.config.variant == "cee_baseline":
            self.config.propagation, self.config.decay = "raw", "off"
        self.model: CALMModel | None = None

    def attach(self, backbone, task) -> CALMModel:
        self.model = CALMModel(backbone)
        return self.model

    def curve_name(self) -> str:
        """calm[softmax], calm[saturation], calm[classifier], calm[oracle] or calm[cee_baseline]."""
        return f"calm[{'cee_baseline' if self.config.variant == 'cee_baseline' else self.config.confidence}]"

    def exit_points(self) -> tuple[int, ...]:
        last, step = self.model.num_layers, self.config.exit_interval
        return tuple(i for i in range(step, last, step) if i >= self.config.min_exit_layer)

    def training_points(self) -> tuple[int, ...]:
        """Every layer below L. Training covers all of them whatever the exit set, so `exit_interval` and
        `min_exit_layer` are inference choices and every exit set shares one checkpoint (a measure whose
        check is dear, softmax with its LM head, can use a sparse set at no retraining cost)."""
        return tuple(range(1, self.model.num_layers))

    # --- training -------------------------------------------------------------------------------------------

    def anytime_loss(self, batch, picked: list[int] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        return anytime_loss(self.model.backbone, batch, self.config.exits_per_step, picked)

    def classifier_loss(self, batch) -> torch.Tensor:
        """Class-balanced CE of the shared classifier at every layer below L against 'argmax_i == argmax_L'."""
        points, last = list(self.training_points()), self.model.num_layers
        with torch.no_grad():
            states = dict(self.model.backbone.forward_states(batch["input_ids"], batch["attention_mask"], {*points, last}))
            valid = (batch["labels"][:, 1:] != -100).nonzero()
            chosen = valid[torch.randperm(len(valid))[:self.config.classifier_positions]]
            def at(layer):
                return states[layer][:, :-1][chosen[:, 0], chosen[:, 1]]
            top = self.model.backbone.logits(at(last)).argmax(-1)
        losses = []
        for layer in points:
            hidden = at(layer)
            with torch.no_grad():
                labels = (self.model.backbone.logits(hidden).argmax(-1) == top).long()
            losses.append(balanced_cross_entropy(self.model.classify(hidden, self.config.classifier_input), labels))
        return torch.stack(losses).mean()

    def fit(self, trainer: Trainer) -> None:
        model = self.model
        anytime_stage(trainer, model.backbone, self.config.exits_per_step)
        for parameter in model.backbone.parameters():
            parameter.requires_grad_(False)
        trainer.train(model.exit_classifier.parameters(), self.classifier_loss,
                      stage="exit classifier: frozen model, consistency labels",
                      epochs=self.config.classifier_epochs, lr=self.config.classifier_lr)
        for parameter in model.backbone.parameters():
            parameter.requires_grad_(True)

    def training_signature(self) -> dict:
        c = self.config
        return {"recipe": "calm-anytime+classifier", "exits_per_step": c.exits_per_step, "training_points": "every layer",
                "classifier_epochs": c.classifier_epochs,
                "classifier_lr": c.classifier_lr, "classifier_positions": c.classifier_positions,
                "classifier_input": c.classifier_input}

    # --- inference ------------------------------------------------------------------------------------------

    def knobs(self, task, num_layers: int) -> list[Knob]:
        if self.config.confidence == "oracle" and self.config.variant == "paper":
            return [{"oracle": 1.0}]
        key = "cee_baseline" if self.config.variant == "cee_baseline" else self.config.confidence
        return [{"threshold": t} for t in (self.config.thresholds or DEFAULT_THRESHOLDS[key])]

    def generate(self, batch: PromptBatch, knob: Knob | None):
        limits: DecodeLimits = batch.limits
        backbone = self.model.backbone
        if knob is None:
            return decode(backbone, batch.input_ids, batch.attention_mask, limits)
        if "oracle" in knob:
            return decode(backbone, batch.input_ids, batch.attention_mask, limits, propagation=self.config.propagation,
                          oracle_exit_points=self.exit_points())
        rule = ConfidenceRule(self.model, self.config, float(knob["threshold"]), self.exit_points(), limits.max_new_tokens)
        return decode(backbone, batch.input_ids, batch.attention_mask, limits, rule=rule,
                      propagation=self.config.propagation)
