"""Timing logic, including the CUDA path, tested on CPU with a fake `torch.cuda`."""

from dataclasses import replace

import pytest

from eebench.timing import (
    MAX_ROUND_FACTOR,
    CpuClock,
    CudaClock,
    Timed,
    interleaved_medians,
    interleaved_times,
    paired_speedup,
    paired_spread,
    timing_fields,
    timing_flag,
    timing_sample,
    timing_steps,
)


class FakeCuda:
    """Records calls; each event pair spans `elapsed_ms` milliseconds."""

    def __init__(self, elapsed_ms):
        self.elapsed_ms = list(elapsed_ms)
        self.calls = []
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing, "timing events must be created with enable_timing=True"
                self.recorded = False

            def record(self):
                fake.calls.append("record")
                self.recorded = True

            def synchronize(self):
                fake.calls.append("event.synchronize")

            def elapsed_time(self, end):
                assert self.recorded and end.recorded, "elapsed_time needs both events recorded"
                return fake.elapsed_ms.pop(0)

        self.Event = Event

    def synchronize(self, device=None):
        self.calls.append("synchronize")


def test_cuda_clock_synchronizes_and_converts_ms_to_seconds():
    cuda = FakeCuda([250.0])
    clock = CudaClock("cuda", cuda=cuda)
    clock.start()
    cuda.calls.append("work")
    assert clock.stop() == pytest.approx(0.25)
    # device drained before start, start event before the work, end recorded and waited for after it
    assert cuda.calls == ["synchronize", "record", "work", "record", "event.synchronize"]


def test_interleaved_medians_skips_warmup_and_takes_median():
    cuda = FakeCuda([999.0, 999.0, 1.0, 10.0, 3.0, 30.0, 2.0, 20.0])  # first round (a, b) is warm-up
    order = []
    result = interleaved_medians({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                 CudaClock("cuda", cuda=cuda), repeats=3, warmup=1)
    assert order == ["a", "b"] * 4  # interleaved, not all a's then all b's
    assert result == {"a": pytest.approx(0.002), "b": pytest.approx(0.020)}


def test_cpu_clock_measures_elapsed_time():
    clock = CpuClock()
    clock.start()
    sum(range(10000))
    assert clock.stop() > 0


def test_repeats_must_be_positive():
    with pytest.raises(ValueError):
        interleaved_medians({"a": lambda: None}, CpuClock(), repeats=0)


def test_interleaved_times_keeps_every_repeat_and_retimes_a_noisy_round():
    # round 1 (after one warm-up round): b's repeats spread 10 -> 30 ms; round 2 is quiet and is kept
    cuda = FakeCuda([9, 9, 1.0, 10.0, 1.0, 30.0, 1.0, 20.0] + [9, 9, 1.0, 10.0, 1.0, 11.0, 1.0, 10.5])
    timed = interleaved_times({"a": lambda: None, "b": lambda: None}, CudaClock("cuda", cuda=cuda), repeats=3, warmup=1)
    assert timed["b"].seconds == pytest.approx((0.010, 0.011, 0.0105))
    assert timed["b"].median == pytest.approx(0.0105) and timed["b"].spread == pytest.approx(0.001 / 0.0105)
    noisy_twice = FakeCuda([9, 9, 1.0, 10.0, 1.0, 30.0] + [9, 9, 1.0, 10.0, 1.0, 40.0])
    timed = interleaved_times({"a": lambda: None, "b": lambda: None}, CudaClock("cuda", cuda=noisy_twice), repeats=2)
    assert timed["b"].seconds == pytest.approx((0.010, 0.030))  # the less noisy of the two runs
    assert timing_flag(1.0, timed["b"], timed["a"]).startswith("speed-up spread 100% over rounds")


def test_timing_flags_name_what_is_implausible():
    quiet, noisy = Timed((1.0, 1.01, 0.99)), Timed((1.0, 1.6, 1.1))
    assert timing_flag(1.0, quiet, quiet) == ""
    assert timing_flag(1.14, quiet, quiet) == ""
    assert "realization 3.80 > 1.15" in timing_flag(3.8, quiet, quiet)  # e.g. a point that saves no layer, 3.8x faster
    assert "machine not quiet" in timing_flag(1.0, quiet, noisy)
    fields = timing_fields(Timed((0.5, 0.6, 0.4)), Timed((1.0, 1.0, 1.0)), timed_saved_layer_speedup=1.0, load=2.5)
    assert fields["wallclock_speedup"] == pytest.approx(2.0) and fields["realization"] == pytest.approx(2.0)
    assert fields["wallclock_seconds_min"] == 0.4 and fields["wallclock_seconds_max"] == 0.6
    assert fields["wallclock_seconds_repeats"] == [0.5, 0.6, 0.4] and fields["load_average"] == 2.5
    assert "realization 2.00" in fields["timing_flag"] and "spread 40%" in fields["timing_flag"]


def test_timing_sample_is_seeded_and_representative_of_a_dev_set_ordered_by_source():
    """STS-B dev is ordered by source: its first 128 pairs are all MSRvid captions, far shorter than the rest."""
    from eebench.tasks import load_split

    from conftest import GLUE

    dev = load_split("stsb", "dev", GLUE).examples
    words = [len((e.text_a + " " + (e.text_b or "")).split()) for e in dev]
    sample = timing_sample(len(dev), 128)
    assert sample == sorted(sample) == timing_sample(len(dev), 128) and len(set(sample)) == 128
    assert timing_sample(len(dev), 128, "first") == list(range(128))
    assert timing_sample(10, 128) == list(range(10))
    whole = sum(words) / len(words)
    first = sum(words[:128]) / 128
    sampled = sum(words[i] for i in sample) / 128
    assert abs(sampled - whole) < 0.1 * whole < abs(first - whole)
    with pytest.raises(ValueError, match="'random' or 'first'"):
        timing_sample(10, 5, "last")


def test_the_timing_bar_counts_every_batch_of_every_round_and_is_off_without_progress(capsys):
    from eebench.timing import timing_bar

    assert timing_bar(False, 3, 1, 8) is None
    label = timing_bar(True, 2, 1, 8)
    # 3 batches, 2 rounds; b's speed-up moves 200 % between rounds, so everything is timed once more
    noisy = ScriptedClock([1, 1] * 3 + [1, 3, 3, 1, 1, 3] + [1, 1] * 6)  # the order rotates: b first in batch 2
    interleaved_times({"a": [lambda: None] * 3, "b": [lambda: None] * 3}, noisy, repeats=2, warmup=0,
                      progress=label, reference="a")
    shown = capsys.readouterr().err
    assert "timing 2 points, batch size 1, 8 examples" in shown and "0/6" in shown and "again: spread 100%" in shown
    interleaved_times({"a": lambda: None}, CpuClock(), repeats=1, warmup=0)
    assert capsys.readouterr().err == ""


def test_the_exclusive_clock_takes_the_pools_timing_threads_and_gives_them_back(tmp_path, monkeypatch):
    """A pool worker trains on its share of the cores (here 1); alone on the node, its clock runs with what a
    serial run has ($EEBENCH_TIMING_THREADS), and the worker gets its own count back afterwards."""
    import torch

    from eebench.timing import TIMING_THREADS_ENV, exclusive_timing

    monkeypatch.setenv("EEBENCH_NODE_LOCK_DIR", str(tmp_path))
    own = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setenv(TIMING_THREADS_ENV, "2")
        with exclusive_timing() as context:
            inside = torch.get_num_threads()
        assert (inside, torch.get_num_threads()) == (2, 1)
        assert context["timing_threads"] == 2 and context["timing_exclusive"] is True
        monkeypatch.delenv(TIMING_THREADS_ENV)
        with exclusive_timing() as context:  # a serial run: its own threads
            assert torch.get_num_threads() == 1
        assert context["timing_threads"] == 1
    finally:
        torch.set_num_threads(own)


class ScriptedClock:
    """A clock whose timed regions last what `durations` says, in order; records what ran in between."""

    def __init__(self, durations):
        self.durations, self.ran = list(durations), []

    def start(self):
        pass

    def stop(self):
        return self.durations.pop(0) if self.durations else 1.0


def test_batches_are_interleaved_with_a_rotating_order_and_summed_per_round():
    ran = []
    steps = {name: [lambda name=name, i=i: ran.append(f"{name}{i}") for i in range(3)] for name in "abc"}
    timed = interleaved_times(steps, ScriptedClock([]), repeats=2, warmup=0, retime_spread=None)
    # every batch runs through every candidate before the next batch; who goes first rotates with the batch
    assert ran[:9] == ["a0", "b0", "c0", "b1", "c1", "a1", "c2", "a2", "b2"] and ran[9:] == ran[:9]
    assert timed["a"].seconds == (3.0, 3.0)  # a round: the sum over the candidate's batches
    with pytest.raises(ValueError, match="same number of steps"):
        interleaved_times({"a": steps["a"], "b": steps["b"][:2]}, ScriptedClock([]))
    with pytest.raises(ValueError, match="reference 'full' is not a candidate"):
        interleaved_times(steps, ScriptedClock([]), reference="full")
    assert interleaved_times({}, ScriptedClock([])) == {}


def test_short_passes_get_more_rounds_up_to_a_cap():
    candidates = {"full": [lambda: None] * 2, "point": [lambda: None] * 2}
    # each timed region lasts 0.1 s, so a full-model round is 0.2 s: 1 s needs 5 rounds
    timed = interleaved_times(candidates, ScriptedClock([0.1] * 1000), repeats=3, warmup=1, min_seconds=1.0)
    assert len(timed["full"].seconds) == 5
    capped = interleaved_times(candidates, ScriptedClock([0.1] * 1000), repeats=2, warmup=0, min_seconds=100.0)
    assert len(capped["full"].seconds) == MAX_ROUND_FACTOR * 2
    assert len(interleaved_times(candidates, ScriptedClock([]), repeats=3, min_seconds=1.0)["point"].seconds) == 3


def test_a_slow_round_that_hits_full_model_and_point_alike_is_not_flagged_or_retimed():
    # round 2 is 50 % slower for both (the machine, not the method): each one's own spread is 50 %, the speed-up's 0
    durations = [1.0, 0.5, 1.0, 0.5, 1.5, 0.75, 1.0, 0.5]  # warm-up (full, point), then 3 rounds
    timed = interleaved_times({"full": lambda: None, "point": lambda: None}, ScriptedClock(durations), repeats=3,
                              reference="full")
    assert timed["full"].spread == pytest.approx(0.5) and paired_spread(timed["point"], timed["full"]) == 0
    assert timing_flag(1.0, timed["point"], timed["full"]) == ""
    # the same rounds judged by each candidate's own spread would have been timed again
    retimed = ScriptedClock(durations + [1.0, 0.5] * 4)
    again = interleaved_times({"full": lambda: None, "point": lambda: None}, retimed, repeats=3)
    assert again["full"].spread == 0  # the second, quiet run was kept


def test_pass_interleave_times_each_pass_as_one_region():
    ran = []
    runs = [lambda i=i: ran.append(i) for i in range(3)]
    assert timing_steps(runs, "batch") == runs
    whole = timing_steps(runs, "pass")
    whole()
    assert callable(whole) and ran == [0, 1, 2]
    with pytest.raises(ValueError, match="'batch' or 'pass'"):
        timing_steps(runs, "example")


def test_the_speedup_pairs_each_rounds_point_with_the_same_rounds_full_model():
    """Round 2 is slow for both, round 3 for the point only. Ratio of medians: 1.2 / 0.9 = 1.33 (the slow rounds
    land in different places of the two medians); paired: rounds give 2, 2, 1.33, median 2."""
    point, full = Timed((0.5, 1.0, 0.9)), Timed((1.0, 2.0, 1.2))
    assert full.median / point.median == pytest.approx(1.2 / 0.9)
    assert paired_speedup(point, full) == pytest.approx(2.0)
    fields = timing_fields(point, full, timed_saved_layer_speedup=2.0, load=0.0)
    assert fields["wallclock_speedup"] == pytest.approx(2.0) and fields["realization"] == pytest.approx(1.0)


def test_the_speedup_spread_leaves_out_the_extreme_rounds_once_there_are_enough():
    full = Timed((1.0,) * 5)
    assert paired_spread(Timed((0.5, 0.5, 1.0, 0.5, 0.5)), full) == 0  # one burst among 5 rounds
    assert paired_spread(Timed((0.5, 0.5, 1.0, 0.5)), Timed((1.0,) * 4)) == pytest.approx(1.0)  # 4 rounds: all count
    assert paired_spread(Timed((0.4, 0.5, 0.6, 0.5, 0.7)), full) == pytest.approx(0.2)  # (0.6 - 0.5) / 0.5


def test_time_points_applies_the_job_timing_settings_and_returns_the_load():
    from eebench.runner import EvalConfig
    from eebench.timing import time_points

    runs = {"full model": [lambda: None] * 2, "t=0.5": [lambda: None] * 2}
    config = EvalConfig(timing_repeats=3, timing_warmup=1, timing_min_seconds=1.9)
    # 0.1 s per batch: a full-model round is 0.2 s, so 1.9 s needs 10 counted rounds
    timed, load = time_points(runs, config, ScriptedClock([0.1] * 1000), "full model", False, 1, 2)
    assert len(timed["full model"].seconds) == 10 and timed["t=0.5"].median == pytest.approx(0.2)
    assert load >= 0
    # "pass": one timed region per round, 0.1 s: 19 rounds would be needed, the 5x cap (15 rounds) ends it
    whole, _ = time_points(runs, replace(config, timing_interleave="pass"), ScriptedClock([0.1] * 1000),
                           "full model", False, 1, 2)
    assert len(whole["full model"].seconds) == MAX_ROUND_FACTOR * 3 and whole["t=0.5"].median == pytest.approx(0.1)
    with pytest.raises(ValueError, match="reference 'missing'"):
        time_points(runs, config, ScriptedClock([0.1] * 1000), "missing", False, 1, 2)
