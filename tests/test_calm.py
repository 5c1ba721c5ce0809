"""CALM: decayed thresholds, the unbiased anytime loss, the confidence measures' exit semantics, variants."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from eebench.backbones import load_backbone
from eebench.evaluation.generation import GenerationEvaluator, encode_prompts, prompt_batches
from eebench.methods import build_method
from eebench.methods.calm import decayed_threshold
from eebench.methods.decoding import DecodeLimits
from eebench.runner import Job
from eebench.tasks import get_task, load_split
from eebench.training import LoopTrainer, TrainConfig

from conftest import SHARED_DATA

GENERATION = SHARED_DATA / "generation"
TRAIN = TrainConfig(epochs=1, lr=1e-3, batch_size=4, max_seq_length=64)


def test_decayed_threshold_forms():
    assert math.isclose(decayed_threshold(0.5, 0, 64, "paper", 4.0), 0.55)  # 0.9 * 0.5 + 0.1
    assert math.isclose(decayed_threshold(0.5, 0, 64, "code", 4.0), 0.5)    # starts at exactly lambda
    assert math.isclose(decayed_threshold(0.5, 64, 64, "code", 4.0), 0.45 + 0.05 * math.exp(-4))
    assert math.isclose(decayed_threshold(0.5, 64, 64, "paper", 4.0), 0.45 + 0.1 * math.exp(-4))
    assert decayed_threshold(0.99, 0, 64, "paper", 4.0) == 0.991
    assert decayed_threshold(0.5, 10, 64, "off", 4.0) == 0.5
    assert decayed_threshold(1.0, 0, 64, "paper", 4.0) == 1.0  # clipped to [0, 1]
    with pytest.raises(ValueError, match="decay form"):
        decayed_threshold(0.5, 1, 64, "linear", 4.0)


def _calm(**config):
    spec = get_task("dolly")
    backbone = load_backbone("tiny-llama", seed=0)
    method = build_method("calm", **config)
    torch.manual_seed(0)
    method.attach(backbone, spec)
    method.model.eval()
    return method, spec, backbone


def _train_batch(method, backbone, spec, n=4):
    train = load_split(spec, "train", GENERATION, limit=n, seed=0)
    job = Job(method="calm", task="dolly", seed=0, backbone="tiny-llama", train=TRAIN)
    encoded = GenerationEvaluator().encode_train(train.examples, backbone, job, spec)
    return encoded, encoded.collate(list(range(n)), backbone.tokenizer.pad_token_id, "cpu")


def test_anytime_loss_subset_is_unbiased():
    method, spec, backbone = _calm(exits_per_step=2)
    _, batch = _train_batch(method, backbone, spec)
    points = list(method.exit_points())
    assert points == [1, 2, 3, 4, 5]
    with torch.no_grad():
        estimates = [method.anytime_loss(batch, list(subset))[0] for subset in itertools.combinations(points, 2)]
        # the exact weighted loss: every exit, w_i = i
        states = dict(backbone.forward_states(batch["input_ids"], batch["attention_mask"]))
        targets, valid = batch["labels"][:, 1:], batch["labels"][:, 1:] != -100
        ce = {i: torch.nn.functional.cross_entropy(backbone.logits(states[i][:, :-1][valid]), targets[valid])
              for i in range(1, 7)}
        exact = sum(i * ce[i] for i in ce) / sum(ce)
    torch.testing.assert_close(torch.stack(estimates).mean(), exact, rtol=1e-5, atol=1e-6)
    assert torch.stack(estimates).std() > 0  # the subsets really differ


def _decode(method, backbone, knob, prompts=3, new=8):
    spec = get_task("dolly")
    dev = load_split(spec, "dev", GENERATION, limit=prompts, seed=0)
    limits = DecodeLimits(max_new_tokens=new)
    encoded = encode_prompts(dev.examples, backbone.tokenizer)
    batch = prompt_batches(encoded, list(range(prompts)), prompts, backbone.tokenizer.pad_token_id, limits, "cpu")[0]
    with torch.inference_mode():
        return method.generate(batch, knob)


@pytest.mark.parametrize("confidence,first_layer", [("softmax", 2), ("classifier", 2), ("saturation", 3)])
def test_always_confident_exits_at_the_first_allowed_point(confidence, first_layer):
    """lambda below every confidence: exit at the first exit point >= min_exit_layer; saturation is undefined
    there (no previous state of the token) and exits at the next one."""
    method, _, backbone = _calm(confidence=confidence, min_exit_layer=2, decay="off")
    out = _decode(method, backbone, {"threshold": -2.0})
    assert all(layers[0] == backbone.num_layers for layers in out.token_layers)  # the prefill's token
    assert {layer for layers in out.token_layers for layer in layers[1:]} == {first_layer}


def test_never_confident_runs_full_depth_and_counts_head_evaluations():
    method, _, backbone = _calm(confidence="softmax", exit_interval=2)
    assert method.exit_points() == (2, 4)
    out = _decode(method, backbone, {"threshold": 2.0})
    full = _decode(method, backbone, None)
    assert out.tokens == full.tokens
    assert all(layers == [backbone.num_layers] * len(layers) for layers in out.token_layers)
    # softmax reads the head at both exit points, then the final head produces the token
    assert all(evals[1:] == [3] * (len(evals) - 1) for evals in out.head_evals)
    saturation, _, _ = _calm(confidence="saturation", exit_interval=2)
    saturation.model.load_state_dict(method.model.state_dict())
    out = _decode(saturation, backbone, {"threshold": 2.0})
    assert all(evals == [1] * len(evals) for evals in out.head_evals)  # saturation reads no logits
    assert all(macs > 0 for macs in out.rule_macs)


def test_cee_baseline_variant_is_the_released_configuration():
    method, spec, backbone = _calm(variant="cee_baseline")
    assert method.config.propagation == "raw" and method.config.decay == "off"
    assert {"threshold": 0.975} in method.knobs(spec, backbone.num_layers)
    out = _decode(method, backbone, {"threshold": -2.0})
    assert {layer for layers in out.token_layers for layer in layers[1:]} == {2}  # never at layer 1


def test_oracle_knob_and_unknown_names():
    method, spec, backbone = _calm(confidence="oracle")
    assert method.knobs(spec, backbone.num_layers) == [{"oracle": 1.0}]
    out = _decode(method, backbone, {"oracle": 1.0})
    full = _decode(method, backbone, None)
    assert [row[:2] for row in out.tokens] == [row[:2] for row in full.tokens]
    with pytest.raises(ValueError, match="unknown confidence"):
        build_method("calm", confidence="entropy")
    with pytest.raises(ValueError, match="unknown variant"):
        build_method("calm", variant="t5x")


def test_fit_trains_backbone_then_classifier_on_a_frozen_model():
    method, spec, backbone = _calm(exits_per_step=2, classifier_epochs=1)
    encoded, batch = _train_batch(method, backbone, spec, n=8)
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    with torch.no_grad():
        loss_before = method.anytime_loss(batch, [1, 3])[0]
    trainer = LoopTrainer(method.model, encoded, TRAIN, 0, backbone.tokenizer.pad_token_id, "cpu", progress=False)
    method.fit(trainer)
    after = method.model.state_dict()
    assert [s["stage"].split(":")[0] for s in trainer.stages] == ["anytime", "exit classifier"]
    assert not torch.equal(before["exit_classifier.weight"], after["exit_classifier.weight"])
    assert not torch.equal(before["backbone.model.model.layers.0.mlp.up_proj.weight"],
                           after["backbone.model.model.layers.0.mlp.up_proj.weight"])
    assert all(p.requires_grad for p in method.model.backbone.parameters())  # unfrozen again
    with torch.no_grad():
        assert method.anytime_loss(batch, [1, 3])[0] < loss_before  # it learned the training batch


def test_exit_set_is_an_inference_choice_sharing_one_checkpoint():
    """Training covers every layer whatever the exit set, so a sparse softmax set reuses the dense checkpoint."""
    dense, _, _ = _calm(confidence="softmax")
    sparse, _, _ = _calm(confidence="softmax", exit_interval=2, min_exit_layer=2)
    assert sparse.exit_points() == (2, 4) and sparse.training_points() == dense.training_points() == (1, 2, 3, 4, 5)
    assert sparse.training_signature() == dense.training_signature()


def test_classifier_reads_the_final_normed_state_unless_raw():
    """Default: the classifier sees norm(h) (what the shared head sees), so rescaling a state leaves its
    confidence unchanged; `classifier_input="raw"` (the paper's M h) does not; both train the same way."""
    normed, _, backbone = _calm(confidence="classifier")
    raw, _, _ = _calm(confidence="classifier", classifier_input="raw")
    raw.model.load_state_dict(normed.model.state_dict())
    hidden = torch.randn(5, backbone.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(normed.model.classify(3.0 * hidden, "normed"), normed.model.classify(hidden, "normed"))
        assert not torch.allclose(raw.model.classify(3.0 * hidden, "raw"), raw.model.classify(hidden, "raw"))
    assert normed.training_signature()["classifier_input"] == "normed" != raw.training_signature()["classifier_input"]
    with pytest.raises(ValueError, match="classifier_input"):
        build_method("calm", classifier_input="logits")
