import math

import numpy as np
import pytest
import sympy
from hypothesis import given, settings, strategies as st

from sr_jax.expressions import Expression
from sr_jax.generator import sample


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10**6))
def test_infix_round_trip_is_exact(seed):
    e = sample(seed).expression
    assert Expression.from_infix(e.infix()) == e


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10**6))
def test_sympy_round_trip_same_values(seed):
    s = sample(seed)
    back = Expression.from_sympy(s.expression.to_sympy())
    np.testing.assert_allclose(back.evaluate_numpy(s.x_NxD), s.y_N, rtol=1e-8, atol=1e-8 * np.abs(s.y_N).max())


def test_infix_special_forms():
    assert Expression.from_infix("1 / x_0").tokens == ("inv", "x_0")
    assert Expression.from_infix("1.0 / x_0").tokens == ("div", 1.0, "x_0")
    assert Expression.from_infix("x_0 ** 2").tokens == ("pow2", "x_0")
    assert Expression.from_infix("x_0 ** 2.0").tokens == ("pow", "x_0", 2.0)
    assert Expression.from_infix("-x_1 + 3 * sin(x_0)").tokens == ("add", "mul", -1.0, "x_1", "mul", 3.0, "sin", "x_0")


def test_latex_matches_sympy_value():
    e = Expression(["add", -1.5, "mul", 2.0, "sqrt", "abs", "x_0"])
    tex = e.latex()
    assert "\\sqrt" in tex and "\\left|x_{0}\\right|" in tex and "\\left(-1.5\\right)" in tex


def test_numpy_out_of_domain_is_nan_or_inf_not_error():
    x = np.array([[-1.0], [0.0], [2.0]])
    assert np.isnan(Expression(["log", "x_0"]).evaluate_numpy(x)[0])
    assert np.isinf(Expression(["inv", "x_0"]).evaluate_numpy(x)[1])
    assert np.isnan(Expression(["arcsin", "x_0"]).evaluate_numpy(x)[2])


@pytest.mark.parametrize("tokens, msg", [
    (["add", "x_0"], "incomplete"),
    (["x_0", "x_1"], "position 1"),
    (["foo", "x_0"], "unknown symbol 'foo' at position 0"),
    (["add", "x_0", "x_12"], "unknown symbol 'x_12'"),
    ([], "empty"),
])
def test_parse_errors_name_the_problem(tokens, msg):
    with pytest.raises(ValueError, match=msg):
        Expression(tokens)


def test_infix_parse_error():
    with pytest.raises(ValueError, match="unknown symbol 'y'"):
        Expression.from_infix("x_0 + y")
    with pytest.raises(ValueError, match="expected"):
        Expression.from_infix("sin(x_0")


def test_from_sympy_unsupported():
    with pytest.raises(ValueError, match="no equivalent operator"):
        Expression.from_sympy(sympy.sinh(sympy.Symbol("x_0")))


def test_with_constants_and_skeleton():
    e = Expression(["add", 1.0, "mul", 2.0, "x_0"])
    assert e.with_constants([3.0, 4.0]).tokens == ("add", 3.0, "mul", 4.0, "x_0")
    assert e.skeleton() == ("add", "CONSTANT", "mul", "CONSTANT", "x_0")
    assert e.n_nodes == 5
    assert math.isclose(float(e.to_sympy().subs(sympy.Symbol("x_0", real=True), 2.0)), 5.0)
