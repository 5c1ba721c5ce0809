"""TR-BERT against its spec: dropped tokens leave attention for good, [CLS] stays, the log-probability and
length penalty by hand, the importance expert, the frozen-backbone RL stage, and costs with keys = kept tokens."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from eebench.backbones import attention_bias, keep_positions, load_backbone
from eebench.leaderboard import load_records
from eebench.methods.trbert import TRBERT
from eebench.runner import run_jobs
from eebench.tasks import get_task, load_split
from eebench.training import LoopTrainer, collate, encode

from conftest import FAST_TRAIN, tiny_job


def test_keep_positions_gathers_each_rows_kept_tokens_in_order():
    hidden = torch.arange(2 * 4, dtype=torch.float32).view(2, 4, 1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    keep = torch.tensor([[True, False, True, True], [True, True, False, True]])  # row 0's position 3 is padding
    kept, new_mask, positions = keep_positions(hidden, mask, keep, torch.arange(4).expand(2, 4))
    assert new_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert positions[0, :2].tolist() == [0, 2] and positions[1].tolist() == [0, 1, 3]
    assert kept[1, :, 0].tolist() == [4.0, 5.0, 7.0]


@pytest.fixture(scope="module")
def method():
    backbone = load_backbone("tiny-bert", seed=0).eval()  # 4 layers: selections after layers 1 and 2
    trbert = TRBERT(num_rollouts=2)
    torch.manual_seed(0)
    trbert.attach(backbone, get_task("graded")).eval()
    return trbert


def _batch(backbone, size=2, length=7):
    ids = torch.randint(1000, 2000, (size, length), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = backbone.tokenizer.cls_token_id
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_dropped_tokens_are_neither_queries_nor_keys(method):
    backbone = method.model.backbone
    batch = _batch(backbone, size=1)
    drop = {0: torch.tensor([[False, True, False, True, True, False, True]]),  # [CLS] asked to drop: kept anyway
            1: None}

    def choose(k, logits, present, positions):
        return drop[k] if drop[k] is not None else torch.ones_like(present, dtype=torch.bool)

    with torch.no_grad():
        out = method.run(batch, choose)
        # by hand: layer 1 on everything, then layers 2..L on the kept tokens alone
        hidden, bias = backbone.embed(batch["input_ids"], batch["attention_mask"])
        hidden = backbone.layer(1, hidden, bias)
        kept = hidden[:, [0, 1, 3, 4, 6]]
        small_bias = attention_bias(torch.ones(1, 5, dtype=torch.long), kept.dtype)
        for layer in range(2, backbone.num_layers + 1):
            kept = backbone.layer(layer, kept, small_bias)
        expected = method.model.head(backbone.summarize(kept, torch.ones(1, 5, dtype=torch.long)))
    torch.testing.assert_close(out["logits"], expected, rtol=1e-5, atol=1e-5)
    assert out["token_layers"].tolist() == [[4, 4, 1, 4, 4, 1, 4]]


def test_log_likelihood_and_length_penalty_by_hand(method):
    logits = torch.tensor([[2.0, -1.0, 0.5, 9.0]])
    trace = [{"logits": logits, "present": torch.tensor([[True, True, True, False]]),
              "keep": torch.tensor([[True, False, True, False]])}]
    p = torch.sigmoid(logits)[0]
    expected = (math.log(p[0]) + math.log(1 - p[1]) + math.log(p[2])) / 3
    assert method.log_likelihood(trace).item() == pytest.approx(expected, rel=1e-5)
    two_points = trace + [{**trace[0], "keep": torch.tensor([[True, False, False, False]])}]
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 0]])}
    assert method.length_penalty(two_points, batch).item() == pytest.approx(0.5 * (2 + 1) / 128)  # N = 128 padded
    real = TRBERT(penalty_length=None)
    assert real.length_penalty(two_points, batch).item() == pytest.approx(0.5 * (2 + 1) / 3)


def test_expert_rollout_keeps_the_most_important_tokens(method):
    method.importance = {7: [torch.tensor([0.0, 5.0, 1.0, 4.0, 3.0]), torch.zeros(5)]}
    choose = method._sampler(expert_rows=1, index=torch.tensor([7, 7]))
    logits = torch.zeros(2, 5)  # p = 0.5 each: the expert keeps round(2.5) = 2 tokens (+ [CLS] by the caller)
    keep = choose(0, logits, torch.ones(2, 5, dtype=torch.bool), torch.arange(5).expand(2, 5))
    assert keep[0].tolist() == [False, True, False, True, False]


def test_rl_stage_trains_only_the_selectors_and_costs_count_kept_keys(tmp_path):
    spec = get_task("graded")
    backbone = load_backbone("tiny-bert", seed=0)
    trbert = TRBERT(num_rollouts=2, alpha=5.0)
    torch.manual_seed(0)
    model = trbert.attach(backbone, spec)
    data = encode(load_split(spec, "train", None, limit=32, seed=0).examples, backbone.tokenizer, 48, False)
    trainer = LoopTrainer(model, data, FAST_TRAIN, 0, backbone.tokenizer.pad_token_id, "cpu", progress=False)
    steps = trbert.compute_importance(trainer)
    assert steps == 2 and len(trbert.importance) == 32 and all(len(v) == 2 for v in trbert.importance.values())
    trbert._guided_steps = 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train(list(model.selectors.parameters()), lambda b: trbert.rollout_loss(b, joint=False), stage="rl",
                  epochs=1, lr=1e-2)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith("selectors.") for k in changed), sorted(changed)
    assert {"mean_kept_fraction", "mean_reward"} <= trainer.stages[-1].keys()
    # through the runner: FLOPs charge dropped tokens nothing (not even as keys)
    job = tiny_job("trbert", train_limit=32, eval_limit=12)
    run_jobs([job], tmp_path / "out", tmp_path / "cache", progress=False, log=lambda _: None)
    records = load_records(tmp_path / "out")
    point = records[records.knob_label.str.contains("keep_threshold=0.5") & (records.batch_size == 1)].iloc[0]
    examples = pd.read_parquet(tmp_path / "out" / "examples" / f"{job.job_id}.parquet")
    rows = examples[examples.knob_label == point.knob_label]
    L = int(point.num_layers)
    assert point.saved_layer_speedup == pytest.approx(L * rows.n_tokens.sum() / (rows.mean_token_layer * rows.n_tokens).sum())
    # keys shrink with queries, so FLOPs fall about as fast as token-layers (selectors and head cost a little)
    assert point.saved_layer_speedup > 1.2 and 0.85 * point.saved_layer_speedup < point.flops_speedup < point.saved_layer_speedup
    with torch.no_grad():
        full = trbert.predict(collate(data, list(range(4)), backbone.tokenizer.pad_token_id, "cpu"), None)
    assert full.token_layers is None and (full.exit_layer == L).all()
