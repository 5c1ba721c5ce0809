"""Cost accounting, defined once: layers executed -> saved-layer speed-up, FLOPs and FLOPs speed-up.

Every number derives from what a method reported per example (`ExitOutput`): the layers it executed
(per token for token-wise methods) and the MACs its exit heads spent. `GLOSSARY` is the single definition
of every metric; the README's glossary is printed from it (`eebench glossary`).

FLOPs convention (../shared/docs/methods/README.md): per layer, with n visible tokens (keys/values) and
q query tokens updated, hidden size d and FFN inner size f (= 4d for BERT-style models):

    MACs = 2·q·d² (Q, output proj.) + 2·n·d² (K, V proj.) + 2·q·d·f (FFN) + 2·q·n·d (scores, weighted sum)

which for f = 4d is the spec's (10q + 2n)·d² + 2·q·n·d. FLOPs = 2 x MACs. Embeddings, LayerNorm, biases
and softmax are excluded; the exit heads that were actually evaluated are included.
"""

from __future__ import annotations

import numpy as np

GLOSSARY: dict[str, str] = {
    "num_layers": "L, the number of transformer layers of the backbone.",
    "exit_layer": "per example: the number of layers executed, 1..L (layer i exits after computing layers 1..i).",
    "mean_exit_layer": "mean over examples of exit_layer.",
    "saved_layer_speedup": "L x N / sum_i exit_layer_i = L / mean_exit_layer (token-wise methods: token-weighted, "
                           "L x sum_i n_i / sum_i sum_t layers_it). The papers' 'x' ratio. NOT the '1 - avg/L' that "
                           "PABEE's and ConsistentEE's code print as 'speed-up' (= saved_layer_fraction).",
    "saved_layer_fraction": "1 - mean_exit_layer / L, what PABEE/PCEE/ConsistentEE code logs as 'Speed Up'.",
    "flops": "per example: 2 x [sum over executed layers of MACs(q, n) + MACs of the exit heads evaluated], "
             "MACs(q, n) = 2qd^2 + 2nd^2 + 2qdf + 2qnd, n = the example's real (unpadded) token count.",
    "flops_speedup": "sum_i flops_full_i / sum_i flops_i, the full model = L layers + its final head only.",
    "wallclock_speedup": "median over rounds of t_full,round / t_method,round, paired round by round (records "
                         "up to commit 533c14d: median t_full / median t_method); every round kept "
                         "(wallclock_seconds_repeats, _min, _max, with the load_average). t = the time to run "
                         "the same timing examples at "
                         "the same batch size, in the same process, after warm-up (perf_counter on CPU; CUDA "
                         "events + synchronize on GPU). Each batch runs through the full model and every point "
                         "back to back (order rotating per batch); a round is one pass, at least 3, more until the "
                         "full model ran 3 s (at most 15). Batched runs drop exited examples from the batch.",
    "wallclock_speedup_spread": "(max - min) / median over rounds of t_method,round / t_full,round: how far the "
                                "speed-up itself moved; a slow round that hits both cancels.",
    "realization": "wallclock_speedup / timed_saved_layer_speedup at one batch size: the share of the saved layers "
                   "that the clock realises (1.0 = every saved layer saves its full share of time).",
    "timed_saved_layer_speedup": "saved_layer_speedup over the timed examples only (a seeded random sample of "
                                 "timing_examples dev examples, the same for every method of a task; the first N in "
                                 "records from before the sample), so that realization compares like with like.",
    "timing_flag": "why a wall-clock number is not to be trusted, '' if nothing: realization > 1.15 (faster than "
                   "the saved layers allow) or wallclock_speedup_spread > 25% after one re-timing. "
                   "Flagged cells carry a numbered dagger in `eebench points`; a wall-clock leaderboard counts "
                   "them per row (flagged timings: flagged of timed points, all seeds).",
    "mean_token_layer": "token-wise methods: sum over tokens of layers that updated them / real tokens (the token-"
                        "weighted depth); layer-wise methods: mean_exit_layer.",
    "curve_cost_ratio": "time to evaluate every operating point of a job on dev / time of one full-model pass "
                        "over the same dev set (about 1 when the curve is replayed from one traced pass).",
    "decoder_flops": "generation, per row: 2 x sum over its generated tokens t of [layers_t x MACs_layer(n_t) + "
                     "head_evals_t x d V + propagated_t x 2 d g e] + the exit rule's own MACs; MACs_layer(n) = "
                     "d h e (Q) + 2 d g e (K, V) + h e d (O) + 3 d f (SwiGLU) + 2 n h e (attention over the n "
                     "real context tokens); propagated_t = L - layers_t for CALM's and the raw propagation, 0 for "
                     "copying K/V. The prompt's prefill (full depth for every method) is not counted.",
    "generation speed-ups": "per generated token, because an early-exit output can be shorter or longer than the "
                            "full model's: saved_layer_speedup = L x T / sum_t layers_t; flops_speedup = (full "
                            "FLOPs / full tokens) / (method FLOPs / method tokens); wallclock_speedup = "
                            "tokens_per_second / full-depth tokens_per_second on the same prompts, batch size and "
                            "process (the clock includes the prefill and all bookkeeping).",
    "tokens_per_second": "generated tokens / wall-clock seconds of greedy decoding of the timing prompts, prefill "
                         "included, median over repeats.",
    "lm-eval records": "`eebench lm-eval`: metric = lm-eval's mean per-document score (ROUGE-L for the eebench tasks); "
                       "costs as for generation over the documents lm-eval sent; tokens_per_second = generated tokens "
                       "/ seconds inside the method's generate over one pass of those requests at the run's batch "
                       "size (no interleaved repeats), wallclock_speedup its ratio to the full model's pass.",
    "rougeL / consistency_rougeL": "ROUGE-L F (rouge-score, stemmed) of the output against the reference / "
                                   "against the full model's output for the same prompt (textual consistency).",
    "token_agreement": "per prompt: positions where the early-exit output has the full model's token / "
                       "max(len(early), len(full)); mean over prompts.",
    "metric": "the task's primary metric on dev (accuracy, F1, Matthews corr., Spearman), 0-1 scale.",
    "floor_metric": "F, the best primary metric a constant prediction reaches on dev (majority-class accuracy, "
                    "all-positive F1, 0 for MCC and correlations); a metric <= F + 0.01 is floor-level and never "
                    "counts as within tolerance.",
    "auc": "(1 / (hi - lo)) * integral_lo^hi max(F, best(s)) ds, best(s) = max metric over points with speed-up "
           ">= s (full model at 1.0): the Pareto frontier extended with the floor, so a short grid is not scored 0 "
           "beyond its fastest point.",
    "standard_finetune_metric": "the task's plain fine-tune on the same backbone and seed (DeeBERT's full model), "
                                "the second reference beside each method's own full model.",
    "method difference": "score(A) - score(B), seed means; interval: percentiles over bootstrap draws r of "
                         "mean_seeds score_r(A) - mean_seeds score_r(B), draw r resampling the same dev examples "
                         "for every job of the task. 'resolved' = the interval excludes 0 and A > B in every seed.",
}


def layer_macs(queries: np.ndarray | float, keys: np.ndarray | float, hidden: int, ffn: int) -> np.ndarray:
    """MACs of one transformer layer updating `queries` tokens that attend over `keys` tokens."""
    q = np.asarray(queries, dtype=np.float64)
    n = np.asarray(keys, dtype=np.float64)
    d, f = float(hidden), float(ffn)
    return 2 * q * d * d + 2 * n * d * d + 2 * q * d * f + 2 * q * n * d


def layerwise_token_counts(exit_layer: np.ndarray, n_tokens: np.ndarray, num_layers: int) -> np.ndarray:
    """Per example and layer, the tokens updated: (N, L) with n_tokens where layer <= exit_layer, else 0."""
    layers = np.arange(1, num_layers + 1)[None, :]
    executed = layers <= np.asarray(exit_layer)[:, None]
    return np.where(executed, np.asarray(n_tokens, dtype=np.float64)[:, None], 0.0)


def token_layer_counts(token_layers: np.ndarray, num_layers: int) -> np.ndarray:
    """(N, S) layers per token (0 at padding) -> (N, L) tokens updated at each layer (the q of MACs(q, n))."""
    layers = np.arange(1, num_layers + 1)[None, None, :]
    return (np.asarray(token_layers)[:, :, None] >= layers).sum(axis=1).astype(np.float64)


def example_flops(queries: np.ndarray, keys: np.ndarray, head_macs: np.ndarray, hidden: int, ffn: int) -> np.ndarray:
    """FLOPs per example: queries, keys (N, L) token counts per layer (0 = layer skipped); head_macs (N,)."""
    per_layer = np.where(np.asarray(queries) > 0, layer_macs(queries, keys, hidden, ffn), 0.0)
    return 2.0 * (per_layer.sum(axis=1) + np.asarray(head_macs, dtype=np.float64))


def layerwise_flops(exit_layer: np.ndarray, n_tokens: np.ndarray, head_macs: np.ndarray,
                    num_layers: int, hidden: int, ffn: int) -> np.ndarray:
    """FLOPs per example for a layer-wise method (every token of an example runs the same layers)."""
    counts = layerwise_token_counts(exit_layer, n_tokens, num_layers)
    return example_flops(counts, counts, head_macs, hidden, ffn)


def saved_layer_speedup(exit_layer: np.ndarray, num_layers: int) -> float:
    """L x N / sum of layers executed."""
    exit_layer = np.asarray(exit_layer, dtype=np.float64)
    return float(num_layers * len(exit_layer) / exit_layer.sum())


def token_weighted_speedup(token_layers: np.ndarray, n_tokens: np.ndarray, num_layers: int) -> float:
    """L x (real tokens) / sum of per-token layers executed; token_layers (N, S) with 0 at padding."""
    return float(num_layers * np.asarray(n_tokens).sum() / np.asarray(token_layers).sum())


def ratio(full: np.ndarray | float, method: np.ndarray | float) -> float:
    """sum(full) / sum(method): how many times cheaper the method is than the full model."""
    return float(np.sum(full) / np.sum(method))


def decoder_layer_macs(context: np.ndarray | float, hidden: int, ffn: int, heads: int, kv_heads: int,
                       head_dim: int) -> np.ndarray:
    """MACs of one Llama-family layer for ONE new token attending over `context` real tokens (GQA, SwiGLU)."""
    n = np.asarray(context, dtype=np.float64)
    d, attention_width, kv_width = float(hidden), float(heads * head_dim), float(kv_heads * head_dim)
    return d * attention_width + 2 * d * kv_width + attention_width * d + 3 * d * ffn + 2 * n * attention_width


def decoder_row_flops(token_layers: np.ndarray, head_evals: np.ndarray, prompt_tokens: int, rule_macs: float,
                      info, propagates: bool = True) -> float:
    """FLOPs of one generated row (see GLOSSARY "decoder_flops"); token_layers / head_evals (T,) per token,
    `info` a DecoderInfo. Token t (0-based) attends over prompt_tokens + t + 1 real tokens."""
    layers = np.asarray(token_layers, dtype=np.float64)
    context = prompt_tokens + np.arange(1, len(layers) + 1)
    per_layer = decoder_layer_macs(context, info.hidden_size, info.intermediate_size, info.num_heads,
                                   info.num_kv_heads, info.head_dim)
    propagated = (info.num_layers - layers) if propagates else np.zeros_like(layers)
    macs = (layers * per_layer + np.asarray(head_evals, dtype=np.float64) * info.hidden_size * info.vocab_size
            + propagated * 2 * info.hidden_size * info.kv_size)
    return float(2.0 * (macs.sum() + rule_macs))

