"""Hardness figures: does an example's exit depth follow how hard it is?

(1) mean exit layer per memorized layer (ConsistentEE's hardness score from the stage-1 model), one line per
operating point, Spearman rho in the legend; (2) mean exit layer per known difficulty level (the embedded
`graded` task). Built on `matplotlib.figure.Figure` like `curves.py` (no pyplot state).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from eebench.analysis import hardness_table, load_examples
from eebench.plots.curves import FIGURES_DIR, _atomic_savefig, _safe


def memorized_layer_figure(examples: pd.DataFrame, table: pd.DataFrame, task: str) -> Figure:
    """Mean exit layer (y) per memorized layer (x) on `task`, one line per (method, point)."""
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    chosen = examples[(examples.task == task) & ~examples.knob_label.eq("full model")].dropna(subset=["memorized_layer"])
    for (method, job, knob), group in chosen.groupby(["method", "job_id", "knob_label"]):
        means = group.groupby("memorized_layer").exit_layer.mean()
        rho = table.loc[(table.job_id == job) & (table.knob_label == knob), "spearman_rho"]
        if means.nunique() < 2 and group.exit_layer.nunique() < 2:
            continue  # a point where every example runs the same depth says nothing about hardness
        ax.plot(means.index, means.values, marker="o", label=f"{method} {knob} (rho={float(rho.iloc[0]):.2f})")
    ax.set_xlabel("memorized layer m(x) (stage-1 model; high = hard)")
    ax.set_ylabel("mean exit layer")
    ax.set_title(f"{task}: exit depth vs instance hardness")
    if ax.lines:
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def difficulty_figure(examples: pd.DataFrame, task: str) -> Figure:
    """Mean exit layer per known difficulty level on `task` (bars per operating point that exits early)."""
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    known = examples[(examples.task == task) & (examples.difficulty >= 0) & ~examples.knob_label.eq("full model")]
    table = known.groupby(["method", "knob_label", "difficulty"]).exit_layer.mean().unstack("difficulty")
    table = table[table.max(axis=1) < known.exit_layer.max()]  # drop points that never exit early
    table.index = [f"{method} {knob}" for method, knob in table.index]
    if len(table):
        table.T.plot.bar(ax=ax, rot=0)
        ax.legend(fontsize=6)
    ax.set_xlabel("difficulty level (0 = easiest)")
    ax.set_ylabel("mean exit layer")
    ax.set_title(f"{task}: exit depth per difficulty level")
    fig.tight_layout()
    return fig


def write_hardness_figures(results_dir: str | Path, formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """DIR/figures/<task>_hardness.<fmt> for tasks with memorized layers, <task>_difficulty.<fmt> for tasks
    with difficulty levels. Returns the paths written."""
    examples = load_examples(results_dir)
    out = Path(results_dir) / FIGURES_DIR
    written = []
    figures = []
    if "memorized_layer" in examples and examples.memorized_layer.notna().any():
        table = hardness_table(results_dir)
        for task in sorted(examples.dropna(subset=["memorized_layer"]).task.unique()):
            figures.append((f"{_safe(task)}_hardness", memorized_layer_figure(examples, table, task)))
    for task in sorted(examples[examples.difficulty >= 0].task.unique()):
        figures.append((f"{_safe(task)}_difficulty", difficulty_figure(examples, task)))
    if not figures:
        raise ValueError(f"{results_dir} has neither memorized layers nor difficulty levels to plot")
    for stem, fig in figures:
        for fmt in formats:
            path = out / f"{stem}.{fmt}"
            _atomic_savefig(fig, path, fmt)
            written.append(path)
    return written
