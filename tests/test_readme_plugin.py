"""The plugin printed in the README works as written: installed through an entry point, it passes the
contract and runs through the runner like a built-in."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from eebench.leaderboard import load_records
from eebench.methods import list_methods
from eebench.runner import run_jobs

from conftest import install_plugin, tiny_job

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_plugin() -> tuple[str, str]:
    text = README.read_text()
    code = re.search(r"<!-- plugin-example -->\n```python\n(.*?)```", text, re.S).group(1)
    entry = re.search(r'\[project.entry-points."eebench.methods"\]\n(\w+) = "(\w+):(\w+)"', text)
    return code, entry


def test_readme_plugin_is_about_twenty_lines():
    code, _ = readme_plugin()
    lines = [line for line in code.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(lines) <= 30


def test_readme_plugin_installs_and_runs(tmp_path, monkeypatch):
    code, entry = readme_plugin()
    name, module, cls = entry.groups()
    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site, monkeypatch, "my_plugin", module, code, {name: cls})
    info = {m.name: m for m in list_methods()}[name]
    assert info.origin == "my_plugin" and info.knob_names == ("threshold",)
    out = tmp_path / "out"
    summary = run_jobs([tiny_job(name)], out, tmp_path / "cache", progress=False, log=lambda _: None)
    assert summary["done"]
    records = load_records(out)
    assert set(records.method) == {name}
    assert len(records[~records.is_full_model].knob_label.unique()) == 5
    first = records[records.knob_label == "threshold=1.01"].iloc[0]
    assert first.mean_exit_layer == first.num_layers  # threshold > 1 never exits: the full model


def test_readme_plugin_passes_the_method_contract(tmp_path, monkeypatch):
    """Installed, the README's plugin is parametrized into the contract test: every contract check passes on it
    (its 0.8-1.01 thresholds never exit on the tiny random backbone; that is a warning, not a failure)."""
    import test_method_contract as contract

    code, entry = readme_plugin()
    name, module, cls = entry.groups()
    install_plugin(tmp_path, monkeypatch, "my_plugin", module, code, {name: cls})
    assert pytest.param((name, "graded"), id=f"{name}-classification") in list(contract._cases())
    trained = contract._trained(name, "graded")
    contract.test_class_satisfies_protocol(trained)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        contract.test_every_knob_gives_batch_shaped_exits_within_depth(trained)
    assert all("no knob exited early" in str(w.message) for w in caught)
    contract.test_largest_budget_knob_equals_full_model(trained)
    contract.test_batched_exits_equal_one_at_a_time(trained)
    contract.test_traced_curve_equals_online_predictions(trained)
