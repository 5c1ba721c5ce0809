"""MultiExitModel.early_exit's overhead cuts: padding cut when rows leave, classifier skipped for pooled-only rules."""

from __future__ import annotations

import pytest
import torch

from eebench.backbones import load_backbone
from eebench.methods.exits import ExitHead, MultiExitModel, center_regression_heads


class FixedExits:
    """Exit at a predetermined layer per row; records what it was shown."""

    def __init__(self, targets: list[int], reads_logits: bool = True):
        self.targets, self.reads_logits, self.seen_logits = torch.tensor(targets), reads_logits, []

    def start(self, batch_size, device):
        return {"target": self.targets.clone()}

    def decide(self, layer, logits, state, pooled=None):
        self.seen_logits.append(logits)
        return state["target"] <= layer, state


def _model(pooling: str) -> MultiExitModel:
    backbone = load_backbone("tiny-bert", seed=0, pooling=pooling)
    torch.manual_seed(0)
    heads = [ExitHead(backbone.pooler, backbone.hidden_size, 3, 0.1, 0.02) for _ in range(backbone.num_layers)]
    return MultiExitModel(backbone, heads).eval()


def _right_padded_batch(lengths: list[int], vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (len(lengths), max(lengths)), generator=generator)
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_rows_that_leave_take_their_padding_with_them(pooling, monkeypatch):
    """Rows leave at layers 1 and 2: later layers run on the survivors' own length only, and every row's
    answer equals running it alone (no padding at all)."""
    model = _model(pooling)
    layers = model.num_layers
    lengths, targets = [12, 4, 6], [1, layers, 2]
    batch = _right_padded_batch(lengths, model.backbone.model.config.vocab_size)
    widths: list[tuple[int, int]] = []
    real_layer = model.backbone.layer

    def spy(index, hidden, bias):
        widths.append((index, hidden.shape[1]))
        return real_layer(index, hidden, bias)

    monkeypatch.setattr(model.backbone, "layer", spy)
    with torch.inference_mode():
        together = model.early_exit(batch, FixedExits(targets))
        # 12 tokens for layer 1; the 12-token row left, so 6; the 6-token row left after layer 2, so 4.
        assert widths == [(1, 12), (2, 6), *((index, 4) for index in range(3, layers + 1))]
        for row, length in enumerate(lengths):
            alone = {key: value[row:row + 1, :length] for key, value in batch.items()}
            single = model.early_exit(alone, FixedExits([targets[row]]))
            assert together.exit_layer[row].item() == single.exit_layer.item() == targets[row]
            torch.testing.assert_close(together.logits[row], single.logits[0], rtol=1e-5, atol=1e-6)


def test_left_padded_batches_are_not_cut(monkeypatch):
    model = _model("mean")
    batch = _right_padded_batch([8, 3], model.backbone.model.config.vocab_size)
    batch = {key: value.flip(1) for key, value in batch.items()}  # padding on the left now
    widths = []
    real_layer = model.backbone.layer
    monkeypatch.setattr(model.backbone, "layer", lambda i, h, b: (widths.append(h.shape[1]), real_layer(i, h, b))[1])
    with torch.inference_mode():
        model.early_exit(batch, FixedExits([1, model.num_layers]))
    assert set(widths) == {8}


def test_pooled_only_rules_get_no_logits_and_the_same_answers():
    model = _model("cls")
    layers = model.num_layers
    batch = _right_padded_batch([5, 5, 5, 5], model.backbone.model.config.vocab_size)
    targets = [1, 2, layers, 1]
    with torch.inference_mode():
        with_logits, without = FixedExits(targets), FixedExits(targets, reads_logits=False)
        expected, got = model.early_exit(batch, with_logits), model.early_exit(batch, without)
        trace = model.trace(batch)
    assert all(logits is None for logits in without.seen_logits)
    assert all(logits is not None for logits in with_logits.seen_logits)
    assert got.exit_layer.tolist() == expected.exit_layer.tolist() == targets
    torch.testing.assert_close(got.logits, expected.logits)
    for row, layer in enumerate(targets):  # each row's answer is its exit layer's head
        torch.testing.assert_close(got.logits[row], trace.logits[layer - 1][row], rtol=1e-5, atol=1e-6)


def test_center_regression_heads_sets_one_output_heads_only():
    backbone = load_backbone("tiny-bert", seed=0)
    regression = [ExitHead(backbone.pooler, backbone.hidden_size, 1, 0.1, 0.02) for _ in range(3)]
    classification = ExitHead(backbone.pooler, backbone.hidden_size, 3, 0.1, 0.02)  # e.g. a plugin's extra head
    model = MultiExitModel(backbone, regression + [ExitHead(backbone.pooler, backbone.hidden_size, 1, 0.1, 0.02)],
                           extras={"other": classification})
    regression = list(model.heads)
    assert center_regression_heads(model, 2.7) == 4
    assert all(h.classifier.bias.item() == pytest.approx(2.7) for h in regression)
    assert torch.equal(classification.classifier.bias, torch.zeros(3))


def _row_rule_cases():
    from torch import nn

    from eebench.methods.berxit import LTERule
    from eebench.methods.consistentee.classification import PolicyRule
    from eebench.methods.consistentee.policy import policy_net
    from eebench.methods.deebert import entropy_rule
    from eebench.methods.pabee import PatienceRule
    from eebench.methods.pcee import ConfidenceStreakRule

    torch.manual_seed(0)
    lte = nn.Linear(8, 1)
    heads = nn.ModuleList([ExitHead(nn.Identity(), 8, 3, 0.0, 0.02, signal=policy_net(8, 4, 0.5)) for _ in range(6)])
    return {
        "entropy": entropy_rule(0.9), "patience": PatienceRule(2, None), "patience-regression": PatienceRule(2, 0.3),
        "confident-streak": ConfidenceStreakRule(2, 0.8, 3), "lte": LTERule(lte, 0.5), "policy": PolicyRule(heads, 0.5),
    }


@pytest.mark.parametrize("name", list(_row_rule_cases()))
def test_scalar_row_decisions_equal_the_tensor_rule(name):
    """`decide_row` (the batch-of-one path) and `decide` give the same exits on the same per-layer inputs, over
    many random examples, including argmax ties, huge logits (overflow) and pooled vectors far from zero."""
    rule = _row_rule_cases()[name]
    generator = torch.Generator().manual_seed(2)
    rows, layers = 200, 5
    logits = torch.randn(layers, rows, 3, generator=generator) * torch.tensor([0.3, 3.0, 300.0]).repeat_interleave(
        rows // 3 + 1)[:rows, None]
    logits[:, :20] = logits[:, :20].round()  # ties between classes and across layers
    pooled = torch.randn(layers, rows, 8, generator=generator) * 4
    state = rule.start(rows, torch.device("cpu"))
    batched = torch.zeros(rows, dtype=torch.long)
    with torch.inference_mode():
        for layer in range(1, layers + 1):
            exit_now, state = rule.decide(layer, logits[layer - 1], state, pooled[layer - 1])
            batched[(batched == 0) & exit_now] = layer
        reads_logits = getattr(rule, "reads_logits", True)
        for row in range(rows):
            row_state, alone = {}, 0
            for layer in range(1, layers + 1):
                row_logits = logits[layer - 1, row].tolist() if reads_logits else None
                if rule.decide_row(layer, row_logits, row_state, pooled[layer - 1, row:row + 1]):
                    alone = layer
                    break
            assert alone == batched[row].item(), (name, row)
    assert 0 < (batched > 0).sum() < rows  # the cases exercise both outcomes
