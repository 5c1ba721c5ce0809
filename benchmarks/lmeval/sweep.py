"""`eebench lm-eval`: one trained decoder method, a sweep of knobs, lm-eval tasks -> lm-eval's results beside eebench's
records for the same run.

The checkpoint is the one `eebench run --suite S` trains for the method on the suite's training task (the same
`Job`, so the same cache key: a checkpoint a suite run left in the cache is reused, else it is trained here).
Every knob, the full model first, is one `lm_eval.simple_evaluate` over the tasks. Outputs in `--out`:

- `lm_eval/<knob>/results.json`: lm-eval's own results (scores, stderr, configs, versions), samples removed;
  `lm_eval/<knob>/samples_<task>.jsonl`: lm-eval's per-document samples.
- `records.jsonl` + `jobs/` + `examples/` (the eebench results store): one job per lm-eval task, one record per
  knob with lm-eval's score as `metric` and eebench's costs (`eebench.costs` GLOSSARY, per generated token);
  the per-request exit layers of every document in `examples/<job>.parquet`. `eebench plot --results DIR` draws
  the curve, `eebench points` lists the points.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from eebench.methods.protocol import Knob

TASKS_DIR = Path(__file__).parent / "tasks"
DEFAULT_SUITE = "generation-smollm2"


def local_task_names() -> list[str]:
    """The lm-eval tasks eebench ships (YAML files in eebench/lmeval/tasks)."""
    return sorted(path.stem for path in TASKS_DIR.glob("*.yaml"))


class UnknownLMEvalTaskError(KeyError):
    """A task name lm-eval does not know."""


def task_manager(names: Sequence[str], data_dir: str | None):
    """An lm-eval TaskManager that knows eebench's tasks (their data read from `data_dir`) and, when a name is not
    one of them, lm-eval's built-in tasks too (indexing those takes seconds). Unknown names raise
    `UnknownLMEvalTaskError` with lm-eval's closest names and where to see the whole list."""
    from lm_eval.tasks import TaskManager

    local = local_task_names()
    builtin = any(name not in local for name in names)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=builtin,
                          metadata={"data_dir": data_dir} if data_dir else None)
    unknown = [name for name in names if not manager.match_tasks([name])]
    if unknown:
        close = sorted({m for name in unknown for m in difflib.get_close_matches(name, manager.all_tasks, n=3)})
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownLMEvalTaskError(
            f"unknown lm-eval task(s): {', '.join(unknown)}.{hint} eebench's own tasks: {', '.join(local)}; lm-eval "
            f"knows {len(manager.all_tasks) - len(local) - 1} more (list them with `lm-eval ls tasks`; they load "
            "their data from the Hugging Face hub).")
    return manager


def parse_setting(text: str) -> tuple[str, object]:
    """`name=value` with value parsed as int, float, true/false or text (`confidence=classifier`)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(f"method setting '{text}': write NAME=VALUE, e.g. confidence=classifier")
    for cast in (int, float):
        try:
            return name, cast(value)
        except ValueError:
            pass
    return name, {"true": True, "false": False}.get(value.lower(), value)


def checkpoint_job(method: str, overrides: dict, suite: str | None = None, backbone: str | None = None,
                   seed: int = 0, device: str = "cpu", data_dir: str | None = None):
    """The `eebench run` job that trains `method` on suite `suite`'s training task: the suite's first config of the
    method that agrees with every override (else its first config), with the overrides applied. `data_dir`
    replaces the suite's (it is part of the checkpoint key as written, as with `eebench run --data-dir`)."""
    from eebench.methods import get_method_class
    from eebench.suites import get_suite

    chosen = get_suite(suite or DEFAULT_SUITE)
    if "generation" not in get_method_class(method).task_kinds:
        raise ValueError(f"{method} is not a decoder (generation) method; the lm-eval adapter wraps decoder methods "
                         "such as calm and consistentee")
    configs = chosen.method_configs.get(method, ({},))
    config = next((c for c in configs if all(c.get(k) == v for k, v in overrides.items())), configs[0])
    task = chosen.train_task or chosen.tasks[0]
    one = replace(chosen, methods=(method,), tasks=(task,), seeds=(seed,), method_configs={method: ({**config, **overrides},)},
                  task_method_configs={}, backbone=backbone or chosen.backbone, data_dir=data_dir or chosen.data_dir)
    return one.jobs(device)[0]


@dataclass(frozen=True)
class LMEvalSettings:
    """One `eebench lm-eval` call. knobs: the operating points besides the full model (always measured first:
    the reference of every speed-up and of textual consistency)."""

    method: str
    tasks: tuple[str, ...]
    out: Path
    knobs: tuple[Knob, ...] = ()
    method_config: dict = field(default_factory=dict)
    suite: str | None = None
    backbone: str | None = None
    seed: int = 0
    limit: int | None = None
    batch_size: int = 8
    data_dir: str | None = None  # default: the suite's
    cache_dir: Path | None = None
    device: str = "cpu"
    chat_template: bool | None = None  # None: when the tokenizer has one (instruct models)


def run_lm_eval(settings: LMEvalSettings, progress: bool = True, log=print) -> pd.DataFrame:
    """Evaluate every knob on every task through lm-eval; store lm-eval's results and eebench's records in
    `settings.out`. Returns the records as a table (one row per task and knob)."""
    from lm_eval import simple_evaluate

    from eebench.env import git_commit
    from eebench.evaluation import knob_label
    from eebench.lmeval.model import EEBenchLM
    from eebench.runner import _digest, prepare_job
    from eebench.store import ResultsStore, check_one_commit
    from eebench.timing import exclusive_timing, load_average

    job = checkpoint_job(settings.method, settings.method_config, settings.suite, settings.backbone, settings.seed,
                         settings.device, settings.data_dir)
    data_dir = job.data_dir
    manager = task_manager(settings.tasks, data_dir)  # unknown names fail before any model loads
    out = Path(settings.out)
    check_one_commit(out, git_commit())
    log(f"checkpoint: {job.describe()} ({settings.suite or DEFAULT_SUITE}); trained now unless cached")
    prepared = prepare_job(job, settings.cache_dir, progress)
    chat = bool(getattr(prepared.backbone.tokenizer, "chat_template", None)) if settings.chat_template is None \
        else settings.chat_template
    identity = {"lm_eval": True, "job": job.resolved(), "checkpoint": prepared.training["checkpoint"],
                "limit": settings.limit, "batch_size": settings.batch_size, "chat_template": chat,
                "knobs": [None, *settings.knobs], "data_dir": data_dir}
    job_ids = {task: _digest({**identity, "task": task}) for task in settings.tasks}
    store = ResultsStore(out)
    pending = [task for task in settings.tasks if job_ids[task] not in store.done()]
    for task in sorted(set(settings.tasks) - set(pending)):
        log(f"{task}: already in {out} (job {job_ids[task]}), skipped")
    if not pending:
        return pd.DataFrame()
    runs = {}
    for knob in [None, *settings.knobs]:
        label = knob_label(knob)
        log(f"lm-eval at {label}: {', '.join(pending)}")
        model = EEBenchLM.from_prepared(prepared, knob, settings.batch_size)
        # tokens/s is clocked inside lm-eval's run, so the whole run holds the node's activity lock exclusively,
        # as the runner's timing stage does: no other job of ours trains or times beside it.
        with _lm_eval_errors_only(), exclusive_timing() as timing_context:
            load, started = load_average(), time.perf_counter()
            results = simple_evaluate(model=model, tasks=list(pending), task_manager=manager, limit=settings.limit,
                                      apply_chat_template=chat, log_samples=True, bootstrap_iters=1000)
            seconds = time.perf_counter() - started
        runs[label] = KnobRun(knob, model.log, results, seconds, load, timing_context)
        _write_lm_eval_output(out / "lm_eval" / _slug(label), results)
    frames = []
    for task in pending:
        records, examples = task_records(task, job_ids[task], runs, prepared, settings, identity)
        store.commit(job_ids[task], records, examples)
        frames.append(pd.DataFrame(records))
    return pd.concat(frames, ignore_index=True)


@dataclass
class KnobRun:
    """One `simple_evaluate` at one knob (None: the full model): the model's per-request log, lm-eval's results,
    the run's seconds, the 1-minute load average as it started, and `exclusive_timing`'s fields (timing_exclusive,
    timing_threads, load_average_end)."""

    knob: Knob | None
    log: object
    results: dict
    seconds: float
    load_average: float
    timing: dict


def task_records(task: str, job_id: str, runs: dict[str, KnobRun], prepared, settings: LMEvalSettings, identity: dict
                 ) -> tuple[list[dict], pd.DataFrame]:
    """One eebench record per knob for `task` (lm-eval's score + eebench's costs) and the per-document rows."""
    import torch

    from eebench.env import environment
    from eebench.evaluation.generation import point_costs
    from eebench.methods.protocol import config_dict
    from eebench.metrics.generation import generation_metrics
    from eebench.timing import Timed, timing_fields

    backbone, method, job = prepared.backbone, prepared.method, prepared.job
    per_knob = {}  # label -> (the run, its samples of `task` by document, the model's log of each)
    for label, run in runs.items():
        samples = sorted(run.results["samples"][task], key=lambda s: s["doc_id"])
        stats = [run.log.requests.get((task, s["doc_id"])) for s in samples]
        if any(s is None for s in stats):
            raise RuntimeError(f"{task} at {label}: lm-eval answered {sum(s is None for s in stats)} request(s) "
                               "without calling the model (a response cache?); run without lm-eval's --use_cache")
        per_knob[label] = (run, samples, stats)
    _, full_samples, full_stats = per_knob[next(iter(runs))]
    full_costs = point_costs(_costs_input(full_stats), backbone.info)
    full_tps = full_costs["tokens"] / sum(s.seconds for s in full_stats)
    curve = method.curve_name() if callable(getattr(method, "curve_name", None)) else job.method
    base = {"method": job.method, "curve": curve, "task": task, "seed": job.seed, "backbone": job.backbone,
            "metric_name": "rougeL", "num_layers": backbone.num_layers, "device": torch.device(job.device).type,
            "n_examples": len(full_samples), "job_id": job_id, "config": identity,
            "environment": environment(torch.device(job.device)), "evaluation": "lm-eval",
            "loglikelihood": "full depth", "train_seconds": prepared.training["train_seconds"],
            "checkpoint": prepared.training["checkpoint"], "checkpoint_commit": prepared.training["train_commit"],
            "train_stages": prepared.training["stages"], "trained_on": job.trained_on,
            "method_config": config_dict(method.config) if hasattr(method, "config") else {},
            "batch_size": settings.batch_size, "limit": settings.limit, "chat_template": identity["chat_template"],
            "n_selection_examples": 0, "n_points": len(runs)}
    records, rows = [], []
    for label, (run, samples, stats) in per_knob.items():
        texts = [s.text for s in stats]
        references = [s["target"] for s in samples]
        scores, _ = generation_metrics(texts, references, [s.text for s in full_stats], [s.tokens for s in stats],
                                       [s.tokens for s in full_stats], scorer="none")
        totals = point_costs(_costs_input(stats), backbone.info)
        task_scores = run.results["results"][task]
        lm_eval_rouge = float(task_scores["rougeL,none"])
        tokens_per_second = totals["tokens"] / sum(s.seconds for s in stats)
        saved = backbone.num_layers * totals["tokens"] / totals["layers"]
        timing = timing_fields(Timed((sum(s.seconds for s in stats),)), Timed((sum(s.seconds for s in full_stats),)),
                               saved, run.load_average, wallclock_speedup=tokens_per_second / full_tps)
        records.append({
            **base, "knob": run.knob or {}, "knob_label": label, "is_full_model": run.knob is None, "metric": lm_eval_rouge,
            "metrics": {"rougeL": lm_eval_rouge, "consistency_rougeL": float(np.mean(scores["consistency_rougeL"])),
                        "token_agreement": float(np.mean(scores["token_agreement"]))},
            "lm_eval_stderr": _float(task_scores.get("rougeL_stderr,none")),
            "eebench_rougeL": float(np.mean(scores["rougeL"])),  # the same metric computed here: must equal lm-eval's
            "mean_exit_layer": totals["layers"] / totals["tokens"], "mean_token_layer": totals["layers"] / totals["tokens"],
            "saved_layer_speedup": saved,
            "flops_speedup": (full_costs["flops"] / full_costs["tokens"]) / (totals["flops"] / totals["tokens"]),
            "mean_gflops_per_token": totals["flops"] / totals["tokens"] / 1e9,
            "mean_generated_tokens": totals["tokens"] / len(stats), "tokens_per_second": tokens_per_second,
            "full_tokens_per_second": full_tps, "lm_eval_seconds": run.seconds,  # load_average: as it started
            "loglikelihood_requests": run.log.loglikelihood_requests, **timing, **run.timing})
        rows.append(pd.DataFrame({
            "job_id": job_id, "knob_label": label, "split": "dev", "example": [s["doc_id"] for s in samples],
            "example_id": [s["doc"].get("example_id", str(s["doc_id"])) for s in samples],
            "prompt_tokens": [s.prompt_tokens for s in stats], "n_generated": [len(s.tokens) for s in stats],
            "exit_layer": [float(np.mean(s.token_layers)) for s in stats],
            "mean_token_layer": [float(np.mean(s.token_layers)) for s in stats],
            "token_layers": [s.token_layers for s in stats], "text": texts,
            "lm_eval_rougeL": [float(s["rougeL"]) for s in samples], **scores}))
    return records, pd.concat(rows, ignore_index=True)


@contextlib.contextmanager
def _lm_eval_errors_only():
    """lm-eval logs a warning per task and knob that custom datasets take metadata (ours do, by design)."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _costs_input(stats) -> dict:
    return {"token_layers": [s.token_layers for s in stats], "head_evals": [s.head_evals for s in stats],
            "prompt_tokens": [s.prompt_tokens for s in stats], "rule_macs": [s.rule_macs for s in stats],
            "tokens": [s.tokens for s in stats], "propagation": stats[0].propagation if stats else "calm"}


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in ".-_" else "_" for c in label).strip("_") or "point"


def _write_lm_eval_output(folder: Path, results: dict) -> None:
    """lm-eval's results JSON (without samples) and one samples JSONL per task, as its own CLI writes them."""
    from lm_eval.utils import handle_non_serializable

    from eebench.store import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    summary = {key: value for key, value in results.items() if key != "samples"}
    text = json.dumps(summary, indent=2, default=handle_non_serializable)
    # lm-eval records each task's YAML as an absolute path (`config_source`); this machine's path means nothing
    # elsewhere, so the package-relative one is stored.
    text = text.replace(json.dumps(str(TASKS_DIR))[1:-1], "eebench/lmeval/tasks")
    atomic_write_text(folder / "results.json", text)
    for task, samples in results.get("samples", {}).items():
        lines = [json.dumps(sample, default=handle_non_serializable, ensure_ascii=False) for sample in samples]
        atomic_write_text(folder / f"samples_{task}.jsonl", "\n".join(lines) + "\n")
