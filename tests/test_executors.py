"""The same grid through every executor (this process, a local process pool, submitit's subprocesses): the
same records apart from timing and provenance fields; failures on a worker come back with the job id and
the worker's traceback while the rest of the grid goes on; the sbatch script of a job array."""

from __future__ import annotations

import json
import operator
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import pytest
import torch

from eebench.executors import JobFailedError, LocalExecutor, SerialExecutor, SlurmOptions, SubmititExecutor
from eebench.runner import run_jobs

from conftest import FAST_TRAIN, GLUE, tiny_job

# What may differ between two runs of the same job: clocks, load, where and when it ran, and which of the
# jobs sharing a checkpoint happened to train it.
VARYING = ("wallclock", "seconds", "load_average", "timing_", "realization", "curve_cost_ratio")
PROVENANCE = {"environment", "host", "slurm_job_id", "checkpoint_from_cache"}


def _comparable(record: dict) -> dict:
    kept = {k: v for k, v in record.items() if k not in PROVENANCE and not any(p in k for p in VARYING)}
    kept["train_stages"] = [{k: v for k, v in stage.items() if k not in ("seconds", "from_cache")}
                            for stage in record["train_stages"]]
    return kept


def _records(out) -> list[dict]:
    lines = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    return sorted((_comparable(r) for r in lines), key=lambda r: (r["job_id"], r["knob_label"], r["batch_size"]))


def _grid():
    # PABEE and PCEE share a checkpoint (one group, one training); DeeBERT and a second seed are groups of their own
    return [tiny_job(method, "sst2", seed=seed, data_dir=str(GLUE), train_limit=48, eval_limit=16)
            for method, seed in (("pabee", 0), ("pcee", 0), ("deebert", 0), ("pabee", 1))]


def _executor(kind: str, tmp_path):
    if kind == "serial":
        return SerialExecutor()
    if kind == "local":
        return LocalExecutor(2, threads=1)
    return SubmititExecutor(tmp_path / "submitit", "local", SlurmOptions(time_min=20, poll_seconds=0.5))


@pytest.fixture(scope="module")
def serial_records(tmp_path_factory):
    # One torch thread, as every worker below has: training sums in another order on more threads, and its
    # losses differ in the last bits (the records' metrics do not, but train_stages would).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("serial")
    try:
        summary = run_jobs(_grid(), out, tmp_path_factory.mktemp("cache"), progress=False, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    assert len(summary["done"]) == 4
    return _records(out)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "submitit-local"])
def test_the_same_jobs_give_the_same_records_through_every_executor(serial_records, tmp_path, monkeypatch, kind):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # submitit's subprocesses: one thread, as a user sets it
    executor = _executor(kind, tmp_path)
    try:
        summary = run_jobs(_grid(), tmp_path / "out", tmp_path / "cache", progress=False, log=lambda _: None,
                           executor=executor)
    finally:
        executor.close()
    assert len(summary["done"]) == 4 and not summary["failed"]
    records = _records(tmp_path / "out")
    assert [r["job_id"] for r in records] == [r["job_id"] for r in serial_records]
    for mine, serial in zip(records, serial_records, strict=True):
        differing = {k: (mine.get(k), serial.get(k)) for k in mine.keys() | serial.keys()
                     if json.dumps(mine.get(k), sort_keys=True) != json.dumps(serial.get(k), sort_keys=True)}
        assert not differing, (mine["job_id"], mine["knob_label"], mine["batch_size"], differing)
    raw = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    trained = {r["job_id"]: not r["checkpoint_from_cache"] for r in raw}
    assert sum(trained.values()) == 3  # three checkpoint keys, each trained once
    assert run_jobs(_grid(), tmp_path / "out", tmp_path / "cache", progress=False, log=lambda _: None,
                    executor=_executor(kind, tmp_path))["skipped"] == [job.describe() for job in _grid()]


@pytest.mark.parametrize("kind", ["local", "submitit-local"])
def test_a_failing_call_names_its_job_and_traceback_and_the_others_finish(tmp_path, kind):
    executor = _executor(kind, tmp_path)
    try:
        handles = executor.submit(operator.truediv, [(1, 0), (4, 2)])
        finished = {handle.job_id: handle for handle in executor.as_completed(handles)}
    finally:
        executor.close()
    assert set(finished) == {handle.job_id for handle in handles} and len(finished) == 2
    assert handles[1].result() == 2.0
    with pytest.raises(JobFailedError) as error:
        handles[0].result()
    assert error.value.job_id == handles[0].job_id
    assert "ZeroDivisionError" in error.value.details and "Traceback" in error.value.details


@pytest.mark.slow
def test_a_job_that_fails_on_a_worker_is_reported_and_the_grid_goes_on(tmp_path):
    """A NaN learning rate passes the input checks and fails in the worker's optimiser."""
    good = tiny_job("pabee", "sst2", data_dir=str(GLUE), train_limit=32, eval_limit=8)
    bad = replace(good, train=replace(FAST_TRAIN, lr=float("nan")))
    lines: list[str] = []
    executor = LocalExecutor(2, threads=1)
    try:
        summary = run_jobs([bad, good], tmp_path / "out", tmp_path / "cache", progress=False, log=lines.append,
                           executor=executor)
    finally:
        executor.close()
    assert summary["done"] == [good.describe()]
    assert summary["failed"] == [f"{bad.describe()} (local-0)"]
    assert any("local-0" in line and "Invalid learning rate" in line and "Traceback" in line for line in lines)
    records = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert {r["job_id"] for r in records} == {good.job_id}


def test_the_sbatch_script_of_a_job_array(tmp_path):
    """What `eebench run --executor slurm` submits for 4 checkpoint groups, rendered by submitit (its own
    renderer, fed the parameters our options become; no Slurm needed)."""
    import submitit

    options = SlurmOptions(partition="gpu", time_min=90, gpus_per_node=1, cpus_per_task=8, mem_gb=32,
                           array_parallelism=2, exclusive=True, setup=("source /shared/venv/bin/activate",),
                           additional={"account": "nlp"})
    slurm = SubmititExecutor(tmp_path, "slurm", options).executor._executor
    script = submitit.slurm.slurm._make_sbatch_string(command="python -u -m submitit.core._submit FOLDER",
                                                     folder=slurm.folder, map_count=4, **slurm.parameters)
    lines = set(script.splitlines())
    for expected in ("#SBATCH --array=0-3%2", "#SBATCH --partition=gpu", "#SBATCH --time=90",
                     "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB",
                     "#SBATCH --exclusive", "#SBATCH --account=nlp", "#SBATCH --job-name=eebench",
                     "#SBATCH --signal=USR2@90", "source /shared/venv/bin/activate"):
        assert expected in lines, f"{expected!r} missing from:\n{script}"
    # the logs of every array task in its own folder under the one we gave
    assert f"#SBATCH --output={tmp_path}/%A_%a/%A_%a_0_log.out" in lines


def test_slurm_options_from_a_file_with_flags_winning(tmp_path):
    config = tmp_path / "slurm.toml"
    config.write_text('[slurm]\npartition = "gpu"\ntime_min = 60\nsetup = ["module load cuda"]\n')
    options = SlurmOptions.from_file(config, time_min=30, partition=None)
    assert (options.partition, options.time_min, options.setup) == ("gpu", 30, ("module load cuda",))
    config.write_text('[slurm]\npartiton = "gpu"\n')
    with pytest.raises(ValueError, match=r"slurm.toml: unknown \[slurm\] option\(s\) partiton"):
        SlurmOptions.from_file(config)


def test_importing_the_slurm_executor_leaves_the_process_logging_alone():
    """submitit's import reconfigures logging, closing the handlers a process has (it closed pytest's
    captured stderr through absl's handler); ours imports it without that."""
    code = textwrap.dedent("""
        import io, logging, sys

        class ClosingHandler(logging.StreamHandler):  # as absl's: closing the handler closes its stream
            def close(self):
                self.stream.close()
                super().close()

        stream = io.StringIO()
        logging.getLogger().addHandler(ClosingHandler(stream))
        import {module}
        assert not stream.closed, "the import closed a handler's stream"
    """)
    result = subprocess.run([sys.executable, "-c", code.format(module="submitit")], capture_output=True, text=True)
    assert "the import closed a handler's stream" in result.stderr  # what submitit alone does
    code = code.replace("{module}", "eebench.executors.slurm")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def _worker_view(hold: float) -> tuple[str, str, int, str]:
    time.sleep(hold)  # both workers busy at once, so each call lands on its own worker
    return (os.environ["CUDA_VISIBLE_DEVICES"], os.environ["OMP_NUM_THREADS"], torch.get_num_threads(),
            os.environ["EEBENCH_TIMING_THREADS"])


def test_local_workers_get_one_gpu_each_and_a_share_of_the_threads():
    """What each worker sees (no GPU is needed to check the assignment: CUDA reads the variable later)."""
    executor = LocalExecutor(2, gpus=["3", "5"], threads=1, timing_threads=2)
    try:
        handles = executor.submit(_worker_view, [(8.0,), (8.0,)])
        views = sorted(handle.result() for handle in handles)
    finally:
        executor.close()
    assert views == [("3", "1", 1, "2"), ("5", "1", 1, "2")]  # the clock, alone on the node, gets 2 threads



@pytest.mark.parametrize("kind", ["local", "submitit-local"])
def test_a_starting_worker_waits_for_a_running_clock_before_its_imports(tmp_path, monkeypatch, kind):
    """A worker's start-up (torch, the jobs' module, a Slurm task's arguments) runs under the node's shared
    hold: while another process holds the clock, the worker imports nothing; once the clock ends it imports
    and runs its call."""
    from eebench.locks import NodeActivity

    (tmp_path / "startup_probe.py").write_text("import time\nIMPORTED_AT = time.time()\n\n\n"
                                               "def imported_at(_):\n    return IMPORTED_AT\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # a spawned worker gets sys.path, a submitit task PYTHONPATH
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("EEBENCH_NODE_LOCK_DIR", str(tmp_path / "node"))
    import startup_probe

    clock = NodeActivity(tmp_path / "node")
    executor = (LocalExecutor(1, gpus=[], threads=1, timing_threads=1) if kind == "local"
                else SubmititExecutor(tmp_path / "submitit", cluster="local", options=SlurmOptions(poll_seconds=0.2)))
    try:
        with clock.timing():
            (handle,) = executor.submit(startup_probe.imported_at, [(None,)])
            deadline = time.time() + 10.0  # a worker that ignored the clock would have answered by then
            while time.time() < deadline and not _done(handle):
                time.sleep(0.2)
            released = time.time()
        imported_at = handle.result()
    finally:
        executor.close()
    assert imported_at > released, f"the worker imported the job's module {released - imported_at:.1f} s inside the clock"


def _done(handle) -> bool:
    return handle.future.done() if hasattr(handle, "future") else handle.job.done()
