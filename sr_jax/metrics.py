"""Metrics of the E2E reference (spec section 8) plus a sympy equivalence check up to constants.

A prediction that is None or contains NaN scores NaN on every numeric metric, as in the reference; averages should
then skip or count it explicitly (the reference's nanmean silently drops failures). A prediction with +-inf (and no
NaN) scores NaN on r2, mse and nmse, while ``accuracy`` counts its infinite points as misses, as the reference's
np.isclose does.
"""
from __future__ import annotations

import numpy as np
import sympy

from .expressions import OPERATORS, VARIABLES, Expression, sympy_depth_errors


def _pair(y_true, y_pred):
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    if y_pred is None:
        return y, None
    p = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"y_true has {y.size} values but y_pred has {p.size}")
    if not np.isfinite(y).all():
        raise ValueError("y_true contains NaN or inf")
    return y, (p if np.isfinite(p).all() else None)


def r2(y_true, y_pred) -> float:
    """Coefficient of determination (sklearn r2_score; 1 - SSE/SST, and 0/0 -> 1, x/0 -> 0 as sklearn)."""
    y, p = _pair(y_true, y_pred)
    if p is None:
        return float("nan")
    sse = np.sum((y - p) ** 2)
    sst = np.sum((y - y.mean()) ** 2)
    if sst == 0:
        return 1.0 if sse == 0 else 0.0
    return float(1.0 - sse / sst)


def r2_zero(y_true, y_pred) -> float:
    v = r2(y_true, y_pred)
    return v if np.isnan(v) else max(0.0, v)


def mse(y_true, y_pred) -> float:
    y, p = _pair(y_true, y_pred)
    return float("nan") if p is None else float(np.mean((y - p) ** 2))


def nmse(y_true, y_pred) -> float:
    """The reference's _nmse: MSE / mean(y) (by the mean, not the variance, as in the original code)."""
    y, p = _pair(y_true, y_pred)
    return float("nan") if p is None else float(np.mean((y - p) ** 2) / np.mean(y))


def accuracy(y_true, y_pred, tau: float = 0.1, atol: float = 0.0, fraction: float = 0.95) -> float:
    """1.0 if at least 95% of points satisfy |y_pred - y| <= atol + tau * |y| (np.isclose), else 0.0.

    Infinite predictions are misses (a few of them still allow 1.0); None or any NaN gives NaN.
    """
    y, _ = _pair(y_true, y_pred)
    if y_pred is None:
        return float("nan")
    p = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if np.isnan(p).any():
        return float("nan")
    with np.errstate(invalid="ignore"):
        return float(np.mean(np.abs(p - y) <= atol + tau * np.abs(y)) >= fraction)


def complexity(expr: Expression) -> int:
    """Prefix node count; a float constant counts as one node."""
    return expr.n_nodes


def compute_metrics(y_true, y_pred, expr: Expression | None = None) -> dict:
    """The reference's default validation metrics for one dataset."""
    out = {"r2_zero": r2_zero(y_true, y_pred), "r2": r2(y_true, y_pred),
           "accuracy_l1_biggio": accuracy(y_true, y_pred, tau=0.05, atol=1e-3),
           "accuracy_l1_1e-3": accuracy(y_true, y_pred, 1e-3), "accuracy_l1_1e-2": accuracy(y_true, y_pred, 1e-2),
           "accuracy_l1_1e-1": accuracy(y_true, y_pred, 1e-1), "_mse": mse(y_true, y_pred),
           "_nmse": nmse(y_true, y_pred)}
    if expr is not None:
        out["_complexity"] = complexity(expr)
    return out


def symbolically_equivalent(a: Expression, b: Expression, up_to_constants: bool = True) -> bool:
    """Whether two expressions are the same function, optionally up to the values of their constants.

    Exact mode: sympy.simplify(a - b) == 0. Up to constants: every constant of the expressions (a number token)
    becomes its own placeholder symbol, both are simplified and expanded, every subexpression that involves
    placeholders but no variable becomes one placeholder C, and the forms are compared structurally. So the two
    expressions are equivalent when they are the same family of functions of their constants: ``2.0 * x_0`` and
    ``-0.5 * x_0`` are, ``2.0 * x_0`` and ``x_0`` are not (no free constant in the second), and the fixed exponents
    of inv, sqrt, pow2 and pow3 stay numbers (``1 / x_0`` is not ``x_0 ** 2``). Sympy canonicalisation is not
    complete, so ``False`` can be a false negative for exotic rewrites.
    """
    deeper = a if a.depth >= b.depth else b
    with sympy_depth_errors(deeper):
        if not up_to_constants:
            return bool(sympy.simplify(a.to_sympy() - b.to_sympy()) == 0)
        return _canonical_skeleton(_with_placeholders(a)) == _canonical_skeleton(_with_placeholders(b))


_PLACEHOLDER = sympy.Symbol("C")


def _with_placeholders(e: Expression) -> sympy.Expr:
    """sympy form of ``e`` with its k-th constant as the real symbol ``_c<k>`` (variables as in ``to_sympy``)."""
    syms = {v: sympy.Symbol(v, real=True) for v in VARIABLES}
    count = [0]

    def leaf(t):
        if isinstance(t, float):
            count[0] += 1
            return sympy.Symbol(f"_c{count[0]}", real=True)
        return syms[t]

    return e._fold(leaf, lambda op, args: OPERATORS[op].sympy_fn(*args))


def _canonical_skeleton(e: sympy.Expr) -> str:
    e = sympy.expand(sympy.simplify(e))
    variables = {s for s in e.free_symbols if s.name in VARIABLES}

    def norm(node):
        if not (node.free_symbols & variables):  # no variable: a placeholder if it holds a constant, else a number
            return _PLACEHOLDER if node.free_symbols else node
        if not node.args:
            return node
        args = [norm(x) for x in node.args]
        if node.is_Add or node.is_Mul:
            # the variable-free terms/factors fold into one constant: C if any of them holds one (C*C -> C)
            fixed = [x for x in args if not (x.free_symbols & variables)]
            rest = [x for x in args if x.free_symbols & variables]
            args = rest + ([_PLACEHOLDER] if any(x.free_symbols for x in fixed) else fixed)
            if len(args) == 1:
                return args[0]
        return node.func(*args)

    # rebuilding may merge terms (C*x + C*x -> 2*C*x): normalise until nothing changes
    for _ in range(10):
        new = norm(e)
        if new == e:
            break
        e = new
    return sympy.srepr(e)
