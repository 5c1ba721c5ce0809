"""Evaluation of classification and regression jobs: the whole knob grid on dev, wall-clock, records.

Quality uses every dev example; traceable layer-wise methods replay every knob from one traced pass. Wall-clock
runs the online `predict` path on a seeded sample of `timing_examples` dev examples (`eebench.timing`), at each
timing batch size.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from eebench import costs
from eebench.methods import check_exit_output
from eebench.methods.exits import MultiExitModel, center_regression_heads, set_decision_lag
from eebench.methods.protocol import ProtocolError
from eebench.metrics import compute_metrics, predictions_from_logits, trivial_floor
from eebench.timing import (
    Timed,
    clock_for,
    exclusive_timing,
    time_points,
    timing_fields,
    timing_sample,
)
from eebench.training import Encoded, batch_indices, collate, encode


def knob_label(knob: dict | None) -> str:
    return "full model" if knob is None else ", ".join(f"{k}={v}" for k, v in knob.items())


class ClassificationEvaluator:
    """Classification and regression tasks on encoder backbones."""

    kinds = ("classification", "regression")
    backbone_kind = "encoder"

    def encode_train(self, examples, backbone, job, spec) -> Encoded:
        return encode(examples, backbone.tokenizer, job.train.max_seq_length, spec.kind == "regression")

    def before_training(self, model: torch.nn.Module, train: Encoded, spec) -> None:
        if spec.kind == "regression":  # heads start at the mean target; see center_regression_heads
            center_regression_heads(model, train.labels.mean().item())

    def evaluate(self, job, spec, method, model, backbone, data, base: dict, progress: bool,
                 memo: dict | None = None) -> tuple[list[dict], pd.DataFrame]:
        return evaluate_classification(job, spec, method, model, backbone, data, base, progress)


def _predict_all(method, data: Encoded, knob, batch_size: int, pad_id: int, device, num_layers: int) -> dict:
    """Run `method.predict` over all of `data`; returns per-example numpy arrays in data order."""
    logits, exits, head_macs, queries, keys = [], [], [], [], []
    for indices in batch_indices(len(data), batch_size):
        batch = collate(data, indices, pad_id, device)
        out = method.predict(batch, knob)
        check_exit_output(out, len(indices), num_layers)
        logits.append(out.logits.float().cpu())
        exits.append(out.exit_layer.cpu())
        head_macs.append(out.head_macs.double().cpu())
        if out.token_layers is not None:  # token-wise: tokens updated per layer, (B, L); rows are ragged in S
            queries.append(torch.from_numpy(costs.token_layer_counts(out.token_layers.cpu().numpy(), num_layers)))
            if out.key_layers is not None:
                keys.append(torch.from_numpy(costs.token_layer_counts(out.key_layers.cpu().numpy(), num_layers)))
    result = {"logits": torch.cat(logits).numpy(), "exit_layer": torch.cat(exits).numpy(),
              "head_macs": torch.cat(head_macs).numpy()}
    if queries:
        if len(queries) != len(logits):
            raise ProtocolError("predict() returned token_layers for some batches and not others at one knob")
        result["queries"] = torch.cat(queries).numpy()
        if keys:
            result["keys"] = torch.cat(keys).numpy()
    return result


def is_traceable(method, model) -> bool:
    """Layer-wise methods that expose `exit_rule(knob)` on a `MultiExitModel` are evaluated from traces."""
    return isinstance(model, MultiExitModel) and callable(getattr(method, "exit_rule", None))


def _evaluate_points(method, model, data: Encoded, points: list, batch_size: int, pad_id: int, device,
                     num_layers: int, progress: bool, desc: str) -> tuple[dict, str]:
    """Per-example outputs of every operating point -> ({knob label: arrays}, "trace" | "online").

    Traceable methods: ONE full pass per batch records every head, then each knob's rule is replayed on the
    recording (`MultiExitModel.replay`), so a 20-point curve costs about one full-model evaluation. Others:
    one `predict` pass per knob."""
    if not is_traceable(method, model):
        return {knob_label(knob): _predict_all(method, data, knob, batch_size, pad_id, device, num_layers)
                for knob in tqdm(points, desc=desc, disable=not progress, leave=False)}, "online"
    parts: dict[str, dict[str, list]] = {knob_label(k): {"logits": [], "exit_layer": [], "head_macs": []} for k in points}
    for indices in tqdm(batch_indices(len(data), batch_size), desc=f"{desc} (one traced pass)", disable=not progress,
                        leave=False):
        trace = model.trace(collate(data, indices, pad_id, device))
        for knob in points:
            out = model.replay(trace, None if knob is None else method.exit_rule(knob))
            check_exit_output(out, len(indices), num_layers)
            part = parts[knob_label(knob)]
            part["logits"].append(out.logits.float().cpu())
            part["exit_layer"].append(out.exit_layer.cpu())
            part["head_macs"].append(out.head_macs.double().cpu())
    return {label: {key: torch.cat(values).numpy() for key, values in part.items()}
            for label, part in parts.items()}, "trace"


def _annotate(method, data: Encoded, batch_size: int, pad_id: int, device) -> dict[str, np.ndarray]:
    """The method's optional per-example analysis columns (`annotate`), in data order; {} when it has none."""
    annotate = getattr(method, "annotate", None)
    if not callable(annotate):
        return {}
    columns: dict[str, list[torch.Tensor]] = {}
    for indices in batch_indices(len(data), batch_size):
        for name, values in annotate(collate(data, indices, pad_id, device)).items():
            if values.shape != (len(indices),):
                raise ProtocolError(f"annotate() column '{name}' has shape {tuple(values.shape)}, expected ({len(indices)},)")
            columns.setdefault(name, []).append(values.detach().cpu())
    return {name: torch.cat(parts).numpy() for name, parts in columns.items()}


def _time_points(method, dev: Encoded, sample: list[int], points, eval_config, pad_id: int, device, progress: bool
                 ) -> dict[int, tuple[dict[str, Timed], float]]:
    """{batch_size: ({knob label: rounds of running the sampled dev examples}, load average before)}."""
    clock = clock_for(device)
    result = {}
    for batch_size in eval_config.timing_batch_sizes:
        # Collate once, outside the timed region: tokenisation and padding are not what is measured.
        batches = [collate(dev, [sample[i] for i in indices], pad_id, device)
                   for indices in batch_indices(len(sample), batch_size)]
        runs = {knob_label(knob): [functools.partial(method.predict, batch, knob) for batch in batches]
                for knob in points}
        result[batch_size] = time_points(runs, eval_config, clock, knob_label(None), progress, batch_size,
                                         len(sample))
    return result


def evaluate_classification(job, spec, method, model, backbone, data, base: dict, progress: bool
                            ) -> tuple[list[dict], pd.DataFrame]:
    """Every knob on dev (and on the held-out selection set when there is one), timing, records."""
    device = torch.device(job.device)
    tokenizer, regression = backbone.tokenizer, spec.kind == "regression"
    pad_id = tokenizer.pad_token_id
    dev = encode(data.dev.examples, tokenizer, job.train.max_seq_length, regression)
    num_layers = backbone.num_layers
    info = backbone.info
    lengths = dev.lengths().numpy()
    labels = dev.labels.numpy()
    full_flops = costs.layerwise_flops(np.full(len(dev), num_layers), lengths, np.zeros(len(dev)),
                                       num_layers, info.hidden_size, info.intermediate_size)
    if job.eval.exit_decision == "late" and not set_decision_lag(model, 1):
        raise ValueError(f"exit_decision 'late' needs layer-wise exits (a MultiExitModel); {job.method} has none: "
                         "run it with --exit-decision now")
    knobs = method.knobs(spec, num_layers)
    points: list[dict | None] = [None, *knobs]
    with torch.inference_mode():
        started = time.perf_counter()
        outputs, evaluation = _evaluate_points(method, model, dev, points, job.eval.batch_size, pad_id, device,
                                               num_layers, progress, f"evaluate {job.method}/{job.task}")
        eval_seconds = time.perf_counter() - started
        # What one full-model pass over the same dev set costs, so the curve's evaluation cost is a ratio.
        started = time.perf_counter()
        _predict_all(method, dev, None, job.eval.batch_size, pad_id, device, num_layers)
        full_eval_seconds = time.perf_counter() - started
        full_flops = full_flops + 2 * outputs["full model"]["head_macs"]
        sample = timing_sample(len(dev), job.eval.timing_examples, job.eval.timing_sample)
        with exclusive_timing() as timing_context:
            timings = _time_points(method, dev, sample, points, job.eval, pad_id, device, progress)
        annotations = _annotate(method, dev, job.eval.batch_size, pad_id, device)
        selection = {}
        if data.selection is not None:  # the same knobs on the held-out selection set, for choosing points
            held_out = encode(data.selection.examples, tokenizer, job.train.max_seq_length, regression)
            selection, _ = _evaluate_points(method, model, held_out, points, job.eval.batch_size, pad_id, device,
                                            num_layers, progress, f"select {job.method}/{job.task}")

    floor_metric, floor_prediction = trivial_floor(spec, labels)  # what a constant answer scores on this dev set
    base = {**base, **timing_context, "pooling": backbone.pooling, "evaluation": evaluation, "eval_seconds": eval_seconds,
            "curve_cost_ratio": eval_seconds / full_eval_seconds, "n_points": len(points),
            "floor_metric": floor_metric, "floor_prediction": floor_prediction}
    records, example_rows = [], []
    for knob in points:
        label = knob_label(knob)
        out = outputs[label]
        predictions = predictions_from_logits(spec, out["logits"])
        metrics = compute_metrics(spec, predictions, labels)
        if "queries" in out:  # token-wise: q tokens updated per layer, all real tokens as keys (ExitOutput doc)
            keys = out["keys"] if "keys" in out else costs.layerwise_token_counts(out["exit_layer"], lengths, num_layers)
            flops = costs.example_flops(out["queries"], keys, out["head_macs"], info.hidden_size, info.intermediate_size)
            saved = float(num_layers * lengths.sum() / out["queries"].sum())
            timed_saved = float(num_layers * lengths[sample].sum() / out["queries"][sample].sum())
        else:
            flops = costs.layerwise_flops(out["exit_layer"], lengths, out["head_macs"], num_layers,
                                          info.hidden_size, info.intermediate_size)
            saved = costs.saved_layer_speedup(out["exit_layer"], num_layers)
            timed_saved = costs.saved_layer_speedup(out["exit_layer"][sample], num_layers)
        point = {"knob": knob or {}, "knob_label": label, "is_full_model": knob is None,
                 "metric": metrics[spec.primary_metric], "metrics": metrics,
                 "mean_exit_layer": float(out["exit_layer"].mean()),
                 "mean_token_layer": float(out["queries"].sum() / lengths.sum()) if "queries" in out
                 else float(out["exit_layer"].mean()),
                 "saved_layer_speedup": saved, "flops_speedup": costs.ratio(full_flops, flops),
                 "mean_gflops": float(flops.mean() / 1e9)}
        if selection:
            held_out_predictions = predictions_from_logits(spec, selection[label]["logits"])
            point["selection_metric"] = compute_metrics(spec, held_out_predictions, held_out.labels.numpy())[spec.primary_metric]
            point["selection_saved_layer_speedup"] = costs.saved_layer_speedup(selection[label]["exit_layer"], num_layers)
        for batch_size, (timed, load) in timings.items():
            records.append({**base, **point, "batch_size": batch_size, "n_timed_examples": len(sample),
                            **timing_fields(timed[label], timed["full model"], timed_saved, load)})
        example_rows.append(pd.DataFrame({
            "job_id": job.job_id, "knob_label": label, "example": np.arange(len(dev)),
            "exit_layer": out["exit_layer"], "prediction": predictions, "label": labels, "n_tokens": lengths,
            "mean_token_layer": out["queries"].sum(1) / lengths if "queries" in out else out["exit_layer"].astype(float),
            "difficulty": [e.difficulty if e.difficulty is not None else -1 for e in data.dev.examples],
            **annotations}))
    return records, pd.concat(example_rows, ignore_index=True)
