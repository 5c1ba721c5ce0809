"""Trade-off figures: what is drawn (lines, legend, labels) and what is written to disk."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from eebench.plots.curves import records_beside, tradeoff_figure, write_figures

from conftest import curve

# The same two methods x two seeds as tests/test_leaderboard.py.
RECORDS = [
    *curve("alpha", 0, 0.90, [(1.5, 0.89), (2.5, 0.80)]),
    *curve("alpha", 1, 0.92, [(1.6, 0.905), (2.0, 0.85)]),
    *curve("beta", 0, 0.91, [(1.2, 0.91), (1.8, 0.90)]),
    *curve("beta", 1, 0.91, [(1.3, 0.905), (1.9, 0.88)]),
]


def drawn(fig, kind: str) -> dict[str, tuple[list[float], list[float]]]:
    """x/y of the artists with gid "<kind>:<curve>" (frontier, points, dominated, full, clipped), by curve."""
    return {line.get_gid().split(":", 1)[1]: (list(line.get_xdata()), list(line.get_ydata()))
            for line in fig.axes[0].get_lines() if (line.get_gid() or "").startswith(kind + ":")}


def measured(fig) -> dict[str, tuple[list[float], list[float]]]:
    """Every early-exit marker per curve (frontier and dominated), sorted by x."""
    out = {}
    for kind in ("points", "dominated"):
        for name, (xs, ys) in drawn(fig, kind).items():
            old = out.get(name, ([], []))
            out[name] = (old[0] + xs, old[1] + ys)
    ordered = {name: sorted(zip(xs, ys, strict=True)) for name, (xs, ys) in out.items()}
    return {name: ([x for x, _ in pairs], [y for _, y in pairs]) for name, pairs in ordered.items()}


def legend_texts(fig) -> list[str]:
    return [t.get_text() for t in fig.legends[0].get_texts()]


def test_seed_averaged_points_frontier_steps_and_own_full_models():
    shuffled = pd.DataFrame(RECORDS).sample(frac=1.0, random_state=0)  # sorting must not rely on input order
    before = plt.get_fignums()
    fig = tradeoff_figure(shuffled, "sst2", plugins=[])
    assert plt.get_fignums() == before  # built without pyplot: nothing left open globally
    assert legend_texts(fig) == ["alpha", "beta", "own full model", "dominated"]
    # alpha t=0.1: seeds at 1.5x/89 and 1.6x/90.5 -> (1.55, 89.75); t=0.2: 2.5x/80 and 2.0x/85 -> (2.25, 82.5)
    assert measured(fig)["alpha"] == (pytest.approx([1.55, 2.25]), pytest.approx([89.75, 82.5]))
    full = drawn(fig, "full")
    assert full["alpha"] == ([1.0], [pytest.approx(91.0)]) and full["beta"] == ([1.0], [pytest.approx(91.0)])
    # The frontier includes the own full model and is drawn as steps: flat to the next point, then down.
    xs, ys = drawn(fig, "frontier")["alpha"]
    assert xs == pytest.approx([1.0, 1.55, 2.25]) and ys == pytest.approx([91.0, 89.75, 82.5])
    assert fig.axes[0].get_lines()[[ln.get_gid() for ln in fig.axes[0].get_lines()].index("frontier:alpha")
                                   ].get_drawstyle() == "steps-pre"
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("saved-layer speed-up") and "batch size" not in ax.get_xlabel()
    assert ax.get_ylabel().startswith("accuracy")
    assert ax.get_title().startswith("SST-2 · MiniLM-L6") and "2 seeds" in ax.get_title()
    assert any(line.get_xdata()[0] == 1.0 and line.get_linestyle() == ":" for line in ax.get_lines())  # 1x line


def test_dominated_points_are_markers_off_the_frontier():
    rows = curve("alpha", 0, 0.90, [(1.5, 0.80), (2.0, 0.85), (3.0, 0.70)])
    fig = tradeoff_figure(pd.DataFrame(rows), "sst2", plugins=[])
    assert drawn(fig, "dominated")["alpha"] == ([1.5], [pytest.approx(80.0)])  # 2.0x is both faster and better
    assert drawn(fig, "frontier")["alpha"][0] == pytest.approx([1.0, 2.0, 3.0])


def test_bars_are_seed_std_or_bootstrap_interval():
    fig = tradeoff_figure(pd.DataFrame(RECORDS), "sst2", plugins=[])
    assert "±1 std over seeds" in fig.axes[0].get_title()
    one = pd.DataFrame(curve("alpha", 0, 0.90, [(2.0, 0.85)]))
    intervals = pd.DataFrame({"job_id": one.job_id, "knob_label": one.knob_label, "ci_low": one.metric - 0.02,
                              "ci_high": one.metric + 0.03})
    from eebench.plots.curves import curve_points
    table = curve_points(one, "sst2", intervals=intervals)
    assert table.low.tolist() == pytest.approx([88.0, 83.0]) and table.high.tolist() == pytest.approx([93.0, 88.0])
    fig = tradeoff_figure(one, "sst2", intervals=intervals, plugins=[])
    assert "95% bootstrap interval" in fig.axes[0].get_title() and "1 seed;" in fig.axes[0].get_title()


def test_a_far_off_point_is_clipped_with_its_value_written():
    rows = [*RECORDS, *curve("hashed", 0, 0.22, [(3.0, 0.81)])]  # a full model at 22 among values near 85-91
    fig = tradeoff_figure(pd.DataFrame(rows), "sst2", plugins=[])
    assert drawn(fig, "clipped")["hashed"][0] == [1.0]
    assert drawn(fig, "full")["hashed"] == ([], [])
    assert fig.axes[0].get_ylim()[0] > 70  # the rest is not squashed
    assert any(text.get_text() == "hashed: 22.0" for text in fig.axes[0].texts)
    # A curve that degrades step by step is drawn in full, however low it ends.
    steady = curve("alpha", 0, 0.90, [(1.5, 0.85), (2.0, 0.78), (3.0, 0.70), (4.0, 0.62), (5.0, 0.55)])
    assert "alpha" not in drawn(tradeoff_figure(pd.DataFrame(steady), "sst2", plugins=[]), "clipped")


def test_points_without_early_exit_collapse_into_one():
    # A training-time sweep: each alpha job has a never-exit point (the full network again) at 1x.
    rows = [*curve("sweep", 0, 0.90, [(1.0, 0.90), (2.0, 0.85)], job_id="a"),
            *curve("sweep", 0, 0.88, [(1.0, 0.88), (3.0, 0.80)], job_id="b")]
    for row in rows:
        row["knob_label"] = f"{row['job_id']}:{row['knob_label']}"
    assert measured(tradeoff_figure(pd.DataFrame(rows), "sst2", plugins=[]))["sweep"] == (
        [1.0, 2.0, 3.0], pytest.approx([89.0, 85.0, 80.0]))


def test_token_wise_points_are_not_collapsed_by_their_exit_layer():
    # Token-wise: every example's exit layer is L ([CLS] runs to the top), yet its tokens save layers.
    rows = [*curve("tokens", 0, 0.90, [(1.0, 0.90), (2.0, 0.85), (3.0, 0.80)])]
    for row in rows:
        row["mean_exit_layer"] = row["num_layers"]
    assert measured(tradeoff_figure(pd.DataFrame(rows), "sst2", plugins=[]))["tokens"] == (
        [1.0, 2.0, 3.0], pytest.approx([90.0, 85.0, 80.0]))


def test_styles_are_fixed_per_method_and_plugins_come_after():
    from eebench.plots.style import _BUILTIN_STYLES, curve_style

    assert curve_style("pabee", []).colour == curve_style("pabee", ["mine"]).colour
    colours = {curve_style(name, []).colour for name in ("berxit", "consistentee", "deebert", "hashee", "pabee",
                                                         "pcee", "trbert")}
    assert len(colours) == 7
    assert curve_style("pcee", []).label == "PCEE-BERT" and curve_style("calm[oracle]", []).label == "CALM (oracle)"
    mine = curve_style("mine", ["mine", "theirs"])
    assert mine.colour not in {c for c, _, _ in _BUILTIN_STYLES.values()} and mine.label == "mine"
    assert curve_style("theirs", ["mine", "theirs"]).colour != mine.colour
    assert curve_style("mine[v2]", ["mine"]).colour == mine.colour
    # The same method in two figures with different company keeps its colour.
    one = tradeoff_figure(pd.DataFrame(curve("pabee", 0, 0.9, [(2.0, 0.85)])), "sst2", plugins=[])
    two = tradeoff_figure(pd.DataFrame([*curve("deebert", 0, 0.9, [(2.0, 0.8)]),
                                        *curve("pabee", 0, 0.9, [(2.0, 0.85)])]), "sst2", plugins=[])
    colour = {fig: [ln.get_color() for ln in fig.axes[0].get_lines() if ln.get_gid() == "points:pabee"][0]
              for fig in (one, two)}
    assert colour[one] == colour[two] == curve_style("pabee", []).colour


def test_wallclock_figure_uses_requested_batch_size():
    rows = [
        *RECORDS,
        *[dict(r, batch_size=32, wallclock_speedup=r["wallclock_speedup"] / 2) for r in RECORDS],
    ]
    fig = tradeoff_figure(pd.DataFrame(rows), "sst2", speedup="wallclock_speedup", batch_size=32)
    assert "batch size 32" in fig.axes[0].get_xlabel()
    assert measured(fig)["alpha"][0] == pytest.approx([1.55 / 2, 2.25 / 2])


def test_points_sorted_by_the_plotted_speedup():
    # Wall-clock order opposite to saved-layer order (per-exit overhead): the line must still run left to right.
    rows = [
        dict(r, wallclock_speedup=1.0 if r["is_full_model"] else 4.0 - r["saved_layer_speedup"])
        for r in RECORDS
    ]
    for x, _ in drawn(tradeoff_figure(pd.DataFrame(rows), "sst2", speedup="wallclock_speedup"), "frontier").values():
        assert x == sorted(x)


def test_several_backbones_are_separate_curves():
    rows = [*curve("alpha", 0, 0.9, [(2.0, 0.9)]), *curve("alpha", 0, 0.8, [(2.0, 0.1)], backbone="bert")]
    fig = tradeoff_figure(pd.DataFrame(rows), "sst2")
    assert legend_texts(fig)[:2] == ["alpha (MiniLM-L6)", "alpha (bert)"]
    assert "bert, MiniLM-L6" in fig.axes[0].get_title()


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
    assert legend_texts(fig)[:2] == ["alpha", "beta"]
    paths = write_figures(token, formats=("png",), beside=[layer])
    assert [p.name for p in paths] == ["sst2_saved_layer_speedup.png"]  # only this directory's tasks


def test_figures_are_byte_identical_when_regenerated_and_go_where_asked(tmp_path: Path):
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    formats = ("png", "pdf", "svg")
    first = write_figures(tmp_path, formats=formats, out=tmp_path / "a")
    second = write_figures(tmp_path, formats=formats, out=tmp_path / "b")
    assert [p.parent for p in first] == [tmp_path / "a"] * 3 and not (tmp_path / "figures").exists()
    for one, two in zip(first, second, strict=True):
        assert one.read_bytes() == two.read_bytes(), one.name  # no creation date, fixed SVG ids
    assert b"CreationDate" not in first[1].read_bytes()
    with pytest.raises(ValueError, match="unknown figure format 'gif'"):
        write_figures(tmp_path, formats=("gif",), out=tmp_path / "c")
