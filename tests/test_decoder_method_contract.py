"""The contract every registered GENERATION method must satisfy (parametrized over the registry).

Each decoder method is fine-tuned for a few steps on the tiny random Llama and real Dolly prompts, then:
full depth (knob None) equals `model.generate` greedy token for token; every knob's outputs are the same
batched (left-padded) as one prompt at a time; per-token layers lie in 1..L and every token was produced by
at least one LM-head evaluation. What a knob's exits are on an untrained tiny model is not judged.
"""

from __future__ import annotations

import pytest
import torch

from eebench.backbones import load_backbone
from eebench.evaluation.generation import (
    GenerationEvaluator,
    check_generation_output,
    encode_prompts,
    prompt_batches,
)
from eebench.methods import build_method, get_method_class, method_names
from eebench.methods.decoding import DecodeLimits
from eebench.methods.protocol import check_method_class
from eebench.runner import Job
from eebench.tasks import get_task, load_split
from eebench.training import LoopTrainer, TrainConfig

from conftest import SHARED_DATA

GENERATION = SHARED_DATA / "generation"
TRAIN = TrainConfig(epochs=1, lr=1e-3, batch_size=4, max_seq_length=64)
GENERATION_METHODS = [name for name in method_names() if "generation" in get_method_class(name).task_kinds]


@pytest.fixture(scope="module", params=GENERATION_METHODS)
def trained(request):
    spec = get_task("dolly")
    backbone = load_backbone("tiny-llama", seed=0)
    method = build_method(request.param)
    torch.manual_seed(0)
    model = method.attach(backbone, spec)
    train = load_split(spec, "train", GENERATION, limit=8, seed=0)
    job = Job(method=request.param, task="dolly", seed=0, backbone="tiny-llama", train=TRAIN)
    encoded = GenerationEvaluator().encode_train(train.examples, backbone, job, spec)
    method.fit(LoopTrainer(model, encoded, TRAIN, 0, backbone.tokenizer.pad_token_id, "cpu", progress=False))
    model.eval()
    dev = load_split(spec, "dev", GENERATION, limit=4, seed=0)
    return method, spec, backbone, encode_prompts(dev.examples, backbone.tokenizer)


def test_generation_methods_are_registered():
    assert "calm" in GENERATION_METHODS


def test_class_satisfies_protocol(trained):
    method, *_ = trained
    check_method_class(type(method))
    assert callable(getattr(method, "generate", None))


def test_full_depth_equals_model_generate(trained):
    method, spec, backbone, prompts = trained
    limits = DecodeLimits(max_new_tokens=10, stop_token_ids=frozenset(backbone.stop_token_ids()))
    pad = backbone.tokenizer.pad_token_id
    batch = prompt_batches(prompts, list(range(len(prompts))), len(prompts), pad, limits, "cpu")[0]
    with torch.inference_mode():
        out = method.generate(batch, None)
        reference = backbone.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                            max_new_tokens=10, do_sample=False, pad_token_id=pad,
                                            eos_token_id=sorted(limits.stop_token_ids))
    check_generation_output(out, len(prompts), backbone.num_layers)
    width = batch.input_ids.shape[1]
    for row, tokens in enumerate(out.tokens):
        expected = reference[row, width:].tolist()
        assert tokens == expected[:len(tokens)] and all(t == pad for t in expected[len(tokens):]), row
        assert out.token_layers[row] == [backbone.num_layers] * len(tokens)


def test_every_knob_batched_equals_one_at_a_time(trained):
    method, spec, backbone, prompts = trained
    limits = DecodeLimits(max_new_tokens=8, stop_token_ids=frozenset(backbone.stop_token_ids()))
    pad, last = backbone.tokenizer.pad_token_id, backbone.num_layers
    together_batch = prompt_batches(prompts, list(range(len(prompts))), len(prompts), pad, limits, "cpu")[0]
    knobs = method.knobs(spec, last)
    assert knobs, "a method must expose at least one operating point"
    with torch.inference_mode():
        for knob in knobs:
            together = method.generate(together_batch, knob)
            check_generation_output(together, len(prompts), last)
            for row in range(len(prompts)):
                alone = method.generate(prompt_batches(prompts, [row], 1, pad, limits, "cpu")[0], knob)
                assert alone.tokens[0] == together.tokens[row], (knob, row)
                assert alone.token_layers[0] == together.token_layers[row], (knob, row)
            assert all(1 <= layer <= last for row in together.token_layers for layer in row)
            assert all(count >= 1 for row in together.head_evals for count in row)
