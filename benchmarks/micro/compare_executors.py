"""The same jobs through every executor: total wall time, identical quality records, wall-clock side by side.

    python benchmarks/micro/compare_executors.py OUT [--executors serial local slurm] [--workers 2]
        [--methods deebert pabee pcee berxit] [--train-limit 2000] [--eval-limit 400] [--timing-examples 32]

Each executor runs `eebench run --suite layerwise-minilm --tasks sst2 --seeds 0` (with the limits above) as
its own process into OUT/<executor>, with its own empty checkpoint cache (so each trains what it needs: PABEE
and PCEE share one network) and its own node-lock folder. `slurm` starts a single-node cluster on 127.0.0.1
(eebench.executors.local_slurm; Debian's slurmctld, slurmd, slurm-client, munge) and stops it by PID; it is
skipped, saying so, where those are not installed. Run it on a quiet machine: nothing else of yours beside it.

Writes OUT/summary.md: per executor the wall time and the jobs run; the quality fields of every record
compared with the serial run's (they must be identical: same seeds, same data, same code); and every
operating point's wall-clock speed-up and realization per executor, side by side, with their ratio to the
serial run's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

QUALITY = ("metric", "saved_layer_speedup", "flops_speedup", "mean_exit_layer", "selection_metric",
           "selection_saved_layer_speedup", "floor_metric")


def run_executor(kind: str, out: Path, args: argparse.Namespace, env: dict[str, str]) -> dict:
    command = [sys.executable, "-m", "eebench.cli", "run", "--suite", "layerwise-minilm", "--tasks", "sst2",
               "--seeds", "0", "--methods", *args.methods, "--train-limit", str(args.train_limit),
               "--eval-limit", str(args.eval_limit), "--timing-examples", str(args.timing_examples),
               "--data-dir", args.data_dir, "--out", str(out / kind), "--cache-dir", str(out / f"{kind}-cache"),
               "--quiet", "--executor", kind]
    if kind == "local":
        command += ["--workers", str(args.workers)]
    if kind == "slurm":
        command += ["--time-min", "60", "--slurm-folder", str(out / "slurm-submitit")]
    lock_dir = out / f"{kind}-node-lock"  # its own: an earlier run's holder can never block this one
    lock_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                            env={**env, "EEBENCH_NODE_LOCK_DIR": str(lock_dir)})
    seconds = time.perf_counter() - started
    (out / f"{kind}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{kind}: eebench run exited {result.returncode}; see {out / f'{kind}.log'}")
    return {"executor": kind, "wall_seconds": seconds, "command": " ".join(command[1:])}


def load(out: Path, kind: str) -> pd.DataFrame:
    rows = [json.loads(line) for line in (out / kind / "records.jsonl").read_text().splitlines() if line.strip()]
    frame = pd.DataFrame(rows)
    frame["executor"] = kind
    return frame


def quality_mismatches(serial: pd.DataFrame, other: pd.DataFrame) -> list[str]:
    keys = ["job_id", "knob_label", "batch_size"]
    joined = serial.merge(other, on=keys, suffixes=("_serial", "_other"), how="outer", indicator=True)
    problems = [f"{row.job_id} {row.knob_label} bs{row.batch_size}: only in one run"
                for row in joined[joined["_merge"] != "both"].itertuples()]
    both = joined[joined["_merge"] == "both"]
    for field in QUALITY:
        if f"{field}_serial" not in both:
            continue
        left, right = both[f"{field}_serial"], both[f"{field}_other"]
        differ = ~((left == right) | (left.isna() & right.isna()))
        problems += [f"{row.job_id} {row.knob_label} bs{row.batch_size}: {field} {a!r} != {b!r}"
                     for row, a, b in zip(both[differ].itertuples(), left[differ], right[differ], strict=True)]
    return problems


def summary(out: Path, runs: list[dict]) -> str:
    kinds = [run["executor"] for run in runs]
    records = {kind: load(out, kind) for kind in kinds}
    lines = ["| executor | wall time (s) | vs serial | jobs | checkpoints trained |", "|---|---:|---:|---:|---:|"]
    serial_seconds = next((r["wall_seconds"] for r in runs if r["executor"] == "serial"), float("nan"))
    for run in runs:
        frame = records[run["executor"]]
        full = frame[frame.is_full_model & (frame.batch_size == frame.batch_size.min())]
        lines.append(f"| {run['executor']} | {run['wall_seconds']:.0f} | {run['wall_seconds'] / serial_seconds:.2f} | "
                     f"{frame.job_id.nunique()} | {int((~full.checkpoint_from_cache).sum())} |")
    lines += ["", "Quality fields (" + ", ".join(QUALITY) + ") against the serial run:", ""]
    for kind in kinds[1:]:
        problems = quality_mismatches(records[kinds[0]], records[kind])
        lines.append(f"- {kind}: " + ("identical in every record" if not problems else
                                      f"{len(problems)} differences, e.g. " + "; ".join(problems[:5])))
    points = pd.concat(records.values(), ignore_index=True)
    points = points[~points.is_full_model]
    table = points.pivot_table(index=["method", "knob_label", "batch_size"], columns="executor",
                               values=["wallclock_speedup", "realization"], aggfunc="first")
    lines += ["", "Wall-clock speed-up per operating point (realization in brackets), and the median ratio of "
                  "each executor's speed-up to the serial run's per batch size:", ""]
    header = "| method | point | bs | " + " | ".join(kinds) + " |"
    lines += [header, "|" + "---|" * 3 + "---:|" * len(kinds)]
    for (method, knob, batch), row in table.iterrows():
        cells = [f"{row[('wallclock_speedup', k)]:.2f}x ({row[('realization', k)]:.2f})" for k in kinds]
        lines.append(f"| {method} | {knob} | {batch} | " + " | ".join(cells) + " |")
    lines.append("")
    for kind in kinds[1:]:
        ratio = table[("wallclock_speedup", kind)] / table[("wallclock_speedup", kinds[0])]
        by_batch = ratio.groupby(level="batch_size").median()
        lines.append(f"- {kind} / {kinds[0]}, median over points: "
                     + ", ".join(f"bs {b}: {v:.3f}" for b, v in by_batch.items()))
    flags = points[points.timing_flag.fillna("") != ""].groupby("executor").size()
    lines.append("- flagged timings: " + (", ".join(f"{k} {n}" for k, n in flags.items()) or "none"))
    threads = points.groupby("executor")["timing_threads"].agg(lambda t: sorted(set(t.dropna().astype(int))))
    lines.append("- clock threads: " + ", ".join(f"{k} {v}" for k, v in threads.items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--executors", nargs="+", default=["serial", "local", "slurm"],
                        choices=("serial", "local", "slurm", "submitit-local"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["deebert", "pabee", "pcee", "berxit"])
    parser.add_argument("--train-limit", type=int, default=2000)
    parser.add_argument("--eval-limit", type=int, default=400)
    parser.add_argument("--timing-examples", type=int, default=32)
    parser.add_argument("--data-dir", default="../shared/data/glue")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per executor's run")
    args = parser.parse_args()
    if args.executors[0] != "serial":
        raise SystemExit("the first executor is the reference the others are compared with: put serial first")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for kind in args.executors:
        env = dict(os.environ)
        if kind != "slurm":
            runs.append(run_executor(kind, args.out, args, env))
            print(f"{kind}: {runs[-1]['wall_seconds']:.0f} s", flush=True)
            continue
        from eebench.executors.local_slurm import local_slurm, missing
        if missing():
            print(f"slurm: skipped ({', '.join(missing())} not installed)", flush=True)
            continue
        with local_slurm(args.out / "slurm-cluster") as cluster:
            runs.append(run_executor(kind, args.out, args, {**env, **cluster}))
        print(f"{kind}: {runs[-1]['wall_seconds']:.0f} s", flush=True)
    text = summary(args.out, runs)
    commands = "\n".join(f"- {run['executor']}: `{run['command']}`" for run in runs)
    (args.out / "summary.md").write_text(text + "\nCommands (each with its own cache and node-lock folder):\n\n"
                                         + commands + "\n")
    print(text)


if __name__ == "__main__":
    main()
