"""Shared fixtures: tiny random backbones, small real data slices, a fast training config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from eebench.runner import EvalConfig, Job
from eebench.training import TrainConfig

# The one place the tests find real data: $EEBENCH_SHARED_DATA, else ../shared/data beside the checkout.
SHARED_DATA = Path(os.environ.get("EEBENCH_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
GLUE = SHARED_DATA / "glue"


def pytest_configure(config):
    if not (SHARED_DATA / "glue").is_dir():
        raise pytest.UsageError(
            f"the tests read slices of real data from {SHARED_DATA}, which has no glue/ folder. Point "
            f"EEBENCH_SHARED_DATA at the folder holding glue/, generation/ and mcid/ (the project's shared/data), "
            f"e.g. EEBENCH_SHARED_DATA=/path/to/shared/data python -m pytest -q")

FAST_TRAIN = TrainConfig(epochs=1, lr=1e-3, batch_size=16, max_seq_length=48)
FAST_EVAL = EvalConfig(batch_size=8, timing_batch_sizes=(1, 4), timing_examples=8, timing_repeats=1, timing_warmup=0,
                       timing_min_seconds=0.0)


@pytest.fixture(autouse=True)
def _quiet_threads():
    # Tests compare numbers, not speed; one thread keeps them deterministic and light on 2-core CI.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_job(method: str, task: str = "graded", **changes) -> Job:
    settings = dict(method=method, task=task, seed=0, backbone="tiny-bert", train=FAST_TRAIN, eval=FAST_EVAL,
                    train_limit=96, eval_limit=24, data_dir=None)
    settings.update(changes)
    return Job(**settings)


def install_plugin(tmp_path: Path, monkeypatch, dist: str, module: str, code: str, entries: dict[str, str]) -> None:
    """Install a real distribution on sys.path: a module plus its .dist-info declaring `eebench.methods` entry points."""
    (tmp_path / f"{module}.py").write_text(code)
    info = tmp_path / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {module}:{target}\n" for name, target in entries.items())
    (info / "entry_points.txt").write_text(f"[eebench.methods]\n{lines}")
    monkeypatch.syspath_prepend(str(tmp_path))


# Hand-built records.jsonl lines for the leaderboard and plot tests.
def make_record(**overrides) -> dict:
    """One records.jsonl line with defaults; a point's speed-ups all equal ``speedup`` unless overridden."""
    speedup = overrides.pop("speedup", 1.0)
    full = overrides.get("is_full_model", False)
    rec = {
        "method": "alpha", "task": "sst2", "seed": 0, "backbone": "minilm",
        "knob": {} if full else {"t": 0.1}, "knob_label": "full model" if full else "t=0.1",
        "is_full_model": False, "metric_name": "accuracy", "metric": 0.9, "metrics": {},
        "num_layers": 12, "mean_exit_layer": 12 / speedup, "saved_layer_speedup": speedup,
        "flops_speedup": speedup, "wallclock_speedup": speedup, "batch_size": 1, "device": "cpu",
        "n_examples": 100, "job_id": "", "config": {}, "environment": {},
    }  # fmt: skip
    rec.update(overrides)
    rec["metrics"] = rec["metrics"] or {rec["metric_name"]: rec["metric"]}
    rec["job_id"] = rec["job_id"] or f"{rec['method']}-{rec['task']}-{rec['seed']}-{rec['backbone']}"
    return rec


def curve(method: str, seed: int, full: float, points: list[tuple[float, float]], **kw) -> list[dict]:
    """A full-model row plus early-exit rows (speed-up, metric), knob labels t=0.1, t=0.2, ..."""
    rows = [make_record(method=method, seed=seed, is_full_model=True, metric=full, **kw)]
    for i, (s, m) in enumerate(points, start=1):
        rows.append(make_record(method=method, seed=seed, speedup=s, metric=m, knob={"t": i / 10},
                                knob_label=f"t={i / 10}", **kw))  # fmt: skip
    return rows
