"""The results store survives a kill at any moment: no lost, torn or duplicated record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from eebench import store as store_module
from eebench.store import ResultsStore

from conftest import GLUE


def _records(job_id, n=3):
    return [{"job_id": job_id, "i": i} for i in range(n)]


def _lines(root):
    return [json.loads(line) for line in (root / "records.jsonl").read_text().splitlines()]


def test_commit_and_reopen(tmp_path):
    store = ResultsStore(tmp_path)
    store.commit("a", _records("a"), pd.DataFrame({"x": [1, 2]}))
    store.commit("b", _records("b"))
    assert ResultsStore(tmp_path).done() == {"a", "b"}
    assert len(_lines(tmp_path)) == 6
    assert list(store.examples("a").x) == [1, 2]


@pytest.mark.parametrize("crash_at", ["examples", "job_file", "rebuild"])
def test_crash_during_commit_loses_nothing_committed_and_never_duplicates(tmp_path, monkeypatch, crash_at):
    store = ResultsStore(tmp_path)
    store.commit("a", _records("a"), pd.DataFrame({"x": [1]}))
    real_replace, real_write = os.replace, store_module.atomic_write_text

    def crashing_replace(src, dst):
        if crash_at == "examples" and str(dst).endswith("b.parquet"):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    def crashing_write(path, text):
        if (crash_at == "job_file" and path.name == "b.jsonl") or (crash_at == "rebuild" and path.name == "records.jsonl"):
            raise KeyboardInterrupt("killed")
        return real_write(path, text)

    monkeypatch.setattr(store_module.os, "replace", crashing_replace)
    monkeypatch.setattr(store_module, "atomic_write_text", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        store.commit("b", _records("b"), pd.DataFrame({"x": [2]}))
    monkeypatch.undo()
    reopened = ResultsStore(tmp_path)  # what a restarted run does
    lines = _lines(tmp_path)
    ids = [r["job_id"] for r in lines]
    assert ids.count("a") == 3 and ids.count("b") in (0, 3)  # whole job or nothing
    assert ("b" in reopened.done()) == (crash_at == "rebuild")
    reopened.commit("b", _records("b"))  # the rerun of job b
    ids = [r["job_id"] for r in _lines(tmp_path)]
    assert ids.count("a") == 3 and ids.count("b") == 3
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_cli_run_killed_and_restarted_resumes(tmp_path):
    """SIGKILL a real `eebench run` after its first job commits; the rerun finishes the rest, no duplicates."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    command = [sys.executable, "-m", "eebench.cli", "run", "--suite", "quick", "--backbone", "tiny-bert",
               "--tasks", "sst2", "--data-dir", str(GLUE), "--methods", "pabee,deebert", "--seeds", "0", "1",
               "--train-limit", "48", "--eval-limit", "16", "--epochs", "1", "--timing-examples", "4", "--timing-min-seconds", "0",
               "--out", str(out), "--cache-dir", str(cache), "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not list((out / "jobs").glob("*.jsonl")):
        time.sleep(0.05)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()
    first = {p.stem for p in (out / "jobs").glob("*.jsonl")}
    assert first, "the first job never committed"
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = _lines(out)
    keys = [(r["job_id"], r["knob_label"], r["batch_size"]) for r in lines]
    assert len(keys) == len(set(keys)), "duplicated records after resume"
    assert len({r["job_id"] for r in lines}) == 4
    assert f"{len(first)} already done" in result.stdout


def _snapshot(root):
    return {path.relative_to(root): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_records_no_job_file_backs_are_kept_as_job_files(tmp_path):
    """records.jsonl merged from another machine: reopening adopts those lines instead of rebuilding them away."""
    store = ResultsStore(tmp_path)
    store.commit("a", _records("a"))
    merged = (tmp_path / "records.jsonl").read_text() + "".join(
        json.dumps(r) + "\n" for r in [*_records("z", 2), {"job_id": "y", "x": float("nan")}])
    (tmp_path / "records.jsonl").write_text(merged)
    reopened = ResultsStore(tmp_path)
    assert reopened.adopted == ["y", "z"]
    assert reopened.done() == {"a", "y", "z"}
    reopened.commit("b", _records("b"))  # a later job's rebuild keeps them too
    ids = [r["job_id"] for r in _lines(tmp_path)]
    assert sorted(ids) == ["a"] * 3 + ["b"] * 3 + ["y"] + ["z"] * 2
    assert ResultsStore(tmp_path).adopted == []  # NaN-valued records compare equal to their job file


@pytest.mark.parametrize("bad_line, expected", [
    ("{not json\n", "records.jsonl:4: not a JSON record"),
    ('{"i": 1}\n', "records.jsonl:4: a record without a valid 'job_id'"),
    ('{"job_id": "a", "i": 99}\n', "job a has 4 record(s) there and 3 different one(s)"),
])
def test_unplaceable_records_stop_the_store_and_change_nothing(tmp_path, bad_line, expected):
    store = ResultsStore(tmp_path)
    store.commit("a", _records("a"), pd.DataFrame({"x": [1]}))
    (tmp_path / "records.jsonl").write_text((tmp_path / "records.jsonl").read_text() + bad_line)
    (tmp_path / "jobs" / ".b.jsonl.tmp").write_text("torn")  # a leftover it would otherwise clean up
    before = _snapshot(tmp_path)
    with pytest.raises(store_module.StoreError, match=expected.replace("(", r"\(").replace(")", r"\)")) as error:
        ResultsStore(tmp_path)
    assert "Fix:" in str(error.value)
    assert _snapshot(tmp_path) == before
