"""Where the jobs of a grid run. The driver (`eebench.runner.run_jobs`) hands an executor one call per
checkpoint group and reads the results back as they complete; it never knows what runs them.

- `SerialExecutor` (serial.py): in this process, one group after another (the default).
- `LocalExecutor` (local.py): a pool of worker processes on this machine, one GPU each, threads split.
- `SubmititExecutor` (slurm.py): Slurm job arrays through submitit (or submitit's local subprocesses).

Another engine (Ray, Dask, ...) is one small adapter: `submit` returns a handle per call, `as_completed`
yields them as they finish, and a handle's `result()` raises `JobFailedError` (job id + remote traceback).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol


class JobFailedError(RuntimeError):
    """A call failed on a worker: carries the engine's job id and the worker's traceback."""

    def __init__(self, job_id: str, details: str):
        super().__init__(f"job {job_id} failed on its worker:\n{details}")
        self.job_id, self.details = job_id, details


class Handle(Protocol):
    job_id: str  # the engine's own id (a Slurm array task "1234_5", a pool slot "local-3")

    def result(self) -> Any:
        """The call's return value; raises JobFailedError when it failed on a worker."""
        ...


class Executor(Protocol):
    # True: calls run in the driver's process (progress bars and the driver's log are theirs to use; an
    # error is raised as it is, not wrapped in JobFailedError)
    in_process: bool

    def submit(self, fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Handle]:
        """Start `fn(*args)` for every args tuple of `calls` (one array, where the engine has them)."""
        ...

    def as_completed(self, handles: Sequence[Handle]) -> Iterator[Handle]:
        """Yield each handle once its call has finished (or failed)."""
        ...

    def close(self) -> None: ...


# The kinds, imported on first use: `eebench.executors.arguments` builds every command's parser, and
# submitit takes a tenth of a second to import.
_KINDS = {"SerialExecutor": "serial", "LocalExecutor": "local", "SubmititExecutor": "slurm", "SlurmOptions": "slurm"}


def __getattr__(name: str) -> Any:
    if name in _KINDS:
        import importlib
        return getattr(importlib.import_module(f"eebench.executors.{_KINDS[name]}"), name)
    raise AttributeError(f"module 'eebench.executors' has no attribute '{name}'")


__all__ = ["Executor", "Handle", "JobFailedError", "LocalExecutor", "SerialExecutor", "SlurmOptions",
           "SubmititExecutor"]
