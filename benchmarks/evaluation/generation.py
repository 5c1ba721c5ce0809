"""Evaluation of generation jobs: greedy decoding of the dev prompts at every knob, metrics, costs, clocks.

Per knob: every dev prompt decoded (quality batch size), scored against its reference (ROUGE-L, BERTScore)
and against the full model's output for the same prompt (textual consistency: ROUGE-L and token agreement);
costs per generated token (layers, LM-head evaluations, propagation; `eebench.costs`); wall-clock on a seeded
random sample of dev prompts at each timing batch size, as tokens/s against full-depth decoding. With a
held-out calibration split (`selection_examples`), Learn-then-Test picks the knob for each tolerance, and
the guarantee is checked empirically over random calibration/test splits of the dev prompts.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from eebench import costs
from eebench.evaluation.classification import knob_label
from eebench.methods.decoding import DecodeLimits, GenerationOutput
from eebench.methods.protocol import PromptBatch, ProtocolError
from eebench.tasks.generation import render_prompt
from eebench.timing import (
    clock_for,
    exclusive_timing,
    paired_speedup,
    time_points,
    timing_fields,
    timing_sample,
)
from eebench.training import LMEncoded

MAX_PROMPT_TOKENS = 1024


class GenerationEvaluator:
    """Generation tasks on decoder backbones."""

    kinds = ("generation",)
    backbone_kind = "decoder"

    def encode_train(self, examples, backbone, job, spec) -> LMEncoded:
        """prompt (chat template) + reference + EOS, at most `train.max_seq_length` tokens: the response is cut
        first, then the prompt from the left (its end, next to the response, matters most)."""
        tokenizer, limit = backbone.tokenizer, job.train.max_seq_length
        ids, prompt_lengths = [], []
        for example in examples:
            prompt = tokenizer(render_prompt(tokenizer, example), add_special_tokens=False)["input_ids"]
            response = tokenizer(example.reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            prompt = prompt[-max(limit // 2, limit - len(response)):]
            response = response[:limit - len(prompt)]
            ids.append(prompt + response)
            prompt_lengths.append(len(prompt))
        return LMEncoded(ids, prompt_lengths)

    def before_training(self, model, train, spec) -> None:
        pass

    def evaluate(self, job, spec, method, model, backbone, data, base: dict, progress: bool,
                 memo: dict | None = None) -> tuple[list[dict], pd.DataFrame]:
        return evaluate_generation(job, spec, method, backbone, data, base, progress, memo)


def encode_prompts(examples, tokenizer) -> list[list[int]]:
    return [tokenizer(render_prompt(tokenizer, e), add_special_tokens=False)["input_ids"][-MAX_PROMPT_TOKENS:]
            for e in examples]


def prompt_batches(prompts: list[list[int]], indices: list[int], batch_size: int, pad_id: int, limits: DecodeLimits,
                   device) -> list[PromptBatch]:
    """Left-padded batches of the prompts at `indices`, in order."""
    batches = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            n = len(prompts[i])
            ids[row, width - n:], mask[row, width - n:] = torch.tensor(prompts[i]), 1
        batches.append(PromptBatch(ids.to(device), mask.to(device), limits, torch.tensor(chunk)))
    return batches


def check_generation_output(output, batch_size: int, num_layers: int) -> None:
    """Raise ProtocolError when a `generate` result breaks the contract."""
    if not isinstance(output, GenerationOutput):
        raise ProtocolError(f"generate() must return eebench.methods.decoding.GenerationOutput, got {type(output).__name__}")
    for name in ("tokens", "text", "token_layers", "head_evals", "rule_macs", "prompt_tokens"):
        if len(getattr(output, name)) != batch_size:
            raise ProtocolError(f"generate() returned {len(getattr(output, name))} rows of {name} for a batch of {batch_size}")
    for tokens, layers in zip(output.tokens, output.token_layers, strict=True):
        if len(tokens) != len(layers) or any(not 1 <= layer <= num_layers for layer in layers):
            raise ProtocolError(f"generate() must give every token a layer count in 1..{num_layers}")


def full_model_outputs(method, batches: list[PromptBatch], num_layers: int, memo: dict | None, key: tuple
                       ) -> tuple[dict, float]:
    """The full model's generations (knob None) for `batches` and the seconds they took, from `memo` when a
    job with the same `key` (method, checkpoint, prompts, limits, batch size, device) computed them: greedy
    decoding at full depth depends on nothing else, so CALM's five measures on one checkpoint decode the
    reference once, not five times. (Timing is separate: every job times its own interleaved full model.)"""
    memo = {} if memo is None else memo
    if key not in memo:
        started = time.perf_counter()
        outputs = generate_all(method, batches, None, num_layers)
        memo[key] = (outputs, time.perf_counter() - started)
    return memo[key]


def generate_all(method, batches: list[PromptBatch], knob, num_layers: int) -> dict[str, list]:
    """Concatenate `method.generate` over batches: {field: per-row list} in batch order."""
    merged: dict[str, list] = {"tokens": [], "text": [], "token_layers": [], "head_evals": [], "rule_macs": [],
                               "prompt_tokens": []}
    for batch in batches:
        out = method.generate(batch, knob)
        check_generation_output(out, len(batch.index), num_layers)
        for name in merged:
            merged[name].extend(getattr(out, name))
    merged["propagation"] = getattr(out, "propagation", "calm") if batches else "calm"
    return merged


def point_costs(out: dict, info) -> dict[str, float]:
    """Totals over rows: generated tokens, layers run, FLOPs (GLOSSARY decoder_flops)."""
    propagates = out["propagation"] != "copy"
    flops = sum(costs.decoder_row_flops(layers, evals, prompt, macs, info, propagates)
                for layers, evals, prompt, macs in zip(out["token_layers"], out["head_evals"], out["prompt_tokens"],
                                                      out["rule_macs"], strict=True))
    return {"tokens": float(sum(len(t) for t in out["tokens"])),
            "layers": float(sum(sum(layers) for layers in out["token_layers"])), "flops": flops}


def _time(method, prompts, dev_size: int, points, job, pad_id, limits, device, num_layers, progress) -> dict:
    """{batch size: ({label: (repeats, tokens generated, layers run)}, load average)} on a seeded sample of dev."""
    sample = timing_sample(dev_size, job.eval.timing_examples, job.eval.timing_sample)
    n = len(sample)
    clock = clock_for(device)
    result = {}
    for batch_size in job.eval.timing_batch_sizes:
        batches = prompt_batches(prompts, sample, batch_size, pad_id, limits, device)
        # (tokens generated, layers run) per candidate and batch: greedy decoding repeats them every round
        counted: dict[str, list[tuple[float, float]]] = {knob_label(knob): [(0.0, 0.0)] * len(batches) for knob in points}

        def runs(knob, batches=batches, counted=counted):
            def run(index: int, batch) -> None:
                out = method.generate(batch, knob)
                counted[knob_label(knob)][index] = (float(sum(len(t) for t in out.tokens)),
                                                    float(sum(sum(layers) for layers in out.token_layers)))
            return [functools.partial(run, index, batch) for index, batch in enumerate(batches)]

        timed, load = time_points({knob_label(knob): runs(knob) for knob in points}, job.eval, clock,
                                  knob_label(None), progress, batch_size, n)
        result[batch_size] = ({label: (timed[label], *np.sum(counted[label], axis=0)) for label in timed}, load)
    return result, sample


def _calibrate(method, prompts_selection, references_selection, points, job, config, pad_id, limits, device,
               num_layers, dev_losses: dict[str, np.ndarray], progress, memo=None, memo_key=()) -> tuple[list[dict], dict[str, list[str]], pd.DataFrame]:
    """LTT on the held-out calibration prompts, per consistency type and tolerance; the empirical guarantee
    check on random calibration/test splits of the dev prompts' losses. Returns (calibration records,
    {knob label: picks}, per-prompt calibration rows)."""
    from eebench.calibration import (
        learn_then_test,
        risk_consistency_loss,
        split_guarantee_check,
        textual_consistency_loss,
    )

    knobs = points[1:]
    indices = list(range(len(prompts_selection)))
    batches = prompt_batches(prompts_selection, indices, job.eval.batch_size, pad_id, limits, device)
    full, _ = full_model_outputs(method, batches, num_layers, memo,
                                 (*memo_key, "calibration", tuple(map(tuple, prompts_selection))))
    losses: dict[str, list[np.ndarray]] = {"textual": [], "risk": []}
    rows = []
    for knob in tqdm(knobs, desc="calibrate (LTT)", disable=not progress, leave=False):
        out = generate_all(method, batches, knob, num_layers)
        textual = textual_consistency_loss(out["text"], full["text"])
        risk = risk_consistency_loss(out["text"], full["text"], references_selection)
        losses["textual"].append(textual)
        losses["risk"].append(risk)
        rows.append(pd.DataFrame({"knob_label": knob_label(knob), "split": "calibration", "example": indices,
                                  "textual_loss": textual, "risk_loss": risk, "text": out["text"]}))
    picks: dict[str, list[str]] = {}
    calibration = []
    for consistency, matrix in losses.items():
        matrix = np.stack(matrix)
        for delta in config.ltt_deltas:
            result = learn_then_test(matrix, delta, config.ltt_epsilon)
            chosen = "full model" if result.chosen is None else knob_label(knobs[result.chosen])
            picks.setdefault(chosen, []).append(f"{consistency} delta={delta:g}")
            check = split_guarantee_check(dev_losses[consistency], delta, config.ltt_epsilon,
                                          calibration_size=min(len(indices), len(dev_losses[consistency][0]) // 2),
                                          draws=config.guarantee_draws, seed=job.seed)
            chosen_dev = float(dev_losses[consistency][result.chosen].mean()) if result.chosen is not None else 0.0
            calibration.append({"consistency": consistency, "delta": delta, "epsilon": config.ltt_epsilon,
                                "n_calibration": len(indices), "chosen_knob": chosen,
                                "p_values": [float(p) for p in result.p_values],
                                "calibration_risks": [float(r) for r in result.risks],
                                "dev_risk_at_chosen": chosen_dev, "guarantee_check": check})
    return calibration, picks, pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def evaluate_generation(job, spec, method, backbone, data, base: dict, progress: bool, memo: dict | None = None
                        ) -> tuple[list[dict], pd.DataFrame]:
    from eebench.metrics.generation import generation_metrics  # rouge-score, bert-score: only for generation
    from eebench.runner import GenerationConfig  # the job's generation settings (defaults when absent)

    config = job.generation or GenerationConfig()
    device = torch.device(job.device)
    tokenizer, info, num_layers = backbone.tokenizer, backbone.info, backbone.num_layers
    pad_id = tokenizer.pad_token_id
    limits = DecodeLimits(config.max_new_tokens or spec.max_new_tokens, frozenset(backbone.stop_token_ids()),
                          tuple(spec.stop_strings))
    prompts = encode_prompts(data.dev.examples, tokenizer)
    references = [e.reference for e in data.dev.examples]
    points: list[dict | None] = [None, *method.knobs(spec, num_layers)]
    batches = prompt_batches(prompts, list(range(len(prompts))), job.eval.batch_size, pad_id, limits, device)
    memo_key = (job.method, base["checkpoint"], limits, job.eval.batch_size, job.device)
    with torch.inference_mode():
        outputs, seconds = {}, {}
        for knob in tqdm(points, desc=f"generate {job.method}/{job.task}", disable=not progress, leave=False):
            started = time.perf_counter()
            if knob is None:  # its seconds are curve_cost_ratio's denominator, as if decoded here
                outputs["full model"], seconds["full model"] = full_model_outputs(
                    method, batches, num_layers, memo, (*memo_key, "dev", tuple(map(tuple, prompts))))
                continue
            outputs[knob_label(knob)] = generate_all(method, batches, knob, num_layers)
            seconds[knob_label(knob)] = time.perf_counter() - started
        eval_seconds = sum(seconds.values())
        with exclusive_timing() as timing_context:
            timings, timed = _time(method, prompts, len(prompts), points, job, pad_id, limits, device, num_layers,
                                   progress)
    full = outputs["full model"]
    scores, scorer = {}, None
    for label, out in outputs.items():
        scores[label], scorer = generation_metrics(out["text"], references, full["text"], out["tokens"], full["tokens"],
                                                   scorer=config.bertscore)
    # The same losses as calibration's (eebench.calibration), from the dev scores already computed.
    dev_losses = {"textual": np.stack([1.0 - scores[knob_label(k)]["consistency_rougeL"] for k in points[1:]]),
                  "risk": np.stack([np.maximum(0.0, scores["full model"]["rougeL"] - scores[knob_label(k)]["rougeL"])
                                    for k in points[1:]])} if len(points) > 1 else {}
    calibration, picks, calibration_rows = [], {}, pd.DataFrame()
    if data.selection is not None and len(points) > 1:
        with torch.inference_mode():
            calibration, picks, calibration_rows = _calibrate(
                method, encode_prompts(data.selection.examples, tokenizer), [e.reference for e in data.selection.examples],
                points, job, config, pad_id, limits, device, num_layers, dev_losses, progress, memo, memo_key)

    full_costs = point_costs(full, info)
    base = {**base, **timing_context, "evaluation": "online", "eval_seconds": eval_seconds,
            "curve_cost_ratio": eval_seconds / seconds["full model"],
            "n_points": len(points), "bertscore_scorer": scorer, "max_new_tokens": limits.max_new_tokens,
            "calibration": calibration, "n_timed_examples": len(timed)}
    records, example_rows = [], []
    for knob in points:
        label = knob_label(knob)
        out, point_scores = outputs[label], scores[label]
        totals = point_costs(out, info)
        metrics = {name: float(np.nanmean(values)) if len(values) and not np.isnan(values).all() else float("nan")
                   for name, values in point_scores.items()}  # BERTScore is all NaN when skipped
        point = {"knob": knob or {}, "knob_label": label, "is_full_model": knob is None,
                 "metric": metrics[spec.primary_metric], "metrics": metrics,
                 "mean_exit_layer": totals["layers"] / totals["tokens"],
                 "mean_token_layer": totals["layers"] / totals["tokens"],
                 "saved_layer_speedup": num_layers * totals["tokens"] / totals["layers"],
                 "flops_speedup": (full_costs["flops"] / full_costs["tokens"]) / (totals["flops"] / totals["tokens"]),
                 "mean_gflops_per_token": totals["flops"] / totals["tokens"] / 1e9,
                 "mean_generated_tokens": totals["tokens"] / len(prompts), "ltt_picks": picks.get(label, [])}
        for batch_size, (measured, load) in timings.items():
            timed, tokens, layers = measured[label]
            full_timed, full_tokens, _ = measured["full model"]
            # Speed-up in tokens/s: an early-exit model may stop at another length than the full model. Every
            # round generates the same tokens, so the tokens/s ratio is the token ratio times the paired speed-up.
            tokens_per_second, full_tokens_per_second = tokens / timed.median, full_tokens / full_timed.median
            records.append({**base, **point, "batch_size": batch_size, "tokens_per_second": tokens_per_second,
                            "full_tokens_per_second": full_tokens_per_second,
                            **timing_fields(timed, full_timed, num_layers * tokens / layers, load,
                                            wallclock_speedup=tokens / full_tokens * paired_speedup(timed, full_timed))})
        example_rows.append(pd.DataFrame({
            "job_id": job.job_id, "knob_label": label, "split": "dev", "example": np.arange(len(prompts)),
            "example_id": [e.example_id for e in data.dev.examples], "prompt_tokens": out["prompt_tokens"],
            "n_generated": [len(t) for t in out["tokens"]],
            "exit_layer": [float(np.mean(layers)) for layers in out["token_layers"]],
            "mean_token_layer": [float(np.mean(layers)) for layers in out["token_layers"]],
            "token_layers": out["token_layers"], "text": out["text"],
            # Each generated token as text, so a report can shade it by its exit layer without a tokenizer.
            "token_texts": [[tokenizer.decode([token]) for token in row] for row in out["tokens"]], **point_scores}))
    if len(calibration_rows):
        example_rows.append(calibration_rows.assign(job_id=job.job_id))
    return records, pd.concat(example_rows, ignore_index=True)
