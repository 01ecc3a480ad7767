"""Metrics of the E2E reference (spec section 8) plus a sympy equivalence check up to constants.

A prediction containing NaN/inf (or None) scores NaN on every numeric metric, as in the reference; averages should
then skip or count it explicitly (the reference's nanmean silently drops failures).
"""
from __future__ import annotations

import numpy as np
import sympy

from .expressions import Expression


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
    """1.0 if at least 95% of points satisfy |y_pred - y| <= atol + tau * |y| (np.isclose), else 0.0."""
    y, p = _pair(y_true, y_pred)
    if p is None:
        return float("nan")
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

    Exact mode: sympy.simplify(a - b) == 0. Up to constants: both are simplified, every number becomes a
    placeholder, and the placeholder forms are compared structurally (numbers inside the canonical sympy forms,
    including absorbed signs and powers, are all treated as free constants). Sympy canonicalisation is not complete,
    so ``False`` can be a false negative for exotic rewrites.
    """
    sa, sb = a.to_sympy(), b.to_sympy()
    if not up_to_constants:
        return bool(sympy.simplify(sa - sb) == 0)
    ka, kb = _canonical_skeleton(sa), _canonical_skeleton(sb)
    return ka == kb


def _canonical_skeleton(e: sympy.Expr) -> str:
    e = sympy.expand(sympy.simplify(e))
    e = sympy.sympify(e).replace(lambda n: n.is_Number, lambda n: sympy.Symbol("C"))

    def norm(node):
        # collapse products/sums of placeholders (C*C -> C, C + C -> C) so constant folding differences vanish
        if not node.args:
            return node
        args = [norm(x) for x in node.args]
        if node.is_Add or node.is_Mul:
            cs = [x for x in args if x == sympy.Symbol("C")]
            rest = [x for x in args if x != sympy.Symbol("C")]
            args = rest + ([sympy.Symbol("C")] if cs else [])
            if len(args) == 1:
                return args[0]
            return node.func(*args)
        if node.is_Pow and node.args[0] == sympy.Symbol("C"):
            return sympy.Symbol("C")
        return node.func(*args)

    return sympy.srepr(norm(e))
