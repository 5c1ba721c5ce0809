"""Wall-clock measurement: the full model and every operating point, same process, same examples.

Candidates (the full model and every operating point) are interleaved batch by batch: each batch of the timed
examples runs through every candidate back to back, in a rotating order, so that a slow second of a noisy
machine (frequency scaling, another process, a VM neighbour) hits every candidate alike. A round is one pass
over the timed examples; each candidate's time is the median of its rounds, after warm-up rounds that are not
counted, and short passes get more rounds (`min_seconds`). Every round is kept (`Timed`), so a record shows
min, median and max; when the speed-up itself moves too much between rounds (`paired_spread`) everything is
timed once more, and what stays implausible is flagged (`timing_flag`), never silently reported.

Before (eebench <= 37578a1) each candidate's whole pass was one timed region, interleaved pass by pass
(`timing_interleave="pass"`): consecutive identical passes of 1-1.5 s spread 30-40 % on a 2-core VM, and
81 % of M-CID's batch-size-1 points were flagged.

What is timed is a seeded random sample of dev (`timing_sample`), the same for every method of a task: the
first N examples of a dev set ordered by source (STS-B's first 128 are all MSRvid captions) are not typical.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import torch

if TYPE_CHECKING:  # the runner imports this module: a type-only import keeps the cycle out
    from eebench.runner import EvalConfig

TIMING_SAMPLE_SEED = 0  # the timed examples: one seeded sample of dev, the same for every method and seed of a task
MAX_PLAUSIBLE_REALIZATION = 1.15  # wall-clock beyond the saved layers by more than this is noise, not a result
TIMING_THREADS_ENV = "EEBENCH_TIMING_THREADS"  # torch threads of an exclusive clock (see exclusive_timing)
MAX_REPEAT_SPREAD = 0.25  # (max - min) / median of a speed-up over rounds; beyond it the machine was not quiet
TimingSample = Literal["random", "first"]
TimingInterleave = Literal["batch", "pass"]
TRIM_FROM_ROUNDS = 5  # paired_spread leaves out the extreme rounds from this many rounds on


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


def timing_sample(size: int, n: int, how: TimingSample = "random", seed: int = TIMING_SAMPLE_SEED) -> list[int]:
    """Indices (sorted, so batches keep dev order) of the `min(n, size)` examples that wall-clock runs on."""
    n = min(n, size)
    if how == "first":  # what eebench timed before the sample existed; kept to reproduce those records
        return list(range(n))
    if how != "random":
        raise ValueError(f"timing_sample must be 'random' or 'first', got {how!r}")
    return sorted(np.random.default_rng(seed).choice(size, n, replace=False).tolist())


@dataclass(frozen=True)
class Timed:
    """The counted rounds of one candidate, in seconds: one whole pass over the timed examples per round."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median: 0 for one round."""
        return (max(self.seconds) - min(self.seconds)) / self.median if self.median > 0 else 0.0


def paired_spread(point: Timed, full: Timed) -> float:
    """(max - min) / median of the per-round ratio point / full: how far the speed-up itself moved between rounds.
    A round's point and full-model times share the machine's state of that moment (every batch of one round runs
    every candidate back to back), so a slow round moves both and cancels here, where each one's own spread
    does not. From TRIM_FROM_ROUNDS rounds on, the lowest and highest ratio are left out: the range of the
    others is an interval for the median that does not widen just because short passes got more rounds."""
    ratios = sorted(p / f for p, f in zip(point.seconds, full.seconds, strict=True) if f > 0)
    if len(ratios) >= TRIM_FROM_ROUNDS:
        ratios = ratios[1:-1]
    return Timed(tuple(ratios)).spread if ratios else 0.0


def paired_speedup(point: Timed, full: Timed) -> float:
    """Median over rounds of t_full,round / t_method,round: the speed-up, paired round by round.

    Why not median(t_full) / median(t_method): every point of a job shares the full model's median, so one
    noisy estimate of it shifts the whole job's curve; pairing each round's point with the same round's full
    model cancels what that round did to both, and the estimate is the centre of the range that `paired_spread`
    reports. From the stored rounds of the headline leaderboard (84 job medians, commit cf14923) the
    seed-to-seed standard deviation of a job's median realization is 0.016 paired against 0.020 unpaired."""
    return statistics.median(f / p for p, f in zip(point.seconds, full.seconds, strict=True) if p > 0)


Candidate = Callable[[], object] | Sequence[Callable[[], object]]

# The longest timing: rounds are added up to this many times `repeats` until the slowest candidate has been timed
# for `min_seconds`; short passes (M-CID's queries, batch size 32) are dominated by jitter otherwise.
MAX_ROUND_FACTOR = 5


def interleaved_times(candidates: Mapping[str, Candidate], clock: Clock, repeats: int = 3, warmup: int = 1,
                      retime_spread: float | None = MAX_REPEAT_SPREAD, progress: str | None = None,
                      min_seconds: float = 0.0, reference: str | None = None) -> dict[str, Timed]:
    """Every candidate's counted rounds, after `warmup` uncounted ones.

    A candidate is one callable (one pass over the timed examples) or a sequence of steps (one per batch; all
    candidates the same length). Steps are interleaved finely: for each batch, every candidate runs it back to
    back, in an order that rotates from batch to batch, so a slow second of the machine hits all candidates
    alike instead of one candidate's whole pass. A candidate's round time is the sum over its steps.

    Rounds: at least `repeats`; more (up to MAX_ROUND_FACTOR x repeats) until the slowest candidate's counted
    time reaches `min_seconds`. When a candidate's paired spread against `reference` (`paired_spread`; each
    candidate's own spread if no reference is given) exceeds `retime_spread`, all are timed once more (a burst
    of other load hits one run, rarely two) and the run with the smaller worst spread is kept. `progress`: the
    description of a tqdm bar (with ETA), updated between timed regions; None: no bar."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    if reference is not None and reference not in candidates:
        raise ValueError(f"reference {reference!r} is not a candidate: {sorted(candidates)}")
    from tqdm.auto import tqdm

    if not candidates:
        return {}
    steps = {name: list(run) if isinstance(run, Sequence) else [run] for name, run in candidates.items()}
    lengths = {len(s) for s in steps.values()}
    if len(lengths) > 1:
        raise ValueError(f"every candidate needs the same number of steps (batches), got {sorted(lengths)}")
    n_steps = lengths.pop()
    names = list(steps)
    bar = tqdm(total=(warmup + repeats) * n_steps, desc=progress, disable=progress is None, leave=False, unit="batch")

    def run_round() -> dict[str, float]:
        totals = dict.fromkeys(names, 0.0)
        for step in range(n_steps):
            shift = step % len(names)
            for name in names[shift:] + names[:shift]:
                clock.start()
                steps[name][step]()
                totals[name] += clock.stop()
            bar.update()  # after the clocks stopped: the bar costs the measurement nothing
        return totals

    def worst_spread(timed: dict[str, Timed]) -> float:
        if reference is None:
            return max(t.spread for t in timed.values())
        return max(paired_spread(t, timed[reference]) for t in timed.values())

    def measure() -> dict[str, Timed]:
        for _ in range(warmup):
            run_round()
        samples: dict[str, list[float]] = {name: [] for name in names}
        while True:
            for name, seconds in run_round().items():
                samples[name].append(seconds)
            rounds = len(samples[names[0]])
            if rounds >= MAX_ROUND_FACTOR * repeats or (
                    rounds >= repeats and max(sum(s) for s in samples.values()) >= min_seconds):
                return {name: Timed(tuple(values)) for name, values in samples.items()}
            if rounds >= repeats:  # one more round than planned: the bar grows with it
                bar.total += n_steps
                bar.refresh()

    first = measure()
    worst = worst_spread(first)
    if retime_spread is None or worst <= retime_spread:
        bar.close()
        return first
    bar.reset(total=(warmup + repeats) * n_steps)
    bar.set_description(f"{progress} (again: spread {100 * worst:.0f}%)")
    second = measure()
    bar.close()
    return second if worst_spread(second) < worst else first


def timing_steps(runs: Sequence[Callable[[], object]], interleave: TimingInterleave) -> Candidate:
    """One candidate for `interleaved_times` from its per-batch runs: the steps themselves ("batch"), or one
    callable running them all ("pass", the timing of eebench up to 37578a1)."""
    if interleave == "batch":
        return list(runs)
    if interleave != "pass":
        raise ValueError(f"timing_interleave must be 'batch' or 'pass', got {interleave!r}")
    return lambda: [run() for run in runs]


def time_points(runs: Mapping[str, Sequence[Callable[[], object]]], config: EvalConfig, clock: Clock, reference: str,
                progress: bool, batch_size: int, examples: int) -> tuple[dict[str, Timed], float]:
    """({label: rounds}, load average just before) for every point's per-batch runs under a job's timing
    settings (interleave, repeats, warm-up, min_seconds), paired against `reference` (the full model's label).
    The one place where evaluators of every kind time their points, so their records mean the same thing."""
    candidates = {label: timing_steps(steps, config.timing_interleave) for label, steps in runs.items()}
    load = load_average()
    timed = interleaved_times(candidates, clock, config.timing_repeats, config.timing_warmup,
                              progress=timing_bar(progress, len(candidates), batch_size, examples),
                              min_seconds=config.timing_min_seconds, reference=reference)
    return timed, load


def timing_bar(progress: bool, points: int, batch_size: int, examples: int) -> str | None:
    """The timing bar's description, or None (no bar) when the run shows no progress."""
    return f"timing {points} points, batch size {batch_size}, {examples} examples" if progress else None


def interleaved_medians(candidates: Mapping[str, Callable[[], object]], clock: Clock,
                        repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median seconds per candidate over `repeats` interleaved rounds, after `warmup` uncounted rounds."""
    return {name: timed.median for name, timed in
            interleaved_times(candidates, clock, repeats, warmup, retime_spread=None).items()}


@contextlib.contextmanager
def exclusive_timing() -> Iterator[dict]:
    """Run the wall-clock stage holding the node's activity lock exclusively (`eebench.locks`): no other job
    of ours trains, evaluates or times on this node meanwhile. A worker of a process pool trains with its
    share of the cores; holding the lock, its clock may use what a serial run has: $EEBENCH_TIMING_THREADS
    (set by the pool) torch threads, restored afterwards. Yields a dict for the records, filled on exit:
    timing_exclusive (whether the lock was held), timing_threads (the torch threads the clock ran with) and
    load_average_end (the 1-minute load as timing ended)."""
    from eebench.locks import node_activity

    context: dict = {}
    with node_activity().timing() as exclusive:
        own = torch.get_num_threads()
        threads = int(os.environ.get(TIMING_THREADS_ENV) or own)
        torch.set_num_threads(threads)
        try:
            yield context
        finally:
            torch.set_num_threads(own)
        context.update(timing_exclusive=exclusive, timing_threads=threads, load_average_end=load_average())


def load_average() -> float:
    """The machine's 1-minute load average (NaN where the OS has none), stored with every timing."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def timing_flag(realization: float, point: Timed, full: Timed) -> str:
    """Why a wall-clock number should not be trusted ("" when nothing is wrong)."""
    reasons = []
    if realization > MAX_PLAUSIBLE_REALIZATION:
        reasons.append(f"realization {realization:.2f} > {MAX_PLAUSIBLE_REALIZATION}: faster than the saved layers allow")
    spread = paired_spread(point, full)
    if spread > MAX_REPEAT_SPREAD:
        reasons.append(f"speed-up spread {100 * spread:.0f}% over rounds > {100 * MAX_REPEAT_SPREAD:.0f}%: machine "
                       "not quiet")
    return "; ".join(reasons)


def timing_fields(point: Timed, full: Timed, timed_saved_layer_speedup: float, load: float,
                  wallclock_speedup: float | None = None) -> dict:
    """The timing part of one record: speed-up (`paired_speedup` unless given, e.g. in tokens/s), every
    round, min/median/max, the speed-up's spread over rounds, realization, load average and the flag."""
    speedup = paired_speedup(point, full) if wallclock_speedup is None else wallclock_speedup
    realization = speedup / timed_saved_layer_speedup
    return {"wallclock_speedup": speedup, "wallclock_speedup_spread": paired_spread(point, full), "wallclock_seconds": point.median, "full_wallclock_seconds": full.median,
            "wallclock_seconds_repeats": list(point.seconds), "full_wallclock_seconds_repeats": list(full.seconds),
            "wallclock_seconds_min": min(point.seconds), "wallclock_seconds_max": max(point.seconds),
            "timed_saved_layer_speedup": timed_saved_layer_speedup, "realization": realization,
            "load_average": load, "timing_flag": timing_flag(realization, point, full)}
