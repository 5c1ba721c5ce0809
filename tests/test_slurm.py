"""End to end on a real Slurm: a single-node cluster started on 127.0.0.1 by the fixture (eebench/executors/local_slurm.py)
when Debian's Slurm and munge are installed (.ci/run installs them); elsewhere the tests say why they skip."""

from __future__ import annotations

import json
import operator
import os
import subprocess
import sys

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
               "--train-limit", "48", "--eval-limit", "16", "--epochs", "1", "--timing-examples", "4",
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
