import numpy as np
import pytest

from sr_jax import Expression, accuracy, complexity, compute_metrics, nmse, r2, symbolically_equivalent


def test_accuracy_tolerance_rule():
    y = np.ones(100)
    p = y.copy()
    p[:5] = 2.0  # 95% within tolerance -> 1
    assert accuracy(y, p, tau=0.1) == 1.0
    p[5] = 2.0  # 94% -> 0
    assert accuracy(y, p, tau=0.1) == 0.0
    assert accuracy(y, y + 1e-3, tau=0.0, atol=1e-3) == 1.0
    assert np.isnan(accuracy(y, np.full(100, np.nan)))


def test_r2_nmse_complexity():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    assert r2(y, y) == 1.0 and r2(y, np.full(4, y.mean())) == 0.0
    assert nmse(y, y + 1) == pytest.approx(1.0 / 2.5)
    assert complexity(Expression(["add", 1.25, "x_0"])) == 3
    m = compute_metrics(y, y, Expression(["x_0"]))
    assert m["accuracy_l1_1e-3"] == 1.0 and m["_complexity"] == 1


def test_symbolic_equivalence_up_to_constants():
    a = Expression.from_infix("1.5 + 2.0 * sin(0.7 * x_0)")
    b = Expression.from_infix("(-3.0) + 0.1 * sin(x_0 * 4.0)")
    c = Expression.from_infix("1.5 + 2.0 * cos(0.7 * x_0)")
    assert symbolically_equivalent(a, b)
    assert not symbolically_equivalent(a, c)
    assert symbolically_equivalent(Expression.from_infix("x_0 * x_1 + x_1 * x_0"),
                                   Expression.from_infix("2.0 * x_1 * x_0"), up_to_constants=False)
    assert not symbolically_equivalent(a, b, up_to_constants=False)


def test_accuracy_counts_infinite_predictions_as_misses():
    y = np.linspace(1.0, 2.0, 200)
    p = y.copy()
    p[:3] = [np.inf, -np.inf, np.inf]  # 197 of 200 within tolerance: 98.5% >= 95%
    assert accuracy(y, p, tau=0.1) == 1.0
    p[:11] = np.inf  # 189 of 200: 94.5%
    assert accuracy(y, p, tau=0.1) == 0.0
    assert np.isnan(r2(y, p))  # the other metrics of an infinite prediction stay NaN
    p[20] = np.nan
    assert np.isnan(accuracy(y, p, tau=0.1)) and np.isnan(accuracy(y, None))
    m = compute_metrics(y, np.where(np.arange(200) < 3, np.inf, y))
    assert m["accuracy_l1_1e-3"] == 1.0 and np.isnan(m["r2"])


@pytest.mark.parametrize("a, b, same", [
    ("1 / x_0", "x_0 ** 2", False),  # the fixed exponents of inv, pow2, sqrt, pow3 are not constants
    ("sqrt(x_0)", "x_0 ** 3", False),
    ("2.0 * x_0", "3.5 * x_0", True),
    ("2.0 * x_0", "x_0", False),  # a free constant against none: different families
    ("x_0 + x_0", "2.0 * x_0", False),
    ("2.0 * x_0 + 3.0 * x_0", "x_0 * 0.5", True),  # constants that combine into one
    ("(x_0 + 1.0) ** 2", "(x_0 + 2.5) ** 2", True),
    ("(x_0 + 1.0) ** 2", "x_0 ** 2 + 1.0", False),
    ("x_0 ** 2.0", "x_0 ** 3.0", True),  # pow with a real constant exponent: that exponent is a constant
    ("x_0 ** 2.0", "x_0 ** 2", False),
    ("1.0 * x_0 * x_1 + 2.0", "x_1 * x_0 * 3.0 - 5.0", True),
])
def test_symbolic_equivalence_placeholders_only_for_real_constants(a, b, same):
    assert symbolically_equivalent(Expression.from_infix(a), Expression.from_infix(b)) is same
