"""Which differences between the methods of a leaderboard its intervals resolve.

Two rows of a leaderboard whose intervals overlap may still differ reliably, and two whose intervals barely
touch may not: what decides is the interval of the DIFFERENCE, computed on the same resampled dev examples
for both methods (paired). `draw_seed_scores` gives every score per seed and bootstrap draw, with draws that
share their resampled indices across all jobs of a task. So per draw r the difference of two methods' seed
means is a paired bootstrap sample of the difference, and its percentiles are the interval.

That interval covers the sampling noise of the dev set, not the spread between training seeds; with three
seeds there is too little to resample. So a difference also has to hold seed by seed: "resolved" means the
interval excludes 0 AND the better method is ahead in every seed both methods have.

Units: scores on the records' 0..1 scale (differences shown x100 in markdown, in points).
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from eebench.leaderboard import (
    CI_SCORES,
    DEFAULT_SCORING,
    ScoreSettings,
    draw_seed_scores,
    metric_text,
    per_seed_scores,
    speedup_text,
)

DIFFERENCE_SCORES = ("auc", "heldout_pick_metric")  # the two headline views: whole frontier, and the one pick
RESOLVED = "resolved"
DEV_ONLY = "dev examples only: seeds disagree"
NOT_RESOLVED = "not resolved"


def method_differences(
    records: pd.DataFrame,
    draws: dict[tuple[str, str], np.ndarray],
    scores: tuple[str, ...] = DIFFERENCE_SCORES,
    settings: ScoreSettings = DEFAULT_SCORING,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Every pair of methods on each (task, backbone), for each score in `scores` (leaderboard score names).

    One row per (task, backbone, score, pair), the better method (higher seed mean) first. Columns: task,
    backbone, score, better, worse, better_value, worse_value (means over the seeds both have), difference
    (better - worse, >= 0), diff_low, diff_high (the paired percentile interval over draws), seeds_ahead (seeds
    in which `better` scores strictly higher), seeds (seeds both have, the only ones compared), seeds_differ
    (one method has a seed the other lacks, as in a folder still being filled), better_speedup, worse_speedup (seed-mean held-out pick
    speed-ups, so that a pick's metric is never read without its cost), rank_gap (1 for methods adjacent in the
    score's ranking) and verdict (:data:`RESOLVED`, :data:`DEV_ONLY`, :data:`NOT_RESOLVED`). A pair whose
    score is missing for either method (a seed lacks it) is left out."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    unknown = [score for score in scores if score not in CI_SCORES]
    if unknown:
        raise ValueError(f"no interval for score(s) {', '.join(unknown)}; choose from {', '.join(CI_SCORES)}")
    columns = ["task", "backbone", "score", "better", "worse", "better_value", "worse_value", "difference",
               "diff_low", "diff_high", "seeds_ahead", "seeds", "seeds_differ", "verdict", "better_speedup",
               "worse_speedup", "rank_gap"]
    per_seed = per_seed_scores(records, settings)
    per_draw = draw_seed_scores(records, draws, settings)
    if per_seed.empty or per_draw.empty:
        return pd.DataFrame(columns=columns)
    quantiles = [(1 - confidence) / 2, (1 + confidence) / 2]
    rows = []
    for (task, backbone), board in per_seed.groupby(["task", "backbone"], sort=True):
        drawn = per_draw[(per_draw.task == task) & (per_draw.backbone == backbone)]
        pick_speedups = board.groupby("method")["heldout_pick_speedup"].mean()
        for score in scores:
            values = board.groupby("method")[score].agg(lambda v: v.mean() if v.notna().all() else np.nan).dropna()
            ranking = list(values.sort_values(ascending=False, kind="stable").index)
            by_seed = board.pivot(index="seed", columns="method", values=score)
            for first, second in itertools.combinations(ranking, 2):
                pair = _pair(drawn, by_seed, first, second, score, quantiles)
                if pair is not None:
                    rows.append({"task": task, "backbone": backbone, "score": score, **pair,
                                 "better_speedup": pick_speedups.get(pair["better"], np.nan),
                                 "worse_speedup": pick_speedups.get(pair["worse"], np.nan),
                                 "rank_gap": abs(ranking.index(second) - ranking.index(first))})
    return pd.DataFrame(rows, columns=columns)


def _pair(drawn: pd.DataFrame, by_seed: pd.DataFrame, first: str, second: str, score: str,
          quantiles: list[float]) -> dict | None:
    """Two methods compared on the seeds both have: a results folder still being filled may hold more seeds of
    one method, and a mean over other seeds is not a paired comparison. None when they share no seed."""
    shared = by_seed[[first, second]].dropna()
    if shared.empty:
        return None
    means = shared.mean()
    better, worse = (first, second) if means[first] >= means[second] else (second, first)
    in_shared = drawn[drawn.seed.isin(shared.index)]

    def draw_means(method: str) -> pd.Series:  # seed mean per draw; NaN where a seed lacks the score
        grouped = in_shared[in_shared.method == method].groupby("draw")[score]
        return grouped.mean().where(grouped.count() == len(shared))

    low, high = np.nanquantile(draw_means(better) - draw_means(worse), quantiles)
    ahead = int((shared[better] > shared[worse]).sum())
    verdict = NOT_RESOLVED if not low > 0 else RESOLVED if ahead == len(shared) else DEV_ONLY
    return {"better": better, "worse": worse, "better_value": means[better], "worse_value": means[worse],
            "difference": means[better] - means[worse], "diff_low": float(low), "diff_high": float(high),
            "seeds_ahead": ahead, "seeds": len(shared), "verdict": verdict,
            "seeds_differ": bool(by_seed[first].notna().ne(by_seed[second].notna()).any())}


SEEDS_DIFFER_MARK = " (shared seeds)"
SCORE_NAMES = {"auc": "AUC", "heldout_pick_metric": "held-out pick metric"}


def differences_markdown(table: pd.DataFrame, adjacent_only: bool = False) -> str:
    """Markdown of :func:`method_differences`: one line per pair (per adjacent pair in each ranking with
    `adjacent_only`), values x100, the interval in points, held-out picks with their speed-up; a pair whose
    methods have different seeds is marked with SEEDS_DIFFER_MARK."""
    if adjacent_only:
        table = table[table["rank_gap"] == 1]
    headers = ["task", "score", "better", "worse", "difference, points (95% CI)", "seeds ahead", "verdict"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join([":---"] * 4 + ["---:"] * 2 + [":---"]) + "|"]
    def named(row: dict, side: str) -> str:
        value = metric_text(row[f"{side}_value"], 2)
        if row["score"] == "heldout_pick_metric":
            value += f" @{speedup_text(row[f'{side}_speedup'])}"
        return f"{row[side]} ({value})"

    for row in table.to_dict("records"):
        interval = f"{100 * row['difference']:.2f} ({100 * row['diff_low']:+.2f} to {100 * row['diff_high']:+.2f})"
        lines.append("| " + " | ".join([row["task"], SCORE_NAMES.get(row["score"], row["score"]), named(row, "better"),
                                         named(row, "worse"), interval, f"{row['seeds_ahead']}/{row['seeds']}"
                                         + (SEEDS_DIFFER_MARK if row["seeds_differ"] else ""),
                                         row["verdict"]]) + " |")
    return "\n".join(lines)


def differences_legend(confidence: float = 0.95) -> str:
    return (f"difference: better − worse seed mean; its {100 * confidence:g} % interval is a paired bootstrap over dev "
            "examples (the same resamples for both methods and every seed; 1000 resamples, seed 0). "
            f"{RESOLVED}: the interval excludes 0 and the better method is ahead in every seed; {DEV_ONLY}: the "
            f"interval excludes 0 but some seed has the order reversed or tied; {NOT_RESOLVED}: the interval holds 0. "
            f"seeds ahead:{SEEDS_DIFFER_MARK} marks a pair whose methods have different seeds; it is compared on "
            "the seeds both have.")
