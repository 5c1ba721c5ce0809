"""Slurm job arrays through submitit: one array task per checkpoint group; requeued on preemption and on
timeout (the task reruns its group, and the jobs it had finished are skipped); a failed task surfaces as
JobFailedError with its Slurm id and the remote traceback, while the other tasks go on.

`cluster="local"` runs the same submissions as subprocesses of this machine (submitit's local executor,
no Slurm needed): what the tests use to check that a grid survives the trip through submitit."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import cloudpickle

from eebench.executors import JobFailedError


def _import_submitit():
    """submitit configures logging when imported (logging.config.dictConfig), which closes every handler
    the process already has: a user's log files, or another library's handler on sys.stderr. Its own switch
    (SUBMITIT_LOG_LEVEL=NOCONFIG) skips that, for this import only; its logger then gets one handler."""
    import logging
    import sys

    previous = os.environ.get("SUBMITIT_LOG_LEVEL")
    if previous is None:
        os.environ["SUBMITIT_LOG_LEVEL"] = "NOCONFIG"
    try:
        import submitit
    finally:
        if previous is None:
            del os.environ["SUBMITIT_LOG_LEVEL"]
    logger = logging.getLogger("submitit")
    if previous is None and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s %(levelname)s (%(asctime)s) - %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
    return submitit


submitit = _import_submitit()


@dataclass(frozen=True)
class SlurmOptions:
    """What each array task asks Slurm for. From flags, or a TOML file whose [slurm] table uses these names:

        [slurm]
        partition = "gpu"
        time_min = 240
        gpus_per_node = 1
        cpus_per_task = 8
        mem_gb = 32
        array_parallelism = 16
        setup = ["module load cuda", "source /shared/eebench/.venv/bin/activate"]
        additional = { account = "nlp", qos = "normal" }
    """

    partition: str | None = None
    time_min: int = 240                # per array task (one checkpoint group); requeued when it runs out
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    array_parallelism: int = 64        # array tasks running at once
    exclusive: bool = False            # whole nodes: wall-clock timing beside nobody, ours or not
    setup: tuple[str, ...] = ()        # shell lines before the task starts (modules, environment)
    additional: dict = field(default_factory=dict)  # any other sbatch option, e.g. {"account": "nlp"}
    poll_seconds: float = 15.0         # how often the driver asks Slurm about its tasks

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> SlurmOptions:
        """The [slurm] table of a TOML file; `overrides` (flags given on the command line) win over it."""
        import tomllib  # Python 3.11+ (the only use of TOML, so 3.10 still runs everything else)

        path = Path(path)
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8")).get("slurm", {})
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path}: not valid TOML ({error}). Fix the file (see `SlurmOptions` in "
                             f"eebench/executors/slurm.py for an example)") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"{path}: unknown [slurm] option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}. "
                             f"Fix: rename or remove them (other sbatch options go under `additional`)")
        table = {**table, **{k: v for k, v in overrides.items() if v is not None}}
        if "setup" in table:
            table["setup"] = tuple(table["setup"])
        return cls(**table)

    def submitit_parameters(self, cluster: str) -> dict[str, Any]:
        """submitit's parameter names (the slurm_ ones are ignored by its local executor)."""
        parameters: dict[str, Any] = {"timeout_min": self.time_min, "gpus_per_node": self.gpus_per_node,
                                      "slurm_array_parallelism": self.array_parallelism, "name": "eebench"}
        if self.cpus_per_task:
            parameters["cpus_per_task"] = self.cpus_per_task
        if self.mem_gb:
            parameters["mem_gb"] = self.mem_gb
        if cluster == "slurm":
            if self.partition:
                parameters["slurm_partition"] = self.partition
            if self.exclusive:
                parameters["slurm_exclusive"] = True
            if self.setup:
                parameters["slurm_setup"] = list(self.setup)
            if self.additional:
                parameters["slurm_additional_parameters"] = dict(self.additional)
        return parameters

    def describe(self) -> dict:
        return asdict(self)


class _Requeueable(submitit.helpers.Checkpointable):
    """The call, made checkpointable: on preemption or timeout submitit requeues it with the same arguments.
    Nothing to save: the rerun skips the jobs the folder already holds (`eebench.runner.run_group`).

    It travels as the function's import path and its arguments as pickled bytes, so that unpickling it imports
    nothing heavy: the task imports the function's module (torch, transformers) and unpickles the arguments
    under the node's shared hold, which waits while another job's clock runs on the node (`eebench.locks`)."""

    def __init__(self, fn: Callable[..., Any]):
        if "<" in fn.__qualname__:  # a lambda or nested function has no import path: it travels as itself
            self.fn, self.path = fn, None
        else:
            self.fn, self.path = None, (fn.__module__, fn.__qualname__)

    def __call__(self, pickled_arguments: bytes) -> Any:
        import importlib
        import pickle

        from eebench.locks import node_activity

        with node_activity().working():
            fn = self.fn
            if fn is None:
                module, qualname = self.path
                fn = importlib.import_module(module)
                for name in qualname.split("."):
                    fn = getattr(fn, name)
            arguments = pickle.loads(pickled_arguments)
            import torch
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus:  # torch would otherwise start a thread per core of the node, not of the task's allocation
            torch.set_num_threads(int(cpus))
        return fn(*arguments)


class _JobHandle:
    def __init__(self, job: submitit.Job):
        self.job, self.job_id = job, str(job.job_id)

    def result(self) -> Any:
        try:
            return self.job.result()
        except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as error:
            raise JobFailedError(self.job_id, f"{error}\n(logs: {self.job.paths.stdout}, {self.job.paths.stderr})") from error


class SubmititExecutor:
    """`folder`: where submitit keeps pickles and logs (a shared filesystem on a cluster). `cluster`:
    "slurm" or "local" (subprocesses of this machine)."""

    in_process = False

    def __init__(self, folder: str | Path, cluster: str = "slurm", options: SlurmOptions | None = None):
        if cluster not in ("slurm", "local"):
            raise ValueError(f"cluster must be 'slurm' or 'local', got '{cluster}' ('debug' runs pdb on a failure)")
        self.options = options or SlurmOptions()
        self.executor = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster=cluster)
        self.executor.update_parameters(**self.options.submitit_parameters(cluster))

    def submit(self, fn: Callable[..., Any], calls: Sequence[tuple]) -> list[_JobHandle]:
        if not calls:
            return []
        pickled = [cloudpickle.dumps(tuple(call)) for call in calls]  # see _Requeueable
        jobs = self.executor.map_array(_Requeueable(fn), pickled)
        return [_JobHandle(job) for job in jobs]

    def as_completed(self, handles: Sequence[_JobHandle]) -> Iterator[_JobHandle]:
        by_job = {id(handle.job): handle for handle in handles}
        for job in submitit.helpers.as_completed([h.job for h in handles], poll_frequency=self.options.poll_seconds):
            yield by_job[id(job)]

    def close(self) -> None:
        pass
