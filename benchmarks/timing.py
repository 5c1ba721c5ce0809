"""Wall-clock measurement: the full model and every operating point, same process, same examples.

Repeats are interleaved (full, point 1, point 2, ..., full, point 1, ...) so that slow drift of a noisy
machine (frequency scaling, another process) hits every candidate alike; each candidate's time is the
median of its repeats, after warm-up runs that are not counted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import torch


class Clock(Protocol):
    def start(self) -> None: ...

    def stop(self) -> float:
        """Seconds since `start`, with all queued device work finished."""
        ...


class CpuClock:
    """time.perf_counter; CPU kernels are synchronous, so nothing to wait for."""

    def __init__(self) -> None:
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        return time.perf_counter() - self._t0


class CudaClock:
    """CUDA events around the work; `stop` synchronises on the end event, so queued kernels are counted."""

    def __init__(self, device: torch.device | str = "cuda", cuda=None) -> None:
        self._cuda = cuda or torch.cuda  # injectable so that the logic is testable without a GPU
        self._device = device
        self._begin = self._end = None

    def start(self) -> None:
        self._cuda.synchronize(self._device)  # don't charge earlier work to this measurement
        self._begin = self._cuda.Event(enable_timing=True)
        self._end = self._cuda.Event(enable_timing=True)
        self._begin.record()

    def stop(self) -> float:
        self._end.record()
        self._end.synchronize()
        return self._begin.elapsed_time(self._end) / 1000.0  # elapsed_time is in milliseconds


def clock_for(device: torch.device | str) -> Clock:
    return CudaClock(device) if torch.device(device).type == "cuda" else CpuClock()


def interleaved_medians(candidates: Mapping[str, Callable[[], object]], clock: Clock,
                        repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median seconds per candidate over `repeats` interleaved rounds, after `warmup` uncounted rounds."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in range(warmup + repeats):
        for name, run in candidates.items():
            clock.start()
            run()
            elapsed = clock.stop()
            if round_index >= warmup:
                samples[name].append(elapsed)
    return {name: statistics.median(values) for name, values in samples.items()}
