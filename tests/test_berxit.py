"""BERxiT against its spec: LTE exit rule, LTE targets and loss, the ALT-LTE alternation, the routines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eebench.backbones import load_backbone
from eebench.methods.berxit import ROUTINES, BERxiT, LTERule
from eebench.methods.exits import exit_loss
from eebench.tasks import get_task


def constant_lte(value: float) -> nn.Linear:
    """An LTE whose score is sigmoid(logit(value)) = value for every input."""
    lte = nn.Linear(4, 1)
    nn.init.zeros_(lte.weight)
    nn.init.constant_(lte.bias, torch.logit(torch.tensor(value)).item())
    return lte


def test_lte_rule_exits_below_threshold_and_tau_zero_never_exits():
    pooled = torch.zeros(3, 4)
    state = LTERule(constant_lte(0.3), 0.5).start(3, torch.device("cpu"))
    assert LTERule(constant_lte(0.3), 0.5).decide(1, torch.zeros(3, 2), state, pooled)[0].tolist() == [True] * 3
    assert LTERule(constant_lte(0.3), 0.2).decide(1, torch.zeros(3, 2), state, pooled)[0].tolist() == [False] * 3
    assert LTERule(constant_lte(1e-6), 0.0).decide(1, torch.zeros(3, 2), state, pooled)[0].tolist() == [False] * 3


def _method(task="sst2", **config):
    method = BERxiT(**config)
    method.attach(load_backbone("tiny-bert", seed=0), get_task(task))
    return method


def test_lte_targets_classification_and_regression():
    method = _method()
    method.model.extras["lte"] = constant_lte(0.5)
    labels = torch.tensor([0, 1])
    logits = [torch.tensor([[2.0, 0.0], [2.0, 0.0]]), torch.tensor([[0.0, 2.0], [0.0, 2.0]])]  # layer 1: [ok, wrong]
    pooled = [torch.zeros(2, 32)] * 2
    method.model.extras["lte"] = nn.Linear(32, 1)
    nn.init.zeros_(method.model.extras["lte"].weight)
    nn.init.zeros_(method.model.extras["lte"].bias)  # u = 0.5 everywhere
    # targets: layer 1 [0, 1], layer 2 [1, 0] -> every (u - t)^2 = 0.25
    assert method.lte_loss(logits, pooled, labels).item() == pytest.approx(0.25)
    regression = _method("stsb")
    regression.model.extras["lte"] = method.model.extras["lte"]
    y = torch.tensor([1.0, 3.0])
    preds = [torch.tensor([[1.0], [4.0]])]
    expected = ((0.5 - torch.tanh(torch.tensor([0.0, 1.0]))) ** 2).mean()
    assert regression.lte_loss(preds, [torch.zeros(2, 32)], y).item() == pytest.approx(expected.item())


def test_alt_lte_alternates_on_the_step_within_the_epoch():
    method = _method()
    torch.manual_seed(0)
    logits = [torch.randn(4, 2) for _ in range(4)]
    pooled = [torch.randn(4, 32) for _ in range(4)]
    labels = torch.tensor([0, 1, 1, 0])
    method._forward_all = lambda batch: (logits, pooled)
    losses = [exit_loss(z, labels, "classification") for z in logits]
    lte = method.lte_loss(logits, pooled, labels)
    even = method.routine_loss({"labels": labels, "step_in_epoch": 4})
    odd = method.routine_loss({"labels": labels, "step_in_epoch": 5})
    torch.testing.assert_close(even, losses[-1] + lte)
    torch.testing.assert_close(odd, sum(losses[:-1]) + lte)  # released code: no final loss on odd steps


def test_other_routines_match_the_spec_table():
    torch.manual_seed(0)
    logits = [torch.randn(4, 2) for _ in range(4)]
    pooled = [torch.randn(4, 32) for _ in range(4)]
    labels = torch.tensor([0, 1, 1, 0])
    losses = [exit_loss(z, labels, "classification") for z in logits]
    teacher = F.softmax(logits[-1], -1)
    distil = sum(-(teacher * F.log_softmax(z, -1)).sum() for z in logits[:-1])
    expected = {
        "alternate": (losses[-1], sum(losses)),
        "all": (sum(losses), sum(losses)),
        "weight-linear": ((sum((i + 1) * loss for i, loss in enumerate(losses)) / 10),) * 2,
        "self_distil": (sum(losses) + distil,) * 2,
        "limit": (losses[1],) * 2,
    }
    for routine, (even, odd) in expected.items():
        method = _method(routine=routine, exit_signal="entropy", limit_layer=2)
        method._forward_all = lambda batch: (logits, pooled)
        torch.testing.assert_close(method.routine_loss({"labels": labels, "step_in_epoch": 0}), even)
        torch.testing.assert_close(method.routine_loss({"labels": labels, "step_in_epoch": 1}), odd)
    assert set(expected) | {"alternate-lte", "two_stage"} == set(ROUTINES)


def test_configuration_errors_name_the_fix():
    with pytest.raises(ValueError, match="choose one of"):
        BERxiT(routine="alt")
    with pytest.raises(ValueError, match="exit_signal='entropy'"):
        BERxiT(routine="all")
    with pytest.raises(ValueError, match="undefined for regression"):
        BERxiT(routine="all", exit_signal="entropy").attach(load_backbone("tiny-bert"), get_task("stsb"))


def test_two_stage_routine_takes_the_releases_clip_scope(monkeypatch):
    # run_highway_glue.py's 2STG clips model.parameters() with the off-ramp gradients reaching the backbone; the
    # scope itself is DeeBERT's two_stage_fit, tested in test_deebert.py: here, that BERxiT passes it on.
    import eebench.methods.berxit as berxit

    seen = []
    monkeypatch.setattr(berxit, "two_stage_fit", lambda model, trainer, kind, clip_scope: seen.append(clip_scope))
    for scope in ("off_ramps", "model"):
        BERxiT(routine="two_stage", exit_signal="entropy", stage2_clip_scope=scope).fit(trainer=None)
    assert seen == ["off_ramps", "model"]
    default = BERxiT(routine="two_stage", exit_signal="entropy").training_signature()
    assert default == {"recipe": "berxit-two_stage"}  # stored checkpoints keep their keys
    release = BERxiT(routine="two_stage", exit_signal="entropy", stage2_clip_scope="model").training_signature()
    assert release == {**default, "stage2_clip_scope": "model"}
    with pytest.raises(ValueError, match="stage2_clip_scope must be one of"):
        BERxiT(routine="two_stage", exit_signal="entropy", stage2_clip_scope="all")
    with pytest.raises(ValueError, match="routine 'two_stage' only"):
        BERxiT(stage2_clip_scope="model")


def test_lte_cost_is_charged_to_offramps_not_to_the_full_model():
    method = _method()
    d, c = 32, 2
    heads = method.model.heads
    assert heads[0].macs() == d * d + d * c + d      # pooler + classifier + LTE
    assert heads[-1].macs() == d * d + d * c         # the final exit never tests the LTE
    assert heads[0].pooler is not heads[1].pooler and heads[-1].pooler is method.model.backbone.pooler


def test_regression_gets_a_finer_lte_grid():
    from eebench.methods.berxit import LTE_GRID

    def taus(task):
        return [k["lte_threshold"] for k in BERxiT().knobs(get_task(task), 4)]

    assert taus("sst2") == [0.0, *LTE_GRID]
    regression = taus("stsb")
    assert regression[0] == 0.0 and set(LTE_GRID) < set(regression) and regression == sorted(regression)
    assert {0.51, 0.55, 0.59} <= set(regression) and len(regression) == len(set(regression))
