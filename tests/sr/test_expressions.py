import contextlib
import math
import sys

import numpy as np
import pytest
import sympy
from hypothesis import assume, given, settings, strategies as st

from sr_jax.expressions import BINARY_OPERATORS, UNARY_OPERATORS, VARIABLES, Expression
from sr_jax.generator import sample


def _bits(e: Expression) -> tuple:
    """Tokens with floats as their hex form, so -0.0 != 0.0 and any lost bit shows."""
    return tuple(t.hex() if isinstance(t, float) else t for t in e.tokens)


# Every operator and any finite or infinite float (the generator never draws div/arcsin/arccos/pow, and its
# constants have 3 significant digits), for the round trips that must be exact for every expression.
_any_expression = st.recursive(
    st.one_of(st.sampled_from(VARIABLES), st.floats(allow_nan=False)).map(lambda t: [t]),
    lambda kids: st.one_of(
        st.tuples(st.sampled_from(UNARY_OPERATORS), kids).map(lambda t: [t[0], *t[1]]),
        st.tuples(st.sampled_from(BINARY_OPERATORS), kids, kids).map(lambda t: [t[0], *t[1], *t[2]]),
    ),
    max_leaves=12,
).map(Expression)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10**6))
def test_infix_round_trip_is_exact(seed):
    e = sample(seed).expression
    assert Expression.from_infix(e.infix()) == e


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10**6))
def test_sympy_round_trip_same_values(seed):
    """Same values wherever they are well conditioned: sympy folds constants (c * exp(a + b x) becomes
    c e^a * exp(b x)), which changes them in the last bits, and e.g. sin(0.1 * exp(49.9 x)) turns such last-bit
    changes into anything. So points whose value moves under a 1e-12 relative change of the constants are not
    compared (sample(64) has 15 of 149)."""
    s = sample(seed)
    back = Expression.from_sympy(s.expression.to_sympy())
    tol = 1e-8 * np.abs(s.y_N).max()
    with np.errstate(all="ignore"):
        nudged = s.expression.with_constants(s.expression.constants * (1 + 1e-12)).evaluate_numpy(s.x_NxD)
    stable = np.abs(nudged - s.y_N) <= 1e-3 * tol
    assume(stable.mean() >= 0.5)
    np.testing.assert_allclose(back.evaluate_numpy(s.x_NxD)[stable], s.y_N[stable], rtol=1e-8, atol=tol)


def test_sympy_round_trip_of_an_ill_conditioned_sample():
    s = sample(64)  # sin(... 0.12 * exp(49.9 x_1) ...): equal where the value does not hinge on the last bits
    back = Expression.from_sympy(s.expression.to_sympy())
    nudged = s.expression.with_constants(s.expression.constants * (1 + 1e-12)).evaluate_numpy(s.x_NxD)
    stable = np.abs(nudged - s.y_N) <= 1e-11 * np.abs(s.y_N).max()
    assert 0.5 < stable.mean() < 1.0
    np.testing.assert_allclose(back.evaluate_numpy(s.x_NxD)[stable], s.y_N[stable], rtol=1e-8)


def test_infix_special_forms():
    assert Expression.from_infix("1 / x_0").tokens == ("inv", "x_0")
    assert Expression.from_infix("1.0 / x_0").tokens == ("div", 1.0, "x_0")
    assert Expression.from_infix("x_0 ** 2").tokens == ("pow2", "x_0")
    assert Expression.from_infix("x_0 ** 2.0").tokens == ("pow", "x_0", 2.0)
    assert Expression.from_infix("x_0 * 2 / 3").tokens == ("div", "mul", "x_0", 2.0, 3.0)
    assert Expression.from_infix("1 / 2").tokens == ("inv", 2.0)
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


def test_parsers_take_strings_only():
    for parse in (Expression.from_infix, Expression.from_latex):
        for bad in (None, 5, b"x_0"):
            with pytest.raises(ValueError, match=f"{parse.__name__} takes a string, got {type(bad).__name__}"):
                parse(bad)


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


# ----- LaTeX input -------------------------------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10**6))
def test_latex_round_trip_is_exact(seed):
    e = sample(seed).expression
    assert Expression.from_latex(e.latex()) == e


@settings(max_examples=300, deadline=None)
@given(_any_expression)
def test_latex_round_trip_is_bit_exact_for_any_expression(e):
    assert _bits(Expression.from_latex(e.latex())) == _bits(e)


@pytest.mark.parametrize("v, tex", [
    (0.5, "0.5"),
    (1234.5, "1234.5"),
    (1.2e-5, "1.2 \\cdot 10^{-5}"),
    (12345.0, "1.2345 \\cdot 10^{4}"),
    (1e16, "1 \\cdot 10^{16}"),
    (5e-324, "5 \\cdot 10^{-324}"),
    (-0.0, "\\left(-0.0\\right)"),
    (-1.7976931348623157e308, "\\left(-1.7976931348623157 \\cdot 10^{308}\\right)"),
    (float("inf"), "\\infty"),
])
def test_latex_constants_are_short_and_exact(v, tex):
    e = Expression([v])
    assert e.latex() == tex
    assert _bits(Expression.from_latex(tex)) == _bits(e)


def test_latex_nan_constant():
    back = Expression.from_latex(Expression(["add", "x_0", float("nan")]).latex())
    assert back.tokens[:2] == ("add", "x_0") and math.isnan(back.tokens[2])


@pytest.mark.parametrize("tex, infix", [
    ("\\frac{x_0}{x_1}", "x_0 / x_1"),
    ("\\dfrac{x_0 + 1}{2}", "(x_0 + 1) / 2"),
    ("\\frac{1}{x_0}", "1 / x_0"),
    ("\\frac{1.0}{x_0}", "1.0 / x_0"),
    ("\\frac 1 2", "1 / 2"),
    ("1 / x_0", "1 / x_0"),
    ("x_0 \\cdot x_1", "x_0 * x_1"),
    ("x_0 \\times x_1 \\div x_2", "x_0 * x_1 / x_2"),
    ("\\left(x_0 + 1.5\\right) \\cdot x_1", "(x_0 + 1.5) * x_1"),
    ("(x_0 - x_1) \\cdot x_2", "(x_0 - x_1) * x_2"),
    ("{x_0 + x_1} \\cdot x_2", "(x_0 + x_1) * x_2"),
    ("\\left[x_0 + x_1\\right] \\cdot [x_2 + 1]", "(x_0 + x_1) * (x_2 + 1)"),
    ("x_{0} + x_1 - x_{ 9 }", "x_0 + x_1 - x_9"),
    ("\\sqrt{x_0}", "sqrt(x_0)"),
    ("\\sqrt x_0", "sqrt(x_0)"),
    ("\\log(x_0)", "log(x_0)"),
    ("\\ln x_0", "log(x_0)"),
    ("\\log{\\left(x_{0} \\right)}", "log(x_0)"),
    ("\\exp(x_0)", "exp(x_0)"),
    ("e^{x_0 + 1}", "exp(x_0 + 1)"),
    ("e^x_0", "exp(x_0)"),
    ("\\mathrm{e}^{2}", "exp(2.0)"),
    ("e", "e"),
    ("\\sin(x_0)", "sin(x_0)"),
    ("\\cos x_0", "cos(x_0)"),
    ("\\tan{x_0}", "tan(x_0)"),
    ("\\arcsin(x_0)", "arcsin(x_0)"),
    ("\\arccos(x_0)", "arccos(x_0)"),
    ("\\arctan(x_0)", "arctan(x_0)"),
    ("\\operatorname{asin}{\\left(x_{0} \\right)}", "arcsin(x_0)"),
    ("\\operatorname{atan}(x_0)", "arctan(x_0)"),
    ("\\sin x_0 \\cdot x_1", "sin(x_0) * x_1"),
    ("\\sin x_0^{2}", "sin(x_0 ** 2)"),
    ("\\sin(x_0)^2", "sin(x_0) ** 2"),
    ("|x_0|", "abs(x_0)"),
    ("\\left| x_0 - 1 \\right| + \\lvert x_1 \\rvert", "abs(x_0 - 1) + abs(x_1)"),
    ("||x_0| - |x_1||", "abs(abs(x_0) - abs(x_1))"),
    ("x_0^{2}", "x_0 ** 2"),
    ("x_0^2", "x_0 ** 2"),
    ("x_0^{3}", "x_0 ** 3"),
    ("{x_0}^{{2}}", "x_0 ** 2"),
    ("x_0^{x_1}", "x_0 ** x_1"),
    ("x_0^{2.5}", "x_0 ** 2.5"),
    ("x_0^{-1}", "x_0 ** -1"),
    ("-x_0", "-x_0"),
    ("-x_0^{2}", "-x_0 ** 2"),
    ("x_0 - -x_1", "x_0 - -x_1"),
    ("3.5", "3.5"),
    ("-3.5", "-3.5"),
    (".5 + 3.", "0.5 + 3.0"),
    ("1.2 \\cdot 10^{-3}", "1.2e-3"),
    ("-1.2 \\times 10^{+3} \\cdot x_0", "-1.2e3 * x_0"),
    ("2 \\cdot 10^5", "2e5"),
    ("x_0^2 \\cdot 10^{3}", "x_0 ** 2 * 10 ** 3"),
    ("2 \\cdot 10^{x_0}", "2 * 10 ** x_0"),
    ("\\pi", "pi"),
    ("2 \\cdot \\pi \\cdot x_0", "2 * pi * x_0"),
    ("1 + 2 \\cdot x_0^{2}", "1 + 2 * x_0 ** 2"),
    ("$x_0 \\, + \\; x_1$", "x_0 + x_1"),
])
def test_latex_hand_written_forms(tex, infix):
    assert Expression.from_latex(tex) == Expression.from_infix(infix)


def test_latex_hand_written_matches_sympy():
    tex = "\\frac{\\sqrt{x_0^{2} + 1}}{\\left|x_1\\right|} - e^{-x_0} \\cdot \\cos(\\pi \\cdot x_1)"
    x0, x1 = sympy.symbols("x_0 x_1", real=True)
    want = sympy.sqrt(x0**2 + 1) / sympy.Abs(x1) - sympy.exp(-x0) * sympy.cos(sympy.pi * x1)
    got = Expression.from_latex(tex).to_sympy()
    for point in [{x0: 0.3, x1: -1.7}, {x0: -2.0, x1: 0.25}]:
        assert math.isclose(float(got.subs(point)), float(want.subs(point)), rel_tol=1e-12)


@pytest.mark.parametrize("tex, msg", [
    ("\\foo", r"unknown command '\\\\foo' at character 0"),
    ("x_0 + \\foo{x_1}", r"unknown command '\\\\foo' at character 6"),
    ("\\frac{1}{x_0", "unbalanced braces: '{' at character 8"),
    ("x_0}", "unbalanced braces: '}' at character 3"),
    ("", "empty LaTeX input"),
    ("  $ $ ", "empty LaTeX input"),
    ("x_0 + y", "unknown symbol 'y' at character 6"),
    ("x_{12}", "unknown variable 'x_12' at character 0"),
    ("2x_0", "unexpected 'x_0' at character 1 .*implicit multiplication"),
    ("\\left( x_0 \\right]", r"expected '\\\\right\)' at character 11"),
    ("\\left x_0", r"'\\\\left' at character 0 .* must be followed by"),
    ("(x_0", "expected '\\)' at character 4"),
    ("x_0 +", "unexpected 'end of text' at character 5"),
    ("x_0^{2}^{3}", "unexpected '\\^' at character 7"),
    ("x_0^23", "ambiguous '23' at character 4"),
    ("\\frac{1}", r"missing argument of '\\\\frac' at character 8"),
    ("\\sqrt[3]{x_0}", "n-th roots are not supported"),
    ("x_0 = 1", "cannot parse LaTeX at character 4"),
])
def test_latex_parse_errors_name_the_problem(tex, msg):
    with pytest.raises(ValueError, match=msg):
        Expression.from_latex(tex)


@pytest.mark.parametrize("text, match", [
    ("x_0^2", r"powers are written \*\* \(x_0\*\*2\), not \^"),
    ("\u0661 + x_0", "ASCII digits 0-9"),  # one rule with the arithmetic CLI: only 0-9 are digits
    ("x_\u0661", "ASCII digits 0-9"),
])
def test_infix_errors_suggest_the_fix(text, match):
    with pytest.raises(ValueError, match=match):
        Expression.from_infix(text)


def test_latex_rejects_non_ascii_digits():
    with pytest.raises(ValueError, match="unexpected '\u0661'"):
        Expression.from_latex("\u0661 + x_0")


# ----- depth (issue 10): the parsers keep their pending work on a list, not on Python's stack --------------------
_DEEP_CONSTANTS = (1.0, 2.0, 3.0, -1.0, -0.0, 0.0, 0.5, 1e-300, -2.5e300, math.inf, -math.inf, 10.0)


@st.composite
def _deep_expressions(draw, min_depth: int = 300, max_depth: int = 1000) -> Expression:
    """A random tree ``depth`` levels deep: a chain of random operators, each binary one with a small random tree
    on a random side (the leaves and side trees include the literals the parsers treat specially: 1, 2, 3,
    negatives, -0.0, inf)."""
    depth = draw(st.integers(min_depth, max_depth))
    sides = draw(st.lists(_any_expression, min_size=1, max_size=4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    leaves = [[c] for c in _DEEP_CONSTANTS] + [[v] for v in VARIABLES[:3]] + [list(s.tokens) for s in sides]
    tokens = list(leaves[rng.integers(len(leaves))])
    for _ in range(depth - 1):
        op = str(rng.choice(UNARY_OPERATORS + BINARY_OPERATORS))
        if op in UNARY_OPERATORS:
            tokens = [op] + tokens
        else:
            side = leaves[rng.integers(len(leaves))]
            tokens = [op] + (tokens + side if rng.random() < 0.5 else side + tokens)
    e = Expression(tokens)
    assert e.depth >= depth
    return e


@settings(max_examples=15, deadline=None)
@given(_deep_expressions())
def test_infix_round_trip_of_deep_expressions(e):
    assert _bits(Expression.from_infix(e.infix())) == _bits(e)


@settings(max_examples=15, deadline=None)
@given(_deep_expressions())
def test_latex_round_trip_of_deep_expressions(e):
    assert _bits(Expression.from_latex(e.latex())) == _bits(e)


def _frames() -> int:
    f, n = sys._getframe(), 0
    while f is not None:
        f, n = f.f_back, n + 1
    return n


@contextlib.contextmanager
def _python_stack_of(frames: int):
    """Allow only ``frames`` more Python frames than the caller has: any recursion per level of a deep text fails."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(_frames() + frames)
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


@pytest.mark.parametrize("parse, text, want", [
    ("infix", "(" * 5000 + "x_0" + ")" * 5000, ["x_0"]),
    ("infix", "-" * 3000 + "x_0", ["mul", -1.0] * 3000 + ["x_0"]),
    ("infix", "x_0" + " ** x_1" * 3000, ["pow", "x_0"] + ["pow", "x_1"] * 2999 + ["x_1"]),  # right associative
    ("infix", "-" * 3001 + "2", [-2.0]),  # signs on a literal fold into it
    ("infix", "sin(" * 3000 + "x_0" + ")" * 3000, ["sin"] * 3000 + ["x_0"]),
    ("latex", "{" * 3000 + "x_0" + "}" * 3000, ["x_0"]),
    ("latex", "\\sqrt" * 3000 + " x_0", ["sqrt"] * 3000 + ["x_0"]),
    ("latex", "\\frac{1}{" * 1000 + "x_0" + "}" * 1000, ["inv"] * 1000 + ["x_0"]),
    ("latex", "e^{" * 1000 + "x_0" + "}" * 1000, ["exp"] * 1000 + ["x_0"]),
    ("latex", "\\left(" * 1000 + "x_0" + "\\right)" * 1000, ["x_0"]),
    ("latex", "x_0^{" * 1000 + "2" + "}" * 1000, ["pow", "x_0"] * 999 + ["pow2", "x_0"]),
])
def test_deep_text_parses_within_a_few_python_frames(parse, text, want):
    """Thousands of levels parse with 40 Python frames to spare (the parsers do not recurse per level)."""
    reader = Expression.from_infix if parse == "infix" else Expression.from_latex
    with _python_stack_of(40):
        got = reader(text)
    assert _bits(got) == _bits(Expression(want))


@settings(max_examples=4, deadline=None)
@given(_deep_expressions(2000, 3000))
def test_writers_and_parsers_need_no_python_stack(e):
    with _python_stack_of(40):
        assert Expression.from_infix(e.infix()) == e
        assert Expression.from_latex(e.latex()) == e


_INFIX_PIECES = ["(", ")", "sin(", "ln(", "-", "+", "**", "*", "/", "x_0", "2", "1.5", ",", "^", "foo", "1e5", " "]
_LATEX_PIECES = ["{", "}", "(", ")", "\\frac", "\\sqrt", "\\left(", "\\right)", "^", "e", "|", "\\sin", "x_{1}",
                 "10", "\\cdot", "-", "2", "\\left|", "\\right|", "[", "]", "y", " "]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 1500), st.lists(st.sampled_from(_INFIX_PIECES), max_size=40),
       st.lists(st.sampled_from(_LATEX_PIECES), max_size=40))
def test_any_text_is_an_expression_or_a_one_line_value_error(depth, infix_pieces, latex_pieces):
    """Deep, malformed text: the parsers answer with an expression or a one-line ValueError, never a
    RecursionError or another exception."""
    for reader, text in [(Expression.from_infix, "(" * depth + "".join(infix_pieces) + ")" * depth),
                         (Expression.from_infix, "sin(" * depth + "".join(infix_pieces)),
                         (Expression.from_latex, "{" * depth + "".join(latex_pieces) + "}" * depth),
                         (Expression.from_latex, "\\sqrt{" * depth + "".join(latex_pieces))]:
        try:
            with _python_stack_of(40):
                reader(text)
        except ValueError as err:
            assert "\n" not in str(err)
