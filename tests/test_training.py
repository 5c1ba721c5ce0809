"""LoopTrainer's per-stage settings: a stage's own batch size, and the set of parameters whose gradient norm
is clipped (a release may clip over the whole model while training only part of it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eebench.training import Encoded, LoopTrainer, TrainConfig


class Toy(nn.Module):
    """Two linear maps on a bag of token embeddings: `a` is trained, `b` only receives gradients."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4)
        self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 2)

    def loss(self, batch: dict) -> torch.Tensor:
        x = self.embed(batch["input_ids"]).mean(dim=1)
        return nn.functional.cross_entropy(self.a(x) + self.b(x), batch["labels"])


def _data(n: int) -> Encoded:
    ids = [[1 + i % 9, 1 + (3 * i) % 9] for i in range(n)]
    return Encoded(ids, [[0, 0]] * n, torch.tensor([i % 2 for i in range(n)]))


def _trainer(model: nn.Module, n: int = 40, **config) -> LoopTrainer:
    settings = TrainConfig(**{"epochs": 1, "lr": 1e-2, "batch_size": 16, **config})
    return LoopTrainer(model, _data(n), settings, 0, 0, "cpu", progress=False)


@pytest.mark.parametrize(("batch_size", "expected"), [(None, [16, 16, 8]), (8, [8] * 5), (40, [40])])
def test_a_stage_iterates_in_its_own_batch_size(batch_size, expected):
    model = Toy()
    trainer = _trainer(model)
    seen = []

    def loss(batch):
        seen.append(len(batch["labels"]))
        return model.loss(batch)

    record = trainer.train(model.a.parameters(), loss, stage="s", batch_size=batch_size)
    assert seen == expected
    assert record["steps"] == len(expected) and record["batch_size"] == (batch_size or 16)
    # The suite's batch size is untouched for later stages and for `batches`.
    assert [len(b["labels"]) for b in trainer.batches()] == [16, 16, 8]
    assert [len(b["labels"]) for b in trainer.batches(batch_size=32)] == [32, 8]


def test_a_stage_batch_size_must_be_positive():
    model = Toy()
    with pytest.raises(ValueError, match="batch_size"):
        _trainer(model).train(model.a.parameters(), model.loss, stage="s", batch_size=0)


def _clip_spy(monkeypatch, model: Toy) -> list[dict]:
    """Record, at every clip, which parameters were clipped together and `a`'s gradient norm before/after."""
    calls, real = [], torch.nn.utils.clip_grad_norm_

    def norm(params):
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        before, whole = norm(model.a.parameters()), norm(model.parameters())
        total = real(params, max_norm, *args, **kwargs)
        calls.append({"ids": {id(p) for p in params}, "total": total.item(), "max_norm": max_norm, "whole_before": whole,
                      "a_before": before, "a_after": norm(model.a.parameters())})
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    return calls


@pytest.mark.parametrize("scope", ["trained", "model"])
def test_the_clipped_norm_is_over_clip_params(monkeypatch, scope):
    model = Toy()
    calls = _clip_spy(monkeypatch, model)
    clip_params = None if scope == "trained" else model.parameters()
    _trainer(model, max_grad_norm=1e-3).train(model.a.parameters(), model.loss, stage="s", clip_params=clip_params)
    a_ids = {id(p) for p in model.a.parameters()}
    assert len(calls) == 3
    for call in calls:
        assert call["ids"] == (a_ids if scope == "trained" else {id(p) for p in model.parameters()})
        if scope == "trained":
            assert call["total"] == pytest.approx(call["a_before"])
        else:  # b and the embedding hold gradients too: a larger norm, so `a` is clipped harder
            assert call["total"] == pytest.approx(call["whole_before"]) and call["total"] > 1.1 * call["a_before"]
        coefficient = min(1.0, call["max_norm"] / (call["total"] + 1e-6))
        assert call["a_after"] == pytest.approx(coefficient * call["a_before"], rel=1e-4)


def test_clip_params_change_the_update_only_when_clipping_bites():
    def trained_a(max_grad_norm: float, clip_over_model: bool) -> torch.Tensor:
        model = Toy()
        trainer = _trainer(model, max_grad_norm=max_grad_norm)
        trainer.train(model.a.parameters(), model.loss, stage="s", clip_params=model.parameters() if clip_over_model else None)
        return model.a.weight.detach().clone()

    # Never clipped: the set the norm is taken over cannot matter.
    assert torch.equal(trained_a(1e6, False), trained_a(1e6, True))
    # Always clipped, by a step-dependent factor that differs between the two sets: Adam's update differs.
    assert not torch.allclose(trained_a(1e-3, False), trained_a(1e-3, True))


def test_defaults_are_the_suites_batch_size_and_the_trained_parameters():
    """None for batch_size and clip_params is the same stage as naming them explicitly, bit for bit."""
    def run(explicit: bool) -> torch.Tensor:
        model = Toy()
        kwargs = {"batch_size": 16, "clip_params": list(model.a.parameters())} if explicit else {}
        _trainer(model, max_grad_norm=1e-3).train(model.a.parameters(), model.loss, stage="s", **kwargs)
        return model.a.weight.detach().clone()

    assert torch.equal(run(False), run(True))


class Wrapped(nn.Module):
    """Another method's modules around the same `a`: only the part both have can be shared."""

    def __init__(self):
        super().__init__()
        self.a, self.policy = nn.Linear(4, 2), nn.Linear(2, 1)


def test_a_cached_part_is_restored_into_another_model_and_old_whole_files_serve_too(tmp_path):
    from eebench.training import StageCache

    cache = StageCache(tmp_path, {"task": "toy"})
    toy = Toy()
    trainer = LoopTrainer(toy, _data(8), TrainConfig(epochs=1, lr=0.1, batch_size=4), 0, 0, "cpu", progress=False,
                          stage_cache=cache)
    assert trainer.cached("warm-a", {"v": 1}, lambda: trainer.train(toy.a.parameters(), toy.loss, stage="a"),
                          part="a") is False
    other = Wrapped()
    policy_before = other.policy.weight.clone()
    restorer = LoopTrainer(other, _data(8), TrainConfig(), 0, 0, "cpu", progress=False, stage_cache=cache)
    assert restorer.cached("warm-a", {"v": 1}, lambda: pytest.fail("the stage is cached"), part="a") is True
    torch.testing.assert_close(other.a.weight, toy.a.weight)
    assert torch.equal(other.policy.weight, policy_before)  # what is not the part is left alone
    assert restorer.stages[0]["stage"] == "a" and restorer.stages[0]["from_cache"]
    cache.save(toy, "whole", {}, [])  # a file of the whole model, as stages cached without `part` are
    fresh = Wrapped()
    assert cache.load(fresh, "whole", {}, "cpu", part="a") == []
    torch.testing.assert_close(fresh.a.weight, toy.a.weight)
