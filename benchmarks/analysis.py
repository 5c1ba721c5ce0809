"""Per-example analyses of a results directory (the per-example tables in DIR/examples/)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from eebench.leaderboard import load_records


def load_examples(results_dir: str | Path) -> pd.DataFrame:
    """All per-example rows of a results directory, joined with their job's method, task and seed."""
    root = Path(results_dir)
    paths = sorted((root / "examples").glob("*.parquet"))
    if not paths:
        raise FileNotFoundError(f"no per-example results under {root / 'examples'}: run `eebench run --out {root}` first")
    jobs = load_records(root)[["job_id", "method", "task", "seed", "backbone", "metric_name"]].drop_duplicates("job_id")
    examples = pd.concat([pd.read_parquet(path) for path in paths], ignore_index=True)
    return examples.merge(jobs, on="job_id", how="inner")


def difficulty_table(results_dir: str | Path) -> pd.DataFrame:
    """Mean exit layer and accuracy per known difficulty level, for every operating point of every job
    whose task carries difficulties (the embedded `graded` task). Columns: exit@<level>, acc@<level>."""
    examples = load_examples(results_dir)
    if "difficulty" not in examples:
        raise ValueError(f"no example in {results_dir} has a known difficulty: only the `graded` task has them")
    examples = examples[examples.difficulty >= 0]
    if examples.empty:
        raise ValueError(f"no example in {results_dir} has a known difficulty: only the `graded` task has them")
    examples = examples.assign(correct=(examples.prediction == examples.label).astype(float))
    keys = ["task", "method", "seed", "knob_label"]
    grouped = examples.groupby([*keys, "difficulty"]).agg(exit=("exit_layer", "mean"), acc=("correct", "mean"))
    table = grouped.unstack("difficulty")
    table.columns = [f"{name}@{level}" for name, level in table.columns]
    return table.reset_index()


def training_table(results_dir: str | Path) -> pd.DataFrame:
    """One row per training stage of every job: its cost (steps, seconds, from_cache) and the statistics the
    method logged (`mean_*` columns, e.g. ConsistentEE's sampled vs greedy exit layer and mean reward)."""
    records = load_records(results_dir).drop_duplicates("job_id")
    if "train_stages" not in records:
        raise ValueError(f"{results_dir} was written before training stages were recorded: rerun it")
    rows = []
    for record in records.itertuples():
        config = record.method_config if isinstance(getattr(record, "method_config", None), dict) else {}
        setting = ", ".join(f"{k}={v}" for k, v in config.items() if k in ("alpha", "hardness_weighting", "num_buckets"))
        for stage in record.train_stages if isinstance(record.train_stages, list) else []:
            rows.append({"task": record.task, "method": record.method, "seed": record.seed, "setting": setting,
                         **{k: v for k, v in stage.items() if k != "final_loss"}})
    table = pd.DataFrame(rows)
    if "from_cache" in table:
        table["from_cache"] = table["from_cache"].astype("boolean").fillna(False)
    return table


def hardness_table(results_dir: str | Path) -> pd.DataFrame:
    """How exit depth follows instance hardness, for every operating point of every job whose method stored a
    per-example `memorized_layer` (ConsistentEE): Spearman rho between memorized layer and exit layer on dev
    (scipy, ties averaged; NaN when either is constant), its p-value, and the mean of both."""
    from scipy.stats import spearmanr

    examples = load_examples(results_dir)
    if "memorized_layer" not in examples or examples["memorized_layer"].isna().all():
        raise ValueError(f"no job in {results_dir} stored a memorized layer per example: run a method that "
                         "annotates it (consistentee) with `eebench run`")
    examples = examples.dropna(subset=["memorized_layer"])
    rows = []
    for (task, method, seed, job, knob), group in examples.groupby(["task", "method", "seed", "job_id", "knob_label"]):
        constant = group.exit_layer.nunique() < 2 or group.memorized_layer.nunique() < 2
        rho, p_value = (float("nan"), float("nan")) if constant else spearmanr(group.memorized_layer, group.exit_layer)
        rows.append({"task": task, "method": method, "seed": seed, "job_id": job, "knob_label": knob,
                     "n": len(group), "spearman_rho": float(rho), "p_value": float(p_value),
                     "mean_memorized_layer": group.memorized_layer.mean(), "mean_exit_layer": group.exit_layer.mean()})
    return pd.DataFrame(rows)


def bootstrap_draws(results_dir: str | Path, n_resamples: int = 1000,
                    seed: int = 0) -> dict[tuple[str, str], np.ndarray]:
    """Percentile-bootstrap raw material: {(job_id, knob_label): (n_resamples,) primary metric on resampled dev
    examples}. Resample r draws the same example indices for every point of every job with the same number of
    dev examples (one seeded generator per job, same seed), so draws are paired across points, jobs and seeds
    of a task: a seed mean or a max over points computed per r is a valid bootstrap of that statistic."""
    return _draws(load_examples(results_dir), n_resamples, seed)


@dataclass(frozen=True)
class ScoredTask:
    """A task eebench does not register, such as an lm-eval task measured by `eebench lm-eval`: generation-kind,
    its per-prompt `primary_metric` scores stored with the examples (what `_point_metric` averages)."""

    name: str
    primary_metric: str
    kind: str = "generation"


def task_spec(name: str, metric_name: str):
    """The registered spec of task `name`, else a `ScoredTask` scored by its records' `metric_name`."""
    from eebench.tasks import UnknownTaskError, get_task

    try:
        return get_task(name)
    except UnknownTaskError:
        return ScoredTask(name, metric_name)


def _dev_rows(examples: pd.DataFrame) -> pd.DataFrame:
    """Generation jobs also store their calibration prompts (split = "calibration"); intervals are over dev."""
    return examples[examples["split"].fillna("dev") == "dev"] if "split" in examples else examples


def _point_metric(spec, point: pd.DataFrame, resamples: np.ndarray | None = None) -> np.ndarray | float:
    """The primary metric of one point on its dev rows, or on each resample (R, N) of them. Generation metrics
    are means of per-prompt scores (stored per row); classification ones are computed from predictions."""
    from eebench.metrics import compute_metrics, resampled_metric

    if spec.kind == "generation":
        scores = point[spec.primary_metric].to_numpy(dtype=np.float64)
        return scores.mean() if resamples is None else scores[resamples].mean(1)
    if resamples is None:
        return compute_metrics(spec, point.prediction.to_numpy(), point.label.to_numpy())[spec.primary_metric]
    return resampled_metric(spec, point.prediction.to_numpy(), point.label.to_numpy(), resamples)


def _draws(examples: pd.DataFrame, n_resamples: int, seed: int) -> dict[tuple[str, str], np.ndarray]:
    draws: dict[tuple[str, str], np.ndarray] = {}
    for job_id, job in _dev_rows(examples).groupby("job_id", sort=True):
        spec = task_spec(job.task.iloc[0], job.metric_name.iloc[0])
        size = int(job[job.knob_label == job.knob_label.iloc[0]].shape[0])
        resamples = np.random.default_rng(seed).integers(0, size, size=(n_resamples, size))
        for knob, point in job.groupby("knob_label", sort=False):
            draws[(job_id, knob)] = _point_metric(spec, point.sort_values("example"), resamples)
    return draws


def bootstrap_intervals(results_dir: str | Path, n_resamples: int = 1000, confidence: float = 0.95,
                        seed: int = 0) -> pd.DataFrame:
    """Percentile bootstrap over dev examples of every operating point's primary metric.

    One row per (job_id, knob_label): `metric` (on all examples), `ci_low`, `ci_high` (0..1 scale like the
    records), and `diff_low`, `diff_high`: the interval of metric(point) - metric(the job's full model) from the
    same resamples (paired: both are scored on the same examples, so the per-example spread they share cancels;
    an interval that excludes 0 resolves the difference, where overlapping `ci_*` intervals need not mean
    anything). The generator is seeded (`seed`), so the intervals are reproducible."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    examples = _dev_rows(load_examples(results_dir))
    draws = _draws(examples, n_resamples, seed)
    rows = []
    for (job_id, knob), point in examples.groupby(["job_id", "knob_label"], sort=True):
        spec = task_spec(point.task.iloc[0], point.metric_name.iloc[0])
        metric = float(_point_metric(spec, point))
        quantiles = [(1 - confidence) / 2, (1 + confidence) / 2]
        low, high = np.quantile(draws[(job_id, knob)], quantiles)
        full = draws.get((job_id, "full model"))
        diff_low, diff_high = (np.nan, np.nan) if full is None else np.quantile(draws[(job_id, knob)] - full, quantiles)
        rows.append({"job_id": job_id, "task": spec.name, "method": point.method.iloc[0], "seed": point.seed.iloc[0],
                     "knob_label": knob, "metric": metric, "ci_low": float(low), "ci_high": float(high),
                     "diff_low": float(diff_low), "diff_high": float(diff_high)})
    return pd.DataFrame(rows)


def timed_saved_layer_speedups(results_dir: str | Path) -> pd.DataFrame:
    """(job_id, knob_label, timed_saved_layer_speedup) recomputed from the stored examples: the saved-layer
    speed-up over the first `n_timed_examples` dev examples, the ones wall-clock was measured on. Token-wise
    jobs (an example's token-weighted depth differs from its exit layer) are token-weighted, as in the runner.
    For records written before the runner stored the field."""
    examples = load_examples(results_dir)
    records = load_records(results_dir)
    timed = records.drop_duplicates("job_id").set_index("job_id")[["n_timed_examples", "num_layers"]]
    rows = []
    for (job_id, knob), point in examples.groupby(["job_id", "knob_label"], sort=True):
        if job_id not in timed.index or pd.isna(timed.at[job_id, "n_timed_examples"]):
            continue
        n, layers = int(timed.at[job_id, "n_timed_examples"]), int(timed.at[job_id, "num_layers"])
        head = point.sort_values("example").iloc[:n]
        # Layer-wise examples stored before the token-wise methods landed have no mean_token_layer column.
        token_wise = "mean_token_layer" in head and bool(
            (head.mean_token_layer.notna() & (head.mean_token_layer != head.exit_layer)).any())
        speedup = (layers * head.n_tokens.sum() / (head.mean_token_layer * head.n_tokens).sum() if token_wise
                   else layers * len(head) / head.exit_layer.sum())
        rows.append({"job_id": job_id, "knob_label": knob, "timed_saved_layer_speedup": float(speedup)})
    return pd.DataFrame(rows, columns=["job_id", "knob_label", "timed_saved_layer_speedup"])


def with_timed_saved_layer_speedups(records: pd.DataFrame, results_dir: str | Path) -> pd.DataFrame:
    """`records` with missing `timed_saved_layer_speedup` filled from the stored examples (records written
    before the runner stored it); unchanged when no examples are stored (realization then falls back to the
    whole dev set's saved layers)."""
    try:
        recomputed = timed_saved_layer_speedups(results_dir)
    except FileNotFoundError:
        return records
    labels = records["knob_label"].where(~records["is_full_model"], "full model")
    lookup = recomputed.set_index(["job_id", "knob_label"])["timed_saved_layer_speedup"]
    filled = pd.Series([lookup.get(key, float("nan")) for key in zip(records["job_id"], labels, strict=True)],
                       index=records.index)
    current = records["timed_saved_layer_speedup"] if "timed_saved_layer_speedup" in records else filled * float("nan")
    return records.assign(timed_saved_layer_speedup=current.fillna(filled))


def with_floor_metrics(records: pd.DataFrame, results_dir: str | Path) -> pd.DataFrame:
    """`records` with missing `floor_metric` (classification and regression records written before the runner
    stored it) computed from each job's stored dev labels (`metrics.trivial_floor`); unchanged without examples."""
    from eebench.metrics import trivial_floor

    current = records["floor_metric"] if "floor_metric" in records else pd.Series(np.nan, index=records.index)
    missing = records.loc[current.isna(), ["job_id", "task", "metric_name"]].drop_duplicates("job_id")
    if missing.empty:
        return records
    floors = {}
    for job_id, task, metric_name in missing.itertuples(index=False):
        spec = task_spec(task, metric_name)
        path = Path(results_dir) / "examples" / f"{job_id}.parquet"
        if spec.kind == "generation" or not path.exists():
            continue
        examples = pd.read_parquet(path, columns=["knob_label", "example", "label"])
        full = examples[examples.knob_label == "full model"].sort_values("example")
        if len(full):
            floors[job_id] = trivial_floor(spec, full["label"].to_numpy())[0]
    return records.assign(floor_metric=current.fillna(records["job_id"].map(floors)))


def points_with_intervals(results_dir: str | Path, ci: bool = False) -> pd.DataFrame:
    """`leaderboard.points_table` of a results directory, completed for older records (timed saved layers,
    floor metrics from the stored examples); with ``ci``, each point's bootstrap interval (`ci_low`, `ci_high`)
    and paired difference from its job's full model (`diff_low`, `diff_high`) from :func:`bootstrap_intervals`."""
    from eebench.leaderboard import points_table

    records = load_records(results_dir)
    if "timed_saved_layer_speedup" not in records or records["timed_saved_layer_speedup"].isna().any():
        records = with_timed_saved_layer_speedups(records, results_dir)
    table = points_table(with_floor_metrics(records, results_dir))  # records from before the runner stored it
    if not ci:
        return table
    intervals = bootstrap_intervals(results_dir)[["job_id", "knob_label", "ci_low", "ci_high", "diff_low", "diff_high"]]
    # A sweep's full-model rows are labelled "full model (alpha=...)" in the table, "full model" per job here.
    intervals["knob_label"] = intervals["knob_label"].where(intervals["knob_label"] != "full model", None)
    table = table.assign(_knob=table["knob_label"].where(~table["knob_label"].str.startswith("full model"), None))
    table = table.merge(intervals.rename(columns={"knob_label": "_knob"}), on=["job_id", "_knob"], how="left")
    return table.drop(columns="_knob")


def compare_points(results_dirs: Sequence[str | Path], task: str, method: str, against: Sequence[str],
                   speedup: str = "saved_layer_speedup", n_resamples: int = 1000, confidence: float = 0.95,
                   seed: int = 0) -> pd.DataFrame:
    """Is `method` better than the methods `against` at the same speed? A name matches itself and its variants
    (`calm` matches `calm[softmax]`, `calm[oracle]`, ...; name the variants to leave the oracle out).

    For every operating point p of `method` on `task` (full-model rows left out): the rival q = the point of
    `against` with the highest metric among those at least as fast (`speedup` of q >= that of p), and the paired
    percentile-bootstrap interval of metric(p) - metric(q) over the dev examples both scored (the same resampled
    indices for both, as in :func:`bootstrap_draws`). The folders may come from different commits.

    q is picked on the same examples it is compared on, which favours `against`: an interval above 0 is
    conservative for `method`, one below 0 is not. Columns: method, point, job_id, speedup, metric, comparator,
    comparator_job_id, comparator_speedup, comparator_metric, difference, diff_low, diff_high (metric scale
    0..1), verdict."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    folders = list(dict.fromkeys(Path(folder) for folder in results_dirs))  # a folder named twice counts once
    per_folder = [points_with_intervals(folder).assign(folder=str(folder)) for folder in folders]
    points = pd.concat(per_folder, ignore_index=True)
    # One job in two folders (a copy, or the same job run twice) would pool both runs' examples per job id.
    shared = points.groupby("job_id").folder.unique().map(len).loc[lambda n: n > 1]
    if len(shared):
        job = shared.index[0]
        raise ValueError(f"job {job} is in more than one of the folders ({', '.join(points[points.job_id == job].folder.unique())})"
                         f"{f' and {len(shared) - 1} more jobs' if len(shared) > 1 else ''}: its examples would be "
                         "pooled. Fix: pass each job's folder once (drop the copy from the list).")
    examples = _dev_rows(pd.concat([load_examples(folder) for folder in folders], ignore_index=True))
    if speedup not in points:
        walls = sorted((c for c in points if c.startswith("wallclock_bs")), key=lambda c: int(c[12:]))
        raise ValueError(f"unknown speed-up column {speedup!r}; choose from saved_layer_speedup, flops_speedup"
                         + "".join(f", {c}" for c in walls) + " (wall-clock: the batch sizes these jobs timed)")
    points = points[(points.task == task) & ~points.knob_label.str.startswith("full model")]

    def named(names: Sequence[str]) -> pd.Series:
        return points.method.isin(names) | points.method.str.startswith(tuple(f"{name}[" for name in names))

    for names in ([method], against):
        if not named(names).any():
            present = sorted(points.method.unique()) or ["none"]
            raise ValueError(f"no operating point of {' or '.join(names)} on task {task!r} in "
                             f"{', '.join(map(str, folders))} (methods there: {', '.join(present)})")
    examples = examples[examples.task == task]
    draws = _draws(examples, n_resamples, seed)
    ids = {job: frozenset(group.example) for job, group in examples.groupby("job_id")}
    quantiles = [(1 - confidence) / 2, (1 + confidence) / 2]
    rivals = points[named(against)]
    rows = []
    for point in points[named([method])].itertuples(index=False):
        row = {"method": point.method, "point": point.knob_label, "job_id": point.job_id,
               "speedup": getattr(point, speedup), "metric": point.metric}
        faster = rivals[rivals[speedup] >= row["speedup"]]
        if faster.empty:
            rows.append({**row, "verdict": "no comparator at least as fast"})
            continue
        rival = faster.loc[faster.metric.idxmax()]
        if ids[point.job_id] != ids[rival.job_id]:
            raise ValueError(f"jobs {point.job_id} and {rival.job_id} scored different {task} examples: a paired "
                             "comparison needs the same eval subset (same --eval-limit and data)")
        difference = draws[(point.job_id, point.knob_label)] - draws[(rival.job_id, rival.knob_label)]
        low, high = np.quantile(difference, quantiles)
        verdict = "better, resolved" if low > 0 else "worse, resolved" if high < 0 else "not resolved"
        rows.append({**row, "comparator": f"{rival.method} {rival.knob_label}", "comparator_job_id": rival.job_id,
                     "comparator_speedup": rival[speedup], "comparator_metric": rival.metric,
                     "difference": point.metric - rival.metric, "diff_low": float(low), "diff_high": float(high),
                     "verdict": verdict})
    return pd.DataFrame(rows).sort_values("speedup", ignore_index=True)
