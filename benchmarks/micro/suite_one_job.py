"""Run one job of the generation-smollm2 suite (ConsistentEE, alpha 0.05, Alpaca) into the folder given as argv[1].

The suite has no per-config selection on the command line; this is how results/generation-smollm2-cee-adf48a8 was
measured.
"""
import sys

from eebench.runner import run_jobs
from eebench.suites import get_suite

jobs = [j for j in get_suite("generation-smollm2").jobs()
        if j.method == "consistentee" and j.task == "alpaca" and j.method_config["alpha"] == 0.05]
assert len(jobs) == 1, jobs
print(jobs[0].job_id, jobs[0].method_config, flush=True)
print(run_jobs(jobs, sys.argv[1]))
