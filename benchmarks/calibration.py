"""Learn-then-Test (LTT) calibration of an early-exit knob (CALM §8, Angelopoulos et al. 2021).

Given per-example losses ``losses[j, s]`` in [0, 1] of K candidate knobs (row 0 the safest, e.g. the highest
threshold; the last row the most aggressive) on n calibration prompts, LTT returns the most aggressive knob
whose risk E[loss] is certified <= delta, such that P(E[loss(chosen)] <= delta) >= 1 - epsilon over the draw
of the calibration set (prompts exchangeable with the test prompts). Each row's null "risk > delta" gets a
Hoeffding–Bentkus p-value; fixed-sequence testing (walk from row 0 while p <= epsilon) controls the
family-wise error at epsilon without a multiplicity correction, and needs no monotonicity of the risk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import xlogy
from scipy.stats import binom

from .metrics.generation import rouge_l


def _check_level(value: float, what: str) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{what} must be in (0, 1), got {value}; e.g. delta=0.1 (tolerated risk) and "
                         "epsilon=0.05 (allowed probability that the guarantee fails)")


def _hb_pvalues(risks: np.ndarray, n: int, delta: float) -> np.ndarray:
    """Vectorised :func:`hoeffding_bentkus_pvalue` over an array of empirical risks (same n and delta)."""
    r = np.asarray(risks, dtype=np.float64)
    a = np.minimum(r, delta)
    # h(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b)), with 0 log 0 = 0 (xlogy) so that R̂ = 0 is defined
    h = xlogy(a, a / delta) + xlogy(1.0 - a, (1.0 - a) / (1.0 - delta))
    hoeffding = np.exp(-n * h)
    # n·R̂ is rounded before the ceiling: a mean of 0/1 losses that floating point puts a hair above an
    # integer count (20.000000000000004) would otherwise be bumped a whole count up.
    counts = np.ceil(np.round(n * r, 9))
    bentkus = math.e * binom.cdf(counts, n, delta)
    return np.clip(np.minimum(hoeffding, bentkus), 0.0, 1.0)


def hoeffding_bentkus_pvalue(risk_hat: float, n: int, delta: float) -> float:
    """p-value of the null "true risk > delta" given the mean ``risk_hat`` of n i.i.d. losses in [0, 1].

    p = min( exp(-n h(min(R̂, δ), δ)), e · P[Binomial(n, δ) <= ⌈n R̂⌉] ), clipped to [0, 1], with
    h(a, b) = a log(a/b) + (1 - a) log((1 - a)/(1 - b)) and 0 log 0 = 0 (Bates et al. 2021, RCPS; as used by LTT).
    """
    _check_level(delta, "delta")
    if not (isinstance(n, int | np.integer) and n >= 1):
        raise ValueError(f"n must be a positive integer (the number of calibration examples), got {n!r}")
    if not 0.0 <= risk_hat <= 1.0:
        raise ValueError(f"risk_hat must be a mean of losses in [0, 1], got {risk_hat}")
    return float(_hb_pvalues(np.array([risk_hat]), int(n), delta)[0])


@dataclass(frozen=True, eq=False)  # eq=False: == on numpy fields would be ambiguous
class LTTResult:
    """LTT's choice and its evidence.

    ``chosen``: index of the most aggressive certified row (fixed sequence: rows 0..chosen all have
    p <= epsilon), or None when row 0 is not certified: use the full model. ``p_values``, ``risks``: (K,)
    Hoeffding–Bentkus p-value and empirical risk (mean loss over the n examples) of every row, including
    those after the first uncertified one (recorded, not used).
    """

    chosen: int | None
    p_values: np.ndarray
    risks: np.ndarray
    n: int
    delta: float
    epsilon: float

    @property
    def certified(self) -> np.ndarray:
        """(K,) bool: the rows the fixed-sequence test declared valid (a prefix of the rows)."""
        mask = np.zeros(len(self.p_values), dtype=bool)
        if self.chosen is not None:
            mask[: self.chosen + 1] = True
        return mask


def _check_losses(losses: np.ndarray) -> np.ndarray:
    arr = np.asarray(losses, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"losses must have shape (K knobs, n examples) with K, n >= 1, got {arr.shape}; "
                         "for one knob pass losses[None, :]")
    bad = ~np.isfinite(arr) | (arr < 0.0) | (arr > 1.0)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"losses[{row}, {col}] = {arr[row, col]} (knob row {row}, example {col}) is not a "
                         f"finite value in [0, 1] ({int(bad.sum())} such entries). Fix: map the loss into "
                         "[0, 1] (e.g. 1 - ROUGE-L, or max(0, difference) for risk consistency) and drop or "
                         "re-score examples with NaN")
    return arr


def learn_then_test(losses: np.ndarray, delta: float, epsilon: float) -> LTTResult:
    """LTT with Hoeffding–Bentkus p-values and fixed-sequence testing.

    ``losses``: (K, n) per-example losses in [0, 1], row j = knob j, rows ordered from safest (0) to most
    aggressive; column s = calibration example s (the same example in every row). ``delta``: tolerated risk
    E[loss]; ``epsilon``: allowed probability that the chosen knob's true risk exceeds delta.
    """
    _check_level(delta, "delta")
    _check_level(epsilon, "epsilon")
    arr = _check_losses(losses)
    n = arr.shape[1]
    risks = arr.mean(axis=1)
    p_values = _hb_pvalues(risks, n, delta)
    chosen: int | None = None
    for j, p in enumerate(p_values):
        if p > epsilon:  # fixed sequence: the first failure ends the walk, later passes do not count
            break
        chosen = j
    return LTTResult(chosen=chosen, p_values=p_values, risks=risks, n=n, delta=float(delta), epsilon=float(epsilon))


def textual_consistency_loss(early_outputs: Sequence[str], full_outputs: Sequence[str]) -> np.ndarray:
    """1 - ROUGE-L(early, full) per prompt: (N,) in [0, 1], 0 when the early exit reproduces the full output.
    Needs no references (CALM's textual consistency)."""
    return 1.0 - rouge_l(early_outputs, full_outputs)


def risk_consistency_loss(early_outputs: Sequence[str], full_outputs: Sequence[str],
                          references: Sequence[str]) -> np.ndarray:
    """max(0, R(early, ref) - R(full, ref)) per prompt with R = 1 - ROUGE-L: (N,) in [0, 1].

    The raw difference lies in [-1, 1], but the Hoeffding–Bentkus bound needs losses in [0, 1]; clipping at 0
    (CALM §8.1) never lowers a loss, so the certified E[max(0, diff)] <= delta implies E[diff] <= delta: more
    conservative, never less (an early exit that beats the full model on one prompt earns no credit).
    """
    early_risk = 1.0 - rouge_l(early_outputs, references)
    full_risk = 1.0 - rouge_l(full_outputs, references)
    return np.maximum(0.0, early_risk - full_risk)


def split_guarantee_check(losses: np.ndarray, delta: float, epsilon: float, calibration_size: int,
                          draws: int, seed: int) -> dict:
    """Empirical check of LTT's guarantee on STORED per-example losses, over random calibration/test splits.

    ``losses``: (K, N) in [0, 1], rows as in :func:`learn_then_test`. Each of ``draws`` splits samples
    ``calibration_size`` of the N examples without replacement, runs LTT on them, and measures the chosen
    row's mean loss on the other N - calibration_size examples (held-out risk; 0 when LTT falls back to the
    full model, whose consistency losses are 0 by construction). Returns a JSON-ready dict:

    - ``violation_rate``: fraction of splits whose held-out risk exceeds delta. LTT bounds the probability
      that the TRUE risk exceeds delta by epsilon; the held-out mean is a noisy estimate of it, so a chosen
      row with true risk just under delta can still "violate" on a small test part: read the rate against
      epsilon with that in mind.
    - ``population_violation_rate``: the same with the chosen row's mean over all N stored examples (the
      stored set taken as the population).
    - ``mean_chosen_index`` (over splits that chose a row; None when none did), ``n_full_model`` (splits
      that certified no row), ``mean_heldout_risk``, and the settings.
    """
    _check_level(delta, "delta")
    _check_level(epsilon, "epsilon")
    arr = _check_losses(losses)
    n_total = arr.shape[1]
    if not 1 <= calibration_size < n_total:
        raise ValueError(f"calibration_size must be in [1, {n_total - 1}] so that both parts of each split are "
                         f"non-empty (N = {n_total} stored examples), got {calibration_size}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    rng = np.random.default_rng(seed)
    population = arr.mean(axis=1)
    heldout, population_risk, chosen = [], [], []
    for _ in range(draws):
        order = rng.permutation(n_total)
        cal, test = order[:calibration_size], order[calibration_size:]
        result = learn_then_test(arr[:, cal], delta, epsilon)
        chosen.append(result.chosen)
        heldout.append(0.0 if result.chosen is None else float(arr[result.chosen, test].mean()))
        population_risk.append(0.0 if result.chosen is None else float(population[result.chosen]))
    picked = [c for c in chosen if c is not None]
    return {
        "draws": draws, "calibration_size": calibration_size, "test_size": n_total - calibration_size,
        "delta": float(delta), "epsilon": float(epsilon), "seed": seed,
        "violation_rate": float(np.mean(np.asarray(heldout) > delta)),
        "population_violation_rate": float(np.mean(np.asarray(population_risk) > delta)),
        "mean_chosen_index": float(np.mean(picked)) if picked else None,
        "n_full_model": len(chosen) - len(picked),
        "mean_heldout_risk": float(np.mean(heldout)),
    }
