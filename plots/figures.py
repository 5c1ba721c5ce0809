"""The paper-style figure set of a results directory, from stored records only (`eebench figures`).

Per task: quality vs every speed-up kind (wall-clock once per timed batch size), BERTScore vs saved layers
for generation, where examples (or tokens) exit per method; ConsistentEE's hardness figures and the
hardness ablation where the jobs exist; the graded task's difficulty figure; per generation curve, the exit
layer of each generated token of a few prompts. ``index.md`` lists each figure with a one-line caption and
the command that made it, so a figure in a paper can be traced back to records and code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from eebench.leaderboard import SPEEDUPS
from eebench.plots.curves import intervals_beside, records_beside, tradeoff_figure
from eebench.plots.style import (
    FORMATS,
    METRIC_NAMES,
    SPEEDUP_NAMES,
    curve_style,
    display_task,
    safe_name,
    save_figure,
)
from eebench.store import atomic_write_text, commits_line

INDEX_FILE = "index.md"


@dataclass
class FigureEntry:
    """One figure of the set: file ``stem``, a one-line ``caption``, the ``paths`` written (one per format)."""

    stem: str
    caption: str
    paths: list[Path] = field(default_factory=list)


def _has_examples(folder: str | Path) -> bool:
    return any((Path(folder) / "examples").glob("*.parquet"))


def _examples(folders: Sequence[str | Path], tasks) -> pd.DataFrame:
    from eebench.analysis import load_examples

    frames = [load_examples(folder) for folder in folders if _has_examples(folder)]
    if not frames:
        return pd.DataFrame()
    examples = pd.concat(frames, ignore_index=True)
    return examples[examples.task.isin(tasks)]


def figure_set(results_dir: str | Path, beside: Sequence[str | Path] = ()) -> list[tuple[str, Figure, str]]:
    """(stem, figure, caption) of every figure the stored records of `results_dir` (and of `beside`, for the
    same tasks) support, in index order."""
    from eebench.plots.exits import exit_distribution_figure, picked_points, token_exit_figure
    from eebench.plots.hardness import hardness_figures

    records = records_beside(results_dir, beside)
    intervals = intervals_beside(results_dir, beside)
    examples = _examples([results_dir, *beside], records.task.unique())
    figures = []
    for task in sorted(records.task.unique()):
        name, rows = display_task(task), records[records.task == task]
        for speedup in SPEEDUPS:
            sizes = sorted(rows.batch_size.unique()) if speedup == "wallclock_speedup" else [1]
            for size in sizes:
                suffix = f"_bs{int(size)}" if speedup == "wallclock_speedup" else ""
                where = f" at batch size {int(size)}" if speedup == "wallclock_speedup" else ""
                figures.append((f"{safe_name(task)}_{speedup}{suffix}",
                                tradeoff_figure(records, task, speedup, int(size), intervals=intervals),
                                f"{name}: dev {METRIC_NAMES.get(rows.metric_name.iloc[0], rows.metric_name.iloc[0])} vs {SPEEDUP_NAMES[speedup]}{where}, "
                                "every method; frontier steps, own full models hollow."))  # fmt: skip
        generation = rows.metric_name.eq("rougeL").any()
        if rows.metrics.map(lambda m: isinstance(m, dict) and pd.notna(m.get("bertscore_f1"))).any():
            figures.append((f"{safe_name(task)}_bertscore_saved_layer_speedup",
                            tradeoff_figure(records, task, metric="bertscore_f1"),
                            f"{name}: BERTScore F1 vs saved-layer speed-up."))  # fmt: skip
        if len(examples) and (examples.task == task).any():
            figures.append((f"{safe_name(task)}_exit_layers", exit_distribution_figure(records, examples, task),
                            f"{name}: share of dev {'tokens' if generation else 'examples'} exiting at each layer, "
                            "one operating point per method (picked on held-out data where stored)."))  # fmt: skip
            if generation:
                for curve in picked_points(records, task).curve:
                    figures.append((f"{safe_name(task)}_token_exits_{safe_name(curve)}",
                                    token_exit_figure(records, examples, task, curve),
                                    f"{name}: exit layer of each generated token, {curve_style(curve).label}."))  # fmt: skip
    if _has_examples(results_dir):
        figures += hardness_figures(results_dir, [b for b in beside if _has_examples(b)])
    return figures


def write_figure_set(results_dir: str | Path, out: str | Path, beside: Sequence[str | Path] = (),
                     formats: Sequence[str] = ("png", "pdf"), command: str | None = None) -> list[FigureEntry]:
    """Write :func:`figure_set` to ``out/<stem>.<fmt>`` and ``out/index.md``; returns the entries in order.

    ``command``: the command line written into the index (default: the `eebench figures` call that does this).
    Files are byte-identical when regenerated from the same records (see `style.save_figure`)."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown figure format(s) {unknown}; choose from {', '.join(FORMATS)}")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for stem, fig, caption in figure_set(results_dir, beside):
        entry = FigureEntry(stem, caption)
        for fmt in formats:
            entry.paths.append(folder / f"{stem}.{fmt}")
            save_figure(fig, entry.paths[-1], fmt)
        entries.append(entry)
    if command is None:
        command = " ".join(["eebench figures --results", str(results_dir), *(["--beside", *map(str, beside)] if beside
                            else []), "--out", str(out), "--format", *formats])  # fmt: skip
    atomic_write_text(folder / INDEX_FILE, index_markdown(entries, command, [results_dir, *beside]))
    return entries


def index_markdown(entries: Sequence[FigureEntry], command: str, folders: Sequence[str | Path]) -> str:
    """The figure index: a table of figure (links to every format) and caption, the command, the commits."""
    lines = ["# Figures", "", f"Made from stored records by `{command}`.", ""]
    lines += [f"- `{folder}`: {commits_line(folder)}" for folder in folders]
    lines += ["", "| figure | caption |", "|:--|:--|"]
    for entry in entries:
        links = " · ".join(f"[{path.suffix[1:]}]({path.name})" for path in entry.paths)
        lines.append(f"| `{entry.stem}` ({links}) | {entry.caption} |")
    return "\n".join(lines) + "\n"
