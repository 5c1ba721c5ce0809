"""The contract between an early-exit method and the runner: all of it, in one place.

A method owns its extra modules (exit heads, policy nets, hash maps), its training objective and its exit
rule. The runner owns data, seeds, the optimisation loop, timing, cost accounting and storage. A method
never measures its own cost: it reports, per example, what it computed (`ExitOutput`) and the shared
counter in `eebench.costs` turns that into layers, FLOPs and speed-ups.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, is_dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:  # only for type checkers: keeps `import eebench.methods` light
    from eebench.backbones import EncoderBackbone
    from eebench.tasks import TaskSpec

Granularity = Literal["layer", "token"]
TaskKind = Literal["classification", "regression", "generation"]
TASK_KINDS = ("classification", "regression", "generation")
Knob = dict[str, float]
"""One operating point of a method, e.g. ``{"entropy_threshold": 0.3}``; ``None`` means the full model."""
Batch = Mapping[str, torch.Tensor]
"""A tokenised batch: ``input_ids``, ``attention_mask``, ``token_type_ids`` (B, S); ``labels`` (B,);
in training also ``step_in_epoch`` (an int: the mini-batch index within the current epoch); ``index`` (B,)
is each example's position in its split (a stable id for per-example training state)."""
LossResult = torch.Tensor | tuple[torch.Tensor, dict[str, float]]


@dataclass
class ExitOutput:
    """What one `predict` call computed, per example. Every cost metric derives from these tensors.

    logits:       (B, C) float; (B, 1) for regression.
    exit_layer:   (B,) int64 in 1..L, the number of transformer layers executed for the example
                  (for token-wise methods: the depth of the deepest token).
    head_macs:    (B,) float64, multiply-accumulates spent in exit heads / policy nets for the example.
    token_layers: (B, S) int64 layers that updated each token (its query, attention output and FFN), token-wise
                  methods only (0 at padding). Cost convention: every real token of an example serves as a key/
                  value in each of the example's `exit_layer` layers (HashEE: exited tokens stay visible).
    """

    logits: torch.Tensor
    exit_layer: torch.Tensor
    head_macs: torch.Tensor
    token_layers: torch.Tensor | None = None
    key_layers: torch.Tensor | None = None
    """(B, S) layers in which each token served as a key/value, when that differs from the convention above
    (TR-BERT: a dropped token leaves attention entirely, so key_layers = token_layers)."""


@dataclass
class PromptBatch:
    """Left-padded prompts for a decoder method's `generate`: input_ids / attention_mask (B, S), the decoding
    limits (`eebench.methods.decoding.DecodeLimits`) and each prompt's position in its split (`index`, (B,))."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    limits: Any
    index: torch.Tensor


class Trainer(Protocol):
    """The optimisation plumbing the runner lends to `fit`: data, seeds, AdamW + linear decay, clipping."""

    def train(self, params: Iterable[nn.Parameter], loss_fn: Callable[[Batch], LossResult], *,
              stage: str, epochs: float | None = None, lr: float | None = None, batch_size: int | None = None,
              clip_params: Iterable[nn.Parameter] | None = None) -> dict[str, float]:
        """One training stage: a fresh AdamW and linear schedule over `params`, minimising `loss_fn(batch)`.
        `loss_fn` returns the scalar loss, or (loss, {name: float}) to log per-step statistics (their
        means over the stage land in the returned record as ``mean_<name>``). `epochs`, `lr`, `batch_size`:
        None = the suite's (a release may set its own per stage); `clip_params`: the parameters whose joint
        gradient norm is clipped, None = `params` (DeeBERT's release clips over the whole model)."""
        ...

    def cached(self, name: str, signature: dict[str, Any], run: Callable[[], object], part: str | None = None) -> bool:
        """Run `run()` (stages that change the model) once; a later job with the same job settings and the
        same (name, signature) restores the resulting weights instead. True when restored. This is how a
        training-time sweep (ConsistentEE's alpha) shares its first stage. `part` (a submodule name such as
        "backbone"): only that submodule is stored and restored, so another method's model can share it."""
        ...

    def batches(self, shuffle: bool = False, *, batch_size: int | None = None) -> Iterator[Batch]:
        """The training data, tokenised, on the job's device (labels included)."""
        ...


@runtime_checkable
class EarlyExitMethod(Protocol):
    """An early-exit method. Implement these members; no base class is needed.

    Class attributes:
      name:        registry name, lower-case (``"pabee"``).
      granularity: ``"layer"`` (an example stops at one layer) or ``"token"`` (tokens stop at different layers).
      task_kinds:  the task kinds it supports, a subset of {"classification", "regression"}.
      knob_names:  names of the knobs that draw its trade-off curve.
    """

    name: str
    granularity: Granularity
    task_kinds: frozenset[str]
    knob_names: tuple[str, ...]

    def attach(self, backbone: EncoderBackbone, task: TaskSpec) -> nn.Module:
        """Build the method's modules around `backbone` for `task`; return the whole model (it is what
        the runner moves to a device, saves and loads). For regression tasks the runner then starts every
        one-output `ExitHead` at the mean training target (`center_regression_heads`); a plugin with heads
        of its own should build them from `ExitHead` or start them at the mean itself."""
        ...

    def fit(self, trainer: Trainer) -> None:
        """The method's own training procedure (joint, two-stage, alternating, RL, ...)."""
        ...

    def knobs(self, task: TaskSpec, num_layers: int) -> list[Knob]:
        """The grid that draws the curve. The FIRST knob is the largest-budget one: it must reproduce
        the full model's predictions with every example at layer L."""
        ...

    def predict(self, batch: Batch, knob: Knob | None) -> ExitOutput:
        """Early-exit inference at one operating point, per-example exits in a batch; `None` runs the
        full model (all L layers, final classifier only, no intermediate heads)."""
        ...

    def training_signature(self) -> dict[str, Any]:
        """Everything that determines the trained weights (not the exit rule). Two methods that return the
        same signature on the same job settings share one cached fine-tuned checkpoint."""
        ...

    # Generation (decoder) methods list "generation" in task_kinds and implement, instead of `predict`:
    #   ``generate(batch: PromptBatch, knob: Knob | None) -> eebench.methods.decoding.GenerationOutput``
    # (greedy decoding at one operating point, per-sequence exits, per-token costs counted by the shared
    # `eebench.methods.decoding.decode`; knob None = full depth, which must equal `model.generate`). Their
    # training batches are causal-LM batches: input_ids, attention_mask (B, S) and labels (B, S) with -100 on
    # prompt and padding tokens (the loss covers the reference response only).
    # Optional: ``exit_rule(knob) -> ExitRule | None`` (None = the full model), for layer-wise methods whose
    # model is a `MultiExitModel` and whose exits depend only on per-layer head outputs. The runner then
    # evaluates the whole knob grid from one traced full pass (`MultiExitModel.trace` / `replay`) instead of
    # one pass per knob; `predict` stays the online path that wall-clock timing measures. Methods that
    # cannot be traced (token-wise, generation) simply do not define it.
    # Optional: ``curve_name() -> str``, the name leaderboards and plots show for this configuration (default:
    # the registry name). For configurations that are different exit rules on one checkpoint (CALM's confidence
    # measures), so that each draws its own curve; a training-time sweep (ConsistentEE's alpha) keeps one.
    # Optional: ``annotate(batch) -> dict[str, Tensor]`` returns per-example (B,) analysis columns (e.g.
    # ConsistentEE's memorized layer) that the runner stores beside each dev example's exit layer.


PROTOCOL_ATTRIBUTES = ("name", "granularity", "task_kinds", "knob_names")
PROTOCOL_METHODS = {"attach": 2, "fit": 1, "knobs": 2, "training_signature": 0}
KIND_METHODS = {"classification": ("predict", 2), "regression": ("predict", 2), "generation": ("generate", 2)}


class ProtocolError(TypeError):
    """A method object that does not satisfy `EarlyExitMethod`."""


def check_method_class(candidate: Any, origin: str = "") -> None:
    """Raise ProtocolError listing every member `candidate` (a class) lacks or gets wrong."""
    where = f" (from {origin})" if origin else ""
    label = getattr(candidate, "__name__", repr(candidate))
    if not inspect.isclass(candidate):
        raise ProtocolError(f"{label}{where} is not a class: an eebench method plugin must point its entry "
                            "point at a class implementing eebench.methods.EarlyExitMethod")
    problems = [f"missing class attribute '{a}'" for a in PROTOCOL_ATTRIBUTES if not hasattr(candidate, a)]
    kinds = getattr(candidate, "task_kinds", frozenset())
    members = dict(PROTOCOL_METHODS)
    known = [k for k in (kinds if isinstance(kinds, (set, frozenset, tuple, list)) else ()) if k in KIND_METHODS]
    for kind in known or ["classification"]:  # no (valid) task_kinds: judge it as a classification method
        member, arity = KIND_METHODS[kind]
        members[member] = arity
    for member, arity in members.items():
        function = getattr(candidate, member, None)
        if not callable(function):
            problems.append(f"missing method '{member}'")
            continue
        params = [p for p in inspect.signature(function).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]  # drop self
        required = [p for p in params if p.default is p.empty]
        if len(required) > arity or len(params) < arity:
            problems.append(f"'{member}' must take {arity} argument(s) after self, "
                            f"it takes ({', '.join(p.name for p in params)})")
    if hasattr(candidate, "granularity") and candidate.granularity not in ("layer", "token"):
        problems.append(f"granularity must be 'layer' or 'token', not {candidate.granularity!r}")
    if hasattr(candidate, "task_kinds") and (not kinds or not set(kinds) <= set(TASK_KINDS)):
        problems.append(f"task_kinds must be a non-empty subset of {set(TASK_KINDS)}, not {kinds!r}")
    if hasattr(candidate, "name") and (not isinstance(candidate.name, str) or not candidate.name):
        problems.append("name must be a non-empty string")
    if problems:
        raise ProtocolError(f"{label}{where} does not satisfy EarlyExitMethod: " + "; ".join(problems)
                            + ". See the plugin example in the README.")


def check_exit_output(output: Any, batch_size: int, num_layers: int) -> None:
    """Raise ProtocolError when a `predict` result breaks the contract (wrong type, shape or range)."""
    if not isinstance(output, ExitOutput):
        raise ProtocolError(f"predict() must return eebench.methods.ExitOutput, got {type(output).__name__}")
    if output.logits.shape[0] != batch_size or output.exit_layer.shape != (batch_size,):
        raise ProtocolError(f"predict() returned logits {tuple(output.logits.shape)} and exit_layer "
                            f"{tuple(output.exit_layer.shape)} for a batch of {batch_size}")
    if output.head_macs.shape != (batch_size,):
        raise ProtocolError(f"predict() returned head_macs {tuple(output.head_macs.shape)}, expected ({batch_size},)")
    if len(output.exit_layer) and (int(output.exit_layer.min()) < 1 or int(output.exit_layer.max()) > num_layers):
        raise ProtocolError(f"predict() returned exit layers outside 1..{num_layers}")
    if not torch.isfinite(output.logits).all():
        raise ProtocolError("predict() returned non-finite logits (NaN or inf): the model diverged; "
                            "lower the learning rate or check the loss")


def config_dict(config: Any) -> dict[str, Any]:
    """A method config (dataclass) as a plain dict, for hashing and records."""
    from dataclasses import asdict
    return asdict(config) if is_dataclass(config) else dict(config or {})
