"""How far a timing protocol can be trusted: the same job timed twice, compared run against run.

    python benchmarks/micro/timing_agreement.py RUN_A RUN_B [--label NAME]

RUN_A and RUN_B are results folders of the same job(s) (same checkpoint, same points), e.g. two
`eebench run --suite leaderboard-minilm --methods pcee --tasks mcid --seeds 0 --out RUN_x` on a quiet machine.
Prints one markdown row per batch size: the share of flagged points in each run (`eebench.timing.timing_flag`,
re-judged from the stored rounds with the current rule, and as stored), the median realization in each run,
the median speed-up spread over rounds, and how far the two runs' wall-clock speed-ups of the same point
differ (median and max of |log(a / b)|; 0.01 = 1 %). The full model (speed-up 1 by definition) is left out.
"""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from eebench.leaderboard import load_records
from eebench.timing import Timed, paired_spread, timing_flag


def timed_points(folder: str) -> pd.DataFrame:
    records = load_records(folder)
    points = records[records.wallclock_speedup.notna() & (records.knob_label != "full model")].copy()
    point, full = (points[column].map(lambda rounds: Timed(tuple(rounds)))
                   for column in ("wallclock_seconds_repeats", "full_wallclock_seconds_repeats"))
    points["spread_now"] = [paired_spread(p, f) for p, f in zip(point, full, strict=True)]
    points["flag_now"] = [timing_flag(r, p, f) for r, p, f in zip(points.realization, point, full, strict=True)]
    points["rounds"] = point.map(lambda timed: len(timed.seconds))
    return points.set_index(["job_id", "batch_size", "knob_label"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    a, b = timed_points(args.run_a), timed_points(args.run_b)
    common = a.index.intersection(b.index)
    if common.empty:
        raise SystemExit(f"{args.run_a} and {args.run_b} share no timed point: not the same job(s)")
    print("| protocol | batch | points | rounds | flagged a / b (as stored) | realization median a / b | "
          "speed-up spread median | a vs b: median / max abs log ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for batch_size in sorted(common.get_level_values("batch_size").unique()):
        keys = [key for key in common if key[1] == batch_size]
        x, y = a.loc[keys], b.loc[keys]
        flagged = " / ".join(f"{(t.flag_now != '').mean():.0%} ({(t.timing_flag.fillna('') != '').mean():.0%})"
                             for t in (x, y))
        gap = np.abs(np.log(x.wallclock_speedup.to_numpy() / y.wallclock_speedup.to_numpy()))
        print(f"| {args.label} | {batch_size} | {len(keys)} | {x.rounds.median():.0f} / {y.rounds.median():.0f} | "
              f"{flagged} | {x.realization.median():.3f} / {y.realization.median():.3f} | "
              f"{pd.concat([x.spread_now, y.spread_now]).median():.1%} | {np.median(gap):.3f} / {gap.max():.3f} |")


if __name__ == "__main__":
    main()
