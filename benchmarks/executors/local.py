"""A pool of worker processes on one machine: one GPU per worker (CUDA_VISIBLE_DEVICES), CPU threads split
between workers, so that N jobs side by side do not oversubscribe the machine."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from eebench.executors import JobFailedError


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES's list, else every GPU torch sees (none on CPU)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu for gpu in listed.split(",") if gpu.strip()]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _init_worker(slots, gpus: list[str], threads: int, timing_threads: int, job_module: str) -> None:
    """Runs once in each new worker, before any job: take a slot, then its GPU and its share of the threads.
    CUDA reads CUDA_VISIBLE_DEVICES when it initialises, which no job has done yet; so `--device cuda` is
    this worker's own GPU. The clock runs alone on the node (`timing.exclusive_timing`), so it gets the
    threads a serial run has (`timing_threads`): wall-clock figures must not depend on the worker count.
    torch and the jobs' module (`job_module`, where the submitted function lives) are imported under the
    node's shared hold, so a worker starting up never runs inside another worker's clock (`eebench.locks`)."""
    from eebench.locks import import_holding_shared

    slot = slots.get()
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    os.environ["EEBENCH_WORKER_SLOT"] = str(slot)
    import_holding_shared("torch", "eebench.timing", job_module)
    import torch

    from eebench.timing import TIMING_THREADS_ENV
    os.environ[TIMING_THREADS_ENV] = str(timing_threads)
    torch.set_num_threads(threads)


class _FutureHandle:
    def __init__(self, future: concurrent.futures.Future, job_id: str):
        self.future, self.job_id = future, job_id

    def result(self) -> Any:
        try:
            return self.future.result()
        except BrokenProcessPool as error:
            raise JobFailedError(self.job_id, f"its worker process died ({error}); a killed or out-of-memory "
                                              f"worker ends the pool, so rerun the command to finish the rest") from None
        except Exception as error:
            # concurrent.futures chains the worker's formatted traceback as the cause
            remote = error.__cause__
            details = str(getattr(remote, "tb", "")) or f"{type(error).__name__}: {error}"
            raise JobFailedError(self.job_id, details.strip()) from error


class LocalExecutor:
    """`workers` processes (spawned: a fresh interpreter, no forked torch state). `gpus`: device ids to share
    out, one per worker (default: the visible ones; none = CPU); `threads`: torch threads per worker (default:
    the machine's cores split evenly); `timing_threads`: torch threads of a worker's wall-clock stage, which
    runs with nothing of ours beside it (default: this process's, what a serial run times with)."""

    in_process = False

    def __init__(self, workers: int, gpus: Sequence[str] | None = None, threads: int | None = None,
                 timing_threads: int | None = None):
        if workers < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        self.workers = workers
        self.gpus = list(gpus) if gpus is not None else visible_gpus()
        self.threads = threads or max(1, (os.cpu_count() or 1) // workers)
        if timing_threads is None:
            import torch
            timing_threads = torch.get_num_threads()
        self.timing_threads = timing_threads
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def submit(self, fn: Callable[..., Any], calls: Sequence[tuple]) -> list[_FutureHandle]:
        if self._pool is None:
            context = multiprocessing.get_context("spawn")
            slots = context.Queue()
            for slot in range(self.workers):
                slots.put(slot)
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=context, initializer=_init_worker, initargs=(slots, self.gpus, self.threads, self.timing_threads, fn.__module__))
        return [_FutureHandle(self._pool.submit(fn, *args), f"local-{i}") for i, args in enumerate(calls)]

    def as_completed(self, handles: Sequence[_FutureHandle]) -> Iterator[_FutureHandle]:
        by_future = {handle.future: handle for handle in handles}
        for future in concurrent.futures.as_completed(by_future):
            yield by_future[future]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
