"""DeeBERT against its spec: entropy rule, per-layer poolers from the pre-trained pooler, two stages."""

from __future__ import annotations

import math

import torch

from eebench.backbones import load_backbone
from eebench.methods.deebert import DeeBERT, entropy_rule
from eebench.methods.exits import entropy
from eebench.tasks import get_task, load_split
from eebench.training import LoopTrainer, encode

from conftest import FAST_TRAIN


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


def _setup():
    spec = get_task("graded")
    backbone = load_backbone("tiny-bert", seed=0)
    pretrained_pooler = {k: v.clone() for k, v in backbone.pooler.state_dict().items()}
    method = DeeBERT()
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


def test_stage1_trains_backbone_and_final_head_only_stage2_offramps_only():
    method, model, backbone, data, _ = _setup()
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
