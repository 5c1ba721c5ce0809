"""Where examples (or generated tokens) exit: one operating point per curve, picked without looking at dev.

(1) ``exit_distribution_figure``: per curve on a task, the share of dev examples (classification) or of
generated tokens (generation) that stop at each layer, one small panel per curve. (2) ``token_exit_figure``:
the exit layer of every generated token of a few prompts, one row per prompt, so the reader sees where
along a sequence a method saves depth. Built on ``matplotlib.figure.Figure`` like ``curves.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from eebench.leaderboard import held_out_pick_row, operating_points
from eebench.plots.style import curve_style, display_backbone, display_task

# The dev fallback when a job stored no selection set: within this much (metric scale) of its own full model.
PICK_TOLERANCE = 0.01


def picked_points(records: pd.DataFrame, task: str, plugins: list[str] | None = None) -> pd.DataFrame:
    """One operating point per curve on ``task`` (seed 0, else the lowest seed; its first job): the held-out
    pick of :func:`eebench.leaderboard.held_out_pick_row`, else the fastest dev point within PICK_TOLERANCE of
    the job's own full model; when neither exits early, the early-exit point with the best dev metric. Points
    that save no layer are not candidates. Columns: curve, label, job_id, knob_label, saved_layer_speedup, metric, rule."""
    points = operating_points(records[records["task"] == task], 1)
    points = points.assign(curve=points["curve"].fillna(points["method"]) if "curve" in points else points["method"])
    rows = []
    for curve, group in points.groupby("curve", sort=True):
        job = group[group["seed"] == group["seed"].min()]
        job = job[job["job_id"] == job["job_id"].iloc[0]]
        full, early = job[job["is_full_model"]], job[~job["is_full_model"]]
        early = early[early["saved_layer_speedup"] > 1.0 + 1e-9]
        best, rule = held_out_pick_row(full, early, PICK_TOLERANCE), "held-out pick"
        if best is None:
            near = early[early["metric"] >= full["metric"].mean() - PICK_TOLERANCE] if len(full) else early
            best = near.sort_values("saved_layer_speedup").iloc[-1] if len(near) else None
            rule = "fastest within 1 point on dev"
        if (best is None or bool(best["is_full_model"])) and len(early):
            # Nothing keeps quality: show the gentlest early exit rather than a full model that never exits.
            best, rule = early.sort_values("metric").iloc[-1], "best early exit on dev"
        best = job.iloc[0] if best is None else best
        rows.append({"curve": curve, "label": curve_style(curve, plugins).label, "job_id": best["job_id"],
                     "knob_label": best["knob_label"], "saved_layer_speedup": float(best["saved_layer_speedup"]),
                     "metric": float(best["metric"]), "num_layers": int(best["num_layers"]), "rule": rule})
    return pd.DataFrame(rows)


def _exit_layers(examples: pd.DataFrame, job_id: str, knob: str) -> tuple[np.ndarray, str]:
    """Exit layer per dev example, or per generated token when the rows carry ``token_layers``; for token-wise
    classification (every example's [CLS] runs to the top) each example's token-weighted depth, rounded.
    Returns (layers, what they are)."""
    rows = examples[(examples["job_id"] == job_id) & (examples["knob_label"] == knob)]
    if "split" in rows:
        rows = rows[rows["split"].fillna("dev") == "dev"]
    if "token_layers" in rows and rows["token_layers"].notna().any():
        return np.concatenate([np.asarray(t, dtype=int) for t in rows["token_layers"].dropna()]), "exit layer"
    if "mean_token_layer" in rows and (rows["mean_token_layer"].notna()
                                       & (rows["mean_token_layer"] != rows["exit_layer"])).any():
        return np.rint(rows["mean_token_layer"].to_numpy()).astype(int), "token-weighted depth"
    return rows["exit_layer"].to_numpy(dtype=int), "exit layer"


def exit_distribution_figure(records: pd.DataFrame, examples: pd.DataFrame, task: str,
                             plugins: list[str] | None = None) -> Figure:
    """Share of examples (tokens for generation) exiting at each layer, one panel per curve on ``task``."""
    picks = picked_points(records, task, plugins)
    if picks.empty:
        raise ValueError(f"no operating point of task {task!r} to draw")
    unit = "generated tokens" if "token_layers" in examples and examples["token_layers"].notna().any() else "examples"
    columns = min(3, len(picks))
    rows = math.ceil(len(picks) / columns)
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        fig = Figure(figsize=(max(4.8, 3.4 * columns), 2.6 * rows + 0.6), layout="constrained")  # titles fit
        axes = fig.subplots(rows, columns, squeeze=False, sharey=True)
        for ax, pick in zip(axes.flat, picks.itertuples(index=False), strict=False):
            layers, what = _exit_layers(examples, pick.job_id, pick.knob_label)
            share = np.bincount(layers, minlength=pick.num_layers + 1)[1:] / max(len(layers), 1)
            style = curve_style(pick.curve, plugins)
            ax.bar(np.arange(1, pick.num_layers + 1), 100 * share, color=style.colour, width=0.8,
                   gid=f"exits:{pick.curve}")  # fmt: skip
            ax.set_title(f"{pick.label}\n{pick.knob_label}\n{pick.saved_layer_speedup:.2f}× saved-layer, "
                         f"{100 * pick.metric:.1f} on dev; {pick.rule}", fontsize="x-small")  # fmt: skip
            ax.set_xlabel(what)
            ax.set_xlim(0.4, pick.num_layers + 0.6)
        for ax in axes[:, 0]:
            ax.set_ylabel(f"% of dev {unit}")
        for ax in list(axes.flat)[len(picks):]:
            ax.set_visible(False)
        backbones = ", ".join(display_backbone(b) for b in sorted(records.loc[records.task == task, "backbone"].unique()))
        fig.suptitle(f"{display_task(task)} · {backbones}: where {unit} exit", fontsize="medium")
    return fig


def token_exit_figure(records: pd.DataFrame, examples: pd.DataFrame, task: str, curve: str,
                      n_prompts: int = 8, plugins: list[str] | None = None) -> Figure:
    """Exit layer of each generated token (columns) of the first ``n_prompts`` dev prompts (rows), at the
    picked point of ``curve`` on ``task``; grey where a sequence has ended."""
    picks = picked_points(records, task, plugins)
    if curve not in set(picks["curve"]):
        raise ValueError(f"no curve {curve!r} on task {task!r} (curves: {', '.join(picks['curve'])})")
    pick = picks[picks["curve"] == curve].iloc[0]
    rows = examples[(examples["job_id"] == pick["job_id"]) & (examples["knob_label"] == pick["knob_label"])]
    if "split" in rows:
        rows = rows[rows["split"].fillna("dev") == "dev"]
    rows = rows.sort_values("example").head(n_prompts)
    if rows.empty or "token_layers" not in rows:
        raise ValueError(f"{curve} on {task}: no generated tokens stored for {pick['knob_label']}")
    width = max(len(t) for t in rows["token_layers"])
    grid = np.full((len(rows), width), np.nan)
    for i, layers in enumerate(rows["token_layers"]):
        grid[i, : len(layers)] = layers
    with sns.axes_style("white"), sns.plotting_context("paper"):
        fig = Figure(figsize=(min(12.0, 2.0 + 0.14 * width), 0.9 + 0.32 * len(rows)), layout="constrained")
        ax = fig.add_subplot()
        ax.set_facecolor("0.92")
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=1, vmax=int(pick["num_layers"]),
                          interpolation="nearest")  # fmt: skip
        fig.colorbar(image, ax=ax, label="exit layer", pad=0.01)
        ax.set_yticks(range(len(rows)), [f"prompt {int(e)}" for e in rows["example"]])
        ax.set_xlabel("generated token position")
        ax.set_title(f"{display_task(task)}: {pick['label']} at {pick['knob_label']} "
                     f"({pick['saved_layer_speedup']:.2f}× saved-layer; {pick['rule']})", fontsize="medium")  # fmt: skip
    return fig
