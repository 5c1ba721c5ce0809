"""ConsistentEE (Zeng et al., AAAI 2024), one method over two task kinds: `classification` (encoders: an
example exits at one layer) and `generation` (decoders: every token exits on its own). `ConsistentEE` picks
the implementation by the task it is attached to; before that, it behaves as the classification one (the
method's history: its checkpoints, signatures and tests).
"""

from __future__ import annotations

from typing import Any

from eebench.methods.consistentee.classification import ConsistentEEClassifier, ConsistentEEConfig
from eebench.methods.consistentee.generation import ConsistentEEDecoder, ConsistentEEDecoderConfig
from eebench.methods.consistentee.policy import (
    group_advantage,
    memorized_layer,
    policy_net,
    reward,
    trajectory,
)

__all__ = ["ConsistentEE", "ConsistentEEClassifier", "ConsistentEEConfig", "ConsistentEEDecoder",
           "ConsistentEEDecoderConfig", "group_advantage", "memorized_layer", "policy_net", "reward", "trajectory"]

_KINDS = {"classification": ConsistentEEClassifier, "generation": ConsistentEEDecoder}


class ConsistentEE:
    """Learned per-layer exit policies trained by REINFORCE with a hardness-guided reward; exit when P(exit) > 0.5."""

    name = "consistentee"
    granularity = "layer"  # per example on classification; per token on generation (each token is an episode)
    task_kinds = frozenset(_KINDS)
    knob_names = ("alpha", "exit_threshold")

    def __init__(self, **overrides: Any):
        impls, errors = {}, {}
        for kind, cls in _KINDS.items():  # a setting is checked now, against the kinds it can belong to
            try:
                impls[kind] = cls(**overrides)
            except (TypeError, ValueError) as error:
                errors[kind] = str(error)
        if not impls:
            raise ValueError("consistentee: these settings fit no task kind: "
                             + "; ".join(f"{kind}: {message}" for kind, message in errors.items()))
        object.__setattr__(self, "_impls", impls)
        object.__setattr__(self, "_errors", errors)
        object.__setattr__(self, "_active", impls.get("classification") or impls["generation"])

    def attach(self, backbone, task):
        kind = "generation" if task.kind == "generation" else "classification"
        if kind not in self._impls:
            raise ValueError(f"consistentee on {task.kind} task '{task.name}': {self._errors[kind]}")
        object.__setattr__(self, "_active", self._impls[kind])
        return self._active.attach(backbone, task)

    # the protocol's members, delegated to the implementation of the attached task kind
    def fit(self, trainer):
        return self._active.fit(trainer)

    def knobs(self, task, num_layers: int):
        return self._active.knobs(task, num_layers)

    def predict(self, batch, knob):
        return self._active.predict(batch, knob)

    def generate(self, batch, knob):
        return self._active.generate(batch, knob)

    def training_signature(self) -> dict:
        return self._active.training_signature()

    def __getattr__(self, name: str):  # config, model, exit_rule, annotate, stage losses, ...
        return getattr(object.__getattribute__(self, "_active"), name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._active, name, value)
