"""Many processes on one results folder and one checkpoint cache: the races measured before the store and the
cache had locks and unique temporary names, as regression tests with real processes (zero failures allowed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from eebench.store import ResultsStore

from conftest import GLUE


def _python(code: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def _finish(processes: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=timeout)
        assert process.returncode == 0, err
        outputs.append(out)
    return outputs


COMMITTER = """
    import sys
    import pandas as pd
    from eebench.store import ResultsStore
    root, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = ResultsStore(root)
    for i in range(n):
        store.commit(f"{name}-{i}", [{"job_id": f"{name}-{i}", "i": i}], pd.DataFrame({"x": [i]}))
"""

OPENER = """
    import sys
    from eebench.store import ResultsStore
    for _ in range(int(sys.argv[2])):
        ResultsStore(sys.argv[1])
"""


def test_two_drivers_and_an_opener_on_one_folder_lose_nothing(tmp_path):
    """Before: 1 of 300 commits failed (a store deleting another writer's temporary file) and 46 of 60
    opens failed beside a committing process."""
    ResultsStore(tmp_path)
    processes = [_python(COMMITTER, str(tmp_path), "a", "150"), _python(COMMITTER, str(tmp_path), "b", "150"),
                 _python(OPENER, str(tmp_path), "60")]
    _finish(processes)
    expected = {f"{name}-{i}" for name in "ab" for i in range(150)}
    assert ResultsStore.finished_jobs(tmp_path) == expected
    store = ResultsStore(tmp_path)  # a last rebuild: whatever order the rebuilds ran in, none is lost now
    lines = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert sorted(r["job_id"] for r in lines) == sorted(expected)
    assert store.adopted == []
    assert len(list((tmp_path / "examples").glob("*.parquet"))) == 300
    assert not list(tmp_path.rglob("*.tmp"))


SAVER = """
    import sys, torch
    from pathlib import Path
    from eebench.store import atomic_write_with
    path = Path(sys.argv[1])
    for i in range(int(sys.argv[2])):
        state = {"w": torch.full((64, 64), float(i))}
        atomic_write_with(path, lambda handle: torch.save(state, handle))
        torch.load(path, weights_only=True)  # always a whole file, whoever wrote it last
"""


def test_two_processes_saving_one_checkpoint_key(tmp_path):
    """Before: 10 of 10 failed (both wrote the fixed temporary name .KEY.pt.tmp)."""
    path = tmp_path / "checkpoints" / "key.pt"
    _finish([_python(SAVER, str(path), "40"), _python(SAVER, str(path), "40")])
    import torch
    assert torch.load(path, weights_only=True)["w"].shape == (64, 64)
    assert [p.name for p in path.parent.iterdir()] == ["key.pt"]


def test_the_store_never_deletes_a_temporary_file_being_written(tmp_path):
    store = ResultsStore(tmp_path)
    fresh = store.jobs_dir / ".x.jsonl.abc.tmp"  # another writer's, mid-write
    fresh.write_text("half a line")
    old = store.examples_dir / ".y.parquet.def.tmp"  # a writer killed two days ago
    old.write_text("torn")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days_ago, two_days_ago))
    ResultsStore(tmp_path)
    assert fresh.read_text() == "half a line"
    assert not old.exists()


COUNTER = """
    import sys
    from pathlib import Path
    from eebench.locks import path_lock
    counter = Path(sys.argv[1])
    for _ in range(int(sys.argv[2])):
        with path_lock(counter.with_suffix(".lock")):
            value = int(counter.read_text()) if counter.exists() else 0
            counter.write_text(str(value + 1))  # read-modify-write: loses updates unless exclusive
"""


@pytest.mark.parametrize("kind", ["flock", "lease"])
def test_path_lock_is_exclusive_across_processes(tmp_path, kind):
    counter = tmp_path / "counter"
    env = {"EEBENCH_LOCKS": kind}
    _finish([_python(COUNTER, str(counter), "60", env=env) for _ in range(3)])
    assert counter.read_text() == "180"


HOLDER = """
    import sys, time
    from eebench.locks import path_lock
    lock = path_lock(sys.argv[1])
    lock.acquire()
    print("held", flush=True)
    time.sleep(600)
"""

TAKER = """
    import sys, time
    from eebench.locks import path_lock
    started = time.monotonic()
    with path_lock(sys.argv[1]):
        print(time.monotonic() - started)
"""


@pytest.mark.parametrize("kind", ["flock", "lease"])
def test_a_lock_whose_holder_died_is_taken_over(tmp_path, kind):
    """flock: the kernel frees it with the process. Without flock (the lease): the holder stops refreshing it,
    and a waiter takes it once the lease has expired (a holder on another node would be no different)."""
    env = {"EEBENCH_LOCKS": kind, "EEBENCH_LEASE_SECONDS": "2"}
    lock = str(tmp_path / "train.lock")
    holder = _python(HOLDER, lock, env=env)
    assert holder.stdout.readline().strip() == "held"
    taker = _python(TAKER, lock, env=env)
    time.sleep(1)
    assert taker.poll() is None, "the lock was taken while its holder was alive"
    holder.send_signal(signal.SIGKILL)
    holder.communicate()
    (waited,) = _finish([taker], timeout=120)  # it got the lock after all
    assert float(waited) > 0


ACTIVITY = """
    import sys, time
    from eebench.locks import NodeActivity
    activity, mode, log, hold = NodeActivity(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
    with (activity.timing() if mode == "timing" else activity.working()):
        start = time.time()
        time.sleep(hold)
        end = time.time()
    with open(log, "a") as handle:
        handle.write(f"{mode} {start} {end}\\n")
"""


def test_timing_never_overlaps_other_jobs_but_jobs_overlap_each_other(tmp_path):
    """Two jobs working side by side and a third job's clock: the clock runs only when both have left."""
    log = tmp_path / "log"
    locks = str(tmp_path / "node")
    workers = [_python(ACTIVITY, locks, "working", str(log), "3") for _ in range(2)]
    time.sleep(1.5)  # both hold it shared by now
    timer = _python(ACTIVITY, locks, "timing", str(log), "0.5")
    _finish([*workers, timer])
    spans = [line.split() for line in log.read_text().splitlines()]
    working = [(float(s), float(e)) for mode, s, e in spans if mode == "working"]
    (timing,) = [(float(s), float(e)) for mode, s, e in spans if mode == "timing"]
    assert max(s for s, _ in working) < min(e for _, e in working)  # the two jobs overlapped
    assert timing[0] >= max(e for _, e in working)  # the clock started after both had finished


def _run(out: Path, cache: Path, methods: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "eebench.cli", "run", "--suite", "quick", "--backbone", "tiny-bert",
               "--tasks", "sst2", "--data-dir", str(GLUE), "--methods", methods, "--seeds", "0",
               "--train-limit", "48", "--eval-limit", "16", "--epochs", "1", "--timing-examples", "4", "--timing-min-seconds", "0",
               "--out", str(out), "--cache-dir", str(cache), "--quiet"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_runs_on_one_folder_train_and_record_each_job_once(tmp_path):
    """Before: both trained and recorded every job. PABEE and PCEE share one checkpoint key: one training."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    _finish([_run(out, cache, "pabee,pcee"), _run(out, cache, "pcee,pabee")])
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records} == {"pabee", "pcee"}
    per_job = pd.DataFrame(records).groupby("job_id").agg(checkpoint=("checkpoint", "first"),
                                                         trained=("checkpoint_from_cache", lambda s: not s.iloc[0]))
    assert len(per_job) == 2 and per_job.checkpoint.nunique() == 1
    assert per_job.trained.sum() == 1  # one job trained the shared network, the other loaded it
    keys = [(r["job_id"], r["knob_label"], r["batch_size"]) for r in records]
    assert len(keys) == len(set(keys))
    assert len(list(cache.glob("checkpoints/*.pt"))) == 1
