"""PCEE-BERT against its spec: confident-streak exits (earliest exit t), no agreement check, PABEE's network."""

from __future__ import annotations

import math

import pytest
import torch

from eebench.methods.pabee import PABEE
from eebench.methods.pcee import PCEE, ConfidenceStreakRule
from eebench.tasks import get_task

CONFIDENT = [8.0, -8.0]     # normalised entropy ~ 0.005
UNSURE = [0.0, 0.0]          # normalised entropy 1.0


def _exits(rule, rows_per_layer):
    """rows_per_layer: list over layers of per-row logit pairs -> 1-based exit layer per row (0 = never)."""
    per_layer = [torch.tensor(rows) for rows in rows_per_layer]
    state = rule.start(per_layer[0].shape[0], torch.device("cpu"))
    exits = [0] * per_layer[0].shape[0]
    for layer, logits in enumerate(per_layer, start=1):
        exit_now, state = rule.decide(layer, logits, state)
        exits = [e or (layer if x else 0) for e, x in zip(exits, exit_now.tolist(), strict=True)]
    return exits


def test_earliest_exit_is_layer_t_counting_from_layer_one():
    layers = [[CONFIDENT]] * 5
    assert _exits(ConfidenceStreakRule(1, 0.5, 2), layers) == [1]   # PABEE's earliest would be 2
    assert _exits(ConfidenceStreakRule(3, 0.5, 2), layers) == [3]


def test_no_agreement_check_and_streak_reset():
    flip = [-8.0, 8.0]  # confident, other class
    # row 0: confident, confident(other class) -> exits at 2 with t = 2 (PABEE would not)
    # row 1: confident, unsure, confident, confident -> streak resets, exits at 4
    layers = [[CONFIDENT, CONFIDENT], [flip, UNSURE], [CONFIDENT, CONFIDENT], [CONFIDENT, CONFIDENT]]
    assert _exits(ConfidenceStreakRule(2, 0.5, 2), layers) == [2, 4]


def test_never_exit_when_nothing_is_confident_or_tau_is_zero():
    assert _exits(ConfidenceStreakRule(1, 0.5, 2), [[UNSURE]] * 4) == [0]
    assert _exits(ConfidenceStreakRule(1, 0.0, 2), [[CONFIDENT]] * 4) == [0]  # strict <


def test_entropy_is_normalised_by_ln_c():
    rule = ConfidenceStreakRule(1, 0.999, 3)
    uniform = torch.zeros(1, 3)  # H = ln 3 -> normalised 1.0, not below 0.999
    assert not rule.decide(1, uniform, rule.start(1, torch.device("cpu")))[0].item()
    almost = torch.tensor([[0.3, 0.0, 0.0]])
    h = -(almost.softmax(-1) * almost.log_softmax(-1)).sum() / math.log(3)
    assert h < 0.999
    assert rule.decide(1, almost, rule.start(1, torch.device("cpu")))[0].item()


def test_pcee_trains_exactly_pabees_network():
    assert PCEE().training_signature() == PABEE().training_signature()
    knobs = PCEE().knobs(get_task("sst2"), 6)
    assert knobs[0]["threshold"] == 0.0
    assert {(k["patience"], k["threshold"]) for k in knobs[1:]} >= {(2, 0.1), (2, 0.5), (1, 1.0)}


def test_pcee_is_classification_only():
    assert PCEE.task_kinds == frozenset({"classification"})
    with pytest.raises(TypeError):
        PCEE(no_such_option=1)
