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
    assert "21 passed" in result.stdout


def _script(name: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "micro" / name), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_decoder_speed_script_runs_on_the_tiny_llama(tmp_path):
    import json
    out = tmp_path / "speed.json"
    _script("decoder_speed.py", "--backbone", "tiny-llama", "--prompts", "2", "--new-tokens", "4", "--batch-sizes",
            "1", "2", "--exit-layers", "3", "--repeats", "1", "--threads", "1", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [row["batch_size"] for row in rows] == [1, 2]
    for row in rows:
        assert row["same_tokens_as_generate"] and 0 < row["prefill_share_of_full"]
        point = row["exit@3"]
        assert point["saved_layer_speedup"] == 2.0 and point["decode_flops_speedup"] > point["flops_speedup"] > 1


def test_calm_classifier_input_script_runs_on_the_tiny_llama():
    printed = _script("calm_classifier_input.py", "--backbone", "tiny-llama", "--train-batches", "2",
                      "--test-batches", "1", "--steps", "2", "--threads", "1")
    assert "softmax top-1 - top-2 pooled AUC" in printed
    assert sum(line.split()[0] in ("raw", "normed") for line in printed.splitlines()[2:]) == 2


def test_calm_saturation_script_runs_on_the_tiny_llama():
    printed = _script("calm_saturation.py", "--backbone", "tiny-llama", "--pairs", "4", "--thresholds", "0.999", "0.5",
                      "--threads", "1")
    rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.startswith(("0.999 ", "0.5 "))}
    # the tiny model's layers are far from saturated: 0.999 never exits (mean exit = L = 6), 0.5 exits earlier
    assert float(rows["0.999"][0]) == 6.0 and float(rows["0.5"][0]) < 6.0
    assert "decayed lambda_t (paper form" in printed


def test_timing_agreement_compares_two_stored_runs_of_one_job():
    stored = ROOT / "results" / "timing-protocol-mcid"
    shown = _script("timing_agreement.py", str(stored / "after-e6a9562-run1"), str(stored / "after-e6a9562-run2"),
                    "--label", "batch")
    rows = [line.split("|") for line in shown.splitlines() if line.startswith("| batch |")]
    assert [row[2].strip() for row in rows] == ["1", "32"] and all(row[3].strip() == "22" for row in rows)
    gap_bs1 = float(rows[0][8].split("/")[0])
    assert 0 < gap_bs1 < 0.05  # the two runs of the batch-interleaved clock agree within 5 % at bs 1
