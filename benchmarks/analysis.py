"""Per-example analyses of a results directory (the per-example tables in DIR/examples/)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from eebench.leaderboard import load_records


def load_examples(results_dir: str | Path) -> pd.DataFrame:
    """All per-example rows of a results directory, joined with their job's method, task and seed."""
    root = Path(results_dir)
    paths = sorted((root / "examples").glob("*.parquet"))
    if not paths:
        raise FileNotFoundError(f"no per-example results under {root / 'examples'}: run `eebench run --out {root}` first")
    jobs = load_records(root)[["job_id", "method", "task", "seed", "backbone"]].drop_duplicates("job_id")
    examples = pd.concat([pd.read_parquet(path) for path in paths], ignore_index=True)
    return examples.merge(jobs, on="job_id", how="inner")


def difficulty_table(results_dir: str | Path) -> pd.DataFrame:
    """Mean exit layer and accuracy per known difficulty level, for every operating point of every job
    whose task carries difficulties (the embedded `graded` task). Columns: exit@<level>, acc@<level>."""
    examples = load_examples(results_dir)
    examples = examples[examples.difficulty >= 0]
    if examples.empty:
        raise ValueError(f"no example in {results_dir} has a known difficulty: only the `graded` task has them")
    examples = examples.assign(correct=(examples.prediction == examples.label).astype(float))
    keys = ["task", "method", "seed", "knob_label"]
    grouped = examples.groupby([*keys, "difficulty"]).agg(exit=("exit_layer", "mean"), acc=("correct", "mean"))
    table = grouped.unstack("difficulty")
    table.columns = [f"{name}@{level}" for name, level in table.columns]
    return table.reset_index()
