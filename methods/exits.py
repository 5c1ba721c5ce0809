"""Shared mechanics of layer-wise early exit: exit heads, layer-by-layer stepping, per-example exits.

A layer-wise method supplies only (a) its heads and (b) an `ExitRule`; `MultiExitModel.early_exit` does the
stepping. Examples that exit leave the batch (their rows are dropped from the hidden states), so a batch
costs what its examples cost, and no example's exit depends on the others in its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from eebench.methods.protocol import Batch, ExitOutput

RuleState = dict[str, torch.Tensor]
"""Per-example state of an exit rule; every tensor has the active batch as its first dimension."""


class ExitRule(Protocol):
    """Decides, after each layer's exit head, which of the still-running examples stop."""

    def start(self, batch_size: int, device: torch.device) -> RuleState:
        ...

    def decide(self, layer: int, logits: torch.Tensor | None, state: RuleState,
               pooled: torch.Tensor | None = None) -> tuple[torch.Tensor, RuleState]:
        """layer: 1..L-1; logits (b, C) and the head's pooled vector (b, d) of the b running examples
        -> (exit mask (b,) bool, new state). Most rules read only the logits. A rule that reads only
        `pooled` sets the class attribute ``reads_logits = False``; early exit then passes logits=None and
        runs the classifier only for the rows that exit (the trace still records every layer's logits)."""
        ...


class StatelessRule:
    """An exit rule that looks only at the current layer's logits: `should_exit(layer, logits) -> (b,) bool`."""

    def __init__(self, should_exit: Callable[[int, torch.Tensor], torch.Tensor]):
        self.should_exit = should_exit

    def start(self, batch_size: int, device: torch.device) -> RuleState:
        return {}

    def decide(self, layer: int, logits: torch.Tensor, state: RuleState,
               pooled: torch.Tensor | None = None) -> tuple[torch.Tensor, RuleState]:
        return self.should_exit(layer, logits), state


class ExitHead(nn.Module):
    """pooler (dense d -> d + tanh; may be shared between heads) -> dropout -> linear d -> C.

    It reads the layer's sequence summary (B, d), position 0 or the token mean: see `EncoderBackbone.summarize`.
    `signal` is an optional extra module the exit rule evaluates on the pooled vector (BERxiT's LTE); it is
    held here only so that its cost is charged to every layer whose head is evaluated.
    """

    def __init__(self, pooler: nn.Module, hidden_size: int, num_labels: int, dropout: float, init_std: float,
                 signal: nn.Module | None = None):
        super().__init__()
        self.pooler = pooler
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=init_std)
        nn.init.zeros_(self.classifier.bias)
        self.signal = signal

    def pool(self, summary: torch.Tensor) -> torch.Tensor:
        """summary (B, d) -> pooled (B, d), after dropout (active in training only)."""
        return self.dropout(self.pooler(summary))

    def forward(self, summary: torch.Tensor) -> torch.Tensor:
        """summary (B, d) -> logits (B, C)."""
        return self.classifier(self.pool(summary))

    def macs(self) -> int:
        """Multiply-accumulates of one evaluation for one example (pooler d^2 + classifier d*C [+ signal], as in
        the shared FLOPs convention; biases and tanh excluded)."""
        return sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))


def center_regression_heads(model: nn.Module, target_mean: float) -> int:
    """Start every one-output `ExitHead` of `model` at the mean training target; returns how many it set.

    Why: a zero bias makes a 0-5 regression (STS-B) spend its first hundreds of steps moving every head's
    output to the mean score through the pooled weights, and at BERT-recipe learning rates it never gets
    past that (MiniLM, PABEE, 2,000 STS-B pairs, 2 epochs: Spearman 0.09 from bias 0, 0.78 from bias 2.7,
    about the mean). HF's regression head starts at zero; ours does not: a recorded deviation, shared by
    every method."""
    heads = [m for m in model.modules() if isinstance(m, ExitHead) and m.classifier.out_features == 1]
    with torch.no_grad():
        for head in heads:
            head.classifier.bias.fill_(float(target_mean))
    return len(heads)


@dataclass
class LayerTrace:
    """Every exit head's output after every layer for one batch, from one full pass (eval mode).

    logits: L tensors (B, C); pooled: L tensors (B, d), the heads' pooled vectors (what rules like BERxiT's
    LTE or ConsistentEE's policy read). A rule whose decisions depend only on these replays exactly."""

    logits: list[torch.Tensor]
    pooled: list[torch.Tensor]


class MultiExitModel(nn.Module):
    """A backbone with one exit head per layer; `heads[L-1]` is the model's final classifier."""

    def __init__(self, backbone: nn.Module, heads: Sequence[ExitHead], extras: dict[str, nn.Module] | None = None):
        super().__init__()
        if len(heads) != backbone.num_layers:
            raise ValueError(f"need one head per layer ({backbone.num_layers}), got {len(heads)}")
        self.backbone = backbone
        self.heads = nn.ModuleList(heads)
        self.extras = nn.ModuleDict(extras or {})  # a method's other modules, saved and moved with the model
        head_macs = torch.tensor([float(h.macs()) for h in heads], dtype=torch.float64)
        # cumulative_head_macs[i-1] = MACs of heads 1..i, what an example exiting at layer i paid in heads.
        self.register_buffer("cumulative_head_macs", head_macs.cumsum(0), persistent=False)

    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers

    def _embed(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backbone.embed(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))

    def head(self, layer: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) of the exit head after `layer` (1..L), from that layer's hidden states (B, S, d)."""
        return self.heads[layer - 1](self.backbone.summarize(hidden, attention_mask))

    def layer_summaries(self, batch: Batch, layers: Sequence[int] | None = None,
                        backbone_grad: bool = True) -> list[torch.Tensor]:
        """Sequence summaries (B, d) after `layers` (default: all 1..L), running every layer once (training).

        backbone_grad=False runs the backbone without autograd (its weights are frozen in that stage, so
        the gradients w.r.t. the heads are the same and the backward pass through the layers is saved)."""
        wanted = set(range(1, self.num_layers + 1) if layers is None else layers)
        with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
            hidden, bias = self._embed(batch)
        weights = self.backbone.summary_weights(batch["attention_mask"], hidden.dtype)
        outputs = []
        for layer in range(1, max(wanted) + 1):
            with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
                hidden = self.backbone.layer(layer, hidden, bias)
            if layer in wanted:
                outputs.append(self.backbone.summarize_weighted(hidden, weights))
        return outputs

    def all_exit_logits(self, batch: Batch, layers: Sequence[int] | None = None,
                        backbone_grad: bool = True) -> list[torch.Tensor]:
        """Logits (B, C) of the heads at `layers` (default: all 1..L); see `layer_summaries`."""
        layers = list(range(1, self.num_layers + 1) if layers is None else layers)
        summaries = self.layer_summaries(batch, layers, backbone_grad)
        return [self.heads[layer - 1](summary) for layer, summary in zip(layers, summaries, strict=True)]

    def full(self, batch: Batch) -> ExitOutput:
        """The full model: all L layers and the final classifier only."""
        hidden, bias = self._embed(batch)
        for layer in range(1, self.num_layers + 1):
            hidden = self.backbone.layer(layer, hidden, bias)
        logits = self.head(self.num_layers, hidden, batch["attention_mask"])
        size = logits.shape[0]
        final_head = self.cumulative_head_macs[-1] - (self.cumulative_head_macs[-2] if self.num_layers > 1 else 0)
        return ExitOutput(logits=logits,
                          exit_layer=torch.full((size,), self.num_layers, dtype=torch.long, device=logits.device),
                          head_macs=final_head.expand(size).clone())

    def early_exit(self, batch: Batch, rule: ExitRule) -> ExitOutput:
        """Per-example early exit: after layer i every running example's head i is evaluated and the rule
        decides; exited rows leave the batch. The last layer's head answers for whoever is left.

        What a layer costs beyond the layer itself is kept small, because at batch size 1 on a CPU each tiny
        op costs about as much as a few thousand MACs: the summary weights are computed once per batch; a
        rule with `reads_logits = False` (it reads the pooled vector only) gets no per-layer classifier, which
        then runs only for the rows that exit; and when rows leave, trailing columns that are padding for
        every remaining row are cut, so the survivors stop paying for a long example that already left."""
        hidden, bias = self._embed(batch)
        mask = batch["attention_mask"]
        weights = self.backbone.summary_weights(mask, hidden.dtype)
        size, device = hidden.shape[0], hidden.device
        last = self.num_layers
        reads_logits = getattr(rule, "reads_logits", True)
        active = torch.arange(size, device=device)
        exit_layer = torch.full((size,), last, dtype=torch.long, device=device)
        logits_out: torch.Tensor | None = None
        state = rule.start(size, device)
        for layer in range(1, last + 1):
            hidden = self.backbone.layer(layer, hidden, bias)
            head = self.heads[layer - 1]
            pooled = head.pool(self.backbone.summarize_weighted(hidden, weights))
            if layer == last:
                logits = head.classifier(pooled)
                if logits_out is None:  # nobody exited before the last layer: the batch never shrank
                    logits_out = logits
                else:
                    logits_out[active] = logits
                break
            logits = head.classifier(pooled) if reads_logits else None
            exit_now, state = rule.decide(layer, logits, state, pooled)
            if bool(exit_now.any()):  # the one host sync per layer that an exit decision needs
                done = active[exit_now]
                exiting = logits[exit_now] if logits is not None else head.classifier(pooled[exit_now])
                if logits_out is None:
                    logits_out = exiting.new_empty(size, exiting.shape[-1])
                logits_out[done] = exiting
                exit_layer[done] = layer
                keep = ~exit_now
                if not bool(keep.any()):
                    break
                hidden, bias, mask, active = hidden[keep], bias[keep], mask[keep], active[keep]
                state = {key: value[keep] for key, value in state.items()}
                hidden, bias, mask = _cut_trailing_padding(hidden, bias, mask)
                weights = self.backbone.summary_weights(mask, hidden.dtype)
        assert logits_out is not None
        return ExitOutput(logits=logits_out, exit_layer=exit_layer,
                          head_macs=self.cumulative_head_macs.to(device)[exit_layer - 1])

    def trace(self, batch: Batch) -> LayerTrace:
        """One full pass recording every head (the whole curve's raw material; see `replay`)."""
        hidden, bias = self._embed(batch)
        weights = self.backbone.summary_weights(batch["attention_mask"], hidden.dtype)
        logits, pooled = [], []
        for layer in range(1, self.num_layers + 1):
            hidden = self.backbone.layer(layer, hidden, bias)
            head = self.heads[layer - 1]
            pooled.append(head.pool(self.backbone.summarize_weighted(hidden, weights)))
            logits.append(head.classifier(pooled[-1]))
        return LayerTrace(logits, pooled)

    def replay(self, trace: LayerTrace, rule: ExitRule | None) -> ExitOutput:
        """What `early_exit(batch, rule)` returns, computed from a trace without running any layer; rule None
        gives `full(batch)`. Rules see every row at every layer (decisions are per example, so rows that
        already exited do not change anyone else's) and the first exit of each row counts."""
        last = self.num_layers
        size, device = trace.logits[0].shape[0], trace.logits[0].device
        exit_layer = torch.full((size,), last, dtype=torch.long, device=device)
        if rule is None:
            final_head = self.cumulative_head_macs[-1] - (self.cumulative_head_macs[-2] if last > 1 else 0)
            return ExitOutput(logits=trace.logits[-1], exit_layer=exit_layer, head_macs=final_head.expand(size).clone())
        logits_out = trace.logits[-1].clone()
        done = torch.zeros(size, dtype=torch.bool, device=device)
        state = rule.start(size, device)
        for layer in range(1, last):
            exit_now, state = rule.decide(layer, trace.logits[layer - 1], state, trace.pooled[layer - 1])
            newly = exit_now & ~done
            logits_out[newly] = trace.logits[layer - 1][newly]
            exit_layer[newly] = layer
            done |= exit_now
        return ExitOutput(logits=logits_out, exit_layer=exit_layer,
                          head_macs=self.cumulative_head_macs.to(device)[exit_layer - 1])


def _cut_trailing_padding(hidden: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop the trailing sequence columns that are padding for every row (right-padded batches). Exact:
    masked keys get weight exp(finfo.min) = 0 in attention, and no other position reads them."""
    length = int(mask.sum(1).max())
    if length == mask.shape[1] or bool(mask[:, length:].any()):  # nothing to cut, or not right-padded
        return hidden, bias, mask
    return hidden[:, :length], bias[..., :length], mask[:, :length]


def exit_loss(logits: torch.Tensor, labels: torch.Tensor, task_kind: str) -> torch.Tensor:
    """Cross-entropy for classification (logits (B, C), labels (B,) int), MSE for regression (logits (B, 1))."""
    if task_kind == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
    return F.cross_entropy(logits, labels)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) in nats, (B, C) -> (B,); not normalised by ln C."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)
