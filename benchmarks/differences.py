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
    draw_seed_means,
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
    backbone, score, better, worse, better_value, worse_value (seed means), difference (better - worse, >= 0),
    diff_low, diff_high (the paired percentile interval over draws), seeds_ahead (seeds in which `better`
    scores strictly higher), seeds (seeds both have), better_speedup, worse_speedup (seed-mean held-out pick
    speed-ups, so that a pick's metric is never read without its cost), rank_gap (1 for methods adjacent in the
    score's ranking) and verdict (:data:`RESOLVED`, :data:`DEV_ONLY`, :data:`NOT_RESOLVED`). A pair whose
    score is missing for either method (a seed lacks it) is left out."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    unknown = [score for score in scores if score not in CI_SCORES]
    if unknown:
        raise ValueError(f"no interval for score(s) {', '.join(unknown)}; choose from {', '.join(CI_SCORES)}")
    columns = ["task", "backbone", "score", "better", "worse", "better_value", "worse_value", "difference",
               "diff_low", "diff_high", "seeds_ahead", "seeds", "better_speedup", "worse_speedup", "rank_gap",
               "verdict"]
    per_seed = per_seed_scores(records, settings)
    per_draw = draw_seed_scores(records, draws, settings)
    if per_seed.empty or per_draw.empty:
        return pd.DataFrame(columns=columns)
    means = draw_seed_means(per_draw)  # (task, method, backbone, draw) -> seed mean per score
    quantiles = [(1 - confidence) / 2, (1 + confidence) / 2]
    rows = []
    for (task, backbone), board in per_seed.groupby(["task", "backbone"], sort=True):
        pick_speedups = board.groupby("method")["heldout_pick_speedup"].mean()
        for score in scores:
            values = board.groupby("method")[score].agg(lambda v: v.mean() if v.notna().all() else np.nan).dropna()
            ranked = values.sort_values(ascending=False, kind="stable")
            for (i, better), (j, worse) in itertools.combinations(enumerate(ranked.index), 2):
                draws_better = means.loc[(task, better, backbone), score].to_numpy(float)
                draws_worse = means.loc[(task, worse, backbone), score].to_numpy(float)
                low, high = np.nanquantile(draws_better - draws_worse, quantiles)
                by_seed = board[board.method.isin([better, worse])].pivot(index="seed", columns="method",
                                                                           values=score).dropna()
                ahead = int((by_seed[better] > by_seed[worse]).sum())
                resolved = low > 0
                verdict = (NOT_RESOLVED if not resolved else RESOLVED if ahead == len(by_seed) else DEV_ONLY)
                rows.append({"task": task, "backbone": backbone, "score": score, "better": better, "worse": worse,
                             "better_value": ranked[better], "worse_value": ranked[worse],
                             "difference": ranked[better] - ranked[worse], "diff_low": float(low),
                             "diff_high": float(high), "seeds_ahead": ahead, "seeds": len(by_seed),
                             "better_speedup": pick_speedups.get(better, np.nan),
                             "worse_speedup": pick_speedups.get(worse, np.nan), "rank_gap": j - i,
                             "verdict": verdict})
    return pd.DataFrame(rows, columns=columns)


SCORE_NAMES = {"auc": "AUC", "heldout_pick_metric": "held-out pick metric"}


def differences_markdown(table: pd.DataFrame, adjacent_only: bool = False) -> str:
    """Markdown of :func:`method_differences`: one line per pair (per adjacent pair in each ranking with
    `adjacent_only`), values x100, the interval in points, held-out picks with their speed-up."""
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
                                         named(row, "worse"), interval, f"{row['seeds_ahead']}/{row['seeds']}",
                                         row["verdict"]]) + " |")
    return "\n".join(lines)


def differences_legend(confidence: float = 0.95) -> str:
    return (f"difference: better − worse seed mean; its {100 * confidence:g} % interval is a paired bootstrap over dev "
            "examples (the same resamples for both methods and every seed; 1000 resamples, seed 0). "
            f"{RESOLVED}: the interval excludes 0 and the better method is ahead in every seed; {DEV_ONLY}: the "
            f"interval excludes 0 but some seed has the order reversed or tied; {NOT_RESOLVED}: the interval holds 0.")
