"""Shared mechanics of layer-wise early exit: exit heads, layer-by-layer stepping, per-example exits.

A layer-wise method supplies only (a) its heads and (b) an `ExitRule`; `MultiExitModel.early_exit` does the
stepping. Examples that exit leave the batch (their rows are dropped from the hidden states), so a batch
costs what its examples cost, and no example's exit depends on the others in its batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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


class RowRule(ExitRule, Protocol):
    """An exit rule with a second, scalar form of the same decision for a batch of ONE example (optional).

    Why: at batch size 1 on a CPU each small tensor op costs 10-20 us inside the layer loop (measured with
    benchmarks/micro/profile_exit.py), so a rule's 5-8 ops per layer were ~2.5 % of a point that exits nowhere;
    the same arithmetic on Python floats costs ~1 us. `early_exit` uses `decide_row` whenever the batch has
    one example; both forms must agree (tests/test_exits.py checks every built-in rule against `decide`)."""

    def decide_row(self, layer: int, logits: list[float] | None, state: dict, pooled: torch.Tensor) -> bool:
        """layer 1..L-1; logits: the C logits of the one example as floats (None when `reads_logits` is
        False); state: a plain dict owned by the rule for this example (starts empty, mutate it); pooled (1, d)."""
        ...


class StatelessRule:
    """An exit rule that looks only at the current layer's logits: `should_exit(layer, logits) -> (b,) bool`,
    and optionally its scalar twin `should_exit_row(layer, logits: list[float]) -> bool` (see `RowRule`)."""

    def __init__(self, should_exit: Callable[[int, torch.Tensor], torch.Tensor],
                 should_exit_row: Callable[[int, list[float]], bool] | None = None):
        self.should_exit = should_exit
        if should_exit_row is not None:
            self.decide_row = lambda layer, logits, state, pooled: should_exit_row(layer, logits)

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
        """summary (B, d) -> pooled (B, d), after dropout (active in training only; skipped in eval, where it is
        the identity, because a module call per layer is measurable at batch size 1)."""
        pooled = self.pooler(summary)
        return self.dropout(pooled) if self.training else pooled

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
        # 0: decide after each layer's head before the next layer starts (the papers' loop). 1: decide one layer
        # late (see `early_exit`); set by `set_decision_lag`, honoured by `early_exit` AND `replay`.
        self.decision_lag = 0
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
        every remaining row are cut, so the survivors stop paying for a long example that already left.

        `decision_lag` 1 (for accelerators): the decision taken on head i is read back (an asynchronous copy of
        the exit mask) only once layer i+1 is queued, so the device never waits for the host between layers;
        the papers' loop reads every layer's decision before the next layer, a device-to-host sync per layer.
        The price: an example that exits on head i also runs layer i+1. It is charged for it (exit_layer = i+1,
        the layers executed, so FLOPs and saved layers follow), its answer is head i's, and head i+1 is never
        evaluated for it; an example deciding at layer L-1 runs layer L as it would anyway."""
        hidden, bias = self._embed(batch)
        mask = batch["attention_mask"]
        weights = self.backbone.summary_weights(mask, hidden.dtype)
        reads_logits = getattr(rule, "reads_logits", True)
        if hidden.shape[0] == 1 and hasattr(rule, "decide_row") and not self.decision_lag:
            return self._early_exit_one(hidden, bias, weights, rule, reads_logits)
        size, device = hidden.shape[0], hidden.device
        last = self.num_layers
        running = _Running(hidden, bias, mask, weights, torch.arange(size, device=device), rule.start(size, device))
        exits = _Exits(torch.full((size,), last, dtype=torch.long, device=device))
        pending: _Decision | None = None
        for layer in range(1, last + 1):
            running.hidden = self.backbone.layer(layer, running.hidden, running.bias)
            if pending is not None:  # decision_lag 1: the previous layer's decision, read now that this one is queued
                self._leave(running, exits, pending, executed=layer)
                pending = None
                if running.empty:
                    break
            head = self.heads[layer - 1]
            pooled = head.pool(self.backbone.summarize_weighted(running.hidden, running.weights))
            if layer == last:
                exits.answer(running.active, head.classifier(pooled), size)
                break
            logits = head.classifier(pooled) if reads_logits else None
            exit_now, running.state = rule.decide(layer, logits, running.state, pooled)
            pending = _Decision(layer, _HostCopy(exit_now), logits, pooled)
            if not self.decision_lag:  # the papers' loop: the one host sync per layer that a decision needs
                self._leave(running, exits, pending, executed=layer)
                pending = None
                if running.empty:
                    break
        assert exits.logits is not None
        return ExitOutput(logits=exits.logits, exit_layer=exits.exit_layer,
                          head_macs=self.cumulative_head_macs.to(device)[exits.head_layer - 1])

    def _leave(self, running: _Running, exits: _Exits, decision: _Decision, executed: int) -> None:
        """Rows that `decision` sends out leave `running`, answered by the head of `decision.layer` and charged
        `executed` layers; the survivors are compacted (and their common trailing padding cut)."""
        leaving_rows = decision.exit_mask.get()
        if not bool(leaving_rows.any()):
            return
        device = running.hidden.device
        leaving = leaving_rows.nonzero().squeeze(1).to(device, non_blocking=True)
        exiting = (decision.logits[leaving] if decision.logits is not None
                   else self.heads[decision.layer - 1].classifier(decision.pooled[leaving]))
        exits.answer(running.active[leaving], exiting, exits.exit_layer.shape[0], executed, decision.layer)
        if len(leaving) < len(leaving_rows):
            running.keep((~leaving_rows).nonzero().squeeze(1).to(device, non_blocking=True), self.backbone)
        else:
            running.active = running.active[:0]

    def _early_exit_one(self, hidden: torch.Tensor, bias: torch.Tensor, weights: torch.Tensor | None,
                        rule: RowRule, reads_logits: bool) -> ExitOutput:
        """`early_exit` for a batch of one example (hidden (1, S, d)) with the rule's scalar `decide_row`: per
        layer, the layer, the head and one host read of C floats, nothing else."""
        state: dict = {}
        last = self.num_layers
        for layer in range(1, last + 1):
            hidden = self.backbone.layer(layer, hidden, bias)
            head = self.heads[layer - 1]
            pooled = head.pool(self.backbone.summarize_weighted(hidden, weights))
            logits = head.classifier(pooled) if reads_logits or layer == last else None
            if layer == last or rule.decide_row(layer, None if logits is None else logits.tolist()[0], state, pooled):
                break
        if logits is None:  # a pooled-only rule fired: the classifier runs for the exiting example only
            logits = head.classifier(pooled)
        return ExitOutput(logits=logits, exit_layer=torch.full((1,), layer, dtype=torch.long, device=logits.device),
                          head_macs=self.cumulative_head_macs[layer - 1:layer].to(logits.device))

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
        already exited do not change anyone else's) and the first exit of each row counts. With
        `decision_lag` 1 an exit decided at layer i executes layer i+1 (see `early_exit`)."""
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
        head_macs = self.cumulative_head_macs.to(device)[exit_layer - 1]
        if self.decision_lag:
            exit_layer = (exit_layer + self.decision_lag).clamp_max(last)
        return ExitOutput(logits=logits_out, exit_layer=exit_layer, head_macs=head_macs)


class _HostCopy:
    """A device tensor's copy on the host, started without waiting: on CUDA a non-blocking copy into pinned
    memory plus an event, so that `get()` waits for the copy alone, not for the work queued after it. On the
    CPU the tensor itself."""

    def __init__(self, tensor: torch.Tensor):
        self._ready = None
        self._host = tensor
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()

    def get(self) -> torch.Tensor:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host


@dataclass
class _Running:
    """The rows of a batch still running: hidden (b, S, d), bias (b, ...) and mask (b, S), the summary weights,
    `active` (b,) their rows in the original batch, and the exit rule's state."""

    hidden: torch.Tensor
    bias: torch.Tensor
    mask: torch.Tensor
    weights: torch.Tensor | None
    active: torch.Tensor
    state: RuleState

    @property
    def empty(self) -> bool:
        return self.active.shape[0] == 0

    def keep(self, rows: torch.Tensor, backbone: nn.Module) -> None:
        """Keep only `rows` (indices into the running rows), then cut the padding that none of them needs."""
        self.hidden, self.bias, self.mask, self.active = (t.index_select(0, rows)
                                                          for t in (self.hidden, self.bias, self.mask, self.active))
        self.state = {key: value.index_select(0, rows) for key, value in self.state.items()}
        self.hidden, self.bias, self.mask = _cut_trailing_padding(self.hidden, self.bias, self.mask)
        self.weights = backbone.summary_weights(self.mask, self.hidden.dtype)


@dataclass
class _Exits:
    """What early exit answers for the whole batch: exit_layer (B,) layers executed, head_layer (B,) whose head
    answered (what the heads cost), logits (B, C), filled in as rows leave."""

    exit_layer: torch.Tensor
    head_layer: torch.Tensor = field(init=False)
    logits: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.head_layer = self.exit_layer.clone()

    def answer(self, rows: torch.Tensor, logits: torch.Tensor, size: int, executed: int | None = None,
               head_layer: int | None = None) -> None:
        """`rows` (original indices) are answered by `logits`; executed / head_layer None: the last layer's,
        which exit_layer and head_layer already hold."""
        if self.logits is None and len(rows) == size:  # everyone at once and nobody before: rows are 0..B-1
            self.logits = logits
        else:
            if self.logits is None:
                self.logits = logits.new_empty(size, logits.shape[-1])
            self.logits[rows] = logits
        if executed is not None:
            self.exit_layer[rows], self.head_layer[rows] = executed, head_layer


@dataclass
class _Decision:
    """An exit decision taken after `layer`'s head, its mask on its way to the host, and what the leavers need."""

    layer: int
    exit_mask: _HostCopy
    logits: torch.Tensor | None
    pooled: torch.Tensor


def set_decision_lag(model: nn.Module, lag: int) -> int:
    """Make every `MultiExitModel` inside `model` decide `lag` layers late (0 or 1; see
    `MultiExitModel.early_exit`). Returns how many it set: 0 means the method has no layer-wise exits."""
    if lag not in (0, 1):
        raise ValueError(f"decision lag must be 0 (decide after each layer) or 1 (one layer late), got {lag}")
    found = [module for module in model.modules() if isinstance(module, MultiExitModel)]
    for module in found:
        module.decision_lag = lag
    return len(found)


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


def entropy_row(logits: Sequence[float]) -> float:
    """`entropy` of one example's C logits as Python floats (double precision): H = log sum_j e^(z_j - m) -
    sum_j p_j (z_j - m), m = max z, which never overflows."""
    top = max(logits)
    shifted = [value - top for value in logits]
    weights = [math.exp(value) for value in shifted]
    total = sum(weights)
    return math.log(total) - sum(w * value for w, value in zip(weights, shifted, strict=True)) / total


def sigmoid_row(value: float) -> float:
    """sigmoid of a Python float without overflow for large |value|."""
    if value >= 0:
        return 1.0 / (1.0 + math.exp(-value))
    exp = math.exp(value)
    return exp / (1.0 + exp)
