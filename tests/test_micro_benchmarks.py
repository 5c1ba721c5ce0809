"""The micro-benchmarks in benchmarks/micro are not run for timing in CI, but they must keep working:
run each once (pytest-benchmark's --benchmark-disable) on the tiny backbone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_micro_benchmarks_run_once_each():
    env = {**os.environ, "EEBENCH_BENCH_BACKBONE": "tiny-bert"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                             str(ROOT / "benchmarks" / "micro")], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "26 passed" in result.stdout


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


def test_profile_exit_prints_each_rules_no_exit_floor_and_bytes_bound():
    """profile_exit.py's summary lines (issue 18): per rule, the realization of a point that exits nowhere, the
    floor of such a point (every head, no decision) with the share reached, and the weight-bytes bound."""
    import re

    from conftest import GLUE

    printed = _script("profile_exit.py", "--backbone", "tiny-bert", "--task", "sst2", "--data-dir", str(GLUE),
                      "--examples", "4", "--batch-sizes", "1", "--rounds", "1", "--threads", "1", "--no-profile")
    pattern = re.compile(r"realization of a point that exits nowhere: ([\d.]+) \[.*\] \((\S+), \w+\); its floor "
                         r"\(embeddings \+ (\d) layers \+ \3 heads\) allows ([\d.]+), share ([\d.]+); weight-bytes "
                         r"bound ([\d.]+)")
    rows = {match[2]: match for match in map(pattern.search, printed.splitlines()) if match}
    assert sorted(rows) == sorted(["entropy", "patience", "confident-streak", "lte", "policy"])
    for match in rows.values():
        realization, allows, share, bound = (float(match[i]) for i in (1, 4, 5, 6))
        assert share == pytest.approx(realization / allows, abs=2e-3)
        assert 0 < bound < 1  # a no-exit point reads L - 1 more heads' weights than the full model
    # the policy net is read beside every head: ConsistentEE's bound is the lowest
    assert float(rows["policy"][6]) < float(rows["entropy"][6])


def test_gpu_check_prepares_a_kit_without_weights_and_runs_the_profile_on_it(tmp_path):
    """benchmarks/micro/gpu_check.sh, issue 18's prepared GPU check, run through on the CPU: `prepare` copies
    MiniLM's config and tokenizer (no weight file) and SST-2 dev; `run` installs eebench without dependencies and
    times profile_exit.py --architecture (random weights) deciding now and one layer late. The run here takes a
    tiny architecture folder instead of the kit's MiniLM (same path, a fraction of the time)."""
    from transformers import AutoConfig

    from eebench.backbones import checkpoint_pooling, load_backbone

    from conftest import GLUE

    kit, out, tiny = tmp_path / "kit", tmp_path / "out", tmp_path / "tiny"
    backbone = load_backbone("tiny-bert")
    backbone.model.config.save_pretrained(tiny)
    backbone.tokenizer.save_pretrained(tiny)
    env = {**os.environ, "GPU_KIT": str(kit), "PYTHON": sys.executable, "DEVICE": "cpu", "OUT": str(out)}
    script = str(ROOT / "benchmarks" / "micro" / "gpu_check.sh")
    for args in (["prepare", str(GLUE)], ["run", "--architecture", str(tiny), "--examples", "2", "--rounds", "1",
                                         "--batch-sizes", "1", "--threads", "1", "--rules", "entropy"]):
        result = subprocess.run(["bash", script, *args], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    minilm = AutoConfig.from_pretrained(kit / "minilm")
    assert (minilm.num_hidden_layers, minilm.hidden_size) == (6, 384) and checkpoint_pooling(kit / "minilm") == "mean"
    assert not [path for path in kit.rglob("*") if path.suffix in (".safetensors", ".bin")]
    assert (kit / "glue" / "SST-2" / "dev.tsv").read_text() == (GLUE / "SST-2" / "dev.tsv").read_text()
    now, late = ((out / f"profile-{decision}.log").read_text() for decision in ("now", "late"))
    assert "(random weights)" in now and "exit decision now" in now and "exit decision late" in late
    assert "realization of a point that exits nowhere" in now
    assert "all exit at layer 1 (4x saved layers, decided one layer late: runs 2), entropy" in late


def test_head_cache_script_times_a_head_and_a_layer_hot_and_cold():
    printed = _script("head_cache.py", "--backbone", "tiny-bert", "--repeats", "3", "--flush-mb", "4", "--threads", "1")
    ratios = printed.splitlines()[-1].split()
    assert ratios[:3] == ["head", "/", "layer:"] and 0 < float(ratios[4].rstrip(",")) < 1  # bytes: a head < a layer
    assert sum(" hot " in line and " cold " in line and line.endswith(" us") for line in printed.splitlines()) == 2
