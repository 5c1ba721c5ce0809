"""Cost formulas on hand-computed cases."""

import numpy as np
import pytest

from eebench import costs


def test_layer_macs_matches_the_spec_formula_for_dense_layers():
    # Spec: dense layer (q = n), f = 4d -> 12 n d^2 + 2 n^2 d.
    n, d = 10, 8
    assert costs.layer_macs(n, n, d, 4 * d) == 12 * n * d * d + 2 * n * n * d
    # q < n (token-wise): (10q + 2n) d^2 + 2 q n d.
    q = 3
    assert costs.layer_macs(q, n, d, 4 * d) == (10 * q + 2 * n) * d * d + 2 * q * n * d


def test_layerwise_flops_hand_computed():
    # Two examples, L = 3, d = 2, f = 8: example A (n=4 tokens) exits at layer 1, B (n=2) at layer 3.
    d, f = 2, 8
    per_layer_a = 2 * 4 * 4 + 2 * 4 * 4 + 2 * 4 * 2 * 8 + 2 * 4 * 4 * 2   # = 32 + 32 + 128 + 64 = 256
    per_layer_b = 2 * 2 * 4 + 2 * 2 * 4 + 2 * 2 * 2 * 8 + 2 * 2 * 2 * 2   # = 16 + 16 + 64 + 16 = 112
    assert per_layer_a == 256 and per_layer_b == 112
    flops = costs.layerwise_flops(np.array([1, 3]), np.array([4, 2]), np.array([5.0, 15.0]), 3, d, f)
    np.testing.assert_allclose(flops, [2 * (256 + 5), 2 * (3 * 112 + 15)])


def test_saved_layer_speedup_and_ratio():
    # L = 12; exits 6, 12, 3, 3 -> mean 6 -> 2x.
    assert costs.saved_layer_speedup(np.array([6, 12, 3, 3]), 12) == pytest.approx(2.0)
    assert costs.saved_layer_speedup(np.array([12, 12]), 12) == 1.0
    assert costs.ratio(np.array([10.0, 10.0]), np.array([5.0, 2.5])) == pytest.approx(20 / 7.5)


def test_token_weighted_speedup():
    # L = 4; example 1 has 3 real tokens at depths 4, 2, 2 (+1 padding); example 2 one token at depth 4.
    token_layers = np.array([[4, 2, 2, 0], [4, 0, 0, 0]])
    assert costs.token_weighted_speedup(token_layers, np.array([3, 1]), 4) == pytest.approx(4 * 4 / 12)


def test_layerwise_token_counts_zero_after_exit():
    counts = costs.layerwise_token_counts(np.array([2, 1]), np.array([5, 7]), 3)
    np.testing.assert_array_equal(counts, [[5, 5, 0], [7, 0, 0]])


def test_glossary_defines_every_reported_speedup():
    for name in ("saved_layer_speedup", "flops_speedup", "wallclock_speedup", "mean_exit_layer", "flops"):
        assert name in costs.GLOSSARY
