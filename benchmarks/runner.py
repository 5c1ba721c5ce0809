"""Jobs: (method, task, seed, backbone, config) -> fine-tune once -> evaluate the whole knob grid -> records.

A job is a pure, idempotent unit: its identity (`Job.job_id`) is a hash of its resolved configuration, its
fine-tuned weights are cached under a hash of what determines them (`checkpoint_key`), and its records are
committed atomically to the results store. Running the same job twice does nothing the second time.

`run_jobs` is the driver of a grid (skip finished jobs, group the rest by checkpoint, hand the groups to an
executor from `eebench.executors`, rebuild records.jsonl); `run_group` is what a worker runs, in this process
or on another machine; `run_job` is one job.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pandas as pd
import torch
from tqdm.auto import tqdm

from eebench.backbones import is_decoder_name, load_backbone
from eebench.env import environment, git_commit
from eebench.evaluation import evaluator_for, is_traceable  # noqa: F401  (is_traceable: re-exported for tests)
from eebench.locks import node_activity, path_lock
from eebench.methods import build_method, get_method_class
from eebench.methods.protocol import ProtocolError, config_dict
from eebench.store import JobFiles, ResultsStore, atomic_write_text, atomic_write_with, check_one_commit
from eebench.tasks import TaskData, get_task, load_split, train_and_selection
from eebench.timing import TimingInterleave, TimingSample
from eebench.training import LoopTrainer, StageCache, TrainConfig, train_settings

if TYPE_CHECKING:
    from eebench.executors import Executor

ExitDecision = Literal["now", "late"]


@dataclass(frozen=True)
class EvalConfig:
    """How operating points are measured. Quality uses every dev example; wall-clock uses `timing_examples`
    of them, a seeded random sample (`eebench.timing.timing_sample`; "first": the first N, as eebench timed
    before the sample existed), the same ones for the full model, every point and every method of a task."""

    batch_size: int = 32                       # quality evaluation; exits are per example, so any size gives the same result
    timing_batch_sizes: tuple[int, ...] = (1, 32)
    timing_examples: int = 128
    timing_repeats: int = 3
    timing_warmup: int = 1
    timing_sample: TimingSample = "random"
    # "batch": every batch runs through every candidate back to back (`eebench.timing.interleaved_times`);
    # "pass": each candidate's whole pass is one timed region, as eebench timed up to 37578a1.
    timing_interleave: TimingInterleave = "batch"
    timing_min_seconds: float = 3.0  # rounds are added (up to 5x timing_repeats) until the full model ran this long
    # "now": decide after each layer's head before the next layer (the papers' loop, a host sync per layer on a
    # GPU); "late": decide one layer late, the next layer queued first (layer-wise methods; an exiting example
    # is charged the extra layer: `MultiExitModel.early_exit`). Quality and costs follow the mode.
    exit_decision: ExitDecision = "now"


@dataclass(frozen=True)
class GenerationConfig:
    """How generation jobs decode and are scored (decoder backbones only).

    max_new_tokens: None = the task's own; ltt_deltas / ltt_epsilon: Learn-then-Test tolerances and error
    level for the calibrated points (needs `selection_examples`, the calibration prompts); bertscore: the
    BERTScore scorer (None = the local MiniLM, "none" = skip it); guarantee_draws: random calibration/test
    splits of the dev prompts for the empirical check of LTT's guarantee."""

    max_new_tokens: int | None = None
    ltt_deltas: tuple[float, ...] = (0.1, 0.2)
    ltt_epsilon: float = 0.05
    bertscore: str | None = None
    guarantee_draws: int = 200


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
    generation: GenerationConfig | None = None  # generation tasks only
    # Fine-tune on ANOTHER task's training split (same kind), e.g. one instruction-tuned checkpoint evaluated on
    # Alpaca, Dolly and CNN/DM. The selection (calibration) set still comes from this task's own train split.
    train_task: str | None = None

    def resolved(self) -> dict:
        settings = asdict(self)
        settings["train"] = train_settings(self.train)
        for optional in ("selection_examples", "generation", "train_task"):
            if settings[optional] is None:
                del settings[optional]  # absent, not null: job ids from before the setting existed hold
        if settings["eval"]["timing_sample"] == "first":
            del settings["eval"]["timing_sample"]  # what every job timed before the setting existed
        if settings["eval"]["timing_interleave"] == "pass" and settings["eval"]["timing_min_seconds"] == 0:
            del settings["eval"]["timing_interleave"], settings["eval"]["timing_min_seconds"]  # likewise
        if settings["eval"]["exit_decision"] == "now":
            del settings["eval"]["exit_decision"]  # likewise
        return settings

    @property
    def job_id(self) -> str:
        return _digest(self.resolved())

    @property
    def trained_on(self) -> str:
        """The task whose training split fine-tunes the checkpoint."""
        return self.train_task or self.task

    def describe(self) -> str:
        trained = f" (trained on {self.train_task})" if self.train_task and self.train_task != self.task else ""
        return f"{self.method} / {self.task}{trained} / seed {self.seed} / {self.backbone}"


class UnsupportedTaskError(ValueError):
    """A method asked to run a task kind it does not support (e.g. DeeBERT on regression)."""


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def training_context(job: Job, carved: bool = False) -> dict:
    """The job settings that determine fine-tuned weights, apart from the method's own training signature.
    `carved`: the selection set was taken out of the training examples, so training data differ."""
    context = {"backbone": job.backbone, "pooling": job.pooling, "task": job.trained_on, "seed": job.seed,
               "train": train_settings(job.train), "data_dir": job.data_dir, "train_limit": job.train_limit}
    if carved:
        context["selection_carved_out"] = job.selection_examples
    spec = get_task(job.trained_on)
    if spec.kind == "regression":  # heads start at the mean target (older checkpoints did not)
        context["regression_heads"] = "bias at the mean training target"
    if spec.train_split_rule:  # the rule changed which rows train holds (older checkpoints)
        context["train_split"] = spec.train_split_rule
    return context


def checkpoint_key(job: Job, signature: dict, carved: bool = False) -> str:
    """What determines fine-tuned weights: backbone, task data, seed, training settings and the method's
    training signature. Methods that train the same network (PABEE and PCEE) share one checkpoint."""
    return _digest({**training_context(job, carved), "signature": signature})


def default_cache_dir() -> Path:
    return Path(os.environ.get("EEBENCH_CACHE", ".eebench_cache"))


def check_supported(job: Job) -> None:
    cls = get_method_class(job.method)
    spec = get_task(job.task)
    kind = spec.kind
    if kind not in cls.task_kinds:
        raise UnsupportedTaskError(f"{job.method} does not support {kind} tasks like '{job.task}' "
                                   f"(it supports: {', '.join(sorted(cls.task_kinds))})")
    needs_decoder, is_decoder = kind == "generation", is_decoder_name(job.backbone)
    if needs_decoder != is_decoder:
        fix = ("a decoder: --backbone smollm2 (offline), tiny-llama (tests) or a Llama-family hub name" if needs_decoder
               else "an encoder: --backbone minilm (offline), tiny-bert (tests) or a BERT-style hub name")
        raise ValueError(f"job {job.describe()}: {kind} tasks need {fix}; '{job.backbone}' is "
                         f"{'a decoder' if is_decoder else 'an encoder'}")
    if job.train_task:
        trained = get_task(job.train_task)
        if (trained.kind, trained.num_labels) != (kind, spec.num_labels):
            raise ValueError(f"job {job.describe()}: train_task '{job.train_task}' is a {trained.kind} task with "
                             f"{trained.num_labels} labels, '{job.task}' a {kind} task with {spec.num_labels}: a "
                             f"checkpoint can only be evaluated on a task of the same kind and label count")


def _train_or_load(job: Job, method, model: torch.nn.Module, train, pad_id: int, cache_dir: Path,
                   progress: bool, evaluator, spec, carved: bool = False) -> dict:
    key = checkpoint_key(job, method.training_signature(), carved)
    path = cache_dir / "checkpoints" / f"{key}.pt"
    meta_path = path.with_suffix(".json")
    # Train-or-load under the key's lock: of the jobs that share the key (PABEE and PCEE, on any worker or
    # node), one trains and the others wait, then load its weights.
    with path_lock(path.with_suffix(".lock")):
        if path.exists() and meta_path.exists():
            model.load_state_dict(torch.load(path, map_location=job.device, weights_only=True))
            meta = json.loads(meta_path.read_text())
            meta.setdefault("train_commit", "unknown (trained before checkpoints recorded it)")
            return {**meta, "checkpoint": key, "from_cache": True}
        stage_cache = StageCache(cache_dir / "checkpoints", training_context(job, carved))
        evaluator.before_training(model, train, spec)  # e.g. regression heads start at the mean target
        trainer = LoopTrainer(model, train, job.train, job.seed, pad_id, job.device, progress, stage_cache)
        commit = git_commit()  # the code that runs: read before training, not after (a commit may land meanwhile)
        started = time.perf_counter()
        method.fit(trainer)
        meta = {"train_seconds": time.perf_counter() - started, "stages": trainer.stages, "train_commit": commit}
        state = model.state_dict()
        atomic_write_with(path, lambda handle: torch.save(state, handle))
        atomic_write_text(meta_path, json.dumps(meta))  # after the weights: the metadata marks them complete
        return {**meta, "checkpoint": key, "from_cache": False}


@dataclass
class JobData:
    """The examples of one job: training, dev, and the held-out selection set (None without one);
    `carved`: the selection set was taken out of the training examples (so the training data differ)."""

    train: TaskData
    dev: TaskData
    selection: TaskData | None = None
    carved: bool = False


def load_job_data(job: Job) -> JobData:
    spec, trained_spec = get_task(job.task), get_task(job.trained_on)
    selection, carved = None, False
    if job.selection_examples:
        train, selection, carved = train_and_selection(trained_spec, job.data_dir, job.train_limit,
                                                       job.selection_examples, job.seed)
    else:
        train = load_split(trained_spec, "train", job.data_dir, job.train_limit, job.seed)
    if job.trained_on != job.task and job.selection_examples:
        # training data (and checkpoint key) exactly as a job on train_task has them; the selection set from
        # this task's own train split, disjoint from its dev split and from the other task's data
        _, selection, _ = train_and_selection(spec, job.data_dir, None, job.selection_examples, job.seed)
    dev = load_split(spec, "dev", job.data_dir, job.eval_limit, job.seed)
    return JobData(train, dev, selection, carved)


@dataclass
class PreparedJob:
    """A job's trained model, ready to evaluate: the method (its modules loaded with the fine-tuned weights, in
    eval mode), its backbone, the task, the job's data and what `_train_or_load` says of the checkpoint."""

    job: Job
    spec: object
    evaluator: object
    method: object
    model: torch.nn.Module
    backbone: torch.nn.Module
    data: JobData
    training: dict
    n_train_examples: int


def prepare_job(job: Job, cache_dir: Path | None = None, progress: bool = True) -> PreparedJob:
    """Load the job's data and backbone, build its method and fine-tune it, or restore the cached checkpoint.
    Shared by `run_job` and everything else that evaluates a trained method (the lm-eval adapter)."""
    check_supported(job)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    spec = get_task(job.task)
    evaluator = evaluator_for(spec)
    device = torch.device(job.device)
    torch.manual_seed(job.seed)
    data = load_job_data(job)

    backbone = load_backbone(job.backbone, seed=job.seed, pooling=job.pooling)
    method = build_method(job.method, **job.method_config)
    torch.manual_seed(job.seed)  # heads are initialised from the job seed
    model = method.attach(backbone, spec)
    if not isinstance(model, torch.nn.Module):
        raise ProtocolError(f"{job.method}.attach() must return the model (a torch.nn.Module), got {type(model).__name__}")
    model.to(device)
    pad_id = backbone.tokenizer.pad_token_id
    train = evaluator.encode_train(data.train.examples, backbone, job, spec)
    training = _train_or_load(job, method, model, train, pad_id, cache_dir, progress, evaluator, spec, data.carved)
    model.eval()
    return PreparedJob(job, spec, evaluator, method, model, backbone, data, training, len(train))


def run_job(job: Job, cache_dir: Path | None = None, progress: bool = True, memo: dict | None = None
            ) -> tuple[list[dict], pd.DataFrame]:
    """Fine-tune (or load) and evaluate one job over its whole knob grid. Returns (records, per-example table).
    What differs between task kinds (encoding, evaluation, metrics, costs) is the evaluator's. `memo`: shared
    by the jobs of one checkpoint group (see `eebench.evaluation`). The job holds the node's activity lock
    shared, so that no other job's wall-clock stage runs beside its training (`eebench.locks`)."""
    with node_activity().working():
        return _run_job(job, cache_dir, progress, memo)


def slurm_job_id() -> str | None:
    """The Slurm job this process runs in (an array task as JOBID_TASK), or None outside Slurm."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def _run_job(job: Job, cache_dir: Path | None, progress: bool, memo: dict | None) -> tuple[list[dict], pd.DataFrame]:
    prepared = prepare_job(job, cache_dir, progress)
    spec, method, backbone, data, training = (prepared.spec, prepared.method, prepared.backbone, prepared.data,
                                              prepared.training)
    device = torch.device(job.device)
    curve = method.curve_name() if callable(getattr(method, "curve_name", None)) else job.method
    base = {"method": job.method, "curve": curve, "task": job.task, "seed": job.seed, "backbone": job.backbone,
            "metric_name": spec.primary_metric, "num_layers": backbone.num_layers, "device": device.type,
            "n_examples": len(data.dev), "job_id": job.job_id, "config": job.resolved(),
            "environment": environment(device), "train_seconds": training["train_seconds"],
            "checkpoint": training["checkpoint"], "checkpoint_commit": training["train_commit"],
            "train_stages": training["stages"], "checkpoint_from_cache": training["from_cache"],
            "host": socket.gethostname(), "slurm_job_id": slurm_job_id(),
            "n_train_examples": prepared.n_train_examples,
            "n_selection_examples": len(data.selection) if data.selection else 0,
            "selection_carved_from_training": data.carved, "trained_on": job.trained_on,
            "method_config": config_dict(method.config) if hasattr(method, "config") else {}}
    return prepared.evaluator.evaluate(job, spec, method, prepared.model, backbone, data, base, progress, memo)


def validate_jobs(jobs: list[Job]) -> None:
    """Fail on bad input before any job runs: unknown names, bad method configs, and every job's data (each file
    read and checked once, whatever the number of jobs that use it). Unsupported task kinds are not errors here:
    `run_jobs` skips and reports those."""
    checked: set[tuple] = set()
    for job in jobs:
        try:
            check_supported(job)
        except UnsupportedTaskError:
            continue
        try:
            if job.eval.exit_decision == "late" and (is_decoder_name(job.backbone)
                                                     or get_method_class(job.method).granularity != "layer"):
                raise ValueError(f"exit_decision 'late' is for layer-wise methods on encoder backbones; "
                                 f"{job.method} ({get_method_class(job.method).granularity}-wise) on {job.backbone} "
                                 "decides otherwise: drop --exit-decision late for it")
            build_method(job.method, **job.method_config)
            data_key = (job.task, job.train_task, job.data_dir, job.train_limit, job.eval_limit,
                        job.selection_examples, job.seed)
            if data_key not in checked:
                load_job_data(job)
                checked.add(data_key)
        except (ValueError, KeyError, TypeError) as error:
            error.add_note(f"(while checking job {job.describe()} before running any job; nothing was stored)")
            raise


def checkpoint_group(job: Job) -> str:
    """The jobs likely to share one fine-tuned checkpoint (PABEE and PCEE of one task and seed), found before
    any data is read: the driver sends each group to one worker, which trains the network once. A grouping
    only; the checkpoint lock is what guarantees one training per key wherever the jobs run."""
    signature = build_method(job.method, **job.method_config).training_signature()
    return _digest({**training_context(job), "selection_examples": job.selection_examples, "signature": signature})


def group_jobs(jobs: list[Job]) -> list[list[Job]]:
    """`jobs` by checkpoint group, groups in order of their first job."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(checkpoint_group(job), []).append(job)
    return list(groups.values())


def run_group(jobs: list[Job], out_dir: str | Path, cache_dir: Path | None = None, progress: bool = False,
              log: Callable[[str], None] | None = None) -> dict[str, list[str]]:
    """A worker's unit of work: the jobs of one checkpoint group, one after another. Each runs under its lock
    and only if the folder still lacks it: a retry, a requeue or a second `eebench run` on the same folder may
    deliver a job that is done (or running) elsewhere. Writes per-job files only; the driver rebuilds
    records.jsonl. Returns {"done": [...], "skipped": [...]} (job descriptions)."""
    log = log or (lambda line: print(line, flush=True))
    files = JobFiles(out_dir)
    summary: dict[str, list[str]] = {"done": [], "skipped": []}
    memo: dict = {}  # full-model generations per checkpoint and prompts, for this group only
    for job in jobs:
        with files.job_lock(job.job_id):
            if files.has(job.job_id):
                log(f"job {job.job_id}: already done elsewhere, skipped")
                summary["skipped"].append(job.describe())
                continue
            log(f"job {job.job_id}: {job.describe()}")
            records, examples = run_job(job, cache_dir, progress, memo)
            files.write(job.job_id, records, examples)
        summary["done"].append(job.describe())
    return summary


def run_jobs(jobs: list[Job], out_dir: str | Path, cache_dir: Path | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None, allow_mixed_commits: bool = False,
             executor: Executor | None = None) -> dict[str, list[str]]:
    """Run every job not yet in the store; returns {"done", "skipped", "unsupported", "failed"}: lists of job
    descriptions ("failed": with the error). Every pending job's input is checked first (`validate_jobs`), so
    bad input never touches the store; so is the code: a folder measured by another commit gets no new job
    (`MixedCommitsError`) unless `allow_mixed_commits`.

    The driver: pending jobs are grouped by checkpoint (`group_jobs`) and the groups submitted to `executor`
    (default: `SerialExecutor`, in this process); records.jsonl is rebuilt as each group comes back. A group
    that fails on a worker is reported with its traceback and job id, and the rest of the grid goes on; in
    this process (serial) its error is raised, as before executors existed."""
    from eebench.executors import JobFailedError, SerialExecutor

    log = log or (tqdm.write if progress else print)  # tqdm.write: a line above the bars, not through them
    finished = ResultsStore.finished_jobs(out_dir)
    pending = [job for job in jobs if job.job_id not in finished]
    validate_jobs(pending)
    if pending and not allow_mixed_commits:
        check_one_commit(out_dir, git_commit())
    store = ResultsStore(out_dir)
    if store.adopted:
        log(f"kept {len(store.adopted)} job(s) that only {store.records_path} held, as jobs/ files: "
            f"{', '.join(store.adopted)}")
    finished = store.done()
    summary: dict[str, list[str]] = {"done": [], "skipped": [], "unsupported": [], "failed": []}
    todo = []
    for job in jobs:
        if job.job_id in finished:
            summary["skipped"].append(job.describe())
            continue
        try:
            check_supported(job)
        except UnsupportedTaskError as error:
            log(f"skip: {error}")
            summary["unsupported"].append(job.describe())
            continue
        todo.append(job)
    executor = executor or SerialExecutor()
    # Absolute paths: a worker may start in another folder (a Slurm job on another node).
    out_dir = Path(out_dir).resolve()
    cache_dir = Path(cache_dir if cache_dir is not None else default_cache_dir()).resolve()
    groups = group_jobs(todo)
    in_process = executor.in_process
    calls = [(group, out_dir, cache_dir, progress and in_process, log if in_process else None) for group in groups]
    handles = executor.submit(run_group, calls)
    bar = tqdm(total=len(todo), desc="jobs", disable=not progress)
    try:
        for handle in executor.as_completed(handles):
            group = groups[handles.index(handle)]
            try:
                result = handle.result()
            except JobFailedError as error:
                log(f"FAILED: {error}")
                summary["failed"].extend(f"{job.describe()} ({error.job_id})" for job in group)
                continue
            finally:
                store.rebuild()
                bar.update(len(group))
            summary["done"].extend(result["done"])
            summary["skipped"].extend(result["skipped"])
    finally:
        bar.close()
    return summary
