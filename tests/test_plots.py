"""Trade-off figures: what is drawn (lines, legend, labels) and what is written to disk."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from eebench.plots.curves import FULL_MODEL_LABEL, records_beside, tradeoff_figure, write_figures

from conftest import curve

# The same two methods x two seeds as tests/test_leaderboard.py.
RECORDS = [
    *curve("alpha", 0, 0.90, [(1.5, 0.89), (2.5, 0.80)]),
    *curve("alpha", 1, 0.92, [(1.6, 0.905), (2.0, 0.85)]),
    *curve("beta", 0, 0.91, [(1.2, 0.91), (1.8, 0.90)]),
    *curve("beta", 1, 0.91, [(1.3, 0.905), (1.9, 0.88)]),
]


def data_lines(fig) -> list[tuple[list[float], list[float]]]:
    """x/y of each drawn curve, in legend order (the dashed full-model line excluded)."""
    ax = fig.axes[0]
    return [
        (list(line.get_xdata()), list(line.get_ydata()))
        for line in ax.get_lines()
        if line.get_linestyle() != "--"
    ]


def legend_texts(fig) -> list[str]:
    return [t.get_text() for t in fig.legends[0].get_texts()]


def test_one_line_per_method_seed_averaged_and_sorted():
    shuffled = pd.DataFrame(RECORDS).sample(frac=1.0, random_state=0)  # sorting must not rely on input order
    before = plt.get_fignums()
    fig = tradeoff_figure(shuffled, "sst2")
    assert plt.get_fignums() == before  # built without pyplot: nothing left open globally
    assert legend_texts(fig) == ["alpha", "beta", FULL_MODEL_LABEL]
    lines = data_lines(fig)
    assert len(lines) == 2
    # alpha t=0.1: seeds at 1.5x/89 and 1.6x/90.5 -> (1.55, 89.75); t=0.2: 2.5x/80 and 2.0x/85 -> (2.25, 82.5)
    (ax_, ay), (bx, _) = lines
    assert ax_ == pytest.approx([1.55, 2.25]) and ay == pytest.approx([89.75, 82.5])
    assert bx == sorted(bx)
    ax = fig.axes[0]
    full = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(full) == 1 and full[0].get_ydata()[0] == pytest.approx(91.0)  # median of 91.0 and 91.0
    assert "saved-layer speed-up" in ax.get_xlabel() and "batch size 1" in ax.get_xlabel()
    assert ax.get_ylabel().startswith("accuracy")
    assert "sst2" in ax.get_title() and "minilm" in ax.get_title()


def test_points_without_early_exit_collapse_into_one():
    # A training-time sweep: each alpha job has a never-exit point (the full network again) at 1x.
    rows = [*curve("sweep", 0, 0.90, [(1.0, 0.90), (2.0, 0.85)], job_id="a"),
            *curve("sweep", 0, 0.88, [(1.0, 0.88), (3.0, 0.80)], job_id="b")]
    for row in rows:
        row["knob_label"] = f"{row['job_id']}:{row['knob_label']}"
    lines = data_lines(tradeoff_figure(pd.DataFrame(rows), "sst2"))
    assert lines == [([1.0, 2.0, 3.0], pytest.approx([89.0, 85.0, 80.0]))]


def test_token_wise_points_are_not_collapsed_by_their_exit_layer():
    # Token-wise: every example's exit layer is L ([CLS] runs to the top), yet its tokens save layers.
    rows = [*curve("tokens", 0, 0.90, [(1.0, 0.90), (2.0, 0.85), (3.0, 0.80)])]
    for row in rows:
        row["mean_exit_layer"] = row["num_layers"]
    assert data_lines(tradeoff_figure(pd.DataFrame(rows), "sst2")) == [([1.0, 2.0, 3.0], pytest.approx([90.0, 85.0, 80.0]))]


def test_wallclock_figure_uses_requested_batch_size():
    rows = [
        *RECORDS,
        *[dict(r, batch_size=32, wallclock_speedup=r["wallclock_speedup"] / 2) for r in RECORDS],
    ]
    fig = tradeoff_figure(pd.DataFrame(rows), "sst2", speedup="wallclock_speedup", batch_size=32)
    assert "batch size 32" in fig.axes[0].get_xlabel()
    assert data_lines(fig)[0][0] == pytest.approx([1.55 / 2, 2.25 / 2])


def test_points_sorted_by_the_plotted_speedup():
    # Wall-clock order opposite to saved-layer order (per-exit overhead): the line must still run left to right.
    rows = [
        dict(r, wallclock_speedup=1.0 if r["is_full_model"] else 4.0 - r["saved_layer_speedup"])
        for r in RECORDS
    ]
    for x, _ in data_lines(tradeoff_figure(pd.DataFrame(rows), "sst2", speedup="wallclock_speedup")):
        assert x == sorted(x) and len(x) == 2


def test_several_backbones_are_separate_curves():
    rows = [*curve("alpha", 0, 0.9, [(2.0, 0.9)]), *curve("alpha", 0, 0.8, [(2.0, 0.1)], backbone="bert")]
    fig = tradeoff_figure(pd.DataFrame(rows), "sst2")
    assert legend_texts(fig)[:2] == ["alpha (bert)", "alpha (minilm)"]
    assert "bert, minilm" in fig.axes[0].get_title()


def test_unknown_task_or_speedup():
    with pytest.raises(ValueError, match="tasks present: sst2"):
        tradeoff_figure(pd.DataFrame(RECORDS), "qnli")
    with pytest.raises(ValueError, match="unknown speed-up"):
        tradeoff_figure(pd.DataFrame(RECORDS), "sst2", speedup="speed")


def test_write_figures(tmp_path: Path):
    rows = [*RECORDS, *[dict(r, task="mrpc", metric_name="f1") for r in RECORDS]]
    rows += [dict(r, batch_size=32) for r in rows]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths = write_figures(tmp_path, speedups=("saved_layer_speedup", "wallclock_speedup"))
    names = sorted(p.name for p in paths)
    assert names == sorted(
        f"{task}_{kind}.{fmt}"
        for task in ("sst2", "mrpc")
        for kind in ("saved_layer_speedup", "wallclock_speedup_bs1", "wallclock_speedup_bs32")
        for fmt in ("png", "pdf")
    )
    magic = {".png": b"\x89PNG", ".pdf": b"%PDF"}
    for path in paths:
        assert path.parent == tmp_path / "figures"
        assert path.read_bytes().startswith(magic[path.suffix])
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == names  # no temp files left behind


def test_write_figures_missing_store(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="eebench run --out"):
        write_figures(tmp_path)


def test_full_model_line_is_the_median_over_methods():
    odd = curve("hashed", 0, 0.10, [(3.0, 0.80)])  # a method whose "full model" is not a normal fine-tune
    fig = tradeoff_figure(pd.DataFrame([*RECORDS, *odd, *curve("gamma", 0, 0.89, [(2.0, 0.85)])]), "sst2")
    full = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert full[0].get_ydata()[0] == pytest.approx(90.0)  # median of 91, 91, 10, 89 (the mean would be 70.25)


def test_write_figures_beside_draws_other_directories_curves(tmp_path: Path):
    token, layer = tmp_path / "token", tmp_path / "layer"
    for folder, rows in ((token, curve("alpha", 0, 0.90, [(3.0, 0.80)], job_id="t")),
                         (layer, [*curve("beta", 0, 0.91, [(1.8, 0.90)], job_id="l"),
                                  *curve("beta", 0, 0.91, [(1.8, 0.90)], job_id="m", task="rte")])):
        folder.mkdir()
        (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = records_beside(token, [layer, token])  # token twice: its job counts once
    assert sorted(records.method.unique()) == ["alpha", "beta"] and set(records.task) == {"sst2"}
    assert len(records) == 4
    fig = tradeoff_figure(records, "sst2")
    assert legend_texts(fig) == ["alpha", "beta", FULL_MODEL_LABEL]
    paths = write_figures(token, formats=("png",), beside=[layer])
    assert [p.name for p in paths] == ["sst2_saved_layer_speedup.png"]  # only this directory's tasks
