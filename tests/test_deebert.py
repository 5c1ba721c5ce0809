"""DeeBERT against its spec: entropy rule, per-layer poolers from the pre-trained pooler, two stages."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from eebench.backbones import load_backbone
from eebench.methods.deebert import DeeBERT, entropy_rule
from eebench.methods.exits import entropy
from eebench.runner import checkpoint_key
from eebench.tasks import get_task, load_split
from eebench.training import LoopTrainer, encode

from conftest import FAST_TRAIN, tiny_job


def test_entropy_is_in_nats_and_unnormalised():
    uniform = torch.zeros(1, 3)
    assert entropy(uniform).item() == torch.tensor(math.log(3)).item()
    assert entropy(torch.tensor([[100.0, 0.0]])).item() < 1e-6


def test_entropy_rule_strict_threshold():
    logits = torch.tensor([[0.0, 0.0], [5.0, -5.0], [1.0, 0.0]])  # H = ln 2, ~0.0005, ~0.582
    exit_now, _ = entropy_rule(0.6).decide(1, logits, {})
    assert exit_now.tolist() == [False, True, True]
    exit_now, _ = entropy_rule(0.0).decide(1, logits, {})  # S = 0 never exits (H >= 0, strict <)
    assert exit_now.tolist() == [False, False, False]
    exit_now, _ = entropy_rule(0.7).decide(1, logits, {})  # S > ln 2 exits everything on a binary task
    assert exit_now.tolist() == [True, True, True]


def test_grid_extends_to_ln_c_for_multiclass():
    method = DeeBERT()
    binary = [k["entropy_threshold"] for k in method.knobs(get_task("sst2"), 12)]
    assert binary[0] == 0.0 and max(binary) == 0.7
    three = [k["entropy_threshold"] for k in method.knobs(get_task("mnli-m"), 12)]
    assert max(three) < math.log(3) and max(three) >= 1.0


def _setup(**config):
    spec = get_task("graded")
    backbone = load_backbone("tiny-bert", seed=0)
    pretrained_pooler = {k: v.clone() for k, v in backbone.pooler.state_dict().items()}
    method = DeeBERT(**config)
    torch.manual_seed(0)
    model = method.attach(backbone, spec)
    data = encode(load_split(spec, "train", limit=32).examples, backbone.tokenizer, 32, False)
    return method, model, backbone, data, pretrained_pooler


def test_offramps_have_their_own_poolers_copied_from_the_pretrained_one():
    method, model, backbone, _, pretrained = _setup()
    poolers = [head.pooler for head in model.heads]
    assert poolers[-1] is backbone.pooler  # the final exit is the backbone's own pooler + classifier
    assert len({id(p) for p in poolers}) == backbone.num_layers  # no sharing
    for pooler in poolers[:-1]:
        for key, value in pooler.state_dict().items():
            assert torch.equal(value, pretrained[key])


@pytest.mark.parametrize("scope", ["off_ramps", "model"])
def test_stage1_trains_backbone_and_final_head_only_stage2_offramps_only(scope):
    method, model, backbone, data, _ = _setup(stage2_clip_scope=scope)
    snapshots = []

    class RecordingTrainer(LoopTrainer):
        def train(self, params, loss_fn, **kwargs):
            before = {k: v.clone() for k, v in model.state_dict().items()}
            result = super().train(params, loss_fn, **kwargs)
            after = model.state_dict()
            snapshots.append({k for k in before if not torch.equal(before[k], after[k])})
            return result

    method.fit(RecordingTrainer(model, data, FAST_TRAIN, 0, backbone.tokenizer.pad_token_id, "cpu", progress=False))
    stage1, stage2 = snapshots
    last = backbone.num_layers - 1
    assert any(k.startswith("backbone.model.encoder") for k in stage1)
    assert all(not k.startswith("heads.") or k.startswith(f"heads.{last}.") for k in stage1)
    assert stage2 and all(k.startswith("heads.") and not k.startswith(f"heads.{last}.") for k in stage2)


# ---- stage 2's clip scope: the release clips clip_grad_norm_(model.parameters()) -----------------------------
def _fit(max_grad_norm: float, trainer_class: type[LoopTrainer] = LoopTrainer, **config) -> dict[str, torch.Tensor]:
    method, model, backbone, data, _ = _setup(**config)
    train = dataclasses.replace(FAST_TRAIN, max_grad_norm=max_grad_norm)
    method.fit(trainer_class(model, data, train, 0, backbone.tokenizer.pad_token_id, "cpu", progress=False))
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


class ClipOverModel(LoopTrainer):
    """eebench's stage 2 (backbone without autograd), but the norm clipped over model.parameters()."""

    def train(self, params, loss_fn, **kwargs):
        if kwargs["stage"].startswith("stage2"):
            kwargs["clip_params"] = self.model.parameters()
        return super().train(params, loss_fn, **kwargs)


@pytest.mark.parametrize("scope", ["off_ramps", "model"])
def test_release_scope_clips_a_norm_that_includes_the_frozen_backbones_gradients(monkeypatch, scope):
    method, model, backbone, data, _ = _setup(stage2_clip_scope=scope)
    trainer = LoopTrainer(model, data, dataclasses.replace(FAST_TRAIN, max_grad_norm=0.05), 0,
                          backbone.tokenizer.pad_token_id, "cpu", progress=False)
    offramps = [p for head in model.heads[:-1] for p in head.parameters()]
    top = f"encoder.layer.{backbone.num_layers - 1}."  # layer L feeds no off-ramp: no gradient in either scope
    calls, real = [], torch.nn.utils.clip_grad_norm_

    def norm(params) -> float:
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])).item()

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        if len(trainer.stages) == 1:  # stage 2
            before = norm(offramps)
            with_grads = {name for name, p in model.backbone.named_parameters() if p.grad is not None}
            final_grads = [p.grad is not None for p in model.heads[-1].parameters()]
            total = real(params, max_norm, *args, **kwargs).item()
            calls.append((before, total, norm(offramps), with_grads, any(final_grads)))
            return torch.tensor(total)
        return real(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    method.fit(trainer)
    assert len(calls) == 2  # 32 examples, batches of 16, one epoch
    for before, total, after, with_grads, final_has_grads in calls:
        assert not final_has_grads  # the final classifier is not in the off-ramp loss in either scope
        assert not any(top in name or "pooler" in name for name in with_grads)
        if scope == "off_ramps":
            assert not with_grads and total == pytest.approx(before)
        else:  # gradients reached the frozen embeddings and layers 1..L-1 and count in the norm
            assert any("embeddings" in name for name in with_grads) and any("layer.0." in name for name in with_grads)
            assert total > before * 1.01
        assert total > 0.05  # clipping is active, so the norm it was computed over decides the step
        assert after == pytest.approx(before * 0.05 / (total + 1e-6), rel=1e-4)


def test_clip_scopes_differ_only_through_the_backbone_gradients_and_only_when_clipping_bites():
    default = _fit(0.05)
    last = len({name.split(".")[1] for name in default if name.startswith("heads.")}) - 1
    offramp = [name for name in default if name.startswith("heads.") and not name.startswith(f"heads.{last}.")]
    # Declared non-deviation: clipping over model.parameters() alone changes nothing in eebench, because the
    # backbone runs without autograd in stage 2 and no other parameter holds a gradient there.
    only_clip_set = _fit(0.05, ClipOverModel)
    assert all(torch.equal(default[name], only_clip_set[name]) for name in default)
    # The release's scope (backbone gradients in the norm) changes the off-ramps, and nothing else.
    release = _fit(0.05, stage2_clip_scope="model")
    assert not all(torch.equal(default[name], release[name]) for name in offramp)
    assert all(torch.equal(default[name], release[name]) for name in default if name not in offramp)
    # When clipping never bites, the two scopes give the same weights bit for bit.
    unclipped, release_unclipped = _fit(1e6), _fit(1e6, stage2_clip_scope="model")
    assert all(torch.equal(unclipped[name], release_unclipped[name]) for name in unclipped)


def test_clip_scope_enters_the_checkpoint_key_only_when_it_is_the_releases():
    job = tiny_job("deebert", "sst2")
    assert DeeBERT().training_signature() == {"recipe": "deebert-two-stage"}  # stored checkpoints keep their keys
    release = DeeBERT(stage2_clip_scope="model").training_signature()
    assert checkpoint_key(job, release) != checkpoint_key(job, DeeBERT().training_signature())
    with pytest.raises(ValueError, match="stage2_clip_scope"):
        DeeBERT(stage2_clip_scope="offramps")
