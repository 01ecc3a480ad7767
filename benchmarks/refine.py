"""Batched jaxopt BFGS refinement (sr_jax.refine) vs one-by-one scipy BFGS, on generated candidates.

Setup: one dataset (a generated d=10 expression on 200 standardised points); 256 different generated candidate
expressions whose initial loss is finite there, with their generated constants as starting points.
Baseline: ``scipy.optimize.minimize(method="BFGS")`` per candidate (scipy defaults, gtol 1e-5) on the same
objective (MSE / var(y), float64) with an exact gradient from a small numpy reverse-mode evaluator.
Ours: ``sr_jax.refine`` (float32 default), timed on the second call (after compilation).

Run: python benchmarks/refine.py [--n 256] [--maxiter 100]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import warnings

import numpy as np
import scipy.optimize

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sr_jax.expressions import OPERATORS, Expression, variable_index  # noqa: E402
from sr_jax.generator import GeneratorConfig, sample  # noqa: E402

_D = {  # derivative(s) of each operator given args and output (numpy)
    "add": lambda a, b, o: (1.0, 1.0), "sub": lambda a, b, o: (1.0, -1.0), "mul": lambda a, b, o: (b, a),
    "div": lambda a, b, o: (1.0 / b, -o / b), "pow": lambda a, b, o: (b * a ** (b - 1), o * np.log(a)),
    "inv": lambda a, b, o: (-o * o,), "abs": lambda a, b, o: (np.sign(a),), "sqrt": lambda a, b, o: (0.5 / o,),
    "log": lambda a, b, o: (1.0 / a,), "exp": lambda a, b, o: (o,), "sin": lambda a, b, o: (np.cos(a),),
    "cos": lambda a, b, o: (-np.sin(a),), "tan": lambda a, b, o: (1.0 + o * o,),
    "arcsin": lambda a, b, o: (1.0 / np.sqrt(1 - a * a),), "arccos": lambda a, b, o: (-1.0 / np.sqrt(1 - a * a),),
    "arctan": lambda a, b, o: (1.0 / (1 + a * a),), "pow2": lambda a, b, o: (2 * a,), "pow3": lambda a, b, o: (3 * a * a,),
}


def numpy_objective(expr: Expression, x: np.ndarray, y: np.ndarray):
    """f(c) -> (MSE/var(y), gradient) with a numpy reverse pass over the expression's post-order tape."""
    # post-order program: (kind, payload, child indices)
    prog, stack, ci = [], [], 0
    consts_pos = [i for i, t in enumerate(expr.tokens) if isinstance(t, float)]
    const_id = {p: k for k, p in enumerate(consts_pos)}
    for pos in range(len(expr.tokens) - 1, -1, -1):
        t = expr.tokens[pos]
        if isinstance(t, float):
            prog.append(("c", const_id[pos], ()))
        elif t in OPERATORS:
            args = tuple(stack.pop() for _ in range(OPERATORS[t].arity))
            prog.append(("op", t, args))
        else:
            prog.append(("x", variable_index(t), ()))
        stack.append(len(prog) - 1)
    var = np.var(y)
    n = len(y)

    def f(c):
        vals = [None] * len(prog)
        with np.errstate(all="ignore"):
            for i, (k, p, a) in enumerate(prog):
                vals[i] = (np.full(n, c[p]) if k == "c" else x[:, p] if k == "x"
                           else OPERATORS[p].np_fn(*[vals[j] for j in a]))
            r = vals[-1] - y
            loss = float(np.mean(r * r) / var)
            if not np.isfinite(loss):
                return np.inf, np.zeros_like(c)
            ct = [None] * len(prog)
            ct[-1] = 2.0 * r / (n * var)
            g = np.zeros_like(c)
            for i in range(len(prog) - 1, -1, -1):
                k, p, a = prog[i]
                if ct[i] is None:
                    continue
                if k == "c":
                    g[p] += ct[i].sum()
                elif k == "op":
                    ds = _D[p](vals[a[0]], vals[a[1]] if len(a) > 1 else None, vals[i])
                    for j, d in zip(a, ds):
                        contrib = ct[i] * d
                        ct[j] = contrib if ct[j] is None else ct[j] + contrib
        return loss, g

    return f


def scipy_refine(expr, x, y):
    c0 = expr.constants
    if len(c0) == 0:
        return numpy_objective(expr, x, y)(c0)[0]
    f = numpy_objective(expr, x, y)
    l0 = f(c0)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = scipy.optimize.minimize(f, c0, jac=True, method="BFGS")
    return min(float(res.fun), l0)


def build_problem(n: int, seed: int = 0):
    cfg = GeneratorConfig(min_input_dimension=10, max_input_dimension=10, n_points=200)
    target = sample([seed, 10**6], cfg)
    x, y = target.x_NxD, target.y_N
    cands, i = [], 0
    while len(cands) < n:
        e = sample([seed, i]).expression
        i += 1
        with np.errstate(all="ignore"):
            if np.isfinite(e.evaluate_numpy(x)).all() and np.isfinite(numpy_objective(e, x, y)(e.constants)[0]):
                cands.append(e)
    return cands, x, y


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--maxiter", type=int, default=100)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--linesearch", default="backtracking")
    ap.add_argument("--maxls", type=int, default=10)
    ap.add_argument("--loss-tol", type=float, default=1e-4, help="ours counts as matching if <= scipy + this")
    args = ap.parse_args(argv)

    import jax

    import sr_jax

    cands, x, y = build_problem(args.n)
    t0 = time.perf_counter()
    sr_jax.refine(cands, x, y, maxiter=args.maxiter, tol=args.tol, linesearch=args.linesearch,
                  maxls=args.maxls)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = sr_jax.refine(cands, x, y, maxiter=args.maxiter, tol=args.tol, linesearch=args.linesearch,
                  maxls=args.maxls)
    ours_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    sc = np.array([scipy_refine(e, x, y) for e in cands])
    scipy_s = time.perf_counter() - t0
    # recompute our final losses in float64 numpy, so both sides are scored the same way
    ours = np.array([numpy_objective(e, x, y)(e.constants)[0] for e in res.expressions])
    ok = ours <= sc + args.loss_tol * np.maximum(1.0, np.abs(sc))
    result = dict(n=args.n, compile_s=compile_s, ours_s=ours_s, scipy_s=scipy_s, speedup=scipy_s / ours_s,
                  scipy_per_candidate_s=scipy_s / args.n, frac_ours_le_scipy=float(ok.mean()),
                  median_loss_ours=float(np.median(ours)), median_loss_scipy=float(np.median(sc)),
                  max_iterations=int(np.max(res.n_iterations)), frac_converged=float(np.mean(res.converged)))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} "
          f"{jax.default_backend()}, date {datetime.date.today().isoformat()}")
    print(f"command: python benchmarks/refine.py --n {args.n} --maxiter {args.maxiter} --linesearch {args.linesearch} "
          f"--maxls {args.maxls}")
    print("| candidates | compile+first call (s) | sr_jax.refine 2nd call (s) | scipy BFGS one by one (s) "
          "| speed-up | scipy s/candidate | ours <= scipy (+tol) | median loss ours / scipy |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.n} x 200 pts | {compile_s:.1f} | {ours_s:.3f} | {scipy_s:.2f} | {result['speedup']:.1f}x "
          f"| {result['scipy_per_candidate_s']:.4f} | {100 * result['frac_ours_le_scipy']:.1f}% "
          f"| {result['median_loss_ours']:.3g} / {result['median_loss_scipy']:.3g} |")
    return result


if __name__ == "__main__":
    main()
