"""Micro-benchmarks (pytest-benchmark), not unit tests: CI does not run them. Run and compare with

    python -m pytest benchmarks/micro --benchmark-autosave          # saves .benchmarks/<machine>/NNNN_*.json
    pytest-benchmark compare --group-by=name                         # compares the saved runs

Backbone: $EEBENCH_BENCH_BACKBONE (default `minilm`, the offline MiniLM-L6); threads: torch's default.
What they isolate: the cost of one transformer layer, what an exit head + exit decision adds to it,
batched early exit (exited rows leave the batch) against the full model at fixed exit distributions, so
wall-clock realisation can be read without any training noise, and (group "no-exit bs1") each layer-wise
method's own network and rule at a setting that never exits, beside the full model: issue 18's target is
full / no-exit >= 0.95 for every rule (`pytest-benchmark compare --group-by=group` shows the ratio).
"""

from __future__ import annotations

import os

import pytest
import torch

# benchmarks/micro/profile_exit.py: one table of rules for both
from profile_exit import RULES, build, layers_only

from eebench.backbones import load_backbone
from eebench.methods.exits import ExitHead, MultiExitModel, RuleState
from eebench.tasks import get_task

SEQ_LEN = 32


class FixedExits:
    """Exit rule with predetermined exit layers per row (state keeps each row's target as rows leave)."""

    def __init__(self, targets: torch.Tensor):
        self.targets = targets

    def start(self, batch_size: int, device: torch.device) -> RuleState:
        return {"target": self.targets.to(device)}

    def decide(self, layer, logits, state, pooled=None):
        return state["target"] <= layer, state


@pytest.fixture(scope="module")
def model() -> MultiExitModel:
    backbone = load_backbone(os.environ.get("EEBENCH_BENCH_BACKBONE", "minilm"), seed=0)
    heads = [ExitHead(backbone.pooler, backbone.hidden_size, 2, 0.1, 0.02) for _ in range(backbone.num_layers)]
    return MultiExitModel(backbone, heads).eval()


def _batch(model: MultiExitModel, size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    vocab = model.backbone.model.config.vocab_size
    ids = torch.randint(1000 if vocab > 2000 else 5, vocab, (size, SEQ_LEN), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


@pytest.mark.parametrize("batch_size", [1, 32])
def test_one_layer(benchmark, model, batch_size):
    hidden, bias = model._embed(_batch(model, batch_size))
    with torch.inference_mode():
        benchmark(model.backbone.layer, 1, hidden, bias)


@pytest.mark.parametrize("batch_size", [1, 32])
def test_exit_head_and_decision(benchmark, model, batch_size):
    """One head (pooler + classifier) and an entropy-style decision with its host sync, per layer."""
    batch = _batch(model, batch_size)
    hidden, _ = model._embed(batch)
    head = model.heads[0]

    def head_and_decide():
        logits = head.classifier(head.pool(model.backbone.summarize(hidden, batch["attention_mask"])))
        return bool((logits.softmax(-1).amax(-1) > 0.9).any())

    with torch.inference_mode():
        benchmark(head_and_decide)


def _targets(distribution: str, size: int, layers: int) -> torch.Tensor:
    if distribution == "none":          # nobody exits: the heads' pure overhead
        return torch.full((size,), layers)
    if distribution == "half-depth":    # everybody at L/2: the ideal 2x
        return torch.full((size,), max(1, layers // 2))
    if distribution == "uniform":       # exits spread over 1..L
        return torch.arange(size) % layers + 1
    return torch.where(torch.arange(size) % 10 == 0, layers, 1)  # "skewed": 90 % at layer 1, 10 % run all


@pytest.mark.parametrize("batch_size", [1, 32])
@pytest.mark.parametrize("distribution", ["full-model", "none", "half-depth", "uniform", "skewed"])
def test_batched_early_exit(benchmark, model, batch_size, distribution):
    batch = _batch(model, batch_size)
    layers = model.num_layers
    benchmark.extra_info["saved_layer_speedup"] = (
        1.0 if distribution == "full-model" else layers / float(_targets(distribution, batch_size, layers).float().mean()))
    with torch.inference_mode():
        if distribution == "full-model":
            benchmark(model.full, batch)
        else:
            rule = FixedExits(_targets(distribution, batch_size, layers))
            benchmark(model.early_exit, batch, rule)


@pytest.fixture(scope="module")
def rule_networks() -> dict:
    """Each rule on its own method's network (untrained; classifiers agree on class 0: see profile_exit.build)."""
    backbone = load_backbone(os.environ.get("EEBENCH_BENCH_BACKBONE", "minilm"), seed=0)
    spec = get_task("sst2")
    return {rule: build(method_name, backbone, spec) for rule, (method_name, *_) in RULES.items()}


@pytest.mark.parametrize("rule", ["full-model", *RULES])
def test_no_exit_point_at_batch_size_one(benchmark, rule_networks, rule):
    """A point that exits nowhere pays every head and decision and saves nothing: its time over the full model's
    is the per-layer overhead at batch size 1 (the realization such a point gets is full / this)."""
    benchmark.group = "no-exit bs1"
    batch = _batch(next(iter(rule_networks.values()))[1], 1)
    with torch.inference_mode():
        if rule == "full-model":
            benchmark(next(iter(rule_networks.values()))[1].full, batch)
        else:
            method, model = rule_networks[rule]
            benchmark(model.early_exit, batch, method.exit_rule(RULES[rule][1]))


@pytest.mark.parametrize("rule", list(RULES))
def test_no_exit_floor_at_batch_size_one(benchmark, rule_networks, rule):
    """What a point that exits nowhere cannot avoid: all L layers and all L heads of the rule's network, no
    decision. no-exit / this = what the rule's decisions and bookkeeping add (profile_exit.py prints the share)."""
    benchmark.group = "no-exit bs1"
    _, model = rule_networks[rule]
    batch = _batch(model, 1)
    with torch.inference_mode():
        benchmark(layers_only, model, batch, heads=model.num_layers)


def test_bootstrap_scores_of_a_stored_leaderboard(benchmark):
    """Every interval score of every (job, bootstrap draw) of a stored results folder: what `eebench leaderboard
    --ci` computes for the intervals and again for the differences. Until cf130e0 each draw was one pandas pass
    (31.6 s for 200 of this folder's 1000 draws on the 2-core VM); all draws are now one array pass (0.14-0.26 s
    for all 1000, same VM, while a leaderboard job was training)."""
    from pathlib import Path

    from eebench.analysis import bootstrap_draws, with_floor_metrics
    from eebench.leaderboard import draw_seed_scores, load_records

    folder = Path(__file__).resolve().parents[2] / "results" / "leaderboard-minilm-cf14923"
    records, draws = with_floor_metrics(load_records(folder), folder), bootstrap_draws(folder)
    benchmark.group = "leaderboard"
    benchmark.pedantic(draw_seed_scores, args=(records, draws), rounds=3)
