"""Run one job of a suite, with method settings changed, into a results folder: a measurement driver for the
settings a suite does not (yet) sweep, such as ConsistentEE's decoder extensions.

    python benchmarks/micro/suite_one_job.py OUT [--suite generation-smollm2] [--method consistentee]
        [--task alpaca] [--alpha 0.05] [--set backbone_init=calm-anytime policy_exit_prior=0.05]

The job is the suite's (data, budget, seed, timing) with `--set` applied to its method config; values are read
as Python literals where they parse (0.05, None, True), else kept as strings. Without arguments after OUT this is
how results/generation-smollm2-cee-adf48a8 was measured (consistentee, alpha 0.05, Alpaca).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses

from eebench.runner import run_jobs
from eebench.suites import get_suite


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--suite", default="generation-smollm2")
    parser.add_argument("--method", default="consistentee")
    parser.add_argument("--task", default="alpaca")
    parser.add_argument("--alpha", type=float, default=0.05, help="pick the suite's config with this alpha")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="method settings to change")
    args = parser.parse_args()
    jobs = [j for j in get_suite(args.suite).jobs() if j.method == args.method and j.task == args.task
            and j.method_config.get("alpha", args.alpha) == args.alpha]
    if len(jobs) != 1:
        raise SystemExit(f"{len(jobs)} jobs of {args.suite} match method {args.method}, task {args.task}, "
                         f"alpha {args.alpha}: {[j.method_config for j in jobs]}")
    changes = dict(item.split("=", 1) for item in args.set)
    job = dataclasses.replace(jobs[0], method_config={**jobs[0].method_config,
                                                      **{k: _value(v) for k, v in changes.items()}})
    print(job.job_id, job.method_config, flush=True)
    print(run_jobs([job], args.out))


if __name__ == "__main__":
    main()
