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
