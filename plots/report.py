"""`eebench report`: one self-contained static HTML page per set of results directories.

The page holds, from stored records only: the provenance (measuring commits, environment, seeds), a sortable
leaderboard per speed-up kind, every figure of :mod:`eebench.plots.figures` (PNG inlined as base64), the
points table with bootstrap intervals, the training cost, and for generation runs a few prompts with the
full model's output beside each method's early-exit output, every token shaded by the layer it exited at.
No network, no external script or stylesheet: the file can be mailed, archived or opened offline.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import pandas as pd

from eebench.leaderboard import SPEEDUPS, leaderboard, load_records
from eebench.plots.style import METRIC_NAMES, SPEEDUP_NAMES, curve_style, display_task, figure_bytes
from eebench.store import atomic_write_text, commits_line

TEMPLATE = "report.html.j2"


@dataclass
class Table:
    """A sortable table: ``rows`` of (shown text, sort key) cells; numeric sort keys sort as numbers."""

    title: str
    columns: list[str]
    rows: list[list[tuple[str, object]]] = field(default_factory=list)
    note: str = ""


def _pct(value, digits: int = 2) -> tuple[str, object]:
    return ("—", "") if value is None or pd.isna(value) else (f"{100 * value:.{digits}f}", float(value))


def _speed(value) -> tuple[str, object]:
    return ("—", "") if value is None or pd.isna(value) else (f"{value:.2f}×", float(value))


def _text(value) -> tuple[str, object]:
    return str(value), str(value)


def _interval(low, high) -> tuple[str, object]:
    if low is None or pd.isna(low):
        return "—", ""
    return f"{100 * low:.1f} – {100 * high:.1f}", float(low)


def leaderboard_tables(records: pd.DataFrame) -> list[Table]:
    """One table per speed-up kind (wall-clock: per timing batch size) over every task of `records`."""
    kinds = [("saved_layer_speedup", 1), ("flops_speedup", 1)]
    kinds += [("wallclock_speedup", int(b)) for b in sorted(records.batch_size.unique())]
    tables = []
    for speedup, batch_size in kinds:
        board = leaderboard(records, speedup=speedup, batch_size=batch_size)
        where = f", batch size {batch_size}" if speedup == "wallclock_speedup" else ""
        table = Table(f"Leaderboard: {SPEEDUP_NAMES[speedup]}{where}",
                      ["task", "method", "metric", "seeds", "full model", "held-out pick", "metric there",
                       "metric @1.5×", "metric @2×", "speed-up within 1 pt", "AUC 1–3×"],
                      note=f"{SPEEDUPS[speedup]}; metrics ×100 on dev; the held-out pick is chosen on held-out "
                           "training examples, the other columns are dev maxima.")  # fmt: skip
        for row in board.to_dict("records"):
            table.rows.append([
                (display_task(row["task"]), row["task"]), (curve_style(row["method"]).label, row["method"]),
                _text(METRIC_NAMES.get(row["metric_name"], row["metric_name"])), _text(row["seeds"]),
                _pct(row["full_model_metric"]), _speed(row["heldout_pick_speedup"]), _pct(row["heldout_pick_metric"]),
                _pct(row["metric_at_1.5x"]), _pct(row["metric_at_2x"]), _speed(row["best_speedup_within_1pt"]),
                _pct(row["auc"]),
            ])  # fmt: skip
        tables.append(table)
    return tables


def points_table_html(results_dir: str | Path) -> Table:
    """Every operating point with its interval, paired difference from its full model and every speed-up."""
    from eebench.analysis import points_with_intervals

    has_examples = any((Path(results_dir) / "examples").glob("*.parquet"))
    points = points_with_intervals(results_dir, ci=has_examples)
    walls = sorted(c for c in points.columns if c.startswith("wallclock_bs"))
    table = Table(f"Operating points: {results_dir}",
                  ["task", "method", "seed", "point", "metric", "95% CI", "vs full model (paired 95% CI)",
                   "mean exit layer", "saved-layer", "FLOPs", *[f"wall-clock bs {c[12:]}" for c in walls],
                   "fine-tuning (s)"],
                  note="Intervals: percentile bootstrap over dev examples (1000 resamples, seed 0).")  # fmt: skip
    for row in points.to_dict("records"):
        table.rows.append([
            (display_task(row["task"]), row["task"]), (curve_style(row["method"]).label, row["method"]),
            _text(row["seed"]), _text(row["knob_label"]), _pct(row["metric"]),
            _interval(row.get("ci_low"), row.get("ci_high")), _interval(row.get("diff_low"), row.get("diff_high")),
            (f"{row['mean_exit_layer']:.2f}", float(row["mean_exit_layer"])), _speed(row["saved_layer_speedup"]),
            _speed(row["flops_speedup"]), *[_speed(row[c]) for c in walls],
            _text("—") if pd.isna(row.get("train_seconds", math.nan)) else (f"{row['train_seconds']:.0f}",
                                                                               float(row["train_seconds"])),
        ])  # fmt: skip
    return table


def training_table_html(results_dir: str | Path) -> Table | None:
    from eebench.analysis import training_table

    try:
        stages = training_table(results_dir)
    except ValueError:  # written before training stages were recorded
        return None
    table = Table(f"Training cost: {results_dir}", ["task", "method", "seed", "setting", "stage", "steps",
                                                     "seconds", "from cache"])  # fmt: skip
    for row in stages.to_dict("records"):
        table.rows.append([(display_task(row["task"]), row["task"]), (curve_style(row["method"]).label, row["method"]),
                           _text(row["seed"]), _text(row.get("setting", "")), _text(row.get("stage", "")),
                           (str(row.get("steps", "")), float(row.get("steps") or 0)),
                           (f"{row.get('seconds', 0):.1f}", float(row.get("seconds") or 0)),
                           _text("yes" if row.get("from_cache") else "no")])  # fmt: skip
    return table


def _figure_uris(results_dir: str | Path, beside: Sequence[str | Path]) -> list[tuple[str, str, str]]:
    """(stem, caption, data: URI of a PNG) for every figure of the set."""
    from eebench.plots.figures import figure_set

    figures = []
    for stem, fig, caption in figure_set(results_dir, beside):
        png = figure_bytes(fig, "png", dpi=110)  # enough for a screen; the paper files come from `figures`
        figures.append((stem, caption, "data:image/png;base64," + base64.b64encode(png).decode()))
    return figures


def provenance(folders: Sequence[str | Path]) -> list[dict]:
    """Per folder: its commit line, jobs, seeds, tasks, methods and the environment of its first record."""
    rows = []
    for folder in folders:
        records = load_records(folder)
        environment = records.environment.dropna().iloc[0] if "environment" in records else {}
        line = commits_line(folder)  # markdown: the page shows mixed commits as a warning instead of **bold**
        rows.append({"folder": str(folder), "commits": line.replace("**", ""), "mixed": "**" in line,
                     "jobs": records.job_id.nunique(),
                     "seeds": ", ".join(map(str, sorted(records.seed.unique()))),
                     "tasks": ", ".join(display_task(t) for t in sorted(records.task.unique())),
                     "methods": ", ".join(sorted({curve_style(m).label for m in records.method.unique()})),
                     "environment": {k: v for k, v in (environment or {}).items() if k != "git_commit"}})  # fmt: skip
    return rows


def report_html(results_dir: str | Path, beside: Sequence[str | Path] = ()) -> str:
    """The page for `results_dir` (and `beside` directories' jobs on the same tasks) as one HTML string."""
    from eebench.plots.curves import records_beside
    from eebench.plots.samples import generation_samples

    records = records_beside(results_dir, beside)
    folders = [results_dir, *beside]
    points = [points_table_html(folder) for folder in folders]
    training = [t for t in map(training_table_html, folders) if t is not None]
    environment = jinja2.Environment(loader=jinja2.PackageLoader("eebench.plots", "."),
                                     autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined)
    return environment.get_template(TEMPLATE).render(
        title=f"eebench report: {Path(results_dir).name}", provenance=provenance(folders),
        leaderboards=leaderboard_tables(records), figures=_figure_uris(results_dir, beside), points=points,
        training=training, samples=generation_samples(records, folders))


def write_report(results_dir: str | Path, out: str | Path, beside: Sequence[str | Path] = ()) -> Path:
    """Write :func:`report_html` to `out` atomically; returns the path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, report_html(results_dir, beside))
    return path
