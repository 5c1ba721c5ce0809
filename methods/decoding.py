"""Shared mechanics of token-level early exit in decoders: greedy decoding layer by layer, per sequence.

A decoder method supplies only a `TokenExitRule` (where it may exit and how confident it is); `decode` does
the rest, once for every method: prefill at full depth, then per generated token run layers 1..L for the
rows still running, ask the rule at its exit points, give exiting rows their next token from the shared
head (final norm + LM head) at that layer, fill the layers they skip with keys/values (`propagation`), and
drop them from the rest of this step. Stop tokens and stop strings end a row during decoding. What every
token cost is counted here, not by the method: layers run, LM-head evaluations, the rule's own MACs and the
propagated layers (`GenerationOutput`; FLOPs in `eebench.costs`).

The first generated token comes from the prompt's last position, which the prefill computes at full depth
anyway (every prompt position's keys/values are needed by every layer), so it counts L layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from eebench.backbones.decoder import PROPAGATIONS, DecoderBackbone, FusedKV, causal_bias

RuleState = dict[str, torch.Tensor]
"""Per-sequence state of a token exit rule; every tensor has the whole batch (B) as its first dimension."""


@dataclass(frozen=True)
class DecodeLimits:
    """max_new_tokens per sequence; a row ends at any of `stop_token_ids` (kept as its last token) or when its
    decoded text contains one of `stop_strings` (the text is cut before it)."""

    max_new_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()


ExitHeads = Callable[[int, torch.Tensor], torch.Tensor]
"""(layer, states (..., d)) -> next-token logits (..., V) of that layer's exit head; None = the model's own final
norm + LM head at every layer (CALM's shared head). ConsistentEE passes its per-layer heads."""


class LayerView:
    """What a rule may look at for the b running rows after one layer: their states, and their logits from
    the layer's exit head, computed at most once (and then counted as one LM-head evaluation per row)."""

    def __init__(self, backbone: DecoderBackbone, hidden: torch.Tensor, rows: torch.Tensor, layer: int = 0,
                 head: ExitHeads | None = None):
        self.backbone, self.hidden, self.rows = backbone, hidden, rows  # hidden (b, d); rows (b,) batch indices
        self.layer, self._head = layer, head
        self._logits: torch.Tensor | None = None

    def logits(self) -> torch.Tensor:
        """(b, V) next-token logits of these rows at this layer."""
        if self._logits is None:
            self._logits = _head_logits(self.backbone, self._head, self.layer, self.hidden)
        return self._logits

    @property
    def has_logits(self) -> bool:
        return self._logits is not None


class TokenExitRule(Protocol):
    """Per generated token: after each exit point's layer, which of the running rows stop there.

    exit_points: the layers (ascending, all < L) at which `decide` is asked.
    extra_macs: MACs per row of one `decide` beyond the LM head (a classifier's d x 2; 0 when none).
    """

    exit_points: tuple[int, ...]
    extra_macs: float

    def start(self, batch_size: int, device: torch.device) -> RuleState:
        ...

    def decide(self, layer: int, step: int, view: LayerView, state: RuleState) -> torch.Tensor:
        """(b,) bool: rows of `view` that exit at `layer` at decoding step `step` (1 = the second generated
        token; the first comes from the prefill). May update `state` in place at `view.rows`."""
        ...


class StaticExitRule:
    """Every generated token exits at one fixed layer (CALM §9's static baseline; the speed benchmarks' probe)."""

    extra_macs = 0.0

    def __init__(self, layer: int):
        self.exit_points = (layer,)

    def start(self, batch_size: int, device: torch.device) -> RuleState:
        return {}

    def decide(self, layer: int, step: int, view: LayerView, state: RuleState) -> torch.Tensor:
        return torch.ones(len(view.rows), dtype=torch.bool, device=view.hidden.device)


@dataclass
class GenerationOutput:
    """What one `generate` call produced, per row (ragged lists; T_i = tokens row i generated).

    tokens:        T_i generated ids, a stop token included.
    text:          decoded text, special tokens skipped, cut before a stop string.
    token_layers:  T_i layers run for each token, 1..L (the first token: L, from the prefill).
    head_evals:    T_i LM-head evaluations for each token (>= 1: the one that produced it; more when the rule read
                   logits at exit points it did not take).
    rule_macs:     the rule's own MACs over the row (`TokenExitRule.extra_macs` per evaluation).
    prompt_tokens: real prompt tokens of the row.
    """

    tokens: list[list[int]]
    text: list[str]
    token_layers: list[list[int]]
    head_evals: list[list[int]]
    rule_macs: list[float]
    prompt_tokens: list[int]
    num_layers: int = 0
    propagation: str = "calm"
    extras: dict[str, list] = field(default_factory=dict)


def _head_logits(backbone: DecoderBackbone, head: ExitHeads | None, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    return backbone.logits(hidden) if head is None else head(layer, hidden)


def decode(backbone: DecoderBackbone, input_ids: torch.Tensor, attention_mask: torch.Tensor, limits: DecodeLimits,
           rule: TokenExitRule | None = None, propagation: str = "calm", fused: bool = True,
           oracle_exit_points: Sequence[int] | None = None, keep_cache: bool = False,
           head: ExitHeads | None = None) -> GenerationOutput:
    """Greedy decoding of left-padded prompts input_ids / attention_mask (B, S); rule None = full depth.

    propagation: "calm" (each skipped layer's own norm + K/V + rotary from the exited state), "raw" (no
    norm) or "copy" (the exit layer's K/V); see `DecoderBackbone.propagate`. fused: CALM's propagation in
    one stacked matmul (same numbers). oracle_exit_points: CALM's local-consistency oracle instead of a
    rule: run every layer, then exit each token at the first of these layers whose argmax equals the top
    layer's (the full model's token; an upper bound on savings that needs the full model to know it).
    keep_cache: put the KV cache in `extras["cache"]` (for tests). head: per-layer exit heads (`ExitHeads`) for
    every token, the prefill's and the top layer's included; None = the model's own head."""
    if propagation not in PROPAGATIONS:
        raise ValueError(f"unknown propagation '{propagation}'; choose one of {PROPAGATIONS}")
    size, width = input_ids.shape
    device, last = input_ids.device, backbone.num_layers
    dtype = next(backbone.parameters()).dtype
    cache = backbone.new_cache(size, width + limits.max_new_tokens, device, dtype)
    cache.key_mask[:, :width] = attention_mask.bool()
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)

    hidden = backbone.embed(input_ids)
    cos, sin = backbone.rotary(hidden, positions)
    bias = causal_bias(attention_mask, cache.key_mask[:, :width], 0, dtype)
    for index in range(1, last + 1):
        hidden = backbone.layer(index, hidden, cos, sin, bias, cache, None, 0)
    next_tokens = _head_logits(backbone, head, last, hidden[:, -1]).argmax(-1)

    tokens: list[list[int]] = [[] for _ in range(size)]
    layers: list[list[int]] = [[] for _ in range(size)]
    head_evals: list[list[int]] = [[] for _ in range(size)]
    rule_evaluations = torch.zeros(size)  # decide() calls per row; x rule.extra_macs at the end
    finished = torch.zeros(size, dtype=torch.bool)
    _append(tokens, layers, head_evals, torch.arange(size), next_tokens, torch.full((size,), last), torch.ones(size))
    _check_stops(backbone, tokens, finished, limits, torch.arange(size))
    next_position = positions[:, -1] + 1
    fused_kv = FusedKV(backbone) if rule is not None and propagation == "calm" and fused else None
    state = rule.start(size, device) if rule is not None else {}
    points = set(rule.exit_points) if rule is not None else set()

    for step in range(1, limits.max_new_tokens):
        active = (~finished).nonzero().squeeze(1)
        if len(active) == 0:
            break
        column = width + step - 1
        all_rows = len(active) == size
        rows = active.to(device)
        hidden = backbone.embed(next_tokens[rows][:, None])  # (b, 1, d)
        cos, sin = backbone.rotary(hidden, next_position[rows][:, None])
        cache.key_mask[rows, column] = True
        key_mask = cache.key_mask[rows, :column + 1]
        bias = torch.zeros(key_mask.shape, dtype=dtype, device=device).masked_fill_(~key_mask, torch.finfo(dtype).min)
        bias = bias[:, None, None, :]
        step_tokens = torch.empty(size, dtype=torch.long, device=device)
        step_layers = torch.full((size,), last, dtype=torch.long)
        step_evals = torch.ones(size)
        if oracle_exit_points is not None:
            _oracle_step(backbone, hidden, cos, sin, bias, cache, rows, column, oracle_exit_points, propagation,
                         step_tokens, step_layers)
        else:
            for index in range(1, last + 1):
                hidden = backbone.layer(index, hidden, cos, sin, bias, cache, None if all_rows else rows, column)
                if index == last or index not in points:
                    continue
                view = LayerView(backbone, hidden[:, 0], rows, index, head)
                exiting = rule.decide(index, step, view, state)
                rule_evaluations[rows.cpu()] += 1
                if view.has_logits:
                    step_evals[rows.cpu()] += 1  # evaluated here; the producing evaluation is counted once below
                if not bool(exiting.any()):  # the one host sync per exit point
                    continue
                logits = view.logits()[exiting] if view.has_logits else _head_logits(backbone, head, index,
                                                                                      hidden[exiting, 0])
                if view.has_logits:
                    step_evals[rows[exiting].cpu()] -= 1
                done = rows[exiting]
                step_tokens[done] = logits.argmax(-1)
                step_layers[done.cpu()] = index
                backbone.propagate(hidden[exiting], index, cache, done, column, cos[exiting], sin[exiting],
                                   propagation, fused_kv)
                keep = ~exiting
                if not bool(keep.any()):
                    rows = rows[:0]
                    break
                hidden, cos, sin, bias, rows = hidden[keep], cos[keep], sin[keep], bias[keep], rows[keep]
                all_rows = False
            if len(rows):
                step_tokens[rows] = _head_logits(backbone, head, last, hidden[:, 0]).argmax(-1)
        next_tokens = step_tokens
        next_position = next_position + 1
        _append(tokens, layers, head_evals, active, step_tokens[active.to(device)].cpu(), step_layers[active],
                step_evals[active])
        _check_stops(backbone, tokens, finished, limits, active)
    text = [_cut_at_stop(backbone.tokenizer.decode(row, skip_special_tokens=True), limits.stop_strings) for row in tokens]
    rule_macs = (rule_evaluations * (rule.extra_macs if rule is not None else 0.0)).tolist()
    output = GenerationOutput(tokens=tokens, text=text, token_layers=layers, head_evals=head_evals, rule_macs=rule_macs,
                              prompt_tokens=attention_mask.sum(1).tolist(), num_layers=last, propagation=propagation)
    if keep_cache:  # tests compare every layer's keys/values with a no-cache reference
        output.extras["cache"] = [cache]
    return output


def _oracle_step(backbone: DecoderBackbone, hidden, cos, sin, bias, cache, rows, column, exit_points, propagation,
                 step_tokens, step_layers) -> None:
    """Every layer for every row, then each row's exit = the first exit point whose argmax is the top layer's;
    the skipped layers' cache columns are then overwritten from the exit state (as if it had exited)."""
    last = backbone.num_layers
    states = {}
    for index in range(1, last + 1):
        hidden = backbone.layer(index, hidden, cos, sin, bias, cache, rows, column)
        if index in exit_points and index < last:
            states[index] = hidden
    top = backbone.logits(hidden[:, 0]).argmax(-1)
    step_tokens[rows] = top
    chosen = torch.full((len(rows),), last, dtype=torch.long, device=rows.device)
    for index in sorted(states, reverse=True):  # the smallest matching layer wins
        match = backbone.logits(states[index][:, 0]).argmax(-1) == top
        chosen = torch.where(match, torch.full_like(chosen, index), chosen)
    for index in sorted(states):
        picked = chosen == index
        if bool(picked.any()):
            backbone.propagate(states[index][picked], index, cache, rows[picked], column, cos[picked], sin[picked],
                               propagation)
    step_layers[rows.cpu()] = chosen.cpu()


def _append(tokens, layers, head_evals, rows: torch.Tensor, new_tokens: torch.Tensor, new_layers: torch.Tensor,
            evals: torch.Tensor) -> None:
    for row, token, layer, count in zip(rows.tolist(), new_tokens.tolist(), new_layers.tolist(), evals.tolist(),
                                        strict=True):
        tokens[row].append(int(token))
        layers[row].append(int(layer))
        head_evals[row].append(int(count))


def _check_stops(backbone: DecoderBackbone, tokens, finished: torch.Tensor, limits: DecodeLimits,
                 rows: torch.Tensor) -> None:
    for row in rows.tolist():
        if tokens[row][-1] in limits.stop_token_ids:
            finished[row] = True
        elif limits.stop_strings:
            # Only the tail can hold a stop string that just completed; decode a window, not the whole row.
            tail = backbone.tokenizer.decode(tokens[row][-16:], skip_special_tokens=True)
            if any(stop in tail for stop in limits.stop_strings):
                finished[row] = True


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
    return text[:cut] if cut >= 0 else text
