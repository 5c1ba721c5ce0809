"""Locks that make one results folder and one checkpoint cache safe for many workers (processes, nodes).

- `path_lock(path)`: an exclusive lock for work that must happen once (train a checkpoint, run a job, rebuild
  records.jsonl). `flock` where the folder's filesystem has it (local disks, NFSv4, Lustre, GPFS): the kernel
  frees it when the holder dies, wherever it dies. On a filesystem without `flock` (some NFS mounts, some
  FUSE filesystems), a lease file its holder refreshes every few seconds: a holder that died, on any node,
  stops refreshing and a waiter takes the lease over after `LEASE_SECONDS` (the stale-lock fallback).
  `EEBENCH_LOCKS=lease` forces the lease everywhere (for a filesystem whose flock is unreliable, and tests).
- `NodeActivity`: a node-wide reader-writer lock for honest timing. Every job holds it shared while it
  trains and evaluates (other jobs may do so beside it); the wall-clock stage takes it exclusively, so no
  other job of ours runs on the node while a clock runs. Waiting timers go first (a gate), so a stream of
  starting jobs cannot starve them. A process's start-up is work too (importing torch and transformers is
  seconds of CPU): `import_holding_shared` does it under the shared hold, before the process's first job.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib
import os
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from filelock import BaseFileLock, FileLock, SoftFileLease

LEASE_SECONDS = float(os.environ.get("EEBENCH_LEASE_SECONDS", "60"))

# errno values of a filesystem that does not implement flock (as opposed to a lock someone holds)
_NO_FLOCK = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}


@cache
def flock_works(directory: Path) -> bool:
    """Whether `flock` works in `directory` (probed once per folder and process, on a probe file there)."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / ".flock-probe"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except OSError as error:
        return error.errno not in _NO_FLOCK
    finally:
        os.close(fd)


def path_lock(path: str | Path) -> BaseFileLock:
    """An exclusive, blocking lock on `path` (see the module docstring for which kind and why)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.environ.get("EEBENCH_LOCKS") == "lease" or not flock_works(path.parent):
        return SoftFileLease(path, lease_duration=LEASE_SECONDS, thread_local=False)
    return FileLock(path, thread_local=False)


def node_lock_dir() -> Path:
    """Where node-wide locks live: node-local by default ($EEBENCH_NODE_LOCK_DIR to change it, e.g. when the
    scheduler gives every job a private /tmp, which would make the lock per job instead of per node)."""
    return Path(os.environ.get("EEBENCH_NODE_LOCK_DIR") or Path(tempfile.gettempdir()) / f"eebench-{os.getuid()}")


class NodeActivity:
    """The node-wide reader-writer lock of one process (see the module docstring). Re-entrant per process:
    `working()` and `timing()` nest, and a `timing()` inside `working()` gives the shared hold up meanwhile."""

    def __init__(self, directory: Path | None = None):
        self.directory = Path(directory) if directory is not None else node_lock_dir()
        self._fd: int | None = None
        self._gate_fd: int | None = None
        self._depth = 0
        self.exclusive_held = False

    def _open(self) -> None:
        if self._fd is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.directory / "activity.lock", os.O_RDWR | os.O_CREAT, 0o666)
            self._gate_fd = os.open(self.directory / "activity.gate", os.O_RDWR | os.O_CREAT, 0o666)

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        """Shared hold: training and quality evaluation, beside other jobs' but never beside a clock."""
        self._open()
        if self._depth == 0:
            fcntl.flock(self._gate_fd, fcntl.LOCK_EX)  # behind any timer already waiting
            fcntl.flock(self._fd, fcntl.LOCK_SH)
            fcntl.flock(self._gate_fd, fcntl.LOCK_UN)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def timing(self) -> Iterator[bool]:
        """Exclusive hold for a wall-clock measurement; yields True (it ran with nothing of ours beside it)."""
        self._open()
        if self._depth:
            fcntl.flock(self._fd, fcntl.LOCK_UN)  # give up our shared hold, or we would wait for ourselves
        fcntl.flock(self._gate_fd, fcntl.LOCK_EX)  # new working() holds wait from now on
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # every running job has left its shared hold
        finally:
            fcntl.flock(self._gate_fd, fcntl.LOCK_UN)
        self.exclusive_held = True
        try:
            yield True
        finally:
            self.exclusive_held = False
            if self._depth:
                fcntl.flock(self._fd, fcntl.LOCK_SH)  # downgrade: flock converts in place
            else:
                fcntl.flock(self._fd, fcntl.LOCK_UN)


_activity: dict[int, NodeActivity] = {}


def node_activity() -> NodeActivity:
    """This process's NodeActivity (one per process: flock holds belong to an open file, and a second open
    file in the same process would wait for the first)."""
    return _activity.setdefault(os.getpid(), NodeActivity())


def import_holding_shared(*modules: str) -> None:
    """Import `modules` (and whatever they import: torch, transformers) holding this node's activity lock shared.

    Why: a job holds the lock shared while it works, but a fresh process imports its libraries before its first
    job starts, seconds of CPU that would land inside another job's running clock (probably what flagged 6 of the
    7 flagged headline-leaderboard timings). Called first thing by `eebench run` and by every local worker (a
    Slurm task does the same in `executors.slurm._Requeueable`); it waits while a clock runs. This module imports
    no torch, so the hold comes before the heavy imports. Already-imported modules cost nothing."""
    with node_activity().working():
        for name in modules:
            importlib.import_module(name)
