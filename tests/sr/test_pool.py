import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sr_jax import Expression
from sr_jax.candidates import Candidate
from sr_jax.pool import (PriorLibrary, _monomial, _product_library, _transformed_sums, _unary_monomials,
                          basis_candidates, dedupe, outer_terms, prior_candidates, prior_library, screen_prior)


def _nmse(expr: Expression, z, y) -> float:
    with np.errstate(all="ignore"):
        return float(np.mean((expr.evaluate_numpy(z) - y) ** 2) / np.var(y))


def _best(cands, z, y) -> float:
    losses = [_nmse(c.expression, z, y) for c in cands]
    return min(v for v in losses if np.isfinite(v))


def _standardise(x):
    m, s = x.mean(axis=0), x.std(axis=0)
    return (x - m) / s, m, s


def test_prior_is_deterministic_distinct_and_in_range():
    a = prior_candidates(3, 16, seed=5)
    assert [c.expression for c in a] == [c.expression for c in prior_candidates(3, 16, seed=5)]
    assert [c.expression for c in a] != [c.expression for c in prior_candidates(3, 16, seed=6)]
    assert len(a) == 16 and len({c.expression.skeleton() for c in a}) == 16
    assert all(c.source == "prior" and c.expression.n_variables_needed <= 3 for c in a)
    # some draws use fewer variables than the dataset has (formulas of a subset of the features)
    assert any(len(c.expression.variables) < 3 for c in a)
    with pytest.raises(ValueError, match="n_features"):
        prior_candidates(11, 4)


def test_bases_contain_the_exact_answer_before_refinement():
    """Least squares on the basis families already solves the simple cases the estimator must recover."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, (150, 1))
    z, m, s = _standardise(x)
    y = 2.5 * np.sin(x[:, 0]) + x[:, 0] ** 2  # unary of the raw feature + polynomial
    assert _best(basis_candidates(z, y, m, s), z, y) < 1e-20
    y = 3.0 * x[:, 0] ** 3 - x[:, 0] + 0.5  # cubic
    assert _best(basis_candidates(z, y, m, s), z, y) < 1e-20
    x2 = rng.uniform(-2, 2, (150, 2))
    z2, m2, s2 = _standardise(x2)
    y = 1.5 * x2[:, 0] * x2[:, 1] - 0.7 * x2[:, 1] + 2  # quadratic with a cross term
    assert _best(basis_candidates(z2, y, m2, s2), z2, y) < 1e-20
    x10 = rng.uniform(-3, 3, (150, 10))
    z10, m10, s10 = _standardise(x10)
    y = 2.5 * np.sin(x10[:, 3]) + x10[:, 7] ** 2  # wide: unary of a correlated feature + squares
    assert _best(basis_candidates(z10, y, m10, s10), z10, y) < 1e-20
    xp = rng.uniform(0.5, 3, (150, 3))
    zp, mp, sp = _standardise(xp)
    y = 4.0 * xp[:, 0] ** 2 * xp[:, 2] / xp[:, 1]  # power law (positive features, one-signed y)
    assert _best(basis_candidates(zp, y, mp, sp), zp, y) < 1e-20


def test_sparse_sums_of_products_are_found_before_refinement():
    """Sums of a few products of powers of the raw features (many physics formulas), where the greedy first pick
    is a wrong term correlated with the whole sum: backward elimination from the longer forward set recovers them."""
    rng = np.random.default_rng(0)
    x = rng.uniform(1, 5, (150, 6))
    z, m, s = _standardise(x)
    for y in (x[:, 0] * x[:, 3] + x[:, 1] * x[:, 4] + x[:, 2] * x[:, 5],  # a dot product
              0.5 * x[:, 0] * (x[:, 1] ** 2 + x[:, 2] ** 2 + x[:, 3] ** 2),  # kinetic energy
              6.67 * x[:, 0] * x[:, 1] * (1 / x[:, 2] - 1 / x[:, 3])):  # a potential difference
        cands = basis_candidates(z, y, m, s)
        assert _best(cands, z, y) < 1e-20
        assert max(len(c.expression.constants) for c in cands) <= 24
    x5, (z5, m5, s5) = x[:, :5], _standardise(x[:, :5])
    for y in (x5[:, 0] * x5[:, 1] * x5[:, 2] * np.sin(x5[:, 3]),  # torque-like: a product times the sine of an angle
              x5[:, 0] * (1 + x5[:, 1] * np.cos(x5[:, 2]))):  # a sum with a cosine term
        assert _best(basis_candidates(z5, y, m5, s5), z5, y) < 1e-20


def test_unary_basis_falls_back_to_the_standardised_feature():
    rng = np.random.default_rng(1)
    x = rng.uniform(-3, 3, (100, 1))
    z, m, s = _standardise(x)
    cands = basis_candidates(z, np.exp(z[:, 0]) + z[:, 0], m, s, unaries=("log",))
    logs = [c.expression for c in cands if "log" in c.expression.tokens]
    # log(x) is not finite on negative x, so log(z + 0) is not either: no log basis at all
    assert logs == []
    xl = rng.uniform(800, 900, (100, 1))  # exp of the raw feature overflows: exp(z) is used instead
    zl, ml, sl = _standardise(xl)
    cands = basis_candidates(zl, np.exp(zl[:, 0]), ml, sl, unaries=("exp",))
    assert _best(cands, zl, np.exp(zl[:, 0])) < 1e-20


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(0, 10**6))
def test_bases_are_valid_for_any_width(d, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(30, d)) * rng.uniform(0.1, 10, d) + rng.normal(size=d)
    z, m, s = _standardise(x)
    y = rng.normal(size=30)
    cands = basis_candidates(z, y, m, s)
    assert cands[0].expression.tokens == (pytest.approx(y.mean()),)
    for c in cands:
        assert c.source == "basis" and c.expression.n_variables_needed <= d
        assert len(c.expression.constants) <= 24
    # the linear basis is the least-squares line: no basis is worse than the constant on its own data
    assert _best(cands[1:2], z, y) <= _nmse(cands[0].expression, z, y) + 1e-12


def test_dedupe_keeps_the_first_of_each_skeleton():
    a = Candidate(Expression(["add", 1.0, "x_0"]), "basis")
    b = Candidate(Expression(["add", 2.0, "x_0"]), "prior")
    c = Candidate(Expression(["mul", 2.0, "x_0"]), "prior")
    assert dedupe([a, b, c, a]) == [a, c]


def test_outer_terms_split_the_top_level_sum_and_drop_outer_factors():
    e = Expression.from_infix("1.5 + 2*sin(x_0) - x_1*3 + (x_0 + 4)*x_1")
    assert [Expression(t).infix() for t in outer_terms(e)] == ["sin(x_0)", "x_1", "((x_0 + 4.0) * x_1)"]
    assert [Expression(t).infix() for t in outer_terms(Expression.from_infix("exp(x_0)"))] == ["exp(x_0)"]
    assert outer_terms(Expression([2.0])) == []


def _library_of(infix: list[str]) -> PriorLibrary:
    return PriorLibrary.of([Candidate(Expression.from_infix(s), "prior") for s in infix])


def test_screening_ranks_by_outer_least_squares_and_sets_the_coefficients():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(150, 2))
    y = 3.0 - 2.0 * np.sin(1.3 * z[:, 0]) + 0.5 * z[:, 1] ** 2
    lib = _library_of(["9*sin(1.3*x_0) + 7*x_1**2 - 4",  # the right structure, wrong outer constants
                       "x_0 + x_1", "exp(x_0)", "log(x_0) + x_1",  # log of a negative z: not finite, dropped
                       "1 + 2*x_0 + 3*x_0"])  # a repeated term is one column
    (picked,) = screen_prior(lib, [(z, y)], n=10)
    assert _nmse(picked[0].expression, z, y) < 1e-16 and picked[0].source == "prior"
    assert np.allclose(sorted(picked[0].expression.constants), sorted([3.0, -2.0, 0.5, 1.3]))
    assert len(picked) == 4 and not any("log" in c.expression.skeleton() for c in picked)
    assert screen_prior(lib, [(z, y)], n=2)[0] == picked[:2]


def test_screening_many_datasets_at_once_equals_one_by_one():
    lib = prior_library(2, 64, seed=1)
    rng = np.random.default_rng(1)
    data = [(rng.normal(size=(n, 2)), rng.normal(size=n)) for n in (30, 80, 50)]
    together = screen_prior(lib, data, n=5)
    assert [len(p) for p in together] == [5, 5, 5]
    for (z, y), picked in zip(data, together):
        assert screen_prior(lib, [(z, y)], n=5)[0] == picked
        losses = [_nmse(c.expression, z, y) for c in picked]
        assert losses == sorted(losses) and losses[0] < 1.0


def test_sparse_products_find_a_dot_product_whose_first_greedy_picks_are_wrong():
    """The Feynman table's I.11.19 sample (x1*y1 + x2*y2 + x3*y3, six features in [1, 5]): the true products enter
    the forward set only after a dozen wrong picks, so 12 forward steps missed them (R² 0.967)."""
    from sr_jax.feynman import load_feynman, problem_seed, sample_problem

    problem = next(p for p in load_feynman().problems if p.name == "I.11.19")
    data = sample_problem(problem, seed=problem_seed(0, problem.name))
    x, y = data.X_train_NxD, data.y_train_N
    z, m, s = _standardise(x)
    assert _best(basis_candidates(z, y, m, s), z, y) < 1e-20


@pytest.mark.parametrize("name", ["lorentz", "doppler", "root", "linear", "planck", "diode", "arcsin"])
def test_shifted_power_of_monomial_bases_are_exact_before_refinement(name):
    """M1 * (1 + c * M2) ** p (p = -1/2, -1, 1/2, 1), M1 / (exp(c * M2) - 1), M1 * (exp(c * M2) - 1) and
    arcsin(M2) from least squares alone: m_0 / sqrt(1 - v**2/c**2), f / (1 - v/c), Planck's law, a diode's current,
    where no sum or product of powers is exact."""
    rng = np.random.default_rng(4)
    x = np.stack([rng.uniform(1, 5, 150), rng.uniform(1, 2, 150), rng.uniform(1, 5, 150),
                  rng.uniform(3, 10, 150)], axis=1)
    a, v, b, c = x.T
    y = {"lorentz": a / np.sqrt(1 - v ** 2 / c ** 2), "doppler": a * b / (1 - v / c),
         "root": a * b * np.sqrt(1 + v / c), "linear": a * b / v * (1 - v / c),
         "planck": a * b ** 3 / (np.exp(b / (2 * np.pi * c)) - 1), "diode": a * (np.exp(v * b / c) - 1),
         "arcsin": np.arcsin(v / c)}[name]
    z, m, s = _standardise(x)
    cands = basis_candidates(z, y, m, s)
    assert _best(cands, z, y) < 1e-20
    best = min(cands, key=lambda cd: _nmse(cd.expression, z, y)).expression.tokens
    shifted = any(t == "add" and best[i + 1] in (1.0, -1.0) for i, t in enumerate(best[:-1]))
    # "linear" is also a sum of two products, which may win the tie
    assert (shifted or name in ("linear", "arcsin")) and ("arcsin" in best) == (name == "arcsin"), best


@pytest.mark.parametrize("name", ["boltzmann", "log_ratio", "dipole", "gaussian", "one_minus_cos", "sin2_2pi"])
def test_unary_of_monomial_bases_are_exact_before_refinement(name):
    """Physics-style u(c * product) * product formulas come out of least squares alone (raw features > 0)."""
    rng = np.random.default_rng(3)
    x = rng.uniform(1, 5, size=(150, 4))
    a, b, c, d = x.T
    y = {"boltzmann": a * np.exp(-b * c / d), "log_ratio": a * b * np.log(d / c),
         "dipole": 3 * a * np.sin(b) * np.cos(b) / (4 * np.pi * c * d ** 3),
         "gaussian": np.exp(-a ** 2 / (2 * b ** 2)) / (np.sqrt(2 * np.pi) * b),
         "one_minus_cos": 2 * a * (1 - np.cos(b * c)), "sin2_2pi": np.sin(2 * np.pi * a * b / c) ** 2}[name]
    z, m, s = _standardise(x)
    assert _best(basis_candidates(z, y, m, s), z, y) < 1e-20


@pytest.mark.parametrize("name", ["distance", "law_of_cosines", "gaussian_shifted", "negative_distance"])
def test_transformed_sums_of_differences_are_exact_before_refinement(name):
    """sqrt or exp of a sparse sum with differences of features: distances, the law of cosines, a Gaussian in
    (theta - theta1) / sigma -- no sum or product of powers is exact there, and the other families miss them."""
    rng = np.random.default_rng(5)
    x = rng.uniform(1, 5, size=(150, 4))
    a, b, c, d = x.T
    y = {"distance": np.sqrt((b - a) ** 2 + (d - c) ** 2),
         "law_of_cosines": np.sqrt(a ** 2 + b ** 2 - 2 * a * b * np.cos(c - d)),
         "gaussian_shifted": np.exp(-((b - c) / a) ** 2 / 2) / (np.sqrt(2 * np.pi) * a),
         "negative_distance": -np.sqrt((b - a) ** 2 + (d - c) ** 2)}[name]
    z, m, s = _standardise(x)
    cands = basis_candidates(z, y, m, s)
    assert _best(cands, z, y) < 1e-20
    assert _best([c for c in cands if c.expression.tokens[0] in ("sqrt", "exp", "mul")], z, y) < 1e-20
    two_signs = np.abs(y) * np.where(np.arange(150) % 2, 1, -1)
    assert _transformed_sums(_product_library(x, m, s), z, two_signs, m, s) == []  # |y|'s transforms need one sign


def test_unary_of_monomial_bases_need_positive_features():
    rng = np.random.default_rng(4)
    x = rng.uniform(1, 5, size=(100, 2))
    x[0, 1] = -1.0
    z, m, s = _standardise(x)
    assert _unary_monomials(z, x[:, 0] * np.exp(-x[:, 1]), m, s) == []


def test_monomial_basis_fits_noisy_targets_that_cross_zero_near_their_small_values():
    """Noise of 10% of RMS(y) on a product of powers with a wide range makes a few small targets negative: the
    monomial is still fitted (on the dominant sign's rows, weighted by |y|) and lands near the truth, while a
    target that really changes sign gets none."""
    rng = np.random.default_rng(0)
    x = rng.uniform(1, 5, size=(200, 3))
    clean = 0.05 * x[:, 0] ** 2 * x[:, 1] ** 2 / x[:, 2] ** 3
    y = clean + 0.1 * np.sqrt(np.mean(clean ** 2)) * rng.normal(size=200)
    assert (y < 0).any()
    z, m, s = _standardise(x)
    mono = _monomial(z, y, m, s)
    assert mono is not None
    assert _nmse(mono, z, clean) < 0.01  # within the noise of the truth before any refinement
    assert _monomial(z, x[:, 0] - 3.0, m, s) is None  # half the rows negative: not a monomial


def test_screening_in_small_pieces_equals_screening_at_once(monkeypatch):
    """Memory stays bounded: the terms and the least-squares problems are processed in pieces of at most
    _SCREEN_VALUES values, with the same result as one piece."""
    import sr_jax.pool as pool

    lib = prior_library(2, 64, seed=2)
    rng = np.random.default_rng(2)
    data = [(rng.normal(size=(40, 2)), rng.normal(size=40)) for _ in range(3)]
    at_once = screen_prior(lib, data, n=6)
    monkeypatch.setattr(pool, "_SCREEN_VALUES", 500)
    assert screen_prior(lib, data, n=6) == at_once
