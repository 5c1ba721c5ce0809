"""HashEE against its spec: bucket filling, rankings, depth semantics (bucket e = e - 1 layers, special ids to
the top, padding never active), and token-weighted costs through the runner."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from eebench.leaderboard import load_records
from eebench.methods.hashee import HashEE, bucket_table, frequency_ranking, mutual_information_ranking
from eebench.runner import run_jobs

from conftest import tiny_job


def test_buckets_fill_by_distinct_ids_and_unranked_ids_run_everything():
    # V = 6 ranked ids, B = 3, m = 4: two ids per bucket, step 1 -> buckets 2, 3, 4; unranked ids -> m.
    table = bucket_table([5, 3, 9, 7, 1, 2], vocab_size=12, num_buckets=3, max_layer=4)
    assert table[[5, 3, 9, 7, 1, 2]].tolist() == [2, 2, 3, 3, 4, 4]
    assert table[[0, 4, 6, 8, 10, 11]].tolist() == [4] * 6


def test_bucket_step_can_overshoot_max_layer():
    # m = 13, B = 6: step 2 -> buckets 2, 4, ..., 12 and the leftovers at 14 (they run every layer).
    table = bucket_table(list(range(13)), vocab_size=13, num_buckets=6, max_layer=13)
    assert table.tolist() == [2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14]


def test_frequency_ranking_counts_occurrences_and_skips_special_ids():
    ranked = frequency_ranking([[101, 7, 7, 9, 102], [101, 9, 7, 4, 102], [101, 4, 102]], special_ids={101, 102})
    assert ranked == [7, 4, 9]  # 7 x3; 4 and 9 x2, ties by id


def test_mutual_information_ranking_by_hand():
    # 7 occurrences, p(y) = 1/2. MI(1) = 2/7 log 2 (only positive), MI(3) = 1/7 log 2 (only negative, rarer),
    # MI(2) = 2 * 2/7 * log((2/7) / (4/7 * 1/2)) = 0 (in both classes alike).
    ids, labels = [[1, 2], [1, 2], [3, 2], [2]], [1, 1, 0, 0]
    assert mutual_information_ranking(ids, labels, special_ids=set()) == [1, 3, 2]
    with pytest.raises(ValueError, match="binary"):
        mutual_information_ranking(ids, [0, 1, 2, 0], set())


def test_token_depths_follow_the_buckets():
    from eebench.backbones import load_backbone
    from eebench.tasks import get_task

    backbone = load_backbone("tiny-bert", seed=0)  # 4 layers -> m = 5
    method = HashEE(num_buckets=4)
    model = method.attach(backbone, get_task("graded"))
    model.buckets.copy_(bucket_table([2000, 2001, 2002, 2003], model.buckets.numel(), 4, 5))
    cls, sep, pad = backbone.tokenizer.cls_token_id, backbone.tokenizer.sep_token_id, backbone.tokenizer.pad_token_id
    batch = {"input_ids": torch.tensor([[cls, 2000, 2001, 2002, 2003, 3000, sep, pad]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])}
    # buckets 2, 3, 4, 5 -> depths 1..4; unseen id 3000 and [CLS]/[SEP] -> all 4 layers; padding 0
    assert method.token_depths(batch).tolist() == [[4, 1, 2, 3, 4, 4, 4, 0]]


def test_token_weighted_costs_through_the_runner(tmp_path):
    job = tiny_job("hashee", train_limit=48, eval_limit=16)
    run_jobs([job], tmp_path / "out", tmp_path / "cache", progress=False, log=lambda _: None)
    records = load_records(tmp_path / "out")
    examples = pd.read_parquet(tmp_path / "out" / "examples" / f"{job.job_id}.parquet")
    hashed = records[records.knob_label.str.contains("hashed=1") & (records.batch_size == 1)].iloc[0]
    point = examples[examples.knob_label == hashed.knob_label]
    L = int(hashed.num_layers)
    # saved-layer speed-up is token-weighted: L * sum n / sum over tokens of layers run
    expected = L * point.n_tokens.sum() / (point.mean_token_layer * point.n_tokens).sum()
    assert hashed.saved_layer_speedup == pytest.approx(expected)
    assert 1.0 < hashed.saved_layer_speedup and hashed.flops_speedup > 1.0
    # exited tokens stay keys: FLOPs save less than layers do
    assert hashed.flops_speedup < hashed.saved_layer_speedup
    full = records[records.is_full_model & (records.batch_size == 1)].iloc[0]
    assert full.saved_layer_speedup == 1.0 and np.isclose(full.flops_speedup, 1.0)


def test_token_level_flops_by_hand():
    from eebench import costs

    # One example, L = 2, three real tokens at depths 2, 1, 2 (+ padding); d = 2, f = 8.
    queries = costs.token_layer_counts(np.array([[2, 1, 2, 0]]), 2)
    assert queries.tolist() == [[3.0, 2.0]]
    keys = costs.layerwise_token_counts(np.array([2]), np.array([3]), 2)  # every real token is a key: n = 3
    # MACs(q, n) = 2qd^2 + 2nd^2 + 2qdf + 2qnd = 8q + 8n + 32q + 4qn: (3, 3) -> 180, (2, 3) -> 128
    assert costs.example_flops(queries, keys, np.array([10.0]), 2, 8).tolist() == [2 * (180 + 128 + 10)]
