"""The operator table (sr_jax.operators) is complete and consistent, and every module reads it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sympy

from sr_jax import interpreter
from sr_jax.expressions import Expression
from sr_jax.float_tokens import EQUATION_SYMBOLS
from sr_jax.generator import GeneratorConfig
from sr_jax.metrics import symbolically_equivalent
from sr_jax.operators import (BINARY_OPERATORS, CHEAP_OPERATORS, FUNCTION_NAMES, LATEX_COMMANDS, OPERATORS,
                              UNARY_OPERATORS)
from sr_jax.vocab import DecoderVocab

# points inside every operator's domain (arcsin/arccos need |a| < 1, log/sqrt a > 0, pow a > 0)
A_POINTS = np.array([0.13, 0.37, 0.62, 0.91])
B_POINTS = np.array([1.7, -0.6, 2.3, 0.45])


def _args(op, xp=np):
    a, b = xp.asarray(A_POINTS), xp.asarray(B_POINTS)
    return (a, b) if OPERATORS[op].arity == 2 else (a,)


def test_table_shape():
    assert set(BINARY_OPERATORS) | set(UNARY_OPERATORS) == set(OPERATORS)
    assert all(OPERATORS[n].arity == 2 for n in BINARY_OPERATORS)
    assert all(o.name == n for n, o in OPERATORS.items())
    # the interpreter's select group and its codes are the table's cheap operators in table order
    assert interpreter.CHEAP_OPS == CHEAP_OPERATORS == tuple(n for n, o in OPERATORS.items() if o.cheap)
    assert set(interpreter._GROUP_ORDER) == {"cheap", interpreter.MIXED} | (set(OPERATORS) - set(CHEAP_OPERATORS))
    # decoder ids follow the table order; the original's float vocabulary only names operators of the table
    assert DecoderVocab().id2word[2:2 + len(OPERATORS)] == tuple(OPERATORS)
    assert set(EQUATION_SYMBOLS) & set(OPERATORS) == set(OPERATORS)
    config = GeneratorConfig()
    assert set(config.unary_operators) <= set(UNARY_OPERATORS)
    assert set(config.binary_operators) <= set(BINARY_OPERATORS)
    # every parser name leads to an operator of the right arity
    assert all(OPERATORS[n].arity == 1 for n in list(FUNCTION_NAMES.values()) + list(LATEX_COMMANDS.values()))


@pytest.mark.parametrize("op", list(OPERATORS))
def test_numpy_and_jax_functions_agree(op):
    want = OPERATORS[op].np_fn(*_args(op))
    with jax.enable_x64(True):
        got = np.asarray(OPERATORS[op].jax_fn(*_args(op, jnp)))
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("op", list(OPERATORS))
def test_derivatives_match_jax_grad(op):
    """The interpreter's (and the numpy benchmark's) local derivatives are jax.grad of the JAX function."""
    entry = OPERATORS[op]
    with jax.enable_x64(True):
        args = _args(op, jnp)
        ours = entry.derivative(jnp, args[0], args[1] if entry.arity == 2 else None)
        assert len(ours) == entry.arity
        scalar = jax.vmap(jax.grad(entry.jax_fn, argnums=tuple(range(entry.arity))))
        theirs = scalar(*args)
        for mine, ref in zip(ours, theirs):
            np.testing.assert_allclose(np.broadcast_to(np.asarray(mine), ref.shape), np.asarray(ref), rtol=1e-10)
    # the same formula on numpy arrays (benchmarks/refine.py's reference objective)
    a = _args(op)
    np_ours = entry.derivative(np, a[0], a[1] if entry.arity == 2 else None)
    for mine, ref in zip(np_ours, theirs):
        np.testing.assert_allclose(np.broadcast_to(mine, ref.shape), np.asarray(ref), rtol=1e-10)


@pytest.mark.parametrize("op", list(OPERATORS))
def test_round_trips_and_sympy(op):
    """Each operator prints and parses back through infix, LaTeX and sympy, and sympy means the same function."""
    args = ["x_0", "x_1"] if OPERATORS[op].arity == 2 else ["x_0"]
    e = Expression([op] + args)
    assert Expression.from_infix(e.infix()) == e
    assert Expression.from_latex(e.latex()) == e
    x = np.stack([A_POINTS, B_POINTS], axis=1)
    x0, x1 = sympy.symbols("x_0 x_1", real=True)
    f = sympy.lambdify((x0, x1), e.to_sympy(), "numpy")
    np.testing.assert_allclose(np.broadcast_to(f(x[:, 0], x[:, 1]), (len(x),)), e.evaluate_numpy(x), rtol=1e-12)
    if op not in ("sub", "div"):  # sympy has no node for a - b or a / b: they come back as add/mul forms
        assert Expression.from_sympy(e.to_sympy()) == e
    else:
        assert symbolically_equivalent(Expression.from_sympy(e.to_sympy()), e, up_to_constants=False)
    for name, target in FUNCTION_NAMES.items():
        if target == op:
            assert Expression.from_infix(f"{name}(x_0)") == e
            assert Expression.from_latex(f"\\operatorname{{{name}}}(x_0)") == e
    for cmd, target in LATEX_COMMANDS.items():
        if target == op:
            assert Expression.from_latex(f"\\{cmd}{{\\left(x_0\\right)}}") == e


def test_interpreter_matches_numpy_for_every_operator():
    exprs = [[op, "x_0", "x_1"] if OPERATORS[op].arity == 2 else [op, "x_0"] for op in OPERATORS]
    x = np.stack([A_POINTS, B_POINTS], axis=1)
    got = np.asarray(interpreter.evaluate(exprs, x))
    want = np.stack([Expression(e).evaluate_numpy(x) for e in exprs])
    np.testing.assert_allclose(got, want, rtol=1e-12)


# ----- depth limits (issue 10) ---------------------------------------------------------------------------------
# (the text parsers have no depth limit: tests/sr/test_expressions.py reads deep text back)


def test_long_prefix_lists_and_deep_sympy_trees():
    """Prefix sequences of any length work (the walks use explicit stacks); sympy's own depth limit is a
    one-line ValueError naming it."""
    long = Expression(["add"] * 20_000 + ["x_0"] * 20_001)
    assert long.n_nodes == 40_001 and long.depth == 20_001
    np.testing.assert_allclose(long.evaluate_numpy(np.ones((2, 1))), 20_001.0)
    assert long.infix().count("(") == 20_000
    deep = Expression(["sin"] * 2000 + ["x_0"])  # sympy's sin recurses while it builds the tree
    with pytest.raises(ValueError, match="recursion limit") as err:
        deep.to_sympy()
    assert "\n" not in str(err.value) and "2001 levels deep" in str(err.value)
    with pytest.raises(ValueError, match="recursion limit"):
        symbolically_equivalent(deep, deep)
    # from_sympy walks a deep sympy tree iteratively: build one with evaluate=False (no sympy recursion)
    x0 = sympy.Symbol("x_0", real=True)
    tree = x0
    for _ in range(3000):
        tree = sympy.Add(tree, sympy.Integer(1), evaluate=False)
    assert Expression.from_sympy(tree).n_nodes == 6001
    with pytest.raises(ValueError, match="sympy cannot read") as err:
        Expression.from_sympy("(" * 5000 + "x_0" + ")" * 5000)
    assert "\n" not in str(err.value)
