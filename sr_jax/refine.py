"""Vectorised BFGS refinement of the constants of many candidate expressions (jaxopt BFGS, one jitted call).

Design: all candidates are compiled into one interpreter tape (``interpreter.compile_tape``). Each candidate owns a
row of the constants array. ``jaxopt.BFGS`` is ``jax.vmap``-ed over candidates (and over datasets); its per-candidate
objective is a ``jax.custom_batching.custom_vmap`` function whose batched rule evaluates the *whole tape once* and
returns every candidate's loss and gradient (losses are separable, so the gradient of their sum is each candidate's
own gradient). So the batch costs one tape pass per BFGS function evaluation, not one per candidate.

Loss: mean squared error / var(y) on the real (unpadded) points. y is flattened to (N,), fixing the reference's
(n,) vs (n, 1) broadcasting bug. A candidate with a non-finite initial loss is marked failed and frozen (value 0,
gradient 0, so its lane is converged from the start); a trial point with a non-finite loss is reported to the line
search as a huge value with zero gradient, so the step is rejected; where-guarded derivatives keep NaN out of other
candidates' gradients. jaxopt returns its last iterate: the better of start and end is kept.

Early convergence / lockstep: inside a vmapped ``while_loop`` every lane runs until the slowest one stops. The default
``linesearch="lockstep"`` (``_LockstepBFGS``, a jaxopt.BFGS subclass) does exactly one batched evaluation per
iteration (a rejected trial shortens the next step instead of running an inner line search), so no iteration pays for
the longest line search of the batch; ``maxiter`` counts evaluations. jaxopt's own line searches stay available
("backtracking", "armijo", "zoom").

Gauss-Newton hybrid (default ``hessian="hybrid"``): the loss is a mean of squares, so the tape's reverse sweep is
seeded with ones, which yields every candidate's Jacobian at once (``_batch_gauss_newton``) and with it the
Gauss-Newton matrix, at the cost of one gradient. BFGS then restarts from the (damped) Gauss-Newton inverse whenever
the loss falls fast (Fletcher & Xu's hybrid), which cuts the evaluations needed several-fold on least squares.

Differentiability: the solver is wrapped in ``jaxopt.implicit_diff.custom_root`` with the batch gradient as
optimality condition, so d(refined constants)/d(X, y) comes from the implicit function theorem.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap

from . import interpreter as itp
from .expressions import Expression

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import jaxopt
    from jaxopt import linear_solve
    from jaxopt.implicit_diff import custom_root
    from jaxopt._src.base import NUM_EVAL_DTYPE as _NUM_EVAL_DTYPE
    from jaxopt._src.bfgs import BfgsState as _BfgsState

_BIG = 1e30  # loss reported to the line search for a non-finite trial point


@dataclasses.dataclass
class RefineResult:
    """Refined candidates. For several datasets every field is a list with one entry per dataset."""

    expressions: list
    losses: object  # final loss per candidate (MSE / var(y)); inf where failed
    initial_losses: object
    failed: object  # bool: non-finite loss, constants left as given
    improved: object  # bool: the refined constants are better than the initial ones
    n_iterations: object
    converged: object  # gradient norm <= tol at the end

    def best(self, dataset: int = 0) -> Expression:
        """The candidate with the lowest final loss."""
        exprs = self.expressions if not _is_multi_list(self.expressions) else self.expressions[dataset]
        losses = self.losses if not isinstance(self.losses, list) else self.losses[dataset]
        return exprs[int(np.nanargmin(np.where(np.isfinite(losses), losses, np.inf)))]


def _is_multi_list(x) -> bool:
    return isinstance(x, list) and len(x) > 0 and isinstance(x[0], list)


def _losses(sig, arrays, consts, x, y, w, vary):
    """MSE / var(y) per candidate; y, w: (N,) shared or (E_b, N) one row per candidate (folded datasets)."""
    return _residuals(itp.run_tape(sig, arrays, consts, x), y, w, vary)[0]


def _residuals(pred_ExN, y, w, vary):
    """(losses, residuals r, weights as (E_b or 1, N), 2 / (sum(w) var(y))): the loss is scale / 2 * sum(w r^2)."""
    y2, w2 = (y, w) if y.ndim == 2 else (y[None, :], w[None, :])
    r = pred_ExN - y2
    scale = 2.0 / (jnp.sum(w2, axis=1) * vary)
    return 0.5 * scale * jnp.sum(w2 * r * r, axis=1), r, w2, scale


def _weighted_var(y, w):
    """var(y) over the real points, per row when y is (E_b, N); 1 where it is not positive."""
    sw = jnp.sum(w, axis=-1, keepdims=True)
    mean = jnp.sum(w * y, axis=-1, keepdims=True) / sw
    vary = jnp.sum(w * (y - mean) ** 2, axis=-1) / sw[..., 0]
    return jnp.where(vary > 0, vary, 1.0)


def _batch_value_and_grad(sig, arrays, consts, x, y, w, vary):
    """Per-candidate losses and gradients from one tape pass (guarded: non-finite candidates get zero gradient)."""

    def total(c):
        l = _losses(sig, arrays, c, x, y, w, vary)
        return jnp.sum(jnp.where(jnp.isfinite(l), l, 0.0)), l

    (_, l), g = jax.value_and_grad(total, has_aux=True)(consts)
    return l, g


def _batch_gauss_newton(sig, arrays, consts, x, y, w, vary, gn_below=None):
    """Per-candidate losses, gradients and Gauss-Newton matrices from ONE forward and ONE reverse sweep.

    Seeding the reverse sweep with ones (not the residuals) leaves d prediction(x_n) / d constant at every
    constant leaf and point, i.e. every candidate's Jacobian J (P x N): each constant belongs to exactly one
    candidate, so one sweep serves the whole batch. Then gradient = 2 J W r / (sum(w) var) and
    Gauss-Newton matrix = 2 J W J' / (sum(w) var).
    ``gn_below`` (E_b,): B is only needed where the loss fell below it (zeros elsewhere). When few candidates need
    it (after the first iterations, ~10% of a batch), only theirs are formed: the Gram matrices are a third of the
    cost of an evaluation when formed for all.
    """
    saved = itp._forward(sig, arrays, consts, x)
    pred = itp._roots(sig, arrays, consts, saved[0])
    losses, r, w2, scale = _residuals(pred, y, w, vary)
    k_buf = itp._reverse(sig, arrays, saved, jnp.ones_like(pred))
    e_b, p_b = consts.shape
    n = x.shape[0]
    kpos_ExP = arrays["cj_kpos"].reshape(e_b, p_b)  # K row per (candidate, constant); 0 (zeros) for padding
    mask_ExN = jnp.broadcast_to(w2 > 0, (e_b, n))

    def jacobian(rows):  # (len(rows), P, N), zero on padded points and non-finite entries
        jac = k_buf[kpos_ExP[rows].reshape(-1)].reshape(rows.shape[0], p_b, n)
        return jnp.where(jnp.isfinite(jac) & mask_ExN[rows][:, None, :], jac, 0.0)

    all_rows = jnp.arange(e_b)
    wr = jnp.where(jnp.isfinite(r), w2 * r, 0.0)
    grads = scale[:, None] * jnp.einsum("epn,en->ep", jacobian(all_rows), wr)

    def gram(rows):
        jac = jacobian(rows)
        return scale[rows][:, None, None] * jnp.einsum("epn,eqn->epq", jac, jac)

    cap = _partial_capacity(e_b)
    if gn_below is None or cap == e_b:
        return losses, grads, gram(all_rows)
    need = jnp.where(jnp.isfinite(losses), losses, _BIG) <= gn_below

    def some():
        rows = jnp.argsort(~need, stable=True)[:cap]  # the candidates that need B first
        return jnp.zeros((e_b, p_b, p_b), losses.dtype).at[rows].set(gram(rows) * need[rows][:, None, None])

    return losses, grads, jax.lax.cond(jnp.sum(need) <= cap, some, lambda: gram(all_rows))


def _partial_capacity(n: int) -> int:
    """Rows formed by the few-candidates path of Gram matrices and factorisations (all of them below 64)."""
    return n // 4 if n >= 64 else n


def _make_solver(sig, maxiter: int, tol: float, linesearch: str, implicit: bool, maxls: int = 30,
                 hessian: str = "hybrid"):
    e_b = sig.n_expressions
    use_gn = linesearch == "lockstep" and hessian == "hybrid"

    def batch_eval(consts, idx, active, gn_below, arrays, x, y, w, vary):
        if use_gn:
            below = jnp.full((e_b,), -jnp.inf, consts.dtype).at[idx].set(jnp.where(active, gn_below, -jnp.inf))
            return _batch_gauss_newton(sig, arrays, consts, x, y, w, vary, below)
        l, g = _batch_value_and_grad(sig, arrays, consts, x, y, w, vary)
        return l, g, jnp.zeros(g.shape + g.shape[-1:], g.dtype)

    # gn_below: the loss under which a candidate's Gauss-Newton matrix is needed (set by _LockstepBFGS.update)
    @custom_vmap
    def cand_vg(c, idx, active, gn_below, arrays, x, y, w, vary):
        # unbatched fallback (one candidate): evaluate the tape with this candidate's row set
        consts = jnp.zeros((e_b, c.shape[0]), c.dtype).at[idx].set(c)
        l, g, gn = batch_eval(consts, idx[None], active[None], gn_below[None], arrays, x, y, w, vary)
        return _mask_value(l[idx], g[idx], gn[idx], active)

    @cand_vg.def_vmap
    def cand_vg_rule(axis_size, in_batched, c, idx, active, gn_below, arrays, x, y, w, vary):
        # The data arguments are shared by all candidates; a batched lax.cond inside jaxopt's line search may
        # broadcast them along the candidate axis, in which case every lane holds the same value: take lane 0.
        shared = [jax.tree_util.tree_map(lambda a, bt: a[0] if bt else a, arg, bat)
                  for arg, bat in zip((arrays, x, y, w, vary), in_batched[4:])]
        arrays, x, y, w, vary = shared
        c, idx, active, gn_below = [a if bt else jnp.broadcast_to(a, (axis_size,) + a.shape)
                                    for a, bt in zip((c, idx, active, gn_below), in_batched[:4])]
        consts = jnp.zeros((e_b, c.shape[-1]), c.dtype).at[idx].set(c)
        l, g, gn = batch_eval(consts, idx, active, gn_below, arrays, x, y, w, vary)
        return jax.vmap(_mask_value)(l[idx], g[idx], gn[idx], active), ((True, True), True)

    if linesearch == "lockstep":
        solver = _LockstepBFGS(fun=cand_vg, value_and_grad=True, has_aux=True, maxiter=maxiter, tol=tol,
                               implicit_diff=False, jit=True, gauss_newton=use_gn)
    else:
        solver = jaxopt.BFGS(fun=cand_vg, value_and_grad=True, has_aux=True, maxiter=maxiter, tol=tol,
                             linesearch="backtracking" if linesearch == "armijo" else linesearch,
                             maxls=maxls, implicit_diff=False, jit=True, linesearch_init="max")
    if linesearch == "armijo":
        # halving Armijo backtracking from step 1: few evaluations per iteration for every lane
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ls = jaxopt.BacktrackingLineSearch(fun=solver._value_and_grad_with_aux, value_and_grad=True,
                                               has_aux=True, maxiter=maxls, condition="armijo",
                                               decrease_factor=0.5, max_stepsize=1.0, jit=True)
        solver.linesearch_solver = ls
        solver.run_ls = ls.run

    def run_lockstep(c0, *args):
        """jaxopt's ``run`` minus the ``update`` it runs before its loop: one copy of the objective, half the compile."""
        def cond(carry):
            return (carry[1].iter_num < maxiter) & (carry[1].error > tol)

        def body(carry):
            step = solver.update(*carry, *args)
            return step.params, step.state

        return jax.lax.while_loop(cond, body, (c0, solver.init_state(c0, *args)))

    def solve(c0, idx, active, arrays, x, y, w, vary):
        run = run_lockstep if linesearch == "lockstep" else solver.run
        run = jax.vmap(run, in_axes=(0, 0, 0, 0, None, None, None, None, None))
        gn_below = jnp.full(idx.shape, jnp.inf, c0.dtype)  # jaxopt's own line searches: every B (unused)
        params, state = run(c0, idx, active, gn_below, arrays, x, y, w, vary)
        if linesearch == "lockstep":  # masked initial and final losses, from the solver's own evaluations
            return params, (state.iter_num, state.error, state.aux[0], state.value)
        return params, (state.iter_num, state.error)

    if not implicit:
        return solve

    def optimality(c, idx, active, arrays, x, y, w, vary):
        l, g = _batch_value_and_grad(sig, arrays, c, x, y, w, vary)
        ok = active & jnp.isfinite(l) & jnp.all(jnp.isfinite(g), axis=1)
        return jnp.where(ok[:, None], g, 0.0)

    def lin_solve(matvec, b):
        return linear_solve.solve_cg(matvec, b, ridge=1e-8, maxiter=200)

    return custom_root(optimality, has_aux=True, solve=lin_solve)(solve)


@dataclasses.dataclass(eq=False)
class _LockstepBFGS(jaxopt.BFGS):
    """jaxopt BFGS with exactly ONE function evaluation per iteration, and optionally a Gauss-Newton hybrid.

    Why lockstep: under ``jax.vmap`` every lane of a ``while_loop`` runs as long as the slowest one, so with an
    inner line search each BFGS iteration costs the longest line search of the whole batch (one batched tape pass
    per trial). Here an iteration evaluates the trial point ``x + t d`` once: if the Armijo condition holds the step
    is accepted; otherwise the point is kept and the next iteration tries a shorter step along the same direction
    (safeguarded quadratic interpolation, within [0.1 t, 0.5 t]). ``maxiter`` counts evaluations; the loop stops
    when every lane's gradient norm is below ``tol``. The start point is evaluated by the first iteration (t = 0),
    so the program holds one copy of the objective.

    Why Gauss-Newton (``gauss_newton=True``, the objective's aux is its Gauss-Newton matrix B): the loss is a mean
    of squares. After an accepted step the next inverse-Hessian estimate H is (B + damping)^-1 when the loss fell by
    at least 10% (small residuals: Gauss-Newton converges fast), else the BFGS update of the previous H (large
    residuals: BFGS's curvature estimate is better) -- the hybrid of Fletcher & Xu (1987), with Marquardt damping.
    The first direction is the Gauss-Newton one. Measured (benchmarks/refine.py): at 100 evaluations it matches
    scipy's fully converged BFGS in float32, where plain lockstep BFGS needed more than 150. B is only formed (and
    factorised) for the candidates whose loss fell by >= 10% in this evaluation: the objective receives that
    threshold as its ``gn_below`` argument. ``state.aux`` holds (initial loss, the last B formed).
    Without Gauss-Newton: plain BFGS from H = I, rescaled by y.s / y.y after the first step (Nocedal & Wright
    eq. 6.20), first step of length 1 as scipy's BFGS. BFGS updates are skipped when the curvature y.s is not
    positive, so H stays positive definite.
    """

    gauss_newton: bool = False

    def init_state(self, init_params, *args, **kwargs):
        """No evaluation here: the first ``update`` evaluates the start point."""
        params, dtype, n = init_params, init_params.dtype, init_params.shape[-1]
        inf = jnp.asarray(jnp.inf, dtype)
        return _BfgsState(iter_num=jnp.asarray(0), value=inf, grad=jnp.zeros_like(params),
                         stepsize=jnp.asarray(0.0, dtype), error=inf, H=jnp.eye(n, dtype=dtype),
                         aux=(inf, jnp.zeros((n, n), dtype)), num_fun_eval=jnp.asarray(0, _NUM_EVAL_DTYPE),
                         num_grad_eval=jnp.asarray(0, _NUM_EVAL_DTYPE),
                         num_linesearch_iter=jnp.asarray(0, _NUM_EVAL_DTYPE))

    def update(self, params, state, *args, **kwargs):
        g, f, H, t = state.grad, state.value, state.H, state.stepsize
        l0, B = state.aux
        n = params.shape[-1]
        eye = jnp.eye(n, dtype=params.dtype)
        first = state.iter_num == 0  # t = 0: evaluate the start point
        d = -H @ g
        slope = jnp.dot(g, d)
        bad = ~(slope < 0) & ~first  # not a descent direction (roundoff): restart from steepest descent
        H = jnp.where(bad, eye, H)
        d = jnp.where(bad, -g, d)
        slope = jnp.where(bad, -jnp.dot(g, g), slope)
        trial = params + t * d
        gn_below = 0.9 * f  # Gauss-Newton after a >= 10% decrease (inf at the start: every candidate)
        if self.gauss_newton:
            args = args[:2] + (gn_below.astype(params.dtype),) + args[3:]
        (f_new, B_new), g_new = self._value_and_grad_with_aux(trial, *args, **kwargs)
        fresh_B = f_new <= gn_below  # the objective formed B exactly here (zeros elsewhere)
        ok = jnp.isfinite(f_new) & (first | (f_new <= f + 1e-4 * t * slope))
        s, yv = t * d, g_new - g
        ys = jnp.dot(yv, s)
        rho = 1.0 / jnp.where(ys > 0, ys, 1.0)
        if self.gauss_newton:
            H0 = H
        else:  # plain BFGS: scale H = I to the curvature seen along the first accepted step
            scale_now = (state.num_linesearch_iter == 1) & (ys > 0)
            H0 = jnp.where(scale_now, ys / jnp.maximum(jnp.dot(yv, yv), 1e-30) * eye, H)
        # (I - rho s y') H (I - rho y s') + rho s s', as a rank-2 update: O(P^2) per candidate, not O(P^3)
        hy = H0 @ yv
        H_upd = H0 - rho * (jnp.outer(s, hy) + jnp.outer(hy, s)) + (rho * rho * jnp.dot(yv, hy) + rho) * jnp.outer(s, s)
        upd_ok = ok & ~first & (ys > 1e-12 * jnp.sqrt(jnp.dot(s, s) * jnp.dot(yv, yv)))
        H_new = jnp.where(upd_ok, H_upd, H)
        # rejected: shorter step next time (quadratic interpolation of f along d, safeguarded)
        curv = f_new - f - slope * t
        t_q = -slope * t * t / (2.0 * jnp.where(curv > 0, curv, 1.0))
        t_q = jnp.where(jnp.isfinite(f_new) & (curv > 0), t_q, 0.1 * t)
        t_rej = jnp.clip(t_q, 0.1 * t, 0.5 * t)
        # the step is below the float resolution of the parameters: restart (Gauss-Newton or steepest descent)
        eps = jnp.finfo(params.dtype).eps
        stalled = ~ok & (t_rej * jnp.sqrt(jnp.dot(d, d)) <= eps * (jnp.sqrt(jnp.dot(params, params)) + eps))
        gn = jnp.sqrt(jnp.dot(g, g))
        if self.gauss_newton:  # B at the point we stay at
            B = jnp.where(ok & fresh_B, B_new, B)
            H_new = _gn_inverse_where((ok & fresh_B) | stalled, B, H_new)
            t_restart = 1.0
        else:
            H_new = jnp.where(stalled, eye, H_new)
            t_restart = jnp.minimum(1.0, 1.0 / jnp.maximum(gn, 1e-30))
        H_new = jnp.where(jnp.all(jnp.isfinite(H_new)), H_new, eye)
        t_rej = jnp.where(stalled, t_restart, t_rej)
        # the first step of plain BFGS has length 1 (t = 1 / |g|), as scipy's; a Gauss-Newton step is t = 1
        g_acc = jnp.where(ok, g_new, g)
        gn_acc = jnp.sqrt(jnp.dot(g_acc, g_acc))
        t_first = 1.0 if self.gauss_newton else jnp.where(gn_acc > 1.0, 1.0 / jnp.maximum(gn_acc, 1e-30), 1.0)
        t_acc = jnp.where(first, t_first, 1.0)
        new_state = state._replace(
            iter_num=state.iter_num + 1, value=jnp.where(ok, f_new, f), grad=g_acc,
            stepsize=jnp.where(ok, t_acc, t_rej).astype(t.dtype), H=H_new,
            error=jnp.where(ok | ~first, gn_acc, 0.0).astype(state.error.dtype),
            aux=(jnp.where(first, f_new, l0), B),
            num_fun_eval=state.num_fun_eval + 1, num_grad_eval=state.num_grad_eval + 1,
            num_linesearch_iter=state.num_linesearch_iter + ok.astype(state.num_linesearch_iter.dtype))
        return jaxopt.OptStep(params=jnp.where(ok, trial, params), state=new_state)


def _gn_inverse(B):
    """(B + damping)^-1 by Cholesky (Levenberg-Marquardt damping); identity on directions B does not see."""
    n = B.shape[-1]
    diag = jnp.diag(B)
    damp = 1e-4 * diag + 1e-7 * jnp.max(diag)  # Marquardt's scale-free damping, plus a floor for flat ones
    reg = B + jnp.diag(jnp.where(diag > 0, damp, 1.0))
    # Gauss-Jordan without pivoting (the damped matrix is symmetric positive definite), in plain jnp ops: a LAPACK
    # call inside the lax.switch of _gn_inverse_where deadlocked XLA's CPU runtime (jax 0.10)
    # (in place: after step k, column k holds the inverse's column, so no augmented matrix is needed)
    m = reg
    for k in range(n):
        inv_piv = 1.0 / m[k, k]
        row = m[k] * inv_piv
        col = m[:, k]
        m = m - col[:, None] * row[None, :]
        m = m.at[k].set(row).at[:, k].set(-col * inv_piv).at[k, k].set(inv_piv)
    return 0.5 * (m + m.T)  # a zero pivot gives inf/NaN: the caller falls back to the identity


@custom_vmap
def _gn_inverse_where(take, B, H):
    """``_gn_inverse(B)`` where ``take``, else ``H``.

    Why custom_vmap: under vmap a ``lax.cond`` becomes a select that runs both branches, so every lane would pay for
    a factorisation every iteration. The batched rule factorises only the lanes that take it (typically ~10% of
    the batch once it has left its fast-decrease phase; all of them when more than a quarter do).
    """
    return jax.lax.cond(take, lambda: _gn_inverse(B), lambda: H)


@_gn_inverse_where.def_vmap
def _gn_inverse_where_rule(axis_size, in_batched, take, B, H):
    take, B, H = [a if bt else jnp.broadcast_to(a, (axis_size,) + a.shape) for a, bt in zip((take, B, H), in_batched)]
    cap = _partial_capacity(axis_size)

    def some():
        rows = jnp.argsort(~take, stable=True)[:cap]
        return H.at[rows].set(jnp.where(take[rows][:, None, None], jax.vmap(_gn_inverse)(B[rows]), H[rows]))

    def every():
        return jnp.where(take[:, None, None], jax.vmap(_gn_inverse)(B), H)

    n_take = jnp.sum(take)
    branch = jnp.where(n_take == 0, 0, jnp.where(n_take <= cap, 1, 2))
    return jax.lax.switch(branch, [lambda: H, some, every]), True


def _mask_value(l, g, gn, active):
    """One candidate's ((value, Gauss-Newton matrix), gradient) as the solver sees it: padding lanes are flat at 0,
    a non-finite loss is a huge value with zero gradient (rejected as a trial point, frozen as a start)."""
    fin = jnp.isfinite(l)
    value = jnp.where(active, jnp.where(fin, l, _BIG), 0.0)
    good = active & fin & jnp.all(jnp.isfinite(g))
    grad = jnp.where(good, g, 0.0)
    gn = jnp.where(good & jnp.all(jnp.isfinite(gn)), gn, 0.0)
    return (value, gn), grad


@functools.lru_cache(maxsize=32)
def _refine_program(sig, maxiter: int, tol: float, linesearch: str, maxls: int, implicit: bool, x64: bool,
                    hessian: str = "hybrid"):
    """Jitted (datasets-vmapped) refinement for one tape signature; cached so a same-bucket batch reuses it."""
    solve = _make_solver(sig, maxiter, tol, linesearch, implicit, maxls, hessian)

    def one_dataset(arrays, c0, real, x, y, w):
        vary = _weighted_var(y, w)
        idx = jnp.arange(sig.n_expressions)
        if linesearch == "lockstep":  # the solver evaluates the start itself; a non-finite one comes back as _BIG
            c_end, (n_iter, err, l0, l_end) = solve(c0, idx, real, arrays, x, y, w, vary)
            active = real & (l0 < 0.5 * _BIG)
            l0 = jnp.where(active, l0, jnp.inf)
        else:
            l0 = _losses(sig, arrays, c0, x, y, w, vary)
            active = real & jnp.isfinite(l0)
            c_end, (n_iter, err) = solve(c0, idx, active, arrays, x, y, w, vary)
            l_end = _losses(sig, arrays, c_end, x, y, w, vary)
        better = active & jnp.isfinite(l_end) & (l_end <= l0)
        c_best = jnp.where(better[:, None], c_end, c0)
        l_best = jnp.where(better, l_end, l0)
        return dict(consts=c_best, losses=l_best, initial_losses=l0, improved=better & (l_end < l0),
                    n_iterations=n_iter, error=err)

    def program(arrays, c0, real, x, y, w):
        itp.COMPILE_COUNTER["refine"] += 1  # trace-time only
        return jax.vmap(one_dataset)(arrays, c0, real, x, y, w)

    return jax.jit(program)


def _check_hessian(hessian: str) -> str:
    if hessian not in ("hybrid", "bfgs"):
        raise ValueError(f"hessian must be 'hybrid' (Gauss-Newton/BFGS) or 'bfgs', got {hessian!r}")
    return hessian


def _as_datasets(expressions, X, y):
    """Normalise inputs to B lists of expressions, B x arrays; single dataset when X is 2-D."""
    if isinstance(X, (list, tuple)):
        xs = [np.asarray(x) for x in X]
        multi = True
    else:
        xa = np.asarray(X)
        multi = xa.ndim == 3
        xs = list(xa) if multi else [xa]
    if multi:
        if not (isinstance(y, (list, tuple)) or np.asarray(y).ndim == 2):
            raise ValueError("with several datasets (3-D X or a list of X), y must be a list or a 2-D array")
        ys = [np.asarray(v) for v in y]
        for b, cand in enumerate(expressions):
            if isinstance(cand, Expression) or not len(cand) or isinstance(list(cand)[0], (str, float, int)):
                raise ValueError(f"with several datasets, expressions must be one list of candidates per dataset; "
                                 f"entry {b} is not a list of candidates")
        exprs = [list(e) for e in expressions]
        if not (len(xs) == len(ys) == len(exprs)):
            raise ValueError(f"got {len(xs)} X datasets, {len(ys)} y datasets and {len(exprs)} expression lists; "
                             "they must match")
    else:
        ys, exprs = [np.asarray(y)], [list(expressions)]
    d = None
    for b, (x, yy) in enumerate(zip(xs, ys)):
        tag = f" (dataset {b})" if multi else ""
        itp.validate_x(x, "X" + tag)
        if yy.ndim == 2 and yy.shape[1] == 1:
            yy = yy[:, 0]
            ys[b] = yy
        if yy.ndim != 1:
            raise ValueError(f"y{tag} must have shape (N,) or (N, 1), got {yy.shape}")
        if yy.shape[0] != x.shape[0]:
            raise ValueError(f"X{tag} has {x.shape[0]} rows but y has {yy.shape[0]}")
        if not np.isfinite(yy).all():
            raise ValueError(f"y{tag} contains NaN or inf (first at index {np.flatnonzero(~np.isfinite(yy))[0]}); "
                             "drop those rows first")
        if d is not None and x.shape[1] != d:
            raise ValueError(f"all datasets need the same number of columns; got {d} and {x.shape[1]}{tag}")
        d = x.shape[1]
    return exprs, xs, ys, multi


def refine(expressions: Sequence, X, y, *, maxiter: int = 100, tol: float = 1e-5,
           linesearch: str = "lockstep", hessian: str = "hybrid", maxls: int = 10, implicit_diff: bool = True,
           dtype=None, fold_datasets: bool = True) -> RefineResult:
    """Refine the constants of every candidate with BFGS on MSE / var(y), all in one jitted call.

    ``expressions``: candidates (Expression or prefix lists) whose numbers are the initial constants; for several
    datasets a list of candidate lists, with X a list of (N_b, D) arrays or a (B, N, D) array and y likewise.
    ``maxiter``/``tol`` bound the function evaluations / gradient norm (scipy's gtol default is 1e-5).
    ``linesearch="lockstep"`` (default): one batched evaluation per iteration (see ``_LockstepBFGS``); or one of
    jaxopt's line searches "backtracking", "armijo", "zoom" (capped by ``maxls``; under vmap every line search runs
    as long as the slowest candidate's, so these are slower). ``hessian`` (lockstep only): "hybrid" (default)
    switches between the Gauss-Newton matrix of the squared loss and the BFGS update (Fletcher & Xu), which
    converges in far fewer iterations on least squares; "bfgs" is plain BFGS from the identity.
    float32 by default, float64 when ``jax_enable_x64`` is on.
    ``fold_datasets`` (several datasets only): put every dataset's candidates into ONE tape over the
    column-concatenated inputs, with one y row per candidate (dataset b's variable x_j reads column b*D + j), so a
    batch of B datasets costs one tape pass per BFGS evaluation like a batch of candidates on one dataset. With
    False, the program is ``jax.vmap``-ed over datasets (measured ~20x slower on CPU for 256 datasets x 1
    candidate: batched gathers with per-dataset indices, and every dataset padded to the largest one's groups).
    """
    exprs, xs, ys, multi = _as_datasets(expressions, X, y)
    dtype = dtype or itp.default_float_dtype()
    if multi and fold_datasets:
        return _refine_folded(exprs, xs, ys, dtype, maxiter, tol, linesearch, maxls, implicit_diff, hessian)
    tape = itp.compile_tape(exprs, xs[0].shape[1])
    arrays, c0 = itp.device_arrays(tape, dtype)
    n_b = itp.point_bucket(max(x.shape[0] for x in xs))
    xb = jnp.asarray(np.stack([itp.pad_points(x, n_b) for x in xs]), dtype)
    yb = jnp.asarray(np.stack([np.concatenate([v, np.repeat(v[:1], n_b - len(v))]) for v in ys]), dtype)
    wb = jnp.asarray(np.stack([np.arange(n_b) < len(v) for v in ys]), dtype)
    real = jnp.asarray(np.stack([np.arange(tape.signature.n_expressions) < n for n in tape.n_expressions]))
    program = _refine_program(tape.signature, int(maxiter), float(tol), linesearch, int(maxls),
                              bool(implicit_diff), bool(jax.config.jax_enable_x64), _check_hessian(hessian))
    out = jax.device_get(program(arrays, c0, real, xb, yb, wb))
    per = []
    for b, n in enumerate(tape.n_expressions):
        refined = [e.with_constants(out["consts"][b, i, : len(e.constants)]) if len(e.constants) else e
                   for i, e in enumerate(tape.expressions[b])]
        losses = np.asarray(out["losses"][b, :n], np.float64)
        failed = ~np.isfinite(losses)
        per.append(dict(
            expressions=refined, losses=np.where(failed, np.inf, losses),
            initial_losses=np.asarray(out["initial_losses"][b, :n], np.float64), failed=failed,
            improved=np.asarray(out["improved"][b, :n]), n_iterations=np.asarray(out["n_iterations"][b, :n]),
            converged=np.asarray(out["error"][b, :n]) <= tol))
    if not multi:
        return RefineResult(**per[0])
    return RefineResult(**{k: [p[k] for p in per] for k in per[0]})


def _refine_folded(exprs, xs, ys, dtype, maxiter, tol, linesearch, maxls, implicit_diff, hessian) -> RefineResult:
    """Several datasets as one tape: candidates of dataset b read columns [b*D, (b+1)*D) of the stacked inputs."""
    d = xs[0].shape[1]
    for b, ex in enumerate(exprs):
        exprs[b] = itp._check_expressions(ex, d, f" of dataset {b}")
    flat = [e for ex in exprs for e in ex]
    offsets = [b * d for b, ex in enumerate(exprs) for _ in ex]
    tape = itp.compile_tape([flat], len(xs) * d, feature_offsets=[offsets])
    arrays, c0 = itp.device_arrays(tape, dtype)
    e_b = tape.signature.n_expressions
    n_b = itp.point_bucket(max(x.shape[0] for x in xs))
    xw = np.concatenate([itp.pad_points(x, n_b) for x in xs], axis=1)
    ypad = [np.concatenate([v, np.repeat(v[:1], n_b - len(v))]) for v in ys]
    wpad = [(np.arange(n_b) < len(v)).astype(np.float64) for v in ys]
    ds_of = np.repeat(np.arange(len(xs)), [len(ex) for ex in exprs])
    yr = np.zeros((e_b, n_b))
    wr = np.ones((e_b, n_b))
    yr[: len(flat)] = np.stack(ypad)[ds_of]
    wr[: len(flat)] = np.stack(wpad)[ds_of]
    real = jnp.asarray((np.arange(e_b) < len(flat))[None])
    program = _refine_program(tape.signature, int(maxiter), float(tol), linesearch, int(maxls),
                              bool(implicit_diff), bool(jax.config.jax_enable_x64), _check_hessian(hessian))
    out = jax.device_get(program(arrays, c0, real, jnp.asarray(xw[None], dtype), jnp.asarray(yr[None], dtype),
                                 jnp.asarray(wr[None], dtype)))
    per, lo = [], 0
    for ex in exprs:
        hi = lo + len(ex)
        refined = [e.with_constants(out["consts"][0, lo + i, : len(e.constants)]) if len(e.constants) else e
                   for i, e in enumerate(ex)]
        losses = np.asarray(out["losses"][0, lo:hi], np.float64)
        failed = ~np.isfinite(losses)
        per.append(dict(
            expressions=refined, losses=np.where(failed, np.inf, losses),
            initial_losses=np.asarray(out["initial_losses"][0, lo:hi], np.float64), failed=failed,
            improved=np.asarray(out["improved"][0, lo:hi]), n_iterations=np.asarray(out["n_iterations"][0, lo:hi]),
            converged=np.asarray(out["error"][0, lo:hi]) <= tol))
        lo = hi
    return RefineResult(**{k: [p[k] for p in per] for k in per[0]})


def make_refine_fn(expressions: Sequence, n_features: int, *, maxiter: int = 100, tol: float = 1e-5,
                   linesearch: str = "backtracking", maxls: int = 10, dtype=None):
    """A pure, jittable, differentiable ``f(X_NxD, y_N) -> (constants_ExP, losses_E)`` for fixed candidates.

    Gradients w.r.t. X and y flow through implicit differentiation of the BFGS solution. X must be finite; every
    row counts (no padding). Constants are returned padded to the tape's width (zeros beyond each candidate's own).
    """
    dtype = dtype or itp.default_float_dtype()
    tape = itp.compile_tape([list(expressions)], n_features)
    arrays, c0 = itp.device_arrays(tape, dtype)
    arrays = jax.tree_util.tree_map(lambda a: a[0], arrays)
    sig = tape.signature
    solve = _make_solver(sig, int(maxiter), float(tol), linesearch, True, int(maxls))
    n_real = tape.n_expressions[0]

    def f(x, y):
        x = jnp.asarray(x, dtype)
        y = jnp.asarray(y, dtype).reshape(-1)
        w = jnp.ones_like(y)
        vary = jnp.var(y)
        vary = jnp.where(vary > 0, vary, 1.0)
        l0 = _losses(sig, arrays, c0[0], x, y, w, vary)
        active = (jnp.arange(sig.n_expressions) < n_real) & jnp.isfinite(l0)
        c_end, _ = solve(c0[0], jnp.arange(sig.n_expressions), active, arrays, x, y, w, vary)
        l_end = _losses(sig, arrays, c_end, x, y, w, vary)
        better = active & jnp.isfinite(l_end) & (l_end <= l0)
        c = jnp.where(better[:, None], c_end, c0[0])
        return c[:n_real], _losses(sig, arrays, c, x, y, w, vary)[:n_real]

    return f
