"""Quality / speed-up trade-off figures: records -> matplotlib figures.

What a reader sees, per curve (a method, or a method's variant such as CALM's classifier): the Pareto
frontier as a step line (best quality reachable at a speed-up of at least s: flat until the next measured
point, then a drop, so no line suggests a point that was not measured), every measured point as a marker
(dominated ones faded), the method's own full model as a hollow marker at 1x, vertical bars for the spread
(±1 std over seeds, or the 95 % bootstrap interval over dev examples when there is one seed), and a dotted
1x line. A point far below the rest (HashEE's F1 22 among 80-85) is drawn on the lower edge as a triangle
with its value written beside it, instead of stretching the axis for everyone.

Pure functions: figures are ``matplotlib.figure.Figure`` objects, never pyplot, so no global registry of
figures fills up and no GUI backend is touched. Metrics are drawn x100; speed-ups are ratios.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from eebench.leaderboard import SPEEDUPS, load_records, operating_points
from eebench.plots.style import (
    METRIC_NAMES,
    SPEEDUP_NAMES,
    CurveStyle,
    curve_style,
    display_backbone,
    display_task,
    safe_name,
    save_figure,
)

FIGURES_DIR = "figures"
_PERCENT_METRICS = {"accuracy", "f1", "precision", "recall", "rougeL", "bertscore_f1"}
# A point is clipped when it lies further below the first quartile of all drawn values than this many
# inter-quartile ranges (and at least _MIN_CLIP_SPAN metric points): far enough that it is a different regime.
_CLIP_IQRS = 3.0
_MIN_CLIP_SPAN = 8.0


def curve_points(
    records: pd.DataFrame, task: str, speedup: str = "saved_layer_speedup", batch_size: int = 1,
    metric: str | None = None, intervals: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per (curve, operating point) of ``task``: what :func:`tradeoff_figure` draws.

    Columns: curve, style_key (the curve without its backbone), knob_label, x (``speedup``, seed mean), y (metric x100, seed mean), low / high (the bar:
    mean ± std over seeds, or the bootstrap interval x100 from ``intervals`` (rows per job_id, knob_label,
    ci_low, ci_high) when one seed, else NaN), n_seeds, is_full_model, on_frontier, batch_size, backbone.
    ``metric``: another entry of the records' ``metrics`` (e.g. "bertscore_f1"); None = the primary metric.
    Points that save no layer are the full network again (one per alpha for a training-time sweep): they
    are pooled into one "no early exit" point so a curve does not zig-zag at 1x. Judged by saved layers,
    not the exit layer: a token-wise example's exit layer is L even when most of its tokens stop early.
    """
    if speedup not in SPEEDUPS:
        raise ValueError(f"unknown speed-up {speedup!r}; choose one of {', '.join(SPEEDUPS)}")
    points = operating_points(records[records["task"] == task], batch_size).copy()  # fallback is per task
    if points.empty:
        present = ", ".join(sorted(records["task"].unique())) if len(records) else "none"
        raise ValueError(f"no records for task {task!r} (tasks present: {present})")
    points["style_key"] = points["curve"].fillna(points["method"]) if "curve" in points else points["method"]
    points["curve"] = points["style_key"]
    if points["backbone"].nunique() > 1:  # never one frontier through points measured on different backbones
        points["curve"] = points["style_key"] + " (" + points["backbone"] + ")"
    if metric is None:
        points["y"] = 100 * points["metric"]
    else:
        values = points["metrics"].map(lambda m: m.get(metric) if isinstance(m, dict) else None)
        if values.astype(float).isna().all():
            raise ValueError(f"no record of task {task!r} has the metric {metric!r}")
        points["y"] = 100 * values.astype(float)
    points["low"] = points["high"] = np.nan
    if intervals is not None and metric is None and len(intervals):
        bars = intervals.set_index(["job_id", "knob_label"])[["ci_low", "ci_high"]] * 100
        keys = pd.MultiIndex.from_frame(points[["job_id", "knob_label"]])
        points["low"] = bars["ci_low"].reindex(keys).to_numpy()
        points["high"] = bars["ci_high"].reindex(keys).to_numpy()
    no_exit = ~points["is_full_model"] & (points["saved_layer_speedup"] <= 1.0 + 1e-9)
    points.loc[no_exit, "knob_label"] = "no early exit"
    table = (
        points.groupby(["curve", "knob_label", "is_full_model"], sort=False)
        .agg(x=(speedup, "mean"), y=("y", "mean"), sd=("y", "std"), n_seeds=("seed", "nunique"),
             low=("low", "mean"), high=("high", "mean"), backbone=("backbone", "first"),
             style_key=("style_key", "first"))
        .reset_index()
    )  # fmt: skip
    # Several seeds: the bar is their spread. One seed: the bootstrap interval, except for the pooled
    # no-early-exit point, whose rows are different trainings (alphas) rather than one point's resamples.
    several = table["n_seeds"] > 1
    table.loc[several, "low"] = table["y"] - table["sd"]
    table.loc[several, "high"] = table["y"] + table["sd"]
    table.loc[table["knob_label"].eq("no early exit") & ~several, ["low", "high"]] = np.nan
    table["on_frontier"] = False
    for _, group in table.groupby("curve"):
        best_faster = -np.inf  # Pareto: no other point of the curve is at least as fast and strictly better
        for index in group.sort_values(["x", "y"], ascending=[False, False]).index:
            if table.at[index, "y"] > best_faster:
                table.at[index, "on_frontier"] = True
                best_faster = table.at[index, "y"]
    table["batch_size"] = int(points["batch_size"].iloc[0])
    table.attrs["devices"] = sorted(points["device"].unique())
    table.attrs["metric_names"] = sorted(points["metric_name"].unique()) if metric is None else [metric]
    return table.drop(columns="sd").sort_values(["curve", "x"], kind="stable").reset_index(drop=True)


def _clip_limit(values: np.ndarray) -> float:
    """The lowest y drawn in place; a point below it is drawn on the lower edge instead.

    A point is clipped only when it is both far out (more than _CLIP_IQRS inter-quartile ranges, and at least
    _MIN_CLIP_SPAN points, below the first quartile) and isolated (its gap to the next value up exceeds half
    the span of everything above): a curve that degrades step by step down to 55 is drawn in full.
    """
    ys = np.sort(values[~np.isnan(values)])
    q1, q3 = np.quantile(ys, [0.25, 0.75])
    far = q1 - max(_CLIP_IQRS * (q3 - q1), _MIN_CLIP_SPAN)
    cut = 0
    while cut < len(ys) - 1 and ys[cut] < far and ys[cut + 1] - ys[cut] > 0.5 * (ys[-1] - ys[cut + 1]):
        cut += 1
    return float(ys[cut]) if len(ys) else -np.inf


def tradeoff_figure(
    records: pd.DataFrame, task: str, speedup: str = "saved_layer_speedup", batch_size: int = 1,
    metric: str | None = None, intervals: pd.DataFrame | None = None, plugins: Sequence[str] | None = None,
) -> Figure:
    """Metric on dev (x100) vs ``speedup`` for every curve on ``task`` (see the module docstring).

    ``batch_size`` matters for wall-clock only (falls back per task to the smallest size present, like
    :func:`eebench.leaderboard.operating_points`); ``metric`` and ``intervals`` as in :func:`curve_points`;
    ``plugins``: the registry's plugin names for :func:`eebench.plots.style.curve_style` (None: ask the
    registry). Artists carry gids ``frontier:<curve>``, ``points:<curve>``, ``full:<curve>``.
    """
    table = curve_points(records, task, speedup, batch_size, metric, intervals)
    plugins = None if plugins is None else list(plugins)
    styles = {}
    for name, key, backbone in table[["curve", "style_key", "backbone"]].drop_duplicates("curve").itertuples(index=False):
        style = curve_style(key, plugins)
        suffix = f" ({display_backbone(backbone)})" if name != key else ""
        styles[name] = CurveStyle(style.colour, style.marker, style.label + suffix)
    order = sorted(styles, key=lambda name: (styles[name].label, name))
    limit = _clip_limit(table["y"].to_numpy())
    clipped = table[table["y"] < limit]

    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.15):
        fig = Figure(figsize=(6.4, 4.6), layout="constrained")
        ax = fig.add_subplot()
        ax.xaxis.get_major_ticks()  # create the tick prototypes now, while the style is active
        ax.yaxis.get_major_ticks()
        ax.axvline(1.0, color="0.55", linestyle=":", linewidth=1.0, zorder=1)
        for name in order:
            style, rows = styles[name], table[table["curve"] == name]
            shown = rows[rows["y"] >= limit]
            front = shown[shown["on_frontier"]].sort_values("x")
            ax.plot(front["x"], front["y"], drawstyle="steps-pre", color=style.colour, linewidth=1.6, zorder=2,
                    gid=f"frontier:{name}")  # fmt: skip
            early = shown[~shown["is_full_model"]]
            for faded, part in ((False, early[early["on_frontier"]]), (True, early[~early["on_frontier"]])):
                ax.plot(part["x"], part["y"], linestyle="none", marker=style.marker, color=style.colour,
                        markersize=7, alpha=0.4 if faded else 1.0, zorder=3,
                        gid=f"{'dominated' if faded else 'points'}:{name}")  # fmt: skip
            full = shown[shown["is_full_model"]]
            ax.plot(full["x"], full["y"], linestyle="none", marker=style.marker, markersize=9,
                    markerfacecolor="white", markeredgecolor=style.colour, markeredgewidth=1.6, zorder=4,
                    gid=f"full:{name}")  # fmt: skip
            # Bars on the frontier and full models only: a bar on every dominated point buries the picture.
            bars = shown[shown["on_frontier"] | shown["is_full_model"]].dropna(subset=["low", "high"])
            if len(bars):
                ax.errorbar(bars["x"], bars["y"], yerr=[bars["y"] - bars["low"], bars["high"] - bars["y"]],
                            fmt="none", ecolor=style.colour, elinewidth=0.9, capsize=2, alpha=0.7, zorder=2)  # fmt: skip
        if len(clipped):
            _draw_clipped(ax, clipped, styles, limit, table)

        handles = [Line2D([], [], color=styles[n].colour, marker=styles[n].marker, linewidth=1.6, markersize=7,
                          label=styles[n].label) for n in order]  # fmt: skip
        handles += [
            Line2D([], [], color="0.3", marker="o", linestyle="none", markerfacecolor="white", markersize=7,
                   label="own full model"),
            Line2D([], [], color="0.3", marker="o", linestyle="none", alpha=0.4, markersize=7, label="dominated"),
        ]  # fmt: skip
        # Four columns fit the figure's width only with short labels ("CALM (ConsistentEE repo)" overflowed it).
        columns = 4 if max(len(handle.get_label()) for handle in handles) <= 18 else 3
        fig.legend(handles=handles, loc="outside lower center", ncol=min(columns, len(handles)), frameon=False,
                   fontsize="small", handlelength=1.6, columnspacing=1.2)  # fmt: skip
        _label_axes(ax, table, speedup, task)
    return fig


def _draw_clipped(ax, clipped: pd.DataFrame, styles: dict, limit: float, table: pd.DataFrame) -> None:
    """Far-off points: a triangle on the lower edge, with their value and speed-up written beside it."""
    shown_low = table.loc[table["y"] >= limit, ["y", "low"]].min().min()
    edge = min(limit, shown_low) - 1.0
    ax.set_ylim(bottom=edge - 0.5)
    for _, row in clipped.iterrows():
        style = styles[row["curve"]]
        ax.plot([row["x"]], [edge], marker="v", color=style.colour, markersize=8, linestyle="none", zorder=4,
                clip_on=False, gid=f"clipped:{row['curve']}")  # fmt: skip
        ax.annotate(f"{style.label}: {row['y']:.1f}", (row["x"], edge), xytext=(5, 4), textcoords="offset points",
                    fontsize="x-small", color=style.colour)  # fmt: skip


def _label_axes(ax, table: pd.DataFrame, speedup: str, task: str) -> None:
    where = ""
    if speedup == "wallclock_speedup":  # only wall-clock depends on batch size and device
        where = f", batch size {table['batch_size'].iloc[0]}, {'/'.join(table.attrs['devices'])}"
    ax.set_xlabel(f"{SPEEDUP_NAMES[speedup]} ({SPEEDUPS[speedup]}{where})")
    names = table.attrs["metric_names"]
    unit = "%" if set(names) <= _PERCENT_METRICS else "×100"
    ax.set_ylabel(f"{'/'.join(METRIC_NAMES.get(m, m) for m in names)} on dev ({unit})")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    seeds = sorted(table["n_seeds"].unique())
    spread = ("bars: ±1 std over seeds" if max(seeds) > 1 else
              "bars: 95% bootstrap interval over dev examples" if table["low"].notna().any() else "no interval stored")
    n = "/".join(map(str, seeds))
    backbones = ", ".join(display_backbone(b) for b in sorted(table["backbone"].unique()))
    ax.set_title(f"{display_task(task)} · {backbones}\n{n} seed{'s' if seeds != [1] else ''}; {spread}",
                 fontsize="medium")


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


def intervals_beside(results_dir: str | Path, beside: Sequence[str | Path] = ()) -> pd.DataFrame | None:
    """Bootstrap intervals (see :func:`eebench.analysis.bootstrap_intervals`) of every directory that stores
    per-example results; None when none does."""
    from eebench.analysis import bootstrap_intervals

    tables = [bootstrap_intervals(folder) for folder in [results_dir, *beside]
              if any((Path(folder) / "examples").glob("*.parquet"))]  # fmt: skip
    return pd.concat(tables, ignore_index=True).drop_duplicates(["job_id", "knob_label"]) if tables else None


def write_figures(
    results_dir: str | Path,
    speedups: Sequence[str] = ("saved_layer_speedup",),
    formats: Sequence[str] = ("png", "pdf"),
    beside: Sequence[str | Path] = (),
    out: str | Path | None = None,
) -> list[Path]:
    """Write one figure per task and speed-up kind to ``out/<task>_<speedup>.<fmt>`` (default
    ``results_dir/figures``).

    Wall-clock speed-up depends on the batch size, so it gets one figure per batch size present
    (``<task>_wallclock_speedup_bs<B>.<fmt>``). ``beside``: other results directories whose curves are
    drawn in the same figures (their records for this directory's tasks; a job stored in both is drawn
    once), e.g. the layer-wise methods beside the token-wise ones. Returns the paths written, in order.
    """
    records = records_beside(results_dir, beside)
    unknown = [s for s in speedups if s not in SPEEDUPS]
    if unknown:
        raise ValueError(f"unknown speed-up(s) {unknown}; choose from {', '.join(SPEEDUPS)}")
    intervals = intervals_beside(results_dir, beside)
    folder = Path(results_dir) / FIGURES_DIR if out is None else Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for task in sorted(records["task"].unique()):
        sizes = sorted(records.loc[records["task"] == task, "batch_size"].unique())
        for speedup in speedups:
            variants = (
                [(int(b), f"_bs{int(b)}") for b in sizes] if speedup == "wallclock_speedup" else [(1, "")]
            )
            for batch_size, suffix in variants:
                fig = tradeoff_figure(records, task, speedup, batch_size, intervals=intervals)
                for fmt in formats:
                    path = folder / f"{safe_name(task)}_{speedup}{suffix}.{fmt}"
                    save_figure(fig, path, fmt)
                    written.append(path)
    return written
