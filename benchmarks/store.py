"""The results store: append-only, atomic, resumable.

Layout of a results directory DIR:
    DIR/jobs/<job_id>.jsonl        the records of one finished job (the commit marker of that job)
    DIR/examples/<job_id>.parquet  per-example exit layers, predictions and labels of that job
    DIR/records.jsonl              all jobs' records, rebuilt from DIR/jobs/ after every commit (by the driver
                                   of a run, never by its workers: they write per-job files only)
    DIR/.locks/                    lock files (the folder's, and one per running job); not results

Every file is written to a temporary name in the same folder, fsync'ed and renamed (`os.replace` is atomic
on POSIX), and a job's records file is written last. So a run killed at any moment leaves either a whole
job or none of it; a restart skips the jobs present, and `records.jsonl` can never hold a torn line or
the same job twice (it is regenerated from one file per job id). Temporary names are unique per writer, and
the store removes only day-old ones, so it never deletes a file another process is still writing.

`records.jsonl` is derived, but a user may have merged lines into it (from another machine, or kept from an
older version): before anything is rewritten, lines that no `jobs/` file backs are adopted into `jobs/` (so
they survive every later rebuild), and lines the store cannot place (not JSON, no job id, or a job id whose
`jobs/` file says otherwise) stop it with a `StoreError` that names the line and leaves every file as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import pandas as pd

from eebench.locks import path_lock

# A temporary file this old is a leftover of a writer killed mid-write (writing one file takes seconds);
# a younger one may be another process's file being written right now, so it is left alone.
STALE_TMP_SECONDS = 24 * 3600


def atomic_write_with(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(handle)` into a temporary file of a name no other writer uses (mkstemp), then rename it over
    `path`: readers see the old file or the new one, and concurrent writers never touch each other's file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_with(path, lambda handle: handle.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _jsonl(records: Sequence[dict]) -> str:
    return "".join(json.dumps(record, sort_keys=True, allow_nan=True) + "\n" for record in records)


def _canonical(records: Sequence[dict]) -> list[str]:
    """Comparable form of records (NaN == NaN here, unlike in dict equality)."""
    return [json.dumps(record, sort_keys=True, allow_nan=True) for record in records]


class StoreError(ValueError):
    """A results folder the store cannot use without losing a record; the message names the file and fix."""


class MixedCommitsError(StoreError):
    """A run would add records measured by other code to a folder (a table is measured by one commit)."""


def measured_commits(root: str | Path) -> dict[str, int]:
    """{commit that measured a job: number of jobs} over a results folder's jobs/ files and records.jsonl
    lines (merged ones too), read-only; a record without one counts as "unrecorded"."""
    root, by_job = Path(root), {}
    sources = sorted((root / "jobs").glob("*.jsonl")) if (root / "jobs").is_dir() else []
    if (root / "records.jsonl").exists():
        sources.append(root / "records.jsonl")
    for path in sources:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the store's own check names such a line when it opens the folder
            if isinstance(record, dict):
                environment = record.get("environment")
                commit = environment.get("git_commit") if isinstance(environment, dict) else None
                by_job.setdefault(str(record.get("job_id", path.stem)), commit or "unrecorded")
    return dict(Counter(by_job.values()))


def _listed(commits: dict[str, int]) -> str:
    return ", ".join(f"{commit[:12]} ({_jobs(n)})" for commit, n in sorted(commits.items()))


def _jobs(n: int) -> str:
    return f"{n} job{'s' * (n != 1)}"


def commits_line(root: str | Path) -> str:
    """One line for a table's footer: the commit that measured the folder's jobs, or every commit if several."""
    commits = measured_commits(root)
    if not commits:
        return "No jobs measured yet."
    if set(commits) == {"unrecorded"}:
        return f"Commit not recorded ({_jobs(commits['unrecorded'])}, written without one)."
    if len(commits) == 1:
        return f"Measured at commit {_listed(commits)}."
    return f"**Mixed commits**: {_listed(commits)}. Rows from different code are not one measurement."


def check_one_commit(root: str | Path, current: str) -> None:
    """Raise MixedCommitsError when the folder holds jobs measured by a commit other than `current`."""
    commits = measured_commits(root)
    other = next((commit for commit in sorted(commits) if commit != current), None)
    if other is None:
        return
    raise MixedCommitsError(
        f"{root} holds jobs measured at {_listed(commits)}; this checkout is {current[:12]}. A results table is "
        f"measured by one commit, so new jobs would mix code into it. Fix: pass a new --out; or finish the folder "
        f"with the code that measured it (git worktree add /tmp/eebench-{other[:7]} {other.split('+')[0]}, then "
        f"run from there); or pass --allow-mixed-commits to add them anyway (tables then list every commit). "
        f"Nothing was run or changed.")


class JobFiles:
    """The per-job files of a results folder, all a worker needs: it writes a finished job's files (never
    records.jsonl, which only the driver rebuilds) and holds a job's lock while it runs and commits it."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.jobs_dir = self.root / "jobs"
        self.examples_dir = self.root / "examples"
        self.records_path = self.root / "records.jsonl"
        self.locks_dir = self.root / ".locks"

    def has(self, job_id: str) -> bool:
        return (self.jobs_dir / f"{job_id}.jsonl").exists()

    def job_lock(self, job_id: str):
        """Held while a job runs and commits, so two processes never run (or record) the same job."""
        return path_lock(self.locks_dir / f"job-{job_id}.lock")

    def write(self, job_id: str, records: Sequence[dict], examples: pd.DataFrame | None = None) -> None:
        """One finished job: examples first, then its records (the marker that the job is done)."""
        if examples is not None:
            atomic_write_with(self.examples_dir / f"{job_id}.parquet",
                              lambda handle: examples.to_parquet(handle, index=False))
        atomic_write_text(self.jobs_dir / f"{job_id}.jsonl", _jsonl(records))


class ResultsStore(JobFiles):
    """The driver's view of a results folder. Many processes may use one folder at once (workers of one run,
    two runs, nodes on a shared filesystem): a job's files are written once, under names no other writer
    uses; records.jsonl is rebuilt, and orphans adopted, under the folder's lock (DIR/.locks/store.lock), so
    rebuilds never interleave."""

    def __init__(self, root: str | Path):
        super().__init__(root)
        self._orphans()  # read-only, and first: a store it cannot read is left exactly as it was
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.examples_dir.mkdir(parents=True, exist_ok=True)
        with self.lock():
            orphans = self._orphans()  # again: another process may have rebuilt since
            cutoff = time.time() - STALE_TMP_SECONDS
            for stale in [*self.jobs_dir.glob(".*.tmp"), *self.examples_dir.glob(".*.tmp"), *self.root.glob(".*.tmp")]:
                with contextlib.suppress(FileNotFoundError):  # another process may remove it first
                    if stale.stat().st_mtime < cutoff:
                        stale.unlink()
            for job_id, records in orphans.items():
                atomic_write_text(self.jobs_dir / f"{job_id}.jsonl", _jsonl(records))
            self.adopted: list[str] = sorted(orphans)  # job ids whose records only records.jsonl held
            self._rebuild()

    def lock(self):
        """The folder's lock: held while records.jsonl is rebuilt (and while lines are adopted)."""
        return path_lock(self.locks_dir / "store.lock")

    @staticmethod
    def finished_jobs(root: str | Path) -> set[str]:
        """The job ids a store at `root` holds, without creating or changing anything there."""
        jobs_dir = Path(root) / "jobs"
        return {path.stem for path in jobs_dir.glob("*.jsonl")} if jobs_dir.is_dir() else set()

    def done(self) -> set[str]:
        return self.finished_jobs(self.root)

    def _orphans(self) -> dict[str, list[dict]]:
        """Records of records.jsonl that no jobs/ file backs, by job id. Raises StoreError for a line that
        cannot be placed; reads only."""
        if not self.records_path.exists():
            return {}
        fix = (f"Fix: repair or remove that line of {self.records_path} (a copy elsewhere keeps it), then rerun; "
               f"the store changed nothing")
        by_job: dict[str, list[dict]] = {}
        for lineno, line in enumerate(self.records_path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise StoreError(f"{self.records_path}:{lineno}: not a JSON record ({error.msg}). {fix}") from None
            job_id = record.get("job_id") if isinstance(record, dict) else None
            if not isinstance(job_id, str) or not job_id or "/" in job_id:
                raise StoreError(f"{self.records_path}:{lineno}: a record without a valid 'job_id', so no jobs/ file "
                                 f"can hold it. {fix}")
            by_job.setdefault(job_id, []).append(record)
        orphans = {}
        for job_id, records in by_job.items():
            job_file = self.jobs_dir / f"{job_id}.jsonl"
            if not job_file.exists():
                orphans[job_id] = records
                continue
            backed = [json.loads(line) for line in job_file.read_text(encoding="utf-8").splitlines() if line.strip()]
            if _canonical(backed) != _canonical(records):
                raise StoreError(f"{self.records_path}: job {job_id} has {len(records)} record(s) there and "
                                 f"{len(backed)} different one(s) in {job_file}; rebuilding would lose one version. "
                                 f"Fix: keep the version you want (move the other file's lines elsewhere), then "
                                 f"rerun; the store changed nothing")
        return orphans

    def commit(self, job_id: str, records: Sequence[dict], examples: pd.DataFrame | None = None) -> None:
        """Store one finished job (`write`), then the merged file."""
        self.write(job_id, records, examples)
        self.rebuild()

    def rebuild(self) -> None:
        """Regenerate records.jsonl from the per-job files (sorted, so the file is deterministic)."""
        with self.lock():
            self._rebuild()

    def _rebuild(self) -> None:
        parts = [path.read_text(encoding="utf-8") for path in sorted(self.jobs_dir.glob("*.jsonl"))]
        atomic_write_text(self.records_path, "".join(parts))

    def examples(self, job_id: str) -> pd.DataFrame:
        return pd.read_parquet(self.examples_dir / f"{job_id}.parquet")
