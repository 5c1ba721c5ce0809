"""End to end on a real Slurm: a single-node cluster started on 127.0.0.1 by the fixture (eebench/executors/local_slurm.py)
when Debian's Slurm and munge are installed (.ci/run installs them); elsewhere the tests say why they skip."""

from __future__ import annotations

import json
import operator
import os
import subprocess
import sys
import time

import pytest

from eebench.executors import JobFailedError, SlurmOptions, SubmititExecutor
from eebench.executors.local_slurm import local_slurm, missing

from conftest import GLUE


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    gaps = missing()
    if gaps:
        pytest.skip(f"Slurm is not installed here ({', '.join(gaps)} not on PATH): this test starts a real "
                    f"single-node cluster; apt-get install slurmctld slurmd slurm-client munge (as .ci/run does)")
    with local_slurm(tmp_path_factory.mktemp("slurm")) as env:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)  # sbatch, squeue and scancel of this process find the cluster
            yield env


@pytest.mark.slow
def test_eebench_run_on_slurm_runs_the_groups_as_an_array(slurm, tmp_path):
    config = tmp_path / "slurm.toml"
    config.write_text("[slurm]\ntime_min = 20\npoll_seconds = 1\n")
    out, cache = tmp_path / "out", tmp_path / "cache"
    command = [sys.executable, "-m", "eebench.cli", "run", "--suite", "quick", "--backbone", "tiny-bert",
               "--tasks", "sst2", "--data-dir", str(GLUE), "--methods", "pabee,pcee,deebert", "--seeds", "0",
               "--train-limit", "48", "--eval-limit", "16", "--epochs", "1", "--timing-examples", "4", "--timing-min-seconds", "0",
               "--out", str(out), "--cache-dir", str(cache), "--quiet", "--executor", "slurm",
               "--slurm-config", str(config), "--slurm-folder", str(tmp_path / "submitit")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env={**os.environ, **slurm})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 job(s) run" in result.stdout
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    tasks = {r["job_id"]: r["slurm_job_id"] for r in records}
    assert len(tasks) == 3
    array = {task.split("_")[0] for task in tasks.values()}
    assert len(array) == 1 and sorted({task.split("_")[1] for task in tasks.values()}) == ["0", "1"]  # two groups
    assert sum(not r["checkpoint_from_cache"] for r in records if r["knob_label"] == "full model"
               and r["batch_size"] == 1) == 2  # PABEE and PCEE trained one network between them


@pytest.mark.slow
def test_a_failing_array_task_names_its_slurm_id_and_traceback(slurm, tmp_path):
    executor = SubmititExecutor(tmp_path, "slurm", SlurmOptions(time_min=5, poll_seconds=1))
    handles = executor.submit(operator.truediv, [(1, 0), (4, 2)])
    assert len(list(executor.as_completed(handles))) == 2
    assert handles[1].result() == 2.0
    with pytest.raises(JobFailedError) as error:
        handles[0].result()
    assert error.value.job_id == handles[0].job_id and error.value.job_id.endswith("_0")
    assert "ZeroDivisionError" in error.value.details


# The array task unpickles its function by module name, so it lives in a module the task can import (this test
# file is not importable there): written to a folder that PYTHONPATH names, which sbatch passes on.
PREEMPTIBLE = """
import os
import time
from pathlib import Path


def interrupted_once(marker: str) -> str:
    \"\"\"First run: leave a mark and wait to be preempted. The requeued run finds the mark and finishes.\"\"\"
    path = Path(marker)
    if not path.exists():
        path.write_text(os.environ.get("SLURM_JOB_ID", "?"))
        time.sleep(300)
        return "never preempted"
    return f"requeued after {path.read_text()}"
"""


@pytest.mark.slow
def test_a_preempted_array_task_is_requeued_and_its_rerun_finishes(slurm, tmp_path, monkeypatch):
    """Preemption as Slurm signals it (USR2, which submitit also receives ahead of a time limit): the task is
    checkpointed and requeued with the same arguments, and the handle returns the rerun's result."""
    (tmp_path / "preemptible.py").write_text(PREEMPTIBLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    from preemptible import interrupted_once

    executor = SubmititExecutor(tmp_path / "submitit", "slurm", SlurmOptions(time_min=10, poll_seconds=1))
    marker = tmp_path / "first-run"
    [handle] = executor.submit(interrupted_once, [(str(marker),)])
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert time.monotonic() < deadline, f"the array task never started; see {tmp_path / 'submitit'}"
        time.sleep(0.5)
    time.sleep(2)  # the task is in its sleep: submitit's signal handlers are installed
    subprocess.run(["scancel", "--signal=USR2", handle.job_id], check=True, env={**os.environ, **slurm})
    assert handle.result() == f"requeued after {marker.read_text()}"
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "submitit").rglob("*.err"))
    # submitit calls it "preempted" or "timed-out" (it cannot tell without accounting); either way it requeues
    assert "Caught signal SIGUSR2" in logs and "DUE TO JOB REQUEUE" in logs
