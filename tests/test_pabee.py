"""PABEE against its spec: patience semantics (earliest exit t + 1), per-example counters, regression."""

from __future__ import annotations

import torch

from eebench.methods.pabee import PABEE, PatienceRule
from eebench.tasks import get_task


def _run(rule, per_layer_logits):
    """Feed per-layer logits (list over layers of (B, C)) and return the 1-based exit layer per row (0 = never)."""
    size = per_layer_logits[0].shape[0]
    state = rule.start(size, torch.device("cpu"))
    exits = torch.zeros(size, dtype=torch.long)
    for layer, logits in enumerate(per_layer_logits, start=1):
        exit_now, state = rule.decide(layer, logits, state)
        exits = torch.where((exits == 0) & exit_now, torch.full_like(exits, layer), exits)
    return exits.tolist()


def one_hot(classes):
    return torch.nn.functional.one_hot(torch.tensor(classes), 2).float()


def test_earliest_exit_is_patience_plus_one():
    layers = [one_hot([1, 0, 1])] * 6
    assert _run(PatienceRule(1, None), layers) == [2, 2, 2]
    assert _run(PatienceRule(3, None), layers) == [4, 4, 4]


def test_counter_resets_on_a_change_and_rows_are_independent():
    # row 0: 1 1 0 0 0 0 -> agreements at layers 2, 4, 5 (reset at 3) -> t = 2 exits at layer 5
    # row 1: 0 0 0 ...   -> t = 2 exits at layer 3;  row 2 alternates and never exits
    layers = [one_hot([1, 0, 0]), one_hot([1, 0, 1]), one_hot([0, 0, 0]), one_hot([0, 0, 1]),
              one_hot([0, 0, 0]), one_hot([0, 0, 1])]
    assert _run(PatienceRule(2, None), layers) == [5, 3, 0]


def test_regression_uses_the_change_threshold():
    values = [[1.0], [1.05], [1.08], [2.0], [2.01]]
    layers = [torch.tensor([v]) for v in values]  # one row, (1, 1) per layer
    assert _run(PatienceRule(2, 0.1), layers) == [3]
    assert _run(PatienceRule(1, 0.0), layers) == [0]  # the code default 0 never fires (strict <)


def test_knobs_start_at_the_full_model_and_patience_zero_is_full_depth():
    method = PABEE()
    knobs = method.knobs(get_task("sst2"), 6)
    assert knobs[0] == {"patience": 5} and knobs[-1] == {"patience": 1} and len(knobs) == 5


def test_joint_loss_is_the_layer_index_weighted_average():
    from eebench.backbones import load_backbone
    from eebench.methods.exits import exit_loss

    backbone = load_backbone("tiny-bert", seed=0)
    method = PABEE()
    model = method.attach(backbone, get_task("sst2"))
    captured = {}

    class CapturingTrainer:
        def train(self, params, loss_fn, **kwargs):
            captured["params"], captured["loss_fn"] = list(params), loss_fn

    method.fit(CapturingTrainer())
    torch.manual_seed(0)
    fixed = [torch.randn(3, 2) for _ in range(backbone.num_layers)]
    labels = torch.tensor([0, 1, 1])
    model.all_exit_logits = lambda batch: fixed
    got = captured["loss_fn"]({"labels": labels})
    per_layer = [exit_loss(z, labels, "classification") for z in fixed]
    expected = sum(j * loss for j, loss in enumerate(per_layer, start=1)) / sum(range(1, backbone.num_layers + 1))
    torch.testing.assert_close(got, expected)
    assert {id(p) for p in captured["params"]} == {id(p) for p in model.parameters()}  # joint: everything trains
