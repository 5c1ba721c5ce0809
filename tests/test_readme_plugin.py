"""The plugin printed in the README works as written: installed through an entry point, it passes the
contract and runs through the runner like a built-in."""

from __future__ import annotations

import re
from pathlib import Path

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
