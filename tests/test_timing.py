"""Timing logic, including the CUDA path, tested on CPU with a fake `torch.cuda`."""

import pytest

from eebench.timing import CpuClock, CudaClock, interleaved_medians


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
