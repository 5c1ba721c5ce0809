"""The micro-benchmarks in benchmarks/micro are not run for timing in CI, but they must keep working:
run each once (pytest-benchmark's --benchmark-disable) on the tiny backbone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_micro_benchmarks_run_once_each():
    env = {**os.environ, "EEBENCH_BENCH_BACKBONE": "tiny-bert"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                             str(ROOT / "benchmarks" / "micro")], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "14 passed" in result.stdout
