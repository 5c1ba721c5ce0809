"""The results store: append-only, atomic, resumable.

Layout of a results directory DIR:
    DIR/jobs/<job_id>.jsonl        the records of one finished job (the commit marker of that job)
    DIR/examples/<job_id>.parquet  per-example exit layers, predictions and labels of that job
    DIR/records.jsonl              all jobs' records, rebuilt from DIR/jobs/ after every commit

Every file is written to a temporary name in the same folder, fsync'ed and renamed (`os.replace` is atomic
on POSIX), and a job's records file is written last. So a run killed at any moment leaves either a whole
job or none of it; a restart skips the jobs present, and `records.jsonl` can never hold a torn line or
the same job twice (it is regenerated from one file per job id).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _jsonl(records: Sequence[dict]) -> str:
    return "".join(json.dumps(record, sort_keys=True, allow_nan=True) + "\n" for record in records)


class ResultsStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.jobs_dir = self.root / "jobs"
        self.examples_dir = self.root / "examples"
        self.records_path = self.root / "records.jsonl"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.examples_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*self.jobs_dir.glob(".*.tmp"), *self.examples_dir.glob(".*.tmp"), *self.root.glob(".*.tmp")]:
            stale.unlink(missing_ok=True)  # leftovers of a run killed mid-write
        self.rebuild()

    def done(self) -> set[str]:
        return {path.stem for path in self.jobs_dir.glob("*.jsonl")}

    def commit(self, job_id: str, records: Sequence[dict], examples: pd.DataFrame | None = None) -> None:
        """Store one finished job: examples first, then its records (the marker), then the merged file."""
        if examples is not None:
            path = self.examples_dir / f"{job_id}.parquet"
            tmp = path.with_name(f".{path.name}.tmp")
            examples.to_parquet(tmp, index=False)
            os.replace(tmp, path)
        atomic_write_text(self.jobs_dir / f"{job_id}.jsonl", _jsonl(records))
        self.rebuild()

    def rebuild(self) -> None:
        """Regenerate records.jsonl from the per-job files (sorted, so the file is deterministic)."""
        parts = [path.read_text(encoding="utf-8") for path in sorted(self.jobs_dir.glob("*.jsonl"))]
        atomic_write_text(self.records_path, "".join(parts))

    def examples(self, job_id: str) -> pd.DataFrame:
        return pd.read_parquet(self.examples_dir / f"{job_id}.parquet")
