"""Accuracy / speed-up trade-off curves: records -> matplotlib figures.

Pure functions: figures are built as ``matplotlib.figure.Figure`` objects, never through pyplot, so there
is no global figure registry to leak into and no GUI backend is ever touched. Metrics are plotted x100;
speed-ups are ratios (full-model cost / point cost).
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from itertools import cycle
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from eebench.leaderboard import SPEEDUPS, load_records, operating_points
from eebench.store import atomic_write_bytes

FIGURES_DIR = "figures"
_SPEEDUP_NAMES = {
    "saved_layer_speedup": "saved-layer speed-up",
    "flops_speedup": "FLOPs speed-up",
    "wallclock_speedup": "wall-clock speed-up",
}
_PERCENT_METRICS = {"accuracy", "f1", "precision", "recall"}
_METRIC_NAMES = {"f1": "F1", "mcc": "MCC", "spearman": "Spearman", "pearson": "Pearson"}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
FULL_MODEL_LABEL = "full model\n(median over methods)"


def _styles(methods: Sequence[str]) -> tuple[dict[str, tuple], dict[str, str]]:
    """Colour and marker per method, fixed by sorted name so a method looks the same in every figure."""
    names = sorted(set(methods))
    colours = dict(zip(names, sns.color_palette("colorblind", len(names)), strict=True))
    markers = dict(zip(names, cycle(_MARKERS)))
    return colours, markers


def tradeoff_figure(
    records: pd.DataFrame, task: str, speedup: str = "saved_layer_speedup", batch_size: int = 1
) -> Figure:
    """Dev metric (x100) vs ``speedup`` for every method on ``task``, at one batch size.

    Each point is one knob setting averaged over seeds (x and y), with a ±1 std band in y when there
    are several seeds; the grey dashed line is the median over methods of their seed-averaged full-model
    metric (a median because some methods' "full model" is a network trained for something else: HashEE's
    hashed-exit network forced to full depth scores F1 5-47 on MRPC, where every layer-wise one is near
    84). When a task holds several backbones, each (method, backbone) is its own curve. Falls back to the smallest batch
    size present like :func:`eebench.leaderboard.operating_points`.
    """
    if speedup not in SPEEDUPS:
        raise ValueError(f"unknown speed-up {speedup!r}; choose one of {', '.join(SPEEDUPS)}")
    # Select the task first: the batch-size fallback is per task.
    points = operating_points(records[records["task"] == task], batch_size).copy()
    if points.empty:
        present = ", ".join(sorted(records["task"].unique())) if len(records) else "none"
        raise ValueError(f"no records for task {task!r} (tasks present: {present})")
    backbones = sorted(points["backbone"].unique())
    points["curve"] = points["method"]
    if len(backbones) > 1:  # never draw one line through points measured on different backbones
        points["curve"] = points["method"] + " (" + points["backbone"] + ")"
    points["metric"] = 100 * points["metric"]

    # Points that save no layer are the full network again (one per alpha for a training-time sweep):
    # drawn as one point per curve, their mean, instead of a vertical zig-zag at 1x. Judged by the saved
    # layers, not the exit layer: a token-wise example's exit layer is L (its [CLS] runs to the top) even
    # when most of its tokens stop early.
    points.loc[points["saved_layer_speedup"] <= 1.0 + 1e-9, "knob_label"] = "no early exit"
    # Average each knob setting over seeds first: x is averaged too, so a setting stays one point.
    curve = (
        points[~points["is_full_model"]]
        .groupby(["curve", "knob_label"], sort=False)
        .agg(x=(speedup, "mean"), y=("metric", "mean"), sd=("metric", "std"))
        .reset_index()
        .sort_values(["curve", "x"])  # so lines run left to right instead of zig-zagging
    )
    # The collapsed point pools different trainings (alphas, bucket counts): its spread is not a seed std.
    curve.loc[curve["knob_label"] == "no early exit", "sd"] = float("nan")
    full = points[points["is_full_model"]].groupby("curve")["metric"].mean()
    colours, markers = _styles(points["curve"])
    order = sorted(colours)

    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.2):
        fig = Figure(figsize=(7.0, 4.2), layout="constrained")
        ax = fig.add_subplot()
        ax.xaxis.get_major_ticks()  # create the tick prototypes now, while the style is active
        ax.yaxis.get_major_ticks()
        if len(curve):
            sns.lineplot(
                data=curve, x="x", y="y", hue="curve", style="curve", hue_order=order, style_order=order,
                palette=colours, markers=markers, dashes=False, errorbar=None, sort=False, legend=False,
                markersize=7, linewidth=1.8, ax=ax,
            )  # fmt: skip
        for name, line in curve.groupby("curve"):
            if line["sd"].notna().any():
                sd = line["sd"].fillna(0.0)
                ax.fill_between(line["x"], line["y"] - sd, line["y"] + sd, color=colours[name], alpha=0.15,
                                linewidth=0)  # fmt: skip
        handles = [
            Line2D([], [], color=colours[n], marker=markers[n], linewidth=1.8, markersize=7, label=n)
            for n in order
        ]
        if len(full):
            ax.axhline(full.median(), color="0.45", linestyle="--", linewidth=1.2, zorder=1)
            handles.append(
                Line2D([], [], color="0.45", linestyle="--", linewidth=1.2, label=FULL_MODEL_LABEL)
            )
        # Outside the axes, on the right: the curves fill the plot area, a legend inside would hide them.
        fig.legend(handles=handles, loc="outside right upper", frameon=False, title="method")

        used_bs = int(points["batch_size"].iloc[0])
        where = f"; {'/'.join(sorted(points['device'].unique()))}" if speedup == "wallclock_speedup" else ""
        ax.set_xlabel(f"{_SPEEDUP_NAMES[speedup]}\n({SPEEDUPS[speedup]}; batch size {used_bs}{where})")
        metric = "/".join(_METRIC_NAMES.get(m, m) for m in sorted(points["metric_name"].unique()))
        unit = "%" if set(points["metric_name"]) <= _PERCENT_METRICS else "×100"
        ax.set_ylabel(f"{metric} on dev ({unit})")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.set_title(f"{task} — {', '.join(backbones)}")
    return fig


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _atomic_savefig(fig: Figure, path: Path, fmt: str) -> None:
    """Render in memory, then write atomically, so readers never see a half-written figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=200)
    atomic_write_bytes(path, buffer.getvalue())


def records_beside(results_dir: str | Path, beside: Sequence[str | Path] = ()) -> pd.DataFrame:
    """The records of `results_dir`, plus those of each `beside` directory for the same tasks; a job
    stored in several directories counts once."""
    records = load_records(results_dir)
    if not beside:
        return records
    tasks = records["task"].unique()
    others = [other[other["task"].isin(tasks)] for other in map(load_records, beside)]
    key = ["job_id", "task", "method", "seed", "knob_label", "batch_size"]
    return pd.concat([records, *others], ignore_index=True).drop_duplicates(key)


def write_figures(
    results_dir: str | Path,
    speedups: Sequence[str] = ("saved_layer_speedup",),
    formats: Sequence[str] = ("png", "pdf"),
    beside: Sequence[str | Path] = (),
) -> list[Path]:
    """Write one figure per task and speed-up kind to ``results_dir/figures/<task>_<speedup>.<fmt>``.

    Wall-clock speed-up depends on the batch size, so it gets one figure per batch size present
    (``<task>_wallclock_speedup_bs<B>.<fmt>``). ``beside``: other results directories whose curves are
    drawn in the same figures (their records for this directory's tasks; a job stored in both is drawn
    once), e.g. the layer-wise methods beside the token-wise ones. Returns the paths written, in order.
    """
    records = records_beside(results_dir, beside)
    unknown = [s for s in speedups if s not in SPEEDUPS]
    if unknown:
        raise ValueError(f"unknown speed-up(s) {unknown}; choose from {', '.join(SPEEDUPS)}")
    out = Path(results_dir) / FIGURES_DIR
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task in sorted(records["task"].unique()):
        sizes = sorted(records.loc[records["task"] == task, "batch_size"].unique())
        for speedup in speedups:
            variants = (
                [(int(b), f"_bs{int(b)}") for b in sizes] if speedup == "wallclock_speedup" else [(1, "")]
            )
            for batch_size, suffix in variants:
                fig = tradeoff_figure(records, task, speedup, batch_size)
                for fmt in formats:
                    path = out / f"{_safe(task)}_{speedup}{suffix}.{fmt}"
                    _atomic_savefig(fig, path, fmt)
                    written.append(path)
    return written
