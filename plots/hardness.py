"""Hardness figures: does an example's exit depth follow how hard it is?

(1) mean exit layer per memorized layer (ConsistentEE's hardness score from the stage-1 model), one line per
operating point, Spearman rho in the legend; (2) the memorized-layer x exit-layer heat map of one point
(each row: where the examples of that memorized layer exit); (3) the paper's ablation, hardness weighting
on vs off at equal alpha, as bars; (4) mean exit layer per known difficulty level (the embedded `graded`
task). Built on `matplotlib.figure.Figure` like `curves.py` (no pyplot state).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from eebench.analysis import hardness_table, load_examples
from eebench.plots.curves import FIGURES_DIR
from eebench.plots.style import curve_style, display_task, safe_name, save_figure


def _early_points(examples: pd.DataFrame, task: str) -> pd.DataFrame:
    chosen = examples[(examples.task == task) & ~examples.knob_label.eq("full model")]
    return chosen.dropna(subset=["memorized_layer"])


def memorized_layer_figure(examples: pd.DataFrame, table: pd.DataFrame, task: str,
                           job_notes: dict[str, str] | None = None) -> Figure:
    """Mean exit layer (y) per memorized layer (x) on `task`, one line per (method, point); `job_notes`: text
    added to a job's labels (e.g. "hardness off"), by job id."""
    groups = list(_early_points(examples, task).groupby(["method", "job_id", "knob_label"]))
    colours = sns.color_palette("rocket", max(len(groups), 1))  # one method's points: one sequential palette
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        fig = Figure(figsize=(6.0, 4.2), layout="constrained")
        ax = fig.add_subplot()
        for colour, ((method, job, knob), group) in zip(colours, groups, strict=False):
            means = group.groupby("memorized_layer").exit_layer.mean()
            rho = table.loc[(table.job_id == job) & (table.knob_label == knob), "spearman_rho"]
            if means.nunique() < 2 and group.exit_layer.nunique() < 2:
                continue  # a point where every example runs the same depth says nothing about hardness
            note = (job_notes or {}).get(job, "")
            ax.plot(means.index, means.values, marker="o", color=colour, label=f"{curve_style(method).label} "
                    f"{knob}{note} (ρ = {float(rho.iloc[0]):.2f})")  # fmt: skip
        ax.set_xlabel("memorized layer m(x) (stage-1 model; high = hard)")
        ax.set_ylabel("mean exit layer on dev")
        ax.set_title(f"{display_task(task)}: exit depth vs instance hardness", fontsize="medium")
        if ax.lines:
            fig.legend(loc="outside lower center", ncol=2, fontsize="x-small", frameon=False)
    return fig


def memorized_exit_heatmap(examples: pd.DataFrame, table: pd.DataFrame, task: str) -> Figure:
    """Share of each memorized layer's dev examples (rows) exiting at each layer (columns), for the point of
    `task` whose exit depth follows hardness most (highest Spearman rho), ρ in the title."""
    candidates = table[(table.task == task) & table.spearman_rho.notna() & ~table.knob_label.eq("full model")]
    if candidates.empty:
        raise ValueError(f"no early-exit point on {task!r} with a defined Spearman rho (every point is constant)")
    best = candidates.sort_values("spearman_rho").iloc[-1]
    rows = examples[(examples.job_id == best.job_id) & (examples.knob_label == best.knob_label)]
    counts = pd.crosstab(rows.memorized_layer.astype(int), rows.exit_layer.astype(int))
    share = counts.div(counts.sum(axis=1), axis=0) * 100
    with sns.axes_style("white"), sns.plotting_context("paper"):
        fig = Figure(figsize=(5.6, 4.4), layout="constrained")
        ax = fig.add_subplot()
        sns.heatmap(share, ax=ax, cmap="mako_r", vmin=0, vmax=100, annot=True, fmt=".0f", annot_kws={"size": 7},
                    cbar_kws={"label": "% of the row's dev examples"})  # fmt: skip
        ax.set_xlabel("exit layer")
        ax.set_ylabel("memorized layer m(x)  (n per row on the right)")
        for i, n in enumerate(counts.sum(axis=1)):
            ax.text(share.shape[1] + 0.05, i + 0.5, f"n={n}", va="center", fontsize=6)
        ax.set_title(f"{display_task(task)}: {curve_style(best.method).label} {best.knob_label} "
                     f"(ρ = {best.spearman_rho:.2f}, {int(best.n)} examples)", fontsize="small")  # fmt: skip
    return fig


def ablation_table(records: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Hardness weighting on vs off, at equal alpha, for ConsistentEE jobs whose configuration says which:
    one row per (task, alpha, hardness_weighting) at the policy's default rule (exit_threshold 0.5, else the
    threshold nearest it), with metric, saved_layer_speedup and spearman_rho. Only alphas measured both ways."""
    cee = records[(records.method == "consistentee") & ~records.is_full_model & (records.batch_size == records.batch_size.min())]
    rows = []
    for job_id, job in cee.groupby("job_id"):
        config = job.config.iloc[0].get("method_config", {}) if isinstance(job.config.iloc[0], dict) else {}
        thresholds = job.knob.map(lambda k: k.get("exit_threshold", np.nan))
        point = job.loc[(thresholds - 0.5).abs().idxmin()]
        rho = table.loc[(table.job_id == job_id) & (table.knob_label == point.knob_label), "spearman_rho"]
        rows.append({"task": point.task, "alpha": float(config.get("alpha", point.knob.get("alpha", np.nan))),
                     "hardness_weighting": bool(config.get("hardness_weighting", True)), "job_id": job_id,
                     "knob_label": point.knob_label, "metric": float(point.metric),
                     "saved_layer_speedup": float(point.saved_layer_speedup),
                     "spearman_rho": float(rho.iloc[0]) if len(rho) else np.nan})  # fmt: skip
    frame = pd.DataFrame(rows, columns=["task", "alpha", "hardness_weighting", "job_id", "knob_label", "metric",
                                        "saved_layer_speedup", "spearman_rho"])  # fmt: skip
    both = frame.groupby(["task", "alpha"]).hardness_weighting.transform("nunique") == 2
    return frame[both].sort_values(["task", "alpha", "hardness_weighting"], ascending=[True, True, False])


def ablation_figure(ablation: pd.DataFrame, task: str) -> Figure:
    """Bars of dev metric, saved-layer speed-up and Spearman rho, hardness weighting on vs off, per alpha."""
    rows = ablation[ablation.task == task]
    if rows.empty:
        raise ValueError(f"no ConsistentEE alpha on {task!r} measured with hardness weighting both on and off")
    panels = (("metric", "dev metric (×100)", 100), ("saved_layer_speedup", "saved-layer speed-up", 1),
              ("spearman_rho", "ρ(memorized, exit layer)", 1))
    colour = curve_style("consistentee").colour
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        fig = Figure(figsize=(7.5, 2.8), layout="constrained")
        axes = fig.subplots(1, 3)
        alphas = sorted(rows.alpha.unique())
        for ax, (column, label, scale) in zip(axes, panels, strict=True):
            for offset, (on, hatch) in ((-0.2, (True, "")), (0.2, (False, "//"))):
                part = rows[rows.hardness_weighting == on].set_index("alpha").reindex(alphas)
                ax.bar(np.arange(len(alphas)) + offset, part[column] * scale, width=0.38, color=colour,
                       alpha=1.0 if on else 0.55, hatch=hatch, edgecolor="0.2",
                       label="hardness on: −CE − α(1 − m/L)e" if on else "hardness off: −CE − αe")  # fmt: skip
            ax.set_xticks(range(len(alphas)), [f"α = {a:g}" for a in alphas])
            ax.set_title(label, fontsize="small")
            if column == "metric":
                low = (rows[column] * scale).min()
                ax.set_ylim(bottom=max(0.0, low - 5))
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize="small",
                   frameon=False)  # fmt: skip
        fig.suptitle(f"{display_task(task)}: ConsistentEE's hardness weighting on vs off (exit rule P > 0.5)",
                     fontsize="medium")  # fmt: skip
    return fig


def difficulty_figure(examples: pd.DataFrame, task: str) -> Figure:
    """Mean exit layer per known difficulty level on `task` (bars per operating point that exits early)."""
    known = examples[(examples.task == task) & (examples.difficulty >= 0) & ~examples.knob_label.eq("full model")]
    table = known.groupby(["method", "knob_label", "difficulty"]).exit_layer.mean().unstack("difficulty")
    table = table[table.max(axis=1) < known.exit_layer.max()]  # drop points that never exit early
    colours = [curve_style(method).colour for method, _ in table.index]
    table.index = [f"{curve_style(method).label} {knob}" for method, knob in table.index]
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        fig = Figure(figsize=(6.4, 4.4), layout="constrained")
        ax = fig.add_subplot()
        width = 0.8 / max(len(table), 1)
        for i, (name, row) in enumerate(table.iterrows()):
            ax.bar(np.arange(len(row)) + (i - (len(table) - 1) / 2) * width, row.values, width=width * 0.95,
                   color=colours[i], alpha=0.55 + 0.45 * (i % 2), label=name)  # fmt: skip
        ax.set_xticks(range(table.shape[1]), [str(int(level)) for level in table.columns])
        ax.set_xlabel("difficulty level (0 = easiest)")
        ax.set_ylabel("mean exit layer on dev")
        ax.set_title(f"{display_task(task)}: exit depth per difficulty level", fontsize="medium")
        if len(table):
            fig.legend(loc="outside lower center", ncol=3, fontsize="x-small", frameon=False)
    return fig


def _beside(results_dir: str | Path, beside: Sequence[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Examples and hardness table of `results_dir` and of `beside` (only this directory's tasks)."""
    folders = [results_dir, *beside]
    examples = pd.concat([load_examples(f) for f in folders], ignore_index=True)
    examples = examples[examples.task.isin(load_examples(results_dir).task.unique())].drop_duplicates(
        ["job_id", "knob_label", "example"] + (["split"] if "split" in examples else []))
    if "memorized_layer" not in examples or examples.memorized_layer.isna().all():
        return examples, None
    tables = []
    for folder in folders:
        try:
            tables.append(hardness_table(folder))
        except ValueError:  # a beside directory without ConsistentEE jobs
            continue
    return examples, pd.concat(tables, ignore_index=True).drop_duplicates(["job_id", "knob_label"])


def hardness_figures(results_dir: str | Path, beside: Sequence[str | Path] = ()) -> list[tuple[str, Figure, str]]:
    """(file stem, figure, caption) for every hardness figure `results_dir` supports (see the module docstring),
    with the jobs of `beside` directories on the same tasks drawn too (the ablation's "on" job may live in
    another directory than its "off" job)."""
    from eebench.plots.curves import records_beside

    examples, table = _beside(results_dir, beside)
    records = records_beside(results_dir, beside)
    off = records[records.config.map(lambda c: isinstance(c, dict) and
                                     c.get("method_config", {}).get("hardness_weighting") is False)]
    notes = dict.fromkeys(off.job_id, ", hardness off")
    figures = []
    if table is not None:
        for task in sorted(examples.dropna(subset=["memorized_layer"]).task.unique()):
            name = display_task(task)
            figures.append((f"{safe_name(task)}_hardness", memorized_layer_figure(examples, table, task, notes),
                            f"{name}: mean exit layer per memorized layer, one line per ConsistentEE point."))
            if table[(table.task == task) & ~table.knob_label.eq("full model")].spearman_rho.notna().any():
                figures.append((f"{safe_name(task)}_memorized_exit", memorized_exit_heatmap(examples, table, task),
                                f"{name}: where each memorized layer's examples exit (the point with the highest ρ)."))
        ablation = ablation_table(records, table)
        for task in sorted(ablation.task.unique()):
            figures.append((f"{safe_name(task)}_hardness_ablation", ablation_figure(ablation, task),
                            f"{display_task(task)}: ConsistentEE with the hardness weighting on vs off at equal α."))
    if "difficulty" in examples:
        for task in sorted(examples[examples.difficulty >= 0].task.unique()):
            figures.append((f"{safe_name(task)}_difficulty", difficulty_figure(examples, task),
                            f"{display_task(task)}: mean exit layer per known difficulty level."))
    return figures


def write_hardness_figures(results_dir: str | Path, formats: tuple[str, ...] = ("png", "pdf"),
                           out: str | Path | None = None) -> list[Path]:
    """Write :func:`hardness_figures` to ``out`` (default DIR/figures) as ``<stem>.<fmt>``; returns the paths."""
    figures = hardness_figures(results_dir)
    if not figures:
        raise ValueError(f"{results_dir} has neither memorized layers nor difficulty levels to plot")
    folder = Path(results_dir) / FIGURES_DIR if out is None else Path(out)
    written = []
    for stem, fig, _ in figures:
        for fmt in formats:
            path = folder / f"{stem}.{fmt}"
            save_figure(fig, path, fmt)
            written.append(path)
    return written
