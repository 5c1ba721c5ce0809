"""Learn-then-Test: Hoeffding–Bentkus p-values, fixed-sequence testing, and the guarantee checked empirically."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from eebench.calibration import (
    LTTResult,
    hoeffding_bentkus_pvalue,
    learn_then_test,
    risk_consistency_loss,
    split_guarantee_check,
    textual_consistency_loss,
)


def _direct_pvalue(r: float, n: int, delta: float, count: int) -> float:
    """The formula written out, scalar by scalar (0 log 0 = 0 by hand); ``count`` = ⌈n R̂⌉, worked out by hand."""
    a = min(r, delta)
    h = (a * math.log(a / delta) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - delta))
    return min(1.0, math.exp(-n * h), math.e * binom.cdf(count, n, delta))


@pytest.mark.parametrize("r,n,delta,count", [(0.0, 50, 0.1, 0), (0.03, 200, 0.1, 6), (0.07, 200, 0.1, 14),
                                             (0.0725, 200, 0.1, 15), (0.1, 200, 0.1, 20), (0.25, 100, 0.2, 25),
                                             (0.5, 30, 0.3, 15), (0.999, 10, 0.5, 10), (0.013, 1000, 0.05, 13)])
def test_pvalue_matches_direct_computation(r, n, delta, count):
    expected = _direct_pvalue(r, n, delta, count)
    assert hoeffding_bentkus_pvalue(r, n, delta) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_pvalue_known_values():
    # R̂ = δ: h(δ, δ) = 0, so the Hoeffding term is 1 and p is the (clipped) Bentkus term.
    assert hoeffding_bentkus_pvalue(0.1, 200, 0.1) == pytest.approx(min(1.0, math.e * binom.cdf(20, 200, 0.1)))
    assert hoeffding_bentkus_pvalue(0.1, 200, 0.1) == 1.0  # e · P[Bin(200, .1) <= 20] ≈ e · 0.56 > 1
    # R̂ = 0: h(0, δ) = log(1/(1-δ)), Hoeffding = (1-δ)^n; Bentkus = e (1-δ)^n, so p = (1-δ)^n.
    assert hoeffding_bentkus_pvalue(0.0, 500, 0.1) == pytest.approx(0.9 ** 500)
    assert hoeffding_bentkus_pvalue(0.0, 500, 0.1) < 1e-20
    # Above δ the Hoeffding term is capped at 1 (a = min(R̂, δ)): no evidence of safety.
    assert hoeffding_bentkus_pvalue(0.5, 200, 0.1) == 1.0


def test_pvalue_float_rounding_does_not_add_a_count():
    losses = np.array([1.0] * 20 + [0.0] * 180)  # 20/200: the float mean times 200 is not exactly 20
    assert hoeffding_bentkus_pvalue(float(losses.mean()), 200, 0.2) == pytest.approx(
        min(1.0, math.exp(-200 * ((0.1 * math.log(0.5)) + 0.9 * math.log(0.9 / 0.8))),
            math.e * binom.cdf(20, 200, 0.2)))


def test_pvalue_is_monotone_in_risk_and_in_n():
    risks = np.linspace(0.0, 0.3, 61)
    by_risk = [hoeffding_bentkus_pvalue(float(r), 200, 0.15) for r in risks]
    assert all(b >= a for a, b in zip(by_risk, by_risk[1:], strict=False))
    assert by_risk[0] < 1e-10 and by_risk[-1] == 1.0
    by_n = [hoeffding_bentkus_pvalue(0.05, n, 0.1) for n in (20, 50, 100, 200, 500, 1000)]
    assert all(b <= a for a, b in zip(by_n, by_n[1:], strict=False))
    assert by_n[-1] < 1e-5


def test_pvalue_bad_inputs():
    with pytest.raises(ValueError, match="delta"):
        hoeffding_bentkus_pvalue(0.1, 100, 1.0)
    with pytest.raises(ValueError, match="positive integer"):
        hoeffding_bentkus_pvalue(0.1, 0, 0.1)
    with pytest.raises(ValueError, match="risk_hat"):
        hoeffding_bentkus_pvalue(1.5, 100, 0.1)


def _rows(risks: list[float], n: int) -> np.ndarray:
    """(K, n) 0/1 losses whose row j has exactly round(risks[j] * n) ones."""
    out = np.zeros((len(risks), n))
    for j, r in enumerate(risks):
        out[j, : round(r * n)] = 1.0
    return out


def test_fixed_sequence_stops_at_first_uncertified_row():
    # rows 0-1 certified, row 2 not (risk 0.2 > δ), rows 3-4 would pass on their own but are never reached
    result = learn_then_test(_rows([0.0, 0.02, 0.2, 0.0, 0.01], 400), delta=0.1, epsilon=0.05)
    assert isinstance(result, LTTResult)
    assert result.chosen == 1
    assert result.certified.tolist() == [True, True, False, False, False]
    assert result.p_values[3] <= 0.05 and result.p_values[4] <= 0.05 and result.p_values[2] > 0.05
    assert result.risks == pytest.approx([0.0, 0.02, 0.2, 0.0, 0.01])
    assert (result.n, result.delta, result.epsilon) == (400, 0.1, 0.05)
    # all rows certified: the last (most aggressive) one is chosen
    assert learn_then_test(_rows([0.0, 0.01, 0.02], 400), 0.1, 0.05).chosen == 2


def test_full_model_when_row_zero_fails():
    result = learn_then_test(_rows([0.3, 0.0, 0.0], 400), delta=0.1, epsilon=0.05)
    assert result.chosen is None
    assert not result.certified.any()
    # too few examples to certify anything, even at zero empirical risk: (1 - 0.1)^10 ≈ 0.35 > 0.05
    assert learn_then_test(np.zeros((2, 10)), 0.1, 0.05).chosen is None


def test_ltt_input_validation():
    losses = np.zeros((3, 20))
    losses[1, 7] = np.nan
    with pytest.raises(ValueError, match=r"losses\[1, 7\].*Fix"):
        learn_then_test(losses, 0.1, 0.05)
    losses[1, 7] = -0.2
    with pytest.raises(ValueError, match=r"losses\[1, 7\].*max\(0, difference\)"):
        learn_then_test(losses, 0.1, 0.05)
    with pytest.raises(ValueError, match="shape"):
        learn_then_test(np.zeros(20), 0.1, 0.05)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="delta"):
            learn_then_test(np.zeros((1, 20)), bad, 0.05)
        with pytest.raises(ValueError, match="epsilon"):
            learn_then_test(np.zeros((1, 20)), 0.1, bad)


def _population(rng: np.random.Generator, size: int) -> np.ndarray:
    """(K, size) per-example losses of K knobs on one population of prompts, with exactly known true risks.

    0/1 rows have exactly round(r * size) ones. The first rows share one latent difficulty per prompt (real
    knobs are correlated) and rise with two dips (non-monotone); a continuous (Beta) row is among them. Then
    come eight INDEPENDENT rows a hair above δ = 0.1: each alone is rarely certified, but a procedure that
    took the best of them without fixed-sequence testing would violate often (multiplicity). Last, two rows
    far above δ, non-monotone too."""
    rank = rng.permutation(size)  # the latent difficulty, a permutation so that counts are exact

    def coupled(r: float) -> np.ndarray:
        return rank < round(r * size)

    def independent(r: float) -> np.ndarray:
        return rng.permutation(size) < round(r * size)

    rows = [coupled(0.02), coupled(0.05), rng.beta(2.0, 38.0, size), coupled(0.04), coupled(0.085),
            coupled(0.06), coupled(0.097), *(independent(0.1005) for _ in range(8)), coupled(0.3), coupled(0.12)]
    return np.stack(rows).astype(np.float64)


@pytest.mark.parametrize("delta,epsilon", [(0.1, 0.1), (0.1, 0.2)])
def test_empirical_guarantee(delta, epsilon):
    rng = np.random.default_rng(0)
    population = _population(rng, 100_000)
    true_risk = population.mean(axis=1)
    unsafe = true_risk > delta
    assert unsafe[7:15].all() and not unsafe[:7].any()  # the independent rows really are just above δ
    draws, n = 1000, 200
    chosen_risk, best_of_all = np.zeros(draws), np.zeros(draws, dtype=bool)
    for d in range(draws):
        sample = rng.integers(0, population.shape[1], n)  # n i.i.d. prompts from the population
        result = learn_then_test(population[:, sample], delta, epsilon)
        chosen_risk[d] = 0.0 if result.chosen is None else true_risk[result.chosen]
        passed = np.flatnonzero(result.p_values <= epsilon)  # without fixed sequence: any row that passes
        best_of_all[d] = len(passed) > 0 and unsafe[passed.max()]
    violations = int(np.sum(chosen_risk > delta))
    # Monte-Carlo slack: if P(violation) <= ε, the count is stochastically below Binomial(draws, ε), which
    # exceeds this bound with probability < 1e-4; the test thus fails by chance at most once in 10^4 seeds.
    bound = binom.ppf(1 - 1e-4, draws, epsilon)
    assert violations <= bound, f"{violations}/{draws} draws chose a knob with true risk > {delta}"
    # ...and LTT is not trivially conservative: most draws certify a knob with true risk well above 0.
    assert np.mean(chosen_risk >= 0.04) > 0.5
    # The population has teeth: skipping fixed-sequence testing breaks the guarantee on the same draws.
    assert best_of_all.sum() > bound


def test_empirical_guarantee_single_knob_just_above_delta():
    """The tightest case: one knob whose true risk is a hair above δ; every certification is a violation."""
    rng = np.random.default_rng(1)
    delta, epsilon, n, draws = 0.1, 0.1, 200, 2000
    population = (rng.random(100_000) < 0.1001).astype(np.float64)[None, :]
    assert population.mean() > delta
    certified = sum(learn_then_test(population[:, rng.integers(0, 100_000, n)], delta, epsilon).chosen == 0
                    for _ in range(draws))
    assert certified <= binom.ppf(1 - 1e-4, draws, epsilon)


def test_split_guarantee_check_on_synthetic_losses():
    rng = np.random.default_rng(2)
    stored = _population(rng, 2000)
    check = split_guarantee_check(stored, delta=0.1, epsilon=0.1, calibration_size=500, draws=200, seed=3)
    assert check["draws"] == 200 and check["calibration_size"] == 500 and check["test_size"] == 1500
    assert check["violation_rate"] <= binom.ppf(1 - 1e-4, 200, 0.1) / 200
    assert 0.0 <= check["population_violation_rate"] <= 1.0
    assert check["mean_chosen_index"] is not None and 0.0 <= check["mean_chosen_index"] <= stored.shape[0] - 1
    assert 0 <= check["n_full_model"] < 200
    assert 0.0 < check["mean_heldout_risk"] < 0.1
    # same seed, same splits
    assert split_guarantee_check(stored, 0.1, 0.1, 500, 200, seed=3) == check


def test_split_guarantee_check_full_model_and_errors():
    hopeless = np.full((3, 400), 0.5)  # every knob far above δ: every split falls back to the full model
    check = split_guarantee_check(hopeless, 0.1, 0.05, calibration_size=200, draws=20, seed=0)
    assert check["n_full_model"] == 20 and check["mean_chosen_index"] is None
    assert check["violation_rate"] == 0.0 and check["mean_heldout_risk"] == 0.0
    with pytest.raises(ValueError, match="calibration_size"):
        split_guarantee_check(hopeless, 0.1, 0.05, calibration_size=400, draws=5, seed=0)
    with pytest.raises(ValueError, match="draws"):
        split_guarantee_check(hopeless, 0.1, 0.05, calibration_size=100, draws=0, seed=0)


def test_consistency_losses():
    early = ["the cat sat on the mat", "a completely different text", ""]
    full = ["the cat sat on the mat", "the dog ran in the park", ""]
    refs = ["the cat sat on the mat", "the dog ran in the park", "something"]
    textual = textual_consistency_loss(early, full)
    assert textual == pytest.approx([0.0, 1.0, 0.0])  # identical, disjoint, both empty
    risk = risk_consistency_loss(early, full, refs)
    assert risk == pytest.approx([0.0, 1.0, 0.0])
    # an early exit BETTER than the full model earns no negative loss (clipped at 0)
    assert risk_consistency_loss(["the dog ran"], ["xyz"], ["the dog ran"]) == pytest.approx([0.0])
    assert risk_consistency_loss(["xyz"], ["the dog ran"], ["the dog ran"]) == pytest.approx([1.0])
    assert ((textual >= 0) & (textual <= 1)).all() and ((risk >= 0) & (risk <= 1)).all()
