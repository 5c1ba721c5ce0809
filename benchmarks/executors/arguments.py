"""`eebench run`'s flags for where jobs run, and the executor they describe. Only argparse at import time:
every eebench command builds the parser, and should stay fast."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_executor_arguments(run: argparse.ArgumentParser) -> None:
    group = run.add_argument_group("where jobs run (see the README: a Slurm cluster, or N workers on one machine)")
    group.add_argument("--executor", default="serial", choices=("serial", "local", "slurm", "submitit-local"),
                       help="serial: this process (default); local: --workers processes here, one GPU each; slurm: "
                            "Slurm job arrays via submitit; submitit-local: submitit's subprocesses (no Slurm)")
    group.add_argument("--workers", type=int, default=2, help="local: worker processes (default 2)")
    group.add_argument("--slurm-config", metavar="FILE.toml", help="slurm: a [slurm] table of options (flags win)")
    group.add_argument("--partition", help="slurm: partition")
    group.add_argument("--time-min", type=int, help="slurm: minutes per array task (requeued when exceeded)")
    group.add_argument("--gpus", type=int, help="slurm: GPUs per task")
    group.add_argument("--cpus", type=int, help="slurm: CPUs per task")
    group.add_argument("--mem-gb", type=float, help="slurm: memory per task (GB)")
    group.add_argument("--array-parallelism", type=int, help="slurm: array tasks running at once")
    group.add_argument("--exclusive-timing", action="store_true", default=None,
                       help="slurm: whole nodes per task, so wall-clock timing runs beside nobody's jobs")
    group.add_argument("--slurm-folder", help="slurm: submitit's pickles and logs (default OUT/.submitit)")


def executor_from_arguments(args: argparse.Namespace, out: Path):
    """The --executor's object (imported only now: submitit and torch are slow to import)."""
    if args.executor == "serial":
        from eebench.executors.serial import SerialExecutor
        return SerialExecutor()
    if args.executor == "local":
        from eebench.executors.local import LocalExecutor
        return LocalExecutor(args.workers)
    from eebench.executors.slurm import SlurmOptions, SubmititExecutor

    flags = dict(partition=args.partition, time_min=args.time_min, gpus_per_node=args.gpus,
                 cpus_per_task=args.cpus, mem_gb=args.mem_gb, array_parallelism=args.array_parallelism,
                 exclusive=args.exclusive_timing)
    options = (SlurmOptions.from_file(args.slurm_config, **flags) if args.slurm_config
               else SlurmOptions(**{k: v for k, v in flags.items() if v is not None}))
    cluster = "slurm" if args.executor == "slurm" else "local"
    return SubmititExecutor(Path(args.slurm_folder or out / ".submitit"), cluster, options)
