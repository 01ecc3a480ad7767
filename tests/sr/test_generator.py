import collections
import math

import numpy as np
import pytest

from sr_jax.generator import ExpressionGenerator, GeneratorConfig, sample, sample_stream
from sr_jax.expressions import UNARY_OPERATORS

N_DIST = 1500


@pytest.fixture(scope="module")
def many():
    return [sample([7, i]) for i in range(N_DIST)]


def test_deterministic_from_seed():
    a, b = sample(123), sample(123)
    assert a.expression == b.expression
    np.testing.assert_array_equal(a.x_NxD, b.x_NxD)
    np.testing.assert_array_equal(a.y_N, b.y_N)
    assert sample(124).expression != a.expression


def test_samples_are_finite_standardised_and_sized(many):
    for s in many[:300]:
        d = s.info["d_in"]
        assert s.x_NxD.shape[1] == d and min(5 * d, 200) <= len(s.y_N) <= 200
        assert np.isfinite(s.x_NxD).all() and np.isfinite(s.y_N).all()
        assert np.abs(s.y_N).max() < 1e103
        np.testing.assert_allclose(s.x_NxD.mean(0), 0, atol=1e-9)
        np.testing.assert_allclose(s.x_NxD.std(0), 1, atol=1e-9)
        assert s.expression.tokens[0] == "add" and isinstance(s.expression.tokens[1], float)
        assert s.expression.n_variables_needed == d  # every variable used (enforce_dim)


def test_dimension_uniform(many):
    counts = np.bincount([s.info["d_in"] for s in many], minlength=11)[1:]
    expected = N_DIST / 10
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 27.9  # 99.9% quantile of chi2 with 9 dof


def test_unary_operator_frequencies():
    """Sampling weights of the spec (before point-validity rejection, which by design favours e.g. inv over log)."""
    cfg = GeneratorConfig()
    gen = ExpressionGenerator(cfg)
    rng = np.random.default_rng(5)
    ops, p = cfg.operator_weights(1)
    c = collections.Counter()
    for _ in range(2500):
        e = gen.sample_expression(rng, int(rng.integers(1, 11)), 4)
        if e is not None:
            c.update(t for t in e.tokens if t in UNARY_OPERATORS)
    total = sum(c.values())
    assert total > 2000
    assert c["arcsin"] == 0 and c["arccos"] == 0 and c["div"] == 0
    for op, prob in zip(ops, p):
        sd = math.sqrt(prob * (1 - prob) / total)
        assert abs(c[op] / total - prob) < 5 * sd, (op, c[op] / total, prob)
    assert p[list(ops).index("sqrt")] == pytest.approx(5 / 17.4)


def test_accepted_binary_count_range(many):
    """b ~ U{0..d+3}, rejected when b + 1 < d: accepted b lies in d-1..d+3 (before prefactor add/mul nodes)."""
    for s in many[:200]:
        d = s.info["d_in"]
        assert d >= 1 and s.info["n_binary_ops"] >= d - 1


def test_binary_count_range_and_constant_format(many):
    for s in many[:300]:
        for v in s.expression.constants:
            m = abs(v)
            assert 1e-3 <= m <= 99.9 + 1e-9
            assert float("%.3g" % m) == pytest.approx(m)  # at most 3 significant digits


def test_uniform_binary_trees():
    """With b = 3 operators all 5 binary tree shapes are equally likely (Catalan(3) = 5)."""
    gen = ExpressionGenerator(GeneratorConfig())
    rng = np.random.default_rng(0)
    shapes = collections.Counter(tuple(v is None for v in gen._binary_tree(rng, 3)) for _ in range(5000))
    assert len(shapes) == 5
    for n in shapes.values():
        assert abs(n - 1000) < 150


def test_stream_matches_single_process_and_is_ordered():
    ref = [sample([3, i]).expression for i in range(6)]
    got = [s.expression for s in sample_stream(seed=3, n_workers=2, stop=6, chunksize=2)]
    assert got == ref


def test_config_validation():
    with pytest.raises(ValueError, match="unknown operators"):
        GeneratorConfig(unary_operators=("sinh",))
    with pytest.raises(ValueError):
        GeneratorConfig(min_input_dimension=0)


def test_extrapolation_sets_reuse_the_fit_sets_centroids_and_distribution():
    """Each sigma set is a fresh mixture with the fit set's number of centroids and distribution type (the
    reference passes them on and draws only new centres)."""
    gen = ExpressionGenerator(GeneratorConfig(prediction_sigmas=(1, 2, 4), n_points=50, n_prediction_points=20,
                                              max_input_dimension=2, reject_fp_errors=False))
    calls = []
    draw = gen.sample_points

    def recording(rng, d, n, n_centroids=None, kind=None):
        x, info = draw(rng, d, n, n_centroids, kind)
        calls.append((n_centroids is None, info["n_centroids"], info["input_distribution_type"]))
        return x, info

    gen.sample_points = recording
    seen = set()
    for seed in range(12):
        calls.clear()
        s = gen.sample(np.random.default_rng(seed))
        fit, preds = calls[-4], calls[-3:]  # the accepted fit set and its three sigma sets
        assert fit[0] and not any(p[0] for p in preds)
        assert all(p[1:] == fit[1:] == (s.info["n_centroids"], s.info["input_distribution_type"]) for p in preds)
        seen.add(fit[1:])
    assert len({k for k, _ in seen}) > 2 and len({t for _, t in seen}) == 2  # K and the type still vary
