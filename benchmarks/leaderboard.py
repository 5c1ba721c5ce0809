"""Results store (``DIR/records.jsonl``, or its ``jobs/`` files) -> per-seed scores -> leaderboard table and markdown.

Units: metrics are on the records' own scale (0..1 for accuracy/F1, a correlation for MCC/Spearman)
and are shown x100 in markdown; speed-ups are ratios (full-model cost / point cost, 1.0 = no gain).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from eebench.store import atomic_write_text, commits_line

RECORDS_FILE = "records.jsonl"
LEADERBOARD_FILE = "leaderboard.md"

REQUIRED_FIELDS = (
    "method", "task", "seed", "backbone", "knob", "knob_label", "is_full_model", "metric_name",
    "metric", "metrics", "num_layers", "mean_exit_layer", "saved_layer_speedup", "flops_speedup",
    "wallclock_speedup", "batch_size", "device", "n_examples", "job_id",
)  # fmt: skip
SPEEDUPS = {
    "saved_layer_speedup": "L / mean layers executed",
    "flops_speedup": "full-model FLOPs / FLOPs",
    "wallclock_speedup": "full-model time / time",
}
# One leaderboard row is one method on one task; the backbone is a key too, so that points measured on
# different backbones never share one Pareto frontier.
ROW_KEYS = ["task", "method", "backbone"]
SEED_KEYS = [*ROW_KEYS, "seed"]
SCORE_COLUMNS = ["full_model_metric", "metric_at_1.5x", "metric_at_2x", "best_speedup_within_1pt", "auc",
                 "heldout_pick_speedup", "heldout_pick_metric", "floor_metric", "standard_finetune_metric",
                 "best_speedup_within_1pt_of_standard"]
# The task's standard fine-tune, the second reference beside each method's own full model: DeeBERT's full
# model IS the plain fine-tune (its stage 1 trains the final classifier alone; stage 2 freezes that network).
STANDARD_FINETUNE_METHOD = "deebert"
# A metric within this margin of the task's trivial floor (a constant answer) is floor-level: one or two dev
# examples from all-"paraphrase" is not a learned operating point (TR-BERT's 81.39 vs MRPC's floor 81.22).
FLOOR_MARGIN = 0.01
# Speed-ups such as 12 / 8.000000001 should still count as 1.5x; metrics one ulp under the tolerance too.
_EPS = 1e-9


# Generation jobs choose their operating point by Learn-then-Test on calibration prompts held out of training
# (`eebench.calibration`), not by a held-out metric: the leaderboard's held-out pick of such a job is the point
# this LTT rule chose. Risk at the smallest tolerance the suites calibrate: its loss, how much worse than the full
# model a prompt's ROUGE-L gets, is the generation counterpart of "within 1 point of the full model".
DEFAULT_LTT_PICK = "risk delta=0.1"


@dataclass(frozen=True)
class ScoreSettings:
    """How points are scored: `speedup` (a SPEEDUPS name), `tolerance` of "within 1 point" (metric units:
    0.01 = 1 point), `auc_range` (speed-ups a..b of the AUC), `batch_size` (whose wall-clock counts) and
    `ltt_pick` (which Learn-then-Test choice is a generation job's held-out pick: "<consistency> delta=<δ>")."""

    speedup: str = "saved_layer_speedup"
    tolerance: float = 0.01
    auc_range: tuple[float, float] = (1.0, 3.0)
    batch_size: int = 1
    ltt_pick: str = DEFAULT_LTT_PICK

    def __post_init__(self) -> None:
        if self.speedup not in SPEEDUPS:
            raise ValueError(f"unknown speed-up {self.speedup!r}; choose one of {', '.join(SPEEDUPS)}")
        lo, hi = self.auc_range
        if not hi > lo:
            raise ValueError(f"auc_range must satisfy a < b, got {self.auc_range}")
        object.__setattr__(self, "auc_range", (float(lo), float(hi)))  # a CLI list becomes a hashable pair


DEFAULT_SCORING = ScoreSettings()


def _record_files(results_dir: Path) -> list[Path]:
    """Where a folder's records are: ``records.jsonl`` (all jobs' lines, merged ones too); or, where only
    ``jobs/`` is present (a git checkout: records.jsonl is derived from jobs/ and not tracked), the per-job
    files in the order the store concatenates them."""
    merged = results_dir / RECORDS_FILE
    if merged.is_file():
        return [merged]
    jobs = sorted((results_dir / "jobs").glob("*.jsonl")) if (results_dir / "jobs").is_dir() else []
    if not jobs:
        raise FileNotFoundError(
            f"no results store at {results_dir} (neither {RECORDS_FILE} nor jobs/*.jsonl): run "
            f"`eebench run --out {results_dir}` first"
        )
    return jobs


def load_records(results_dir: str | Path) -> pd.DataFrame:
    """Read a results folder into one row per (operating point, batch size): ``results_dir/records.jsonl``,
    or the per-job files ``results_dir/jobs/*.jsonl`` it is rebuilt from when it is absent (read-only).

    Blank lines are skipped. ``knob`` / ``metrics`` / ``config`` / ``environment`` stay dict columns.
    Raises FileNotFoundError when the folder holds neither, ValueError (naming file and line) on a bad line.
    """
    rows = []
    for path in _record_files(Path(results_dir)):
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {lineno}: malformed JSON ({err.msg})") from err
                if not isinstance(row, dict):
                    raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
                missing = [f for f in REQUIRED_FIELDS if f not in row]
                if missing:
                    raise ValueError(f"{path}, line {lineno}: missing field(s) {', '.join(missing)}")
                rows.append(row)
    if not rows:
        return pd.DataFrame(columns=list(REQUIRED_FIELDS))
    records = pd.DataFrame(rows)
    if "curve" in records:  # configurations that are different exit rules (CALM's measures) are their own rows
        records["method"] = records["curve"].fillna(records["method"])
    return records


def operating_points(records: pd.DataFrame, batch_size: int = 1) -> pd.DataFrame:
    """The tidy per-point table for one batch size (full-model rows included, ``is_full_model`` marks them).

    Per task, falls back to the smallest batch size present when ``batch_size`` is absent (per task, so
    all methods compared on a task share one batch size); the ``batch_size`` column says which was used.
    If a (job, point, batch size, device) was recorded twice (a rerun appended to the store), the later
    line wins. ``config`` / ``environment`` are dropped. Sorted by task, method, backbone, seed, speed-up.
    """
    if records.empty:
        return records.drop(columns=["config", "environment"], errors="ignore").copy()
    sizes = records.groupby("task")["batch_size"].agg(
        lambda bs: batch_size if (bs == batch_size).any() else bs.min()
    )
    points = records[records["batch_size"] == records["task"].map(sizes)]
    points = points.drop_duplicates(["job_id", "knob_label", "batch_size", "device"], keep="last")
    points = points.drop(columns=["config", "environment"], errors="ignore")
    return points.sort_values([*SEED_KEYS, "saved_layer_speedup"], kind="stable").reset_index(drop=True)


def frontier_auc(speedups: np.ndarray, metrics: np.ndarray, lo: float = 1.0, hi: float = 3.0,
                 floor: float = 0.0) -> float:
    """Normalised area under the Pareto frontier: (1 / (hi - lo)) * integral_lo^hi best(s) ds.

    best(s) = max(floor, max metric among points with speed-up >= s). The leaderboard passes the task's trivial
    floor: a constant answer is available at any speed-up, so a grid that stops early is extended at the floor
    rather than at 0, and a point below the floor counts as the floor. Result is on the metric's scale.
    """
    return float(_frontier_auc_draws(np.asarray(speedups, float), np.asarray(metrics, float)[:, None], lo, hi,
                                     floor)[0])


def _frontier_auc_draws(speedups: np.ndarray, metrics: np.ndarray, lo: float, hi: float, floor: float
                        ) -> np.ndarray:
    """:func:`frontier_auc` of every column of `metrics` (points, draws) at the same `speedups` (points,):
    (draws,). A point with a NaN speed-up is left out; a NaN metric counts for nothing in its draw."""
    if not hi > lo:
        raise ValueError(f"auc_range must satisfy a < b, got ({lo}, {hi})")
    keep = ~np.isnan(speedups)
    s, m = speedups[keep], np.where(np.isnan(metrics[keep]), -np.inf, metrics[keep])
    # best(s) is a non-increasing step function that only changes at the points' speed-ups, so it is
    # constant on (left, right] between consecutive edges and equals best(right) there.
    edges = np.unique(np.clip(np.concatenate([[lo, hi], s]), lo, hi))
    area = np.zeros(m.shape[1])
    for left, right in zip(edges[:-1], edges[1:], strict=True):
        area += (right - left) * np.fmax(floor, _column_max(m[s >= right]))  # fmax: nothing reaches -> floor
    return area / (hi - lo)


def _column_max(values: np.ndarray) -> np.ndarray:
    """Max over rows of (rows, draws), skipping NaN and -inf; NaN for a column with nothing (pandas' max)."""
    if len(values) == 0:
        return np.full(values.shape[1], np.nan)
    best = np.where(np.isnan(values), -np.inf, values).max(axis=0)
    return np.where(np.isneginf(best), np.nan, best)


def _seed_scores(group: pd.DataFrame, settings: ScoreSettings, standard: float = math.nan) -> dict:
    """Scores of one (task, method, backbone, seed): see :func:`leaderboard`. `standard`: the task's standard
    fine-tune's full-model metric on the same backbone and seed (NaN when that job is not in the records)."""
    scores = _score_draws(group, group["metric"].to_numpy(float)[:, None], settings, standard)
    return {"metric_name": group["metric_name"].iloc[0], **{name: float(values[0]) for name, values in scores.items()}}


def _score_draws(group: pd.DataFrame, metrics: np.ndarray, settings: ScoreSettings, standard: float
                 ) -> dict[str, np.ndarray]:
    """{score: (draws,)}: every SCORE_COLUMNS score of one (task, method, backbone, seed) for each column of
    `metrics` (the group's rows x draws: one column of the measured metrics, or one per bootstrap draw). Speed-
    ups, the floor and the held-out pick's choice are the same in every column; only metrics vary."""
    speedup, tolerance = settings.speedup, settings.tolerance
    is_full = group["is_full_model"].to_numpy(bool)
    draws = metrics.shape[1]
    floors = group["floor_metric"].dropna() if "floor_metric" in group else pd.Series(dtype=float)
    floor = float(floors.iloc[0]) if len(floors) else math.nan
    # pandas' mean: NaN rows skipped, NaN when none is left
    full_metric = pd.DataFrame(metrics[is_full]).mean(axis=0).to_numpy(float) if is_full.any() else np.full(draws, np.nan)
    point_speedups, point_metrics = group[speedup].to_numpy(float)[~is_full], metrics[~is_full]

    def best_at(threshold: float) -> np.ndarray:
        return _column_max(point_metrics[point_speedups >= threshold - _EPS])

    # The full model is the 1.0x point by definition (a measured wall-clock ratio may be 0.98).
    s = np.concatenate([np.ones(is_full.sum()), point_speedups])
    m = np.concatenate([metrics[is_full], point_metrics])
    # A point at or below the floor has learned nothing a constant lacks: it never counts as "within 1 point"
    # (HashEE's floor classifier on MRPC, TR-BERT's all-positive point), even when its full model is there too.
    useful = m > floor + FLOOR_MARGIN + _EPS if not math.isnan(floor) else np.ones(m.shape, bool)

    def fastest(within: np.ndarray) -> np.ndarray:  # the largest speed-up among the points `within` (points, draws)
        return _column_max(np.where(within, s[:, None], np.nan))

    pick = held_out_pick_row(group[is_full], group[~is_full], tolerance, settings.ltt_pick)
    if pick is None:
        pick_speedup, pick_metric = math.nan, np.full(draws, np.nan)
    elif bool(pick["is_full_model"]):  # the full model counts as 1x with the full metric
        pick_speedup, pick_metric = 1.0, full_metric
    else:
        pick_speedup, pick_metric = float(pick[speedup]), metrics[group.index.get_loc(pick.name)]
    return {
        "full_model_metric": full_metric,
        "metric_at_1.5x": best_at(1.5),
        "metric_at_2x": best_at(2.0),
        "best_speedup_within_1pt": fastest(useful & (m >= full_metric - tolerance - _EPS)),
        "auc": _frontier_auc_draws(s, m, *settings.auc_range, 0.0 if math.isnan(floor) else floor),
        "heldout_pick_speedup": np.full(draws, pick_speedup),
        "heldout_pick_metric": pick_metric,
        "floor_metric": np.full(draws, floor),
        "standard_finetune_metric": np.full(draws, standard),
        "best_speedup_within_1pt_of_standard": fastest(useful & (m >= standard - tolerance - _EPS)),
    }


def held_out_pick_row(full: pd.DataFrame, pts: pd.DataFrame, tolerance: float = 0.01,
                      ltt_pick: str = DEFAULT_LTT_PICK) -> pd.Series | None:
    """The operating point chosen WITHOUT looking at dev: the largest held-out saved-layer speed-up whose
    held-out metric is within `tolerance` of the full model's held-out metric (the full model's first row when
    none is). A generation job has no held-out metric: its pick is the row whose `ltt_picks` name `ltt_pick`
    (Learn-then-Test on the calibration prompts). None when the job stored neither."""
    if "selection_metric" not in pts or full.empty or pts["selection_metric"].isna().all():
        return _ltt_pick_row(pd.concat([full, pts]), ltt_pick)
    full_selection = float(full["selection_metric"].mean())
    eligible = pts[pts["selection_metric"] >= full_selection - tolerance - _EPS]
    if eligible.empty:
        return full.iloc[0]
    return eligible.sort_values(["selection_saved_layer_speedup", "selection_metric"], kind="stable").iloc[-1]


def _ltt_pick_row(rows: pd.DataFrame, ltt_pick: str) -> pd.Series | None:
    """The first of `rows` whose stored `ltt_picks` (the LTT rules that chose that point) include `ltt_pick`."""
    if "ltt_picks" not in rows:
        return None
    chosen = rows[rows["ltt_picks"].map(lambda picks: isinstance(picks, list | np.ndarray) and ltt_pick in list(picks))]
    return None if chosen.empty else chosen.iloc[0]


def _standard_finetunes(points: pd.DataFrame) -> dict[tuple, float]:
    """{(task, backbone, seed): the standard fine-tune's full-model metric} (see STANDARD_FINETUNE_METHOD)."""
    if points.empty:
        return {}
    full = points[(points["method"] == STANDARD_FINETUNE_METHOD) & points["is_full_model"]]
    return full.groupby(["task", "backbone", "seed"])["metric"].mean().to_dict()


def per_seed_scores(records: pd.DataFrame, settings: ScoreSettings = DEFAULT_SCORING) -> pd.DataFrame:
    """One row per (task, method, backbone, seed) with the leaderboard's scores before seed averaging."""
    points = operating_points(records, settings.batch_size)
    standards = _standard_finetunes(points)
    rows = [
        {**dict(zip(SEED_KEYS, key, strict=True)),
         **_seed_scores(g, settings, standards.get((key[0], key[2], key[3]), math.nan))}
        for key, g in points.groupby(SEED_KEYS, sort=True)
    ]
    return pd.DataFrame(rows, columns=[*SEED_KEYS, "metric_name", *SCORE_COLUMNS])


def leaderboard(
    records: pd.DataFrame,
    speedup: str = "saved_layer_speedup",
    tolerance: float = 0.01,
    auc_range: tuple[float, float] = (1.0, 3.0),
    batch_size: int = 1,
    draws: dict[tuple[str, str], np.ndarray] | None = None,
    ltt_pick: str = DEFAULT_LTT_PICK,
) -> pd.DataFrame:
    """One row per (task, method, backbone), sorted by task then AUC (descending).

    Each score is computed per seed (:func:`per_seed_scores`) then averaged over seeds:
    ``full_model_metric``; ``metric_at_1.5x`` / ``metric_at_2x`` = best metric among early-exit points with
    speed-up >= 1.5 / 2.0; ``best_speedup_within_1pt`` = largest speed-up (full model = 1.0) whose metric
    >= full_model_metric - tolerance; ``auc`` = :func:`frontier_auc` over ``auc_range`` (full model = 1.0).
    A seed-averaged score is NaN when any seed lacks it, so a mean never hides seeds that miss a target.
    ``*_std`` are sample std over seeds (NaN for one seed). ``batch_size`` only matters for wall-clock.
    With ``draws`` (`analysis.bootstrap_draws`), 95 % bootstrap intervals over dev examples are added as
    ``<score>_ci_low`` / ``_ci_high`` (:func:`leaderboard_intervals`). ``ltt_pick``: which Learn-then-Test choice
    is a generation job's held-out pick (:func:`held_out_pick_row`).
    The parameters (and the batch size actually used) are kept in ``board.attrs`` for :func:`to_markdown`.
    """
    settings = ScoreSettings(speedup, tolerance, tuple(auc_range), batch_size, ltt_pick)
    calibrated = calibrated_ltt_picks(records)
    if calibrated and ltt_pick not in calibrated:
        raise ValueError(f"no generation job here calibrated the Learn-then-Test rule {ltt_pick!r} (they calibrated: "
                         f"{', '.join(calibrated)}). Fix: --ltt-pick one of those.")
    scores = per_seed_scores(records, settings)
    grouped = scores.groupby(ROW_KEYS, sort=True)
    board = grouped[SCORE_COLUMNS].mean()
    if not scores.empty:  # skipna=False is not available on a grouped mean: blank groups with any NaN
        board = board.where(~grouped[SCORE_COLUMNS].agg(lambda col: col.isna().any()).astype(bool))
    board["metric_name"] = grouped["metric_name"].agg(lambda col: "/".join(sorted(set(col))))
    board["seeds"] = grouped["seed"].nunique()
    board["full_model_metric_std"] = grouped["full_model_metric"].std()
    board["auc_std"] = grouped["auc"].std()
    board = board.reset_index()
    board["heldout_pick_metric_std"] = grouped["heldout_pick_metric"].std()
    order = [
        *ROW_KEYS, "metric_name", "seeds", "full_model_metric", "full_model_metric_std", "standard_finetune_metric",
        "floor_metric", "heldout_pick_speedup", "heldout_pick_metric", "heldout_pick_metric_std",
        "metric_at_1.5x", "metric_at_2x", "best_speedup_within_1pt", "best_speedup_within_1pt_of_standard",
        "auc", "auc_std",
    ]  # fmt: skip
    board = board.reindex(columns=order)
    points = operating_points(records, batch_size)
    if speedup == "wallclock_speedup":
        board = board.merge(_flagged_timings(points), on=ROW_KEYS, how="left")
    if draws is not None:
        intervals = leaderboard_intervals(records, draws, settings)
        board = board.merge(intervals, on=ROW_KEYS, how="left")
    board = board.sort_values(["task", "auc", "method"], ascending=[True, False, True], na_position="last")
    board = board.reset_index(drop=True)
    used = sorted(points["batch_size"].unique()) if len(records) else [batch_size]
    board.attrs.update(
        speedup=speedup, tolerance=tolerance, auc_range=settings.auc_range, batch_sizes=[int(b) for b in used]
    )
    if calibrated_ltt_picks(records):
        board.attrs["ltt_pick"] = ltt_pick  # some row's held-out pick is an LTT choice: the legend says which
    board.attrs["selection_pick"] = "selection_metric" in records and bool(records["selection_metric"].notna().any())
    return board


def calibrated_ltt_picks(records: pd.DataFrame) -> list[str]:
    """The Learn-then-Test rules ("<consistency> delta=<δ>") the records' generation jobs calibrated: each chose
    one point (the full model when nothing else passed), whose `ltt_picks` names it."""
    if "ltt_picks" not in records:
        return []
    return sorted({pick for picks in records["ltt_picks"] if isinstance(picks, list | np.ndarray) for pick in picks})


def _flagged_timings(points: pd.DataFrame) -> pd.DataFrame:
    """Per (task, method, backbone) of `operating_points`, over all seeds: ``flagged_timings``, the timed
    points the runner judged implausible (a non-empty ``timing_flag``: realization above 1.15 or a speed-up
    spread over rounds beyond the noise), and ``timed_points``. Flagged points still enter the wall-clock
    scores as measured (dropping them would move a frontier silently); the count tells a reader which rows
    to read with care, and `eebench points` lists each point and why."""
    timed = points[points["wallclock_speedup"].notna()]
    flags = timed["timing_flag"] if "timing_flag" in timed else pd.Series("", index=timed.index)
    is_flagged = flags.fillna("").astype(str).ne("")
    counts = is_flagged.groupby([timed[key] for key in ROW_KEYS]).agg(["sum", "size"])
    return counts.rename(columns={"sum": "flagged_timings", "size": "timed_points"}).reset_index()


# Scores whose value moves when dev examples are resampled (the held-out pick's speed-up is fixed by the
# selection set, so it has no interval over dev examples).
CI_SCORES = ["full_model_metric", "metric_at_1.5x", "metric_at_2x", "best_speedup_within_1pt", "auc",
             "heldout_pick_metric"]


def draw_seed_scores(records: pd.DataFrame, draws: dict[tuple[str, str], np.ndarray],
                     settings: ScoreSettings = DEFAULT_SCORING) -> pd.DataFrame:
    """Every leaderboard score of ``CI_SCORES`` per (task, method, backbone, seed) and bootstrap draw: one row
    per (seed, draw) with columns ``SEED_KEYS``, ``draw`` and ``CI_SCORES``.

    For draw r every point's metric is replaced by its r-th resampled value (`analysis.bootstrap_draws`) and the
    per-seed scores are recomputed exactly as :func:`leaderboard` computes them (so "best metric at >= 1.5x"
    re-picks its point per draw). Speed-ups stay at their measured dev values: what varies is the metric's
    sampling noise over dev examples, not the cost's. Draws share their resampled indices across the points,
    jobs and seeds of a task, so any statistic built per draw from these rows (a seed mean, the difference
    of two methods' seed means) is itself a paired bootstrap."""
    points = operating_points(records, settings.batch_size)
    standards = _standard_finetunes(points)  # held at its dev value: a reference, not a score of the row
    per_seed = []
    for key, group in points.groupby(SEED_KEYS, sort=True):
        labels = group["knob_label"].where(~group["is_full_model"], "full model")
        missing = [f"{j}/{k}" for j, k in zip(group["job_id"], labels, strict=True) if (j, k) not in draws]
        if missing:
            raise ValueError(f"no per-example results for {', '.join(missing[:3])}: intervals need the examples "
                             "tables that `eebench run` stores in DIR/examples/")
        stacked = np.stack([draws[(j, k)] for j, k in zip(group["job_id"], labels, strict=True)])  # (points, R)
        scores = _score_draws(group, stacked, settings, standards.get((key[0], key[2], key[3]), math.nan))
        frame = pd.DataFrame({name: scores[name] for name in CI_SCORES})
        frame.insert(0, "draw", np.arange(stacked.shape[1]))
        per_seed.append(frame.assign(**dict(zip(SEED_KEYS, key, strict=True)))[[*SEED_KEYS, "draw", *CI_SCORES]])
    if not per_seed:
        return pd.DataFrame(columns=[*SEED_KEYS, "draw", *CI_SCORES])
    return pd.concat(per_seed, ignore_index=True)


def draw_seed_means(per_draw: pd.DataFrame) -> pd.DataFrame:
    """:func:`draw_seed_scores` averaged over seeds: indexed by (task, method, backbone, draw). As in
    :func:`leaderboard`, a seed mean is NaN when any seed lacks the score in that draw."""
    grouped = per_draw.groupby([*ROW_KEYS, "draw"])[CI_SCORES]
    return grouped.mean().where(grouped.count().eq(grouped.size(), axis=0))


def leaderboard_intervals(records: pd.DataFrame, draws: dict[tuple[str, str], np.ndarray],
                          settings: ScoreSettings = DEFAULT_SCORING, confidence: float = 0.95) -> pd.DataFrame:
    """Bootstrap intervals over dev examples of every leaderboard score: one row per (task, method, backbone)
    with ``<score>_ci_low`` / ``<score>_ci_high`` for each of ``CI_SCORES``: the percentile range over draws of
    the seed mean of :func:`draw_seed_scores`. Draws are paired across seeds, so this is the interval of the
    seed mean."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    per_draw = draw_seed_scores(records, draws, settings)
    if per_draw.empty:
        return pd.DataFrame(columns=[*ROW_KEYS, *(f"{c}_ci_{e}" for c in CI_SCORES for e in ("low", "high"))])
    quantiles = draw_seed_means(per_draw).groupby(ROW_KEYS).quantile([(1 - confidence) / 2, (1 + confidence) / 2])
    low = quantiles.xs((1 - confidence) / 2, level=-1).add_suffix("_ci_low")
    high = quantiles.xs((1 + confidence) / 2, level=-1).add_suffix("_ci_high")
    return low.join(high).reset_index()


def metric_text(value: float, digits: int, std: float = math.nan) -> str:
    """A 0..1 metric as points (x100) with `digits` decimals, "± std" when given; "—" when missing."""
    if value is None or pd.isna(value):
        return "—"
    text = f"{100 * value:.{digits}f}"
    return text if pd.isna(std) else f"{text} ± {100 * std:.{digits}f}"


def speedup_text(value: float) -> str:
    """A speed-up ratio as "2.50x"; "—" when missing."""
    return "—" if value is None or pd.isna(value) else f"{value:.2f}x"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|")  # a pipe would split the markdown cell


def to_markdown(board: pd.DataFrame, digits: int = 2) -> str:
    """Render :func:`leaderboard` output as a markdown table plus a legend.

    Headline first: the references (the method's own full model, the task's standard fine-tune, the trivial
    floor) and the held-out pick, the operating point chosen without looking at dev. Then the dev-max view,
    labelled as such: best metric at >= 1.5x / 2x, the largest speed-up within the tolerance of each reference,
    the floor-extended AUC. Metrics are shown x100 with ``digits`` decimals (mean ± std over seeds where
    available), speed-ups as ``1.83x``, missing values as ``—``; a value at or below the floor is marked
    "(floor)". The legend reads the parameters from ``board.attrs``.
    """
    speedup = board.attrs.get("speedup", "saved_layer_speedup")
    tol = 100 * board.attrs.get("tolerance", 0.01)
    lo, hi = board.attrs.get("auc_range", (1.0, 3.0))
    batch = "/".join(str(b) for b in board.attrs.get("batch_sizes", [1]))
    held_out = "heldout_pick_speedup" in board and board["heldout_pick_speedup"].notna().any()
    standard = "standard_finetune_metric" in board and board["standard_finetune_metric"].notna().any()
    floors = "floor_metric" in board and board["floor_metric"].notna().any()
    headers = ["task", "method", "backbone", "metric", "seeds", "full model",
               *(["standard fine-tune"] if standard else []), *(["floor"] if floors else []),
               *(["held-out pick: speed-up / metric"] if held_out else []),
               "dev max: metric @1.5x", "dev max: metric @2x", f"dev max: speed-up @−{tol:g}pt",
               *([f"dev max: speed-up @−{tol:g}pt of standard"] if standard else []), f"AUC {lo:g}–{hi:g}x",
               *(["flagged timings"] if "flagged_timings" in board else [])]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join([":---"] * 4 + ["---:"] * (len(headers) - 4)) + "|",
    ]
    with_ci = "auc_ci_low" in board

    def ci(row: dict, score: str, render=lambda v: metric_text(v, 1)) -> str:
        low, high = row.get(f"{score}_ci_low"), row.get(f"{score}_ci_high")
        if not with_ci or low is None or pd.isna(low):
            return ""
        return f" [{render(low)}, {render(high)}]"

    def metric(row: dict, score: str, std: float = math.nan) -> str:
        floor = row.get("floor_metric", math.nan)
        at_floor = not pd.isna(floor) and not pd.isna(row[score]) and row[score] <= floor + FLOOR_MARGIN + _EPS
        return metric_text(row[score], digits, std) + (" (floor)" if at_floor else "") + ci(row, score)

    for row in board.to_dict("records"):
        cells = [
            _cell(row["task"]), _cell(row["method"]), _cell(row["backbone"]), _cell(row["metric_name"]),
            str(int(row["seeds"])), metric(row, "full_model_metric", row["full_model_metric_std"]),
            *([metric_text(row["standard_finetune_metric"], digits)] if standard else []),
            *([metric_text(row["floor_metric"], digits)] if floors else []),
            *([f"{speedup_text(row['heldout_pick_speedup'])} / "
               + metric(row, "heldout_pick_metric", row.get("heldout_pick_metric_std", math.nan))] if held_out else []),
            metric(row, "metric_at_1.5x"), metric(row, "metric_at_2x"),
            speedup_text(row["best_speedup_within_1pt"]) + ci(row, "best_speedup_within_1pt", speedup_text),
            *([speedup_text(row["best_speedup_within_1pt_of_standard"])] if standard else []),
            metric_text(row["auc"], digits, row["auc_std"]) + ci(row, "auc"),
            *([_flagged_text(row)] if "flagged_timings" in board else []),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    seeds = int(board["seeds"].max()) if len(board) else 0
    legend = [
        f"Speed-up: {speedup} ({SPEEDUPS.get(speedup, speedup)}), batch size {batch}. Metrics: dev x100"
        + (", mean ± std over seeds." if seeds > 1 else ", one seed (no spread)."),
        "full model: the method's own full-depth run"
        + ("; standard fine-tune: the task's plain fine-tune, same backbone and seed (DeeBERT's full model)."
           if standard else "."),
        *([f"floor: the best constant prediction on dev; (floor) marks values at most {100 * FLOOR_MARGIN:g} pt above "
           "it, never counted as within tolerance."] if floors else []),
        *([f"held-out pick (the headline): chosen on held-out training examples (largest speed-up within {tol:g} pt "
           "of the full model there), reported on dev."] if held_out and board.attrs.get("selection_pick", True) else []),
        *([f"held-out pick of a generation job: the point Learn-then-Test chose for `{board.attrs['ltt_pick']}` on its "
           "calibration prompts (held out of training; the loss bounded by δ with probability ≥ 1 − ε; "
           "`--ltt-pick` names another rule the run calibrated)."] if held_out and "ltt_pick" in board.attrs else []),
        f"dev max (optimistic, chosen on dev itself): best metric at speed-up ≥ 1.5x / 2x; largest speed-up within "
        f"{tol:g} pt of the reference and above the floor; AUC {lo:g}–{hi:g}x = mean over s of max(floor, best "
        "metric at ≥ s).",
        *(["[a, b]: 95 % bootstrap interval over dev examples (1000 resamples, seed 0)."] if with_ci else []),
        *(["flagged timings: of the row's timed points (all seeds), those whose clock the runner judged "
           "implausible (realization > 1.15 or speed-up spread over rounds beyond the noise); they enter the "
           "scores as measured: `eebench points` lists each and why."] if "flagged_timings" in board else []),
        "Formulas: `eebench glossary`.",
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {line}" for line in legend) + "\n"


def _flagged_text(row: dict) -> str:
    flagged, timed = row.get("flagged_timings"), row.get("timed_points")
    if flagged is None or pd.isna(flagged):
        return "—"
    return f"{int(flagged)} of {int(timed)}" + (" †" if flagged else "")


def write_leaderboard(results_dir: str | Path, digits: int = 2, filename: str | None = None, ci: bool = False,
                      by_config: bool = False, **kwargs) -> tuple[pd.DataFrame, Path]:
    """Compute the leaderboard of ``results_dir`` and write it to ``results_dir/leaderboard.md`` (or `filename`).

    ``by_config``: one row per setting of a training-time sweep (:func:`split_by_config`).
    ``kwargs`` go to :func:`leaderboard` (speedup, tolerance, auc_range, batch_size); ``digits`` to
    :func:`to_markdown`; ``ci`` adds bootstrap intervals from the stored per-example tables, and a section on
    which differences between adjacent methods they resolve (`eebench.differences`; the whole pair table is
    kept in ``board.attrs["differences"]``). Returns the table and the path written.
    """
    draws = None
    if ci:
        from eebench.analysis import bootstrap_draws  # analysis imports this module
        draws = bootstrap_draws(results_dir)
    from eebench.analysis import with_floor_metrics  # analysis imports this module; fills pre-floor records

    records = with_floor_metrics(load_records(results_dir), results_dir)
    if by_config:
        records = split_by_config(records)
    settings = ScoreSettings(**kwargs)  # checked before anything is computed or written
    board = leaderboard(records, settings.speedup, settings.tolerance, settings.auc_range, settings.batch_size, draws,
                        settings.ltt_pick)
    text = to_markdown(board, digits=digits)
    if draws is not None and board["seeds"].gt(0).any():
        from eebench.differences import differences_legend, differences_markdown, method_differences

        differences = method_differences(records, draws, settings=settings)
        board.attrs["differences"] = differences
        text += ("\n## Which differences the intervals resolve\n\nMethods next to each other in the ranking by "
                 "each score (every pair: `eebench.differences.method_differences`).\n\n"
                 + differences_markdown(differences, adjacent_only=True) + "\n\n- " + differences_legend() + "\n")
    path = Path(results_dir) / (filename or LEADERBOARD_FILE)
    atomic_write_text(path, text + "\n" + commits_line(results_dir) + "\n")
    return board, path


def points_table(records: pd.DataFrame) -> pd.DataFrame:
    """Every operating point with all its costs side by side: one row per (task, method, seed, knob), the
    wall-clock speed-up of each timing batch size as its own column (``wallclock_bs1``, ``wallclock_bs32``)."""
    records = _label_sweep_full_models(records)
    keys = ["task", "method", "backbone", "seed", "job_id", "knob_label"]
    first = records.drop_duplicates(keys).set_index(keys)
    columns = ["metric_name", "metric", "mean_exit_layer", "saved_layer_speedup", "flops_speedup"]
    optional = [c for c in ("train_seconds", "floor_metric") if c in first]
    table = first[columns + optional].copy()
    wallclock = records.pivot_table(index=keys, columns="batch_size", values="wallclock_speedup", aggfunc="first")
    for batch_size in wallclock.columns:
        table[f"wallclock_bs{batch_size}"] = wallclock[batch_size]
    # Realization compares the clock with the layers saved ON THE TIMED EXAMPLES (dev[:n_timed]); a dev set
    # ordered by source (STS-B) makes those differ from the whole set's. Older records lack the field: they
    # fall back to the whole set's, or are filled from the stored examples (`analysis.timed_saved_layer_speedups`).
    timed = first["timed_saved_layer_speedup"] if "timed_saved_layer_speedup" in first else pd.Series(float("nan"), first.index)
    denominator = timed.fillna(table["saved_layer_speedup"])
    for batch_size in wallclock.columns:  # how much of the saved layers the clock realises (GLOSSARY)
        table[f"realization_bs{batch_size}"] = wallclock[batch_size] / denominator
    if "timing_flag" in records:  # why a wall-clock number is not to be trusted (eebench.timing.timing_flag)
        flags = records.assign(timing_flag=records["timing_flag"].fillna("")).pivot_table(
            index=keys, columns="batch_size", values="timing_flag", aggfunc="first")
        for batch_size in flags.columns:
            table[f"timing_flag_bs{batch_size}"] = flags[batch_size].fillna("")
    if "metrics" in first:  # every metric of the point, for `points_markdown(all_metrics=True)`
        table["metrics"] = first["metrics"]
    if "tokens_per_second" in records:  # generation: absolute decoding speed per timing batch size
        speed = records.pivot_table(index=keys, columns="batch_size", values="tokens_per_second", aggfunc="first")
        for batch_size in speed.columns:
            table[f"tokens_per_second_bs{batch_size}"] = speed[batch_size]
    table = table.reset_index().sort_values(["task", "method", "seed", "saved_layer_speedup"], kind="stable")
    return table.reset_index(drop=True)


def _sweep_labels(group: pd.DataFrame) -> dict[str, str]:
    """job_id -> "alpha=0.05" (the method settings that differ between the group's jobs); {} when the group
    holds one setting, or records without `method_config`."""
    configs = group.drop_duplicates("job_id").set_index("job_id")["method_config"]
    if not all(isinstance(c, dict) for c in configs):
        return {}
    varying = sorted({k for c in configs for k in c if len({repr(other.get(k)) for other in configs}) > 1})
    if not varying:
        return {}
    return {job_id: ", ".join(f"{k}={config.get(k)}" for k in varying) for job_id, config in configs.items()}


def _label_sweep_full_models(records: pd.DataFrame) -> pd.DataFrame:
    """When one method ran several jobs on a task and seed (a training-time sweep), each job's full-model row
    is a different network: label it with the settings that differ, e.g. "full model (alpha=0.1)"."""
    if "method_config" not in records:
        return records
    records = records.copy()
    for _, group in records.groupby(["task", "method", "backbone", "seed"]):
        for job_id, label in _sweep_labels(group).items():
            rows = group.index[(group["job_id"] == job_id) & group["is_full_model"]]
            records.loc[rows, "knob_label"] = f"full model ({label})"
    return records


def split_by_config(records: pd.DataFrame) -> pd.DataFrame:
    """One leaderboard row per setting of a training-time sweep: a method whose jobs on a task differ in their
    settings (ConsistentEE at alpha 0.05 and 0.2) becomes "consistentee[alpha=0.05]" and
    "consistentee[alpha=0.2]". By default a sweep is ONE row, whose held-out pick chooses among every setting's
    points (the setting tuned on held-out data); split, each setting is scored as its own method."""
    if "method_config" not in records:
        return records
    records = records.copy()
    for _, group in records.groupby(ROW_KEYS):
        for job_id, label in _sweep_labels(group).items():
            rows = group.index[group["job_id"] == job_id]
            records.loc[rows, "method"] = records.loc[rows, "method"] + f"[{label}]"
    return records


def _difference(row: dict) -> str:
    """The paired interval of metric - full model's, in points; '*' marks one that excludes 0 (resolved)."""
    low, high = row.get("diff_low", math.nan), row.get("diff_high", math.nan)
    if pd.isna(low) or str(row["knob_label"]).startswith("full model"):
        return "—"
    return f"{100 * low:+.1f} to {100 * high:+.1f}" + (" *" if low > 0 or high < 0 else "")


def _floor_mark(row: dict) -> str:
    floor = row.get("floor_metric", math.nan)
    return " (floor)" if not pd.isna(floor) and row["metric"] <= floor + FLOOR_MARGIN + _EPS else ""


def points_markdown(table: pd.DataFrame, digits: int = 2, all_metrics: bool = False) -> str:
    """Markdown rendering of :func:`points_table` (metric x100, speed-ups as ``1.83x``); `all_metrics`: also
    every secondary metric (x100) and, for generation, tokens/s per timing batch size."""
    walls = [c for c in table.columns if c.startswith("wallclock_bs")]
    real = [c for c in table.columns if c.startswith("realization_bs")]
    extra, speed = [], []
    if all_metrics:
        primary = set(table["metric_name"])
        dicts = [m for m in table.get("metrics", []) if isinstance(m, dict)]
        extra = sorted({name for m in dicts for name in m} - primary)
        speed = [c for c in table.columns if c.startswith("tokens_per_second_bs")]
    headers = ["task", "method", "seed", "operating point", "metric", *extra, "mean exit layer", "saved-layer",
               "FLOPs", *[f"wall-clock bs={c.removeprefix('wallclock_bs')}" for c in walls],
               *[f"realization bs={c.removeprefix('realization_bs')}" for c in real],
               *[f"tok/s bs={c.removeprefix('tokens_per_second_bs')}" for c in speed], "fine-tuning (s)"]
    with_ci = "ci_low" in table
    if with_ci:
        headers[5:5] = ["95% CI", "vs full, 95% CI"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join([":---"] * 4 + ["---:"] * (len(headers) - 4)) + "|"]
    flagged: list[str] = []

    def wall(row: dict, column: str) -> str:
        """The wall-clock cell, with a numbered mark when its timing was flagged (listed under the table)."""
        flag = row.get(column.replace("wallclock_bs", "timing_flag_bs"), "")
        if not isinstance(flag, str) or not flag:
            return speedup_text(row[column])
        flagged.append(f"{row['task']} / {row['method']} / {row['knob_label']} at batch size "
                       f"{column.removeprefix('wallclock_bs')}: {flag}")
        return f"{speedup_text(row[column])} †{len(flagged)}"

    for row in table.to_dict("records"):
        ci = [f"{metric_text(row['ci_low'], 1)}–{metric_text(row['ci_high'], 1)}", _difference(row)] if with_ci else []
        cells = [_cell(row["task"]), _cell(row["method"]), str(row["seed"]), _cell(row["knob_label"]),
                 f"{row['metric_name']} {metric_text(row['metric'], digits)}" + _floor_mark(row), *ci,
                 *[metric_text((row.get("metrics") or {}).get(name), digits) for name in extra], f"{row['mean_exit_layer']:.2f}",
                 speedup_text(row["saved_layer_speedup"]), speedup_text(row["flops_speedup"]), *[wall(row, c) for c in walls],
                 *["—" if pd.isna(row[c]) else f"{row[c]:.2f}" for c in real],
                 *["—" if pd.isna(row[c]) else f"{row[c]:.1f}" for c in speed],
                 "—" if pd.isna(row.get("train_seconds", math.nan)) else f"{row['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", "Flagged timings (re-time on a quiet machine before quoting them):",
             *[f"- †{i}: {text}" for i, text in enumerate(flagged, start=1)]] if flagged else []
    return "\n".join(lines + notes) + "\n"


def comparison_markdown(table: pd.DataFrame, speedup: str = "saved_layer_speedup") -> str:
    """Markdown rendering of :func:`eebench.analysis.compare_points` (metrics x100, speed-ups as ``1.83x``)."""
    headers = ["method", "point", speedup, "metric", "best rival at least as fast", f"rival {speedup}",
               "rival metric", "difference (paired 95% CI)", "verdict"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join([":---"] * 2 + ["---:"] * 2 + [":---"] + ["---:"] * 3
                                                               + [":---"]) + "|"]
    for row in table.to_dict("records"):
        cells = [_cell(row["method"]), _cell(row["point"]), speedup_text(row["speedup"]), f"{100 * row['metric']:.2f}"]
        if isinstance(row.get("comparator"), str):
            interval = f"{100 * row['diff_low']:+.1f} to {100 * row['diff_high']:+.1f}"
            cells += [_cell(row["comparator"]), speedup_text(row["comparator_speedup"]),
                      f"{100 * row['comparator_metric']:.2f}", f"{100 * row['difference']:+.2f} ({interval})"]
        else:
            cells += ["—"] * 4
        lines.append("| " + " | ".join([*cells, row["verdict"]]) + " |")
    return "\n".join(lines)
