"""Generation metrics: ROUGE-L and token agreement by hand, BERTScore with the local MiniLM (no network)."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

from eebench.metrics import METRIC_DESCRIPTIONS, bertscore_f1, generation_metrics, rouge_l, token_agreement
from eebench.metrics.generation import GENERATION_METRIC_DESCRIPTIONS
from eebench.tasks import get_task, task_names


def test_rouge_l_hand_values():
    scores = rouge_l(["the cat sat on the mat", "alpha beta gamma", "the cat lay on the mat"],
                     ["the cat sat on the mat", "delta epsilon zeta", "the cat sat on the mat"])
    assert scores.dtype == np.float64 and scores.shape == (3,)
    # identical; disjoint; LCS 'the cat on the mat' = 5 of 6 tokens each side: P = R = F = 5/6
    assert scores == pytest.approx([1.0, 0.0, 5 / 6])
    # P = 2/2, R = 2/4: F = 2PR/(P+R) = 2/3; stemming makes 'running' match 'runs'
    assert rouge_l(["dogs running"], ["the dog runs fast"]) == pytest.approx([2 / 3])


def test_rouge_l_empty_and_multiline():
    assert rouge_l(["", "   ", "", "text"], ["some reference", "ref", "", ""]) == pytest.approx([0, 0, 1, 0])
    # newline-separated reference sentences (CNN/DM highlights): summary-level LCS, one scorer for all
    highlights = "the cat sat on the mat\nthe dog ran"
    assert rouge_l(["the cat sat on the mat\nthe dog ran"], [highlights]) == pytest.approx([1.0])
    assert 0.0 < rouge_l(["the dog ran"], [highlights])[0] < 1.0
    assert rouge_l([], []).shape == (0,)
    with pytest.raises(ValueError, match="lengths"):
        rouge_l(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="decode"):
        rouge_l([[1, 2]], ["a"])


def test_token_agreement_hand_examples():
    early = [[1, 2, 3], [1, 2], [1, 2, 3, 4], [], [], [5, 6], [9, 2, 3]]
    full = [[1, 2, 3], [1, 2, 3, 4], [1, 2], [], [7], [6, 5], [1, 2, 3]]
    # same; early too short (2 of 4); early runs on (2 of 4); both empty; early empty; swapped; first differs
    assert token_agreement(early, full) == pytest.approx([1.0, 0.5, 0.5, 1.0, 0.0, 0.0, 2 / 3])
    assert token_agreement([np.array([4, 5])], [np.array([4, 6])]) == pytest.approx([0.5])
    with pytest.raises(ValueError, match="lengths"):
        token_agreement([[1]], [])


def test_generation_metrics_without_bertscore():
    preds, refs, full = ["the cat sat", "a dog"], ["the cat sat", "the dog ran"], ["the cat sat", "a dog"]
    scores, name = generation_metrics(preds, refs, full, [[1, 2], [3]], [[1, 2], [4]], scorer="none")
    assert list(scores) == ["rougeL", "bertscore_f1", "consistency_rougeL", "token_agreement"]
    assert all(v.shape == (2,) and v.dtype == np.float64 for v in scores.values())
    assert np.isnan(scores["bertscore_f1"]).all() and "skipped" in name
    assert scores["rougeL"] == pytest.approx([1.0, 0.4])  # P = 1/2, R = 1/3
    assert scores["consistency_rougeL"] == pytest.approx([1.0, 1.0])
    assert scores["token_agreement"] == pytest.approx([1.0, 0.0])
    with pytest.raises(ValueError, match="lengths"):
        generation_metrics(preds, refs, full[:1], [[1], [2]], [[1], [2]], scorer="none")


def test_descriptions_cover_generation_metrics():
    used = {m for name in task_names("generation") for m in get_task(name).metric_names}
    assert used <= set(GENERATION_METRIC_DESCRIPTIONS) <= set(METRIC_DESCRIPTIONS)
    assert {"accuracy", "mcc", "spearman"} <= set(METRIC_DESCRIPTIONS)  # the classification ones are kept
    assert all("\n" not in v for v in METRIC_DESCRIPTIONS.values())


def test_unknown_bertscore_scorer_names_the_fix():
    with pytest.raises(ValueError, match="no default layer"):
        bertscore_f1(["a"], ["a"], scorer="no-such-model-xyz")


def test_bertscore_local_minilm(monkeypatch):
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("no network in this test")

    # every connection attempt is recorded (transformers may swallow the error) and refused; env flags such
    # as HF_HUB_OFFLINE would come too late, the hub client reads them when first imported
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    preds = ["The cat sat on the mat.", "Stock markets fell sharply on Monday.", "", "A dog barks."]
    refs = ["The cat sat on the mat.", "The recipe needs two eggs and flour.", "", "The dog is barking."]
    started = time.perf_counter()
    scores, name = bertscore_f1(preds, refs)
    assert time.perf_counter() - started < 60
    assert scores.shape == (4,) and scores.dtype == np.float64
    assert ((scores >= 0) & (scores <= 1)).all()
    assert scores[0] == pytest.approx(1.0, abs=1e-5)  # identical pair
    assert scores[2] == 1.0  # two empty texts, scored without bert-score
    assert scores[0] > scores[3] > scores[1]  # paraphrase between identical and unrelated
    assert "minilm" in name and "layer 6" in name
    again, _ = bertscore_f1(preds[:1], refs[:1])  # cached scorer: same model, same number
    assert again[0] == pytest.approx(scores[0])
    assert attempts == []
