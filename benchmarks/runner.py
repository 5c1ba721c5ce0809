"""Jobs: (method, task, seed, backbone, config) -> fine-tune once -> evaluate the whole knob grid -> records.

A job is a pure, idempotent unit: its identity (`Job.job_id`) is a hash of its resolved configuration, its
fine-tuned weights are cached under a hash of what determines them (`checkpoint_key`), and its records are
committed atomically to the results store. Running the same job twice does nothing the second time.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from eebench import costs
from eebench.backbones import load_backbone
from eebench.env import environment
from eebench.methods import build_method, check_exit_output, get_method_class
from eebench.methods.exits import MultiExitModel, center_regression_heads
from eebench.methods.protocol import ProtocolError, config_dict
from eebench.metrics import compute_metrics, predictions_from_logits
from eebench.store import ResultsStore, atomic_write_text
from eebench.tasks import get_task, load_split, train_and_selection
from eebench.timing import clock_for, interleaved_medians
from eebench.training import Encoded, LoopTrainer, StageCache, TrainConfig, batch_indices, collate, encode


@dataclass(frozen=True)
class EvalConfig:
    """How operating points are measured. Quality uses every dev example; wall-clock uses the first
    `timing_examples` of them (the same ones for the full model and every point)."""

    batch_size: int = 32                       # quality evaluation; exits are per example, so any size gives the same result
    timing_batch_sizes: tuple[int, ...] = (1, 32)
    timing_examples: int = 128
    timing_repeats: int = 3
    timing_warmup: int = 1


@dataclass(frozen=True)
class Job:
    method: str
    task: str
    seed: int
    backbone: str
    pooling: str = "auto"   # how exit heads summarise a layer: "cls", "mean", or the checkpoint's own ("auto")
    method_config: dict = field(default_factory=dict)
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    data_dir: str | None = None
    train_limit: int | None = None
    eval_limit: int | None = None
    device: str = "cpu"
    # Held-out examples from the train split on which operating points are CHOSEN (see
    # `eebench.tasks.train_and_selection`); None = no selection set.
    selection_examples: int | None = None

    def resolved(self) -> dict:
        settings = asdict(self)
        if settings["selection_examples"] is None:
            del settings["selection_examples"]  # absent, not null: job ids from before the setting existed hold
        return settings

    @property
    def job_id(self) -> str:
        return _digest(self.resolved())

    def describe(self) -> str:
        return f"{self.method} / {self.task} / seed {self.seed} / {self.backbone}"


class UnsupportedTaskError(ValueError):
    """A method asked to run a task kind it does not support (e.g. DeeBERT on regression)."""


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def training_context(job: Job, carved: bool = False) -> dict:
    """The job settings that determine fine-tuned weights, apart from the method's own training signature.
    `carved`: the selection set was taken out of the training examples, so training data differ."""
    context = {"backbone": job.backbone, "pooling": job.pooling, "task": job.task, "seed": job.seed,
               "train": asdict(job.train), "data_dir": job.data_dir, "train_limit": job.train_limit}
    if carved:
        context["selection_carved_out"] = job.selection_examples
    if get_task(job.task).kind == "regression":  # heads start at the mean target (older checkpoints did not)
        context["regression_heads"] = "bias at the mean training target"
    return context


def checkpoint_key(job: Job, signature: dict, carved: bool = False) -> str:
    """What determines fine-tuned weights: backbone, task data, seed, training settings and the method's
    training signature. Methods that train the same network (PABEE and PCEE) share one checkpoint."""
    return _digest({**training_context(job, carved), "signature": signature})


def default_cache_dir() -> Path:
    return Path(os.environ.get("EEBENCH_CACHE", ".eebench_cache"))


def check_supported(job: Job) -> None:
    cls = get_method_class(job.method)
    kind = get_task(job.task).kind
    if kind not in cls.task_kinds:
        raise UnsupportedTaskError(f"{job.method} does not support {kind} tasks like '{job.task}' "
                                   f"(it supports: {', '.join(sorted(cls.task_kinds))})")


def _knob_label(knob: dict | None) -> str:
    return "full model" if knob is None else ", ".join(f"{k}={v}" for k, v in knob.items())


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
        return {_knob_label(knob): _predict_all(method, data, knob, batch_size, pad_id, device, num_layers)
                for knob in tqdm(points, desc=desc, disable=not progress, leave=False)}, "online"
    parts: dict[str, dict[str, list]] = {_knob_label(k): {"logits": [], "exit_layer": [], "head_macs": []} for k in points}
    for indices in tqdm(batch_indices(len(data), batch_size), desc=f"{desc} (one traced pass)", disable=not progress,
                        leave=False):
        trace = model.trace(collate(data, indices, pad_id, device))
        for knob in points:
            out = model.replay(trace, None if knob is None else method.exit_rule(knob))
            check_exit_output(out, len(indices), num_layers)
            part = parts[_knob_label(knob)]
            part["logits"].append(out.logits.float().cpu())
            part["exit_layer"].append(out.exit_layer.cpu())
            part["head_macs"].append(out.head_macs.double().cpu())
    return {label: {key: torch.cat(values).numpy() for key, values in part.items()}
            for label, part in parts.items()}, "trace"


def _train_or_load(job: Job, method, model: torch.nn.Module, train: Encoded, pad_id: int, cache_dir: Path,
                   progress: bool, carved: bool = False) -> dict:
    key = checkpoint_key(job, method.training_signature(), carved)
    path = cache_dir / "checkpoints" / f"{key}.pt"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        model.load_state_dict(torch.load(path, map_location=job.device, weights_only=True))
        meta = json.loads(meta_path.read_text())
        return {**meta, "checkpoint": key, "from_cache": True}
    stage_cache = StageCache(cache_dir / "checkpoints", training_context(job, carved))
    if get_task(job.task).kind == "regression":  # same test as training_context; see center_regression_heads
        center_regression_heads(model, train.labels.mean().item())
    trainer = LoopTrainer(model, train, job.train, job.seed, pad_id, job.device, progress, stage_cache)
    started = time.perf_counter()
    method.fit(trainer)
    meta = {"train_seconds": time.perf_counter() - started, "stages": trainer.stages}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    atomic_write_text(meta_path, json.dumps(meta))  # after the weights: the metadata marks them complete
    return {**meta, "checkpoint": key, "from_cache": False}


def run_job(job: Job, cache_dir: Path | None = None, progress: bool = True) -> tuple[list[dict], pd.DataFrame]:
    """Fine-tune (or load) and evaluate one job over its whole knob grid. Returns (records, per-example table)."""
    check_supported(job)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    spec = get_task(job.task)
    device = torch.device(job.device)
    torch.manual_seed(job.seed)
    selection_data, carved = None, False
    if job.selection_examples:
        train_data, selection_data, carved = train_and_selection(spec, job.data_dir, job.train_limit,
                                                                 job.selection_examples, job.seed)
    else:
        train_data = load_split(spec, "train", job.data_dir, job.train_limit, job.seed)
    dev_data = load_split(spec, "dev", job.data_dir, job.eval_limit, job.seed)

    backbone = load_backbone(job.backbone, seed=job.seed, pooling=job.pooling)
    method = build_method(job.method, **job.method_config)
    torch.manual_seed(job.seed)  # heads are initialised from the job seed
    model = method.attach(backbone, spec)
    if not isinstance(model, torch.nn.Module):
        raise ProtocolError(f"{job.method}.attach() must return the model (a torch.nn.Module), got {type(model).__name__}")
    model.to(device)
    tokenizer, regression = backbone.tokenizer, spec.kind == "regression"
    pad_id = tokenizer.pad_token_id
    train = encode(train_data.examples, tokenizer, job.train.max_seq_length, regression)
    dev = encode(dev_data.examples, tokenizer, job.train.max_seq_length, regression)
    training = _train_or_load(job, method, model, train, pad_id, cache_dir, progress, carved)
    model.eval()

    num_layers = backbone.num_layers
    info = backbone.info
    lengths = dev.lengths().numpy()
    labels = dev.labels.numpy()
    full_flops = costs.layerwise_flops(np.full(len(dev), num_layers), lengths, np.zeros(len(dev)),
                                       num_layers, info.hidden_size, info.intermediate_size)
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
        timings = _time_points(method, dev, points, job.eval, pad_id, device, progress)
        annotations = _annotate(method, dev, job.eval.batch_size, pad_id, device)
        selection = {}
        if selection_data is not None:  # the same knobs on the held-out selection set, for choosing points
            held_out = encode(selection_data.examples, tokenizer, job.train.max_seq_length, regression)
            selection, _ = _evaluate_points(method, model, held_out, points, job.eval.batch_size, pad_id, device,
                                            num_layers, progress, f"select {job.method}/{job.task}")

    env = environment(device)
    base = {"method": job.method, "task": job.task, "seed": job.seed, "backbone": job.backbone,
            "pooling": backbone.pooling,
            "metric_name": spec.primary_metric, "num_layers": num_layers, "device": device.type,
            "n_examples": len(dev), "job_id": job.job_id, "config": job.resolved(), "environment": env,
            "train_seconds": training["train_seconds"], "checkpoint": training["checkpoint"],
            "train_stages": training["stages"], "evaluation": evaluation, "eval_seconds": eval_seconds,
            "curve_cost_ratio": eval_seconds / full_eval_seconds, "n_points": len(points),
            "n_train_examples": len(train), "n_selection_examples": len(selection_data) if selection_data else 0,
            "selection_carved_from_training": carved,
            "method_config": config_dict(method.config) if hasattr(method, "config") else {}}
    records, example_rows = [], []
    for knob in points:
        label = _knob_label(knob)
        out = outputs[label]
        predictions = predictions_from_logits(spec, out["logits"])
        metrics = compute_metrics(spec, predictions, labels)
        timed = min(job.eval.timing_examples, len(dev))  # wall-clock runs on dev[:timed]
        if "queries" in out:  # token-wise: q tokens updated per layer, all real tokens as keys (ExitOutput doc)
            keys = out["keys"] if "keys" in out else costs.layerwise_token_counts(out["exit_layer"], lengths, num_layers)
            flops = costs.example_flops(out["queries"], keys, out["head_macs"], info.hidden_size, info.intermediate_size)
            saved = float(num_layers * lengths.sum() / out["queries"].sum())
            timed_saved = float(num_layers * lengths[:timed].sum() / out["queries"][:timed].sum())
        else:
            flops = costs.layerwise_flops(out["exit_layer"], lengths, out["head_macs"], num_layers,
                                          info.hidden_size, info.intermediate_size)
            saved = costs.saved_layer_speedup(out["exit_layer"], num_layers)
            timed_saved = costs.saved_layer_speedup(out["exit_layer"][:timed], num_layers)
        point = {"knob": knob or {}, "knob_label": label, "is_full_model": knob is None,
                 "metric": metrics[spec.primary_metric], "metrics": metrics,
                 "mean_exit_layer": float(out["exit_layer"].mean()),
                 "mean_token_layer": float(out["queries"].sum() / lengths.sum()) if "queries" in out
                 else float(out["exit_layer"].mean()),
                 "saved_layer_speedup": saved, "timed_saved_layer_speedup": timed_saved,
                 "flops_speedup": costs.ratio(full_flops, flops), "mean_gflops": float(flops.mean() / 1e9)}
        if selection:
            held_out_predictions = predictions_from_logits(spec, selection[label]["logits"])
            point["selection_metric"] = compute_metrics(spec, held_out_predictions, held_out.labels.numpy())[spec.primary_metric]
            point["selection_saved_layer_speedup"] = costs.saved_layer_speedup(selection[label]["exit_layer"], num_layers)
        for batch_size, seconds in timings.items():
            records.append({**base, **point, "batch_size": batch_size,
                            "wallclock_speedup": seconds["full model"] / seconds[label],
                            "wallclock_seconds": seconds[label], "full_wallclock_seconds": seconds["full model"],
                            "n_timed_examples": min(job.eval.timing_examples, len(dev))})
        example_rows.append(pd.DataFrame({
            "job_id": job.job_id, "knob_label": label, "example": np.arange(len(dev)),
            "exit_layer": out["exit_layer"], "prediction": predictions, "label": labels, "n_tokens": lengths,
            "mean_token_layer": out["queries"].sum(1) / lengths if "queries" in out else out["exit_layer"].astype(float),
            "difficulty": [e.difficulty if e.difficulty is not None else -1 for e in dev_data.examples],
            **annotations}))
    return records, pd.concat(example_rows, ignore_index=True)


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


def _time_points(method, dev: Encoded, points, eval_config: EvalConfig, pad_id: int, device, progress: bool) -> dict:
    """{batch_size: {knob label: median seconds to run the timing examples}}."""
    n = min(eval_config.timing_examples, len(dev))
    clock = clock_for(device)
    result = {}
    for batch_size in eval_config.timing_batch_sizes:
        # Collate once, outside the timed region: tokenisation and padding are not what is measured.
        batches = [collate(dev, indices, pad_id, device) for indices in batch_indices(n, batch_size)]

        def runner(knob, batches=batches):
            return lambda: [method.predict(batch, knob) for batch in batches]

        candidates = {_knob_label(knob): runner(knob) for knob in points}
        if progress:
            tqdm.write(f"  timing {len(candidates)} points at batch size {batch_size} on {n} examples")
        result[batch_size] = interleaved_medians(candidates, clock, eval_config.timing_repeats, eval_config.timing_warmup)
    return result


def run_jobs(jobs: list[Job], out_dir: str | Path, cache_dir: Path | None = None, progress: bool = True,
             log: Callable[[str], None] = print) -> dict[str, list[str]]:
    """Run every job not yet in the store; returns {"done": [...], "skipped": [...], "unsupported": [...]}"""
    store = ResultsStore(out_dir)
    finished = store.done()
    summary: dict[str, list[str]] = {"done": [], "skipped": [], "unsupported": []}
    for job in tqdm(jobs, desc="jobs", disable=not progress):
        if job.job_id in finished:
            summary["skipped"].append(job.describe())
            continue
        try:
            check_supported(job)
        except UnsupportedTaskError as error:
            log(f"skip: {error}")
            summary["unsupported"].append(job.describe())
            continue
        log(f"job {job.job_id}: {job.describe()}")
        records, examples = run_job(job, cache_dir, progress)
        store.commit(job.job_id, records, examples)
        summary["done"].append(job.describe())
    return summary
