"""The one contract every registered method must satisfy (timm style: parametrized over the registry).

Each method is trained for a few steps on a tiny random backbone and a slice of real data, then:
exits have batch shape and lie in 1..L; the first (largest-budget) knob reproduces the full model;
per-example exits do not depend on the batch (batched == one at a time); cost never exceeds full depth.

Installed plugins are parametrized too, and are judged only on what the protocol makes them guarantee. Whether
some knob exits early on a tiny random network trained for a few steps is a property of that network (a
confidence threshold of 0.8 is never reached by near-uniform logits), so it is asserted for the built-in
methods only, as a check that their exit rules are wired, and is a warning for a plugin.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from eebench.backbones import load_backbone
from eebench.methods import (
    ExitOutput,
    build_method,
    check_exit_output,
    get_method_class,
    list_methods,
    method_names,
)
from eebench.methods.protocol import check_method_class
from eebench.tasks import get_task, load_split
from eebench.training import LoopTrainer, collate, encode

from conftest import FAST_TRAIN, GLUE


def _trained(method_name: str, task_name: str):
    spec = get_task(task_name)
    backbone = load_backbone("tiny-bert", seed=0)
    method = build_method(method_name)
    torch.manual_seed(0)
    model = method.attach(backbone, spec)
    data = load_split(spec, "train", None if task_name == "graded" else GLUE, limit=64, seed=0)
    encoded = encode(data.examples, backbone.tokenizer, FAST_TRAIN.max_seq_length, spec.kind == "regression")
    method.fit(LoopTrainer(model, encoded, FAST_TRAIN, 0, backbone.tokenizer.pad_token_id, "cpu", progress=False))
    model.eval()
    dev = load_split(spec, "dev", None if task_name == "graded" else GLUE, limit=12, seed=0)
    dev_encoded = encode(dev.examples, backbone.tokenizer, FAST_TRAIN.max_seq_length, spec.kind == "regression")
    return method, spec, backbone, dev_encoded


def _cases():
    """Every registered method (installed plugins included) on each task kind it supports."""
    for name in method_names():
        kinds = get_method_class(name).task_kinds
        if "classification" in kinds:
            yield pytest.param((name, "graded"), id=f"{name}-classification")
        if "regression" in kinds:
            yield pytest.param((name, "stsb"), id=f"{name}-regression")


@pytest.fixture(scope="module", params=list(_cases()))
def trained(request):
    return _trained(*request.param)


def test_class_satisfies_protocol(trained):
    method, *_ = trained
    check_method_class(type(method))


def test_every_knob_gives_batch_shaped_exits_within_depth(trained):
    method, spec, backbone, dev = trained
    batch = collate(dev, list(range(len(dev))), backbone.tokenizer.pad_token_id, "cpu")
    L = backbone.num_layers
    knobs = method.knobs(spec, L)
    assert knobs, "a method must expose at least one operating point"
    any_early = False
    with torch.inference_mode():
        for knob in [None, *knobs]:
            out = method.predict(batch, knob)
            assert isinstance(out, ExitOutput)
            check_exit_output(out, len(dev), L)
            assert out.logits.shape == (len(dev), spec.num_labels)
            assert ((out.exit_layer >= 1) & (out.exit_layer <= L)).all()
            assert (out.head_macs > 0).all(), "the head that produced the answer costs something"
            any_early |= bool((out.exit_layer < L).any())
            if out.token_layers is not None:  # token-wise: per-token depths within the example's depth
                mask = batch["attention_mask"].bool()
                assert type(method).granularity == "token", "only token-wise methods report token_layers"
                assert out.token_layers.shape == batch["input_ids"].shape
                assert (out.token_layers[~mask] == 0).all() and (out.token_layers[mask] >= 1).all()
                assert (out.token_layers.amax(1) == out.exit_layer).all()
                any_early |= bool((out.token_layers[mask] < L).any())
    if _origin(type(method).name) == "built-in":
        assert any_early, "no knob ever exits early: the exit rule is not wired"
    elif not any_early:
        warnings.warn(f"plugin method '{type(method).name}': no knob exited early on the tiny random backbone; "
                      f"check on a trained model that its exit rule is wired", stacklevel=1)


def _origin(name: str) -> str:
    return {info.name: info.origin for info in list_methods()}.get(name, "unknown")


def test_largest_budget_knob_equals_full_model(trained):
    method, spec, backbone, dev = trained
    batch = collate(dev, list(range(len(dev))), backbone.tokenizer.pad_token_id, "cpu")
    with torch.inference_mode():
        full = method.predict(batch, None)
        largest = method.predict(batch, method.knobs(spec, backbone.num_layers)[0])
    assert (largest.exit_layer == backbone.num_layers).all()
    assert (full.exit_layer == backbone.num_layers).all()
    torch.testing.assert_close(largest.logits, full.logits, rtol=1e-5, atol=1e-6)
    # the full model evaluates only its final head, never more than the early-exit path at full depth
    assert (full.head_macs <= largest.head_macs).all()


def test_batched_exits_equal_one_at_a_time(trained):
    """Exits are per example: an example's exit and answer do not depend on the rest of its batch."""
    method, spec, backbone, dev = trained
    pad = backbone.tokenizer.pad_token_id
    batch = collate(dev, list(range(len(dev))), pad, "cpu")
    with torch.inference_mode():
        for knob in method.knobs(spec, backbone.num_layers):
            together = method.predict(batch, knob)
            for i in range(len(dev)):
                alone = method.predict(collate(dev, [i], pad, "cpu"), knob)
                assert alone.exit_layer.item() == together.exit_layer[i].item(), (knob, i)
                torch.testing.assert_close(alone.logits[0], together.logits[i], rtol=1e-4, atol=1e-4)
                # a batch of one takes the rules' scalar path (`decide_row`): it must charge the same heads
                assert alone.head_macs.item() == together.head_macs[i].item(), (knob, i)


def test_mean_pooling_exits_do_not_depend_on_padding():
    """With mean pooling the heads read a masked mean: padding added by a batch must not change anything."""
    spec = get_task("graded")
    backbone = load_backbone("tiny-bert", seed=0, pooling="mean")
    method = build_method("pabee")
    method.attach(backbone, spec).eval()
    data = load_split(spec, "dev", limit=10, seed=0)
    encoded = encode(data.examples, backbone.tokenizer, FAST_TRAIN.max_seq_length, False)
    pad = backbone.tokenizer.pad_token_id
    with torch.inference_mode():
        together = method.predict(collate(encoded, list(range(10)), pad, "cpu"), {"patience": 1})
        for i in range(10):
            alone = method.predict(collate(encoded, [i], pad, "cpu"), {"patience": 1})
            assert alone.exit_layer.item() == together.exit_layer[i].item()
            torch.testing.assert_close(alone.logits[0], together.logits[i], rtol=1e-4, atol=1e-4)


def test_traced_curve_equals_online_predictions(trained):
    """Traceable methods are evaluated from one recorded pass: every knob's replay must give the online
    path's exits and answers, and replaying no rule must give the full model."""
    from eebench.runner import is_traceable

    method, spec, backbone, dev = trained
    if not is_traceable(method, method.model if hasattr(method, "model") else None):
        assert not callable(getattr(method, "exit_rule", None)), "exit_rule without a MultiExitModel cannot be traced"
        return
    model = method.model
    batch = collate(dev, list(range(len(dev))), backbone.tokenizer.pad_token_id, "cpu")
    with torch.inference_mode():
        trace = model.trace(batch)
        full, replayed_full = method.predict(batch, None), model.replay(trace, None)
        torch.testing.assert_close(replayed_full.logits, full.logits, rtol=1e-5, atol=1e-6)
        assert torch.equal(replayed_full.head_macs, full.head_macs)
        for knob in method.knobs(spec, backbone.num_layers):
            online, replayed = method.predict(batch, knob), model.replay(trace, method.exit_rule(knob))
            assert replayed.exit_layer.tolist() == online.exit_layer.tolist(), knob
            torch.testing.assert_close(replayed.logits, online.logits, rtol=1e-4, atol=1e-5)
            assert torch.equal(replayed.head_macs, online.head_macs), knob
