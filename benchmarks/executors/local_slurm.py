"""A real single-node Slurm cluster on 127.0.0.1, for the end-to-end test and for trying `--executor slurm` on
one machine (benchmarks/micro/compare_executors.py): munged, slurmctld and slurmd (Debian's packages:
apt-get install slurmctld slurmd slurm-client munge) started in the foreground from a private folder, their
PIDs kept and stopped by PID. No systemd, no /etc changes, no accounting database (submitit reads a finished
job's result file, which needs none)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue")


def missing() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _config(root: Path, user: str, cpus: int) -> str:
    return "\n".join([
        "ClusterName=eebench-test",
        "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmUser={user}", f"SlurmdUser={user}",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        # cred_expire is also how long a requeued job waits before it may start again (default 120 s)
        "AuthType=auth/munge", f"AuthInfo=socket={root / 'munge.socket'},cred_expire=10",
        f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "ReturnToService=2",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "SlurmdTimeout=30", "InactiveLimit=0", "KillWait=5",
        f"NodeName=eebench-node NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=2000 State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
    ]) + "\n"


def _log(root: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(root.glob("*.log")))


@contextlib.contextmanager
def local_slurm(root: Path, timeout: float = 60) -> Iterator[dict[str, str]]:
    """Start the cluster in `root`; yields the environment a client needs (SLURM_CONF). Stops every daemon
    it started, by PID, on exit."""
    import pwd

    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)  # munged refuses group- or world-writable folders
    for name in ("state", "spool"):
        (root / name).mkdir(exist_ok=True)
    user = pwd.getpwuid(os.getuid()).pw_name
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    conf = root / "slurm.conf"
    conf.write_text(_config(root, user, os.cpu_count() or 1))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started: list[subprocess.Popen] = []

    def start(*command: str) -> None:
        log = open(root / f"{Path(command[0]).name}.out", "w")  # noqa: SIM115  (closed with the process)
        started.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True))

    try:
        start("munged", "--foreground", "--force", f"--socket={root / 'munge.socket'}", f"--key-file={key}",
              f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
              f"--seed-file={root / 'munged.seed'}")
        _wait(lambda: (root / "munge.socket").exists(), timeout, "munged's socket", root)
        start("slurmctld", "-D", "-i", "-f", str(conf))
        start("slurmd", "-D", "-N", "eebench-node", "-f", str(conf))

        def idle() -> bool:
            state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=env)
            return state.stdout.strip() == "idle"

        _wait(idle, timeout, "the node to be idle", root, started)
        yield {"SLURM_CONF": str(conf)}
    finally:
        # Jobs first: a step still running when slurmd stops keeps its slurmstepd, job script and srun alive
        # (seen once in three CI runs after the preemption test). SLURM_CONF makes this the private cluster only.
        with contextlib.suppress(OSError, subprocess.SubprocessError, RuntimeError):  # the daemons stop regardless
            subprocess.run(["scancel", "--user", user], env=env, capture_output=True, timeout=15)
            _wait(lambda: not subprocess.run(["squeue", "-h"], capture_output=True, text=True, env=env,
                                             timeout=15).stdout.strip(), 30, "every job to end", root)
        for process in reversed(started):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _wait(ready, timeout: float, what: str, root: Path, started: list[subprocess.Popen] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        dead = [p.args[0] for p in started if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}:\n{_log(root)}")
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}:\n{_log(root)}")
