"""Vectorised BFGS refinement of the constants of many candidate expressions, in one jitted call.

Design: all candidates are compiled into one interpreter tape (``interpreter.compile_tape``). Each candidate owns a
row of the constants array. The per-candidate BFGS is ``jax.vmap``-ed over candidates (and over datasets); its
objective is a ``jax.custom_batching.custom_vmap`` function whose batched rule evaluates the *whole tape once* and
returns every candidate's loss and gradient (losses are separable, so the gradient of their sum is each candidate's
own gradient). So the batch costs one tape pass per BFGS function evaluation, not one per candidate. What the
objective shares between candidates is one named pytree, ``Problem`` (tape arrays, x, y, weights, var(y), y scale);
what belongs to one candidate is a ``_Lane`` (its row, whether it is active, its Gauss-Newton threshold).

Loss: mean squared error / var(y) on the real (unpadded) points. y is flattened to (N,), fixing the reference's
(n,) vs (n, 1) broadcasting bug. A candidate with a non-finite initial loss is marked failed and frozen (value 0,
gradient 0, so its lane is converged from the start); a trial point with a non-finite loss is reported to the line
search as a huge value with zero gradient, so the step is rejected; where-guarded derivatives keep NaN out of other
candidates' gradients. The better of start and end is kept.

Precision: float64 by default, as the original. float32 cannot hold what refinement meets on ordinary data: a few
percent of the generator's own datasets have max |y| beyond float32's 3.4e38, and a candidate a little off in an
exponent predicts values whose squared error overflows long before that. float64 runs inside a scoped
``jax.enable_x64`` (this thread, this call), so the user's global ``jax_enable_x64`` setting is never changed. It
costs more time per evaluation on CPU than float32, which ``dtype=float32`` trades back for data that fits. In
both precisions y and the predictions are multiplied by a power of two that brings max |y| into [0.5, 1) before
they are compared (exact, so the loss is unchanged): squares and var(y) cannot overflow for any finite y that the
dtype holds.

Early convergence / lockstep: inside a vmapped ``while_loop`` every lane runs until the slowest one stops. The
default ``linesearch="lockstep"`` (``sr_jax.lockstep.minimize``, which ``refine`` runs over the whole batch as
``minimize_batch``) does exactly one batched evaluation per iteration
(a rejected trial shortens the next step instead of running an inner line search), so no iteration pays for the
longest line search of the batch; ``maxiter`` counts evaluations. jaxopt's public BFGS with its own line searches
stays available ("backtracking", "zoom").

Lane compaction: in a large batch most candidates converge within a few evaluations while a few run to ``maxiter``.
So the lockstep run ends a chunk as soon as at most half of the tape's rows still run (``lockstep.minimize_batch``'s
``until_running``; and at a few evaluation counts, ``_CHECKPOINTS``; a run resumes from its state exactly), and
those continue on a smaller tape: the batch's own signature scaled by 1/2, 1/4, ...
(``interpreter.scaled_signature``), into which the running candidates are placed. The scaled shapes depend only on
the batch's signature, not on which candidates still run, so a process compiles at most a handful of programs per
signature and reuses them for every later batch of that signature.

Stopping the beaten (``refine(beaten=Beaten(...))``): at the same checkpoints, plus one after the first evaluation,
a candidate that a no-more-complex candidate of its dataset has already solved (or beats ``ratio``-fold) stops; a
caller that keeps only the simplest good fit (the estimator) loses nothing by it, and the stopped lanes leave the
tape at the next compaction (or end their lane in the running program when no smaller tape holds the rest).

Gauss-Newton hybrid (default ``hessian="hybrid"``): the loss is a mean of squares, so the tape's reverse sweep can
be seeded with a constant, which yields every candidate's Jacobian at once (``_batch_gauss_newton``) and with it
the Gauss-Newton matrix, at the cost of one gradient. BFGS then restarts from the (damped) Gauss-Newton inverse
whenever the loss falls fast (Fletcher & Xu's hybrid), which cuts the evaluations needed several-fold on least
squares.

Differentiability: ``refine`` returns host values (numpy and Expressions). The differentiable form is
``make_refine_fn``: a pure JAX function of (X, y) whose solver is wrapped in ``jaxopt.implicit_diff.custom_root``
with the batch gradient as optimality condition, so d(refined constants)/d(X, y) comes from the implicit function
theorem.
"""
from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap

from . import interpreter as itp
from .expressions import Expression
from .lockstep import init_lockstep_state, minimize as lockstep_minimize, minimize_batch, partial_capacity

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import jaxopt
    from jaxopt import linear_solve
    from jaxopt.implicit_diff import custom_root


def _big(dtype) -> float:
    """The loss reported to the line search for a non-finite point (1.4e29 in float32, 1e231 in float64): a
    finite loss above it counts as non-finite, which leaves the line searches' arithmetic headroom."""
    return float(np.finfo(dtype).max) ** 0.75


@dataclasses.dataclass
class RefineResult:
    """Refined candidates. For several datasets every field is a list with one entry per dataset."""

    expressions: list
    losses: object  # final loss per candidate (MSE / var(y)), float64 numpy; inf where failed
    initial_losses: object  # at the given constants; inf where failed
    failed: object  # bool: the loss at the given constants is non-finite (or above _big); constants left as given
    improved: object  # bool: the refined constants are better than the initial ones
    n_iterations: object  # objective evaluations (lockstep) or BFGS iterations (jaxopt's line searches)
    converged: object  # gradient norm <= tol at the end

    def best(self, dataset: int = 0) -> Expression:
        """The candidate with the lowest final loss."""
        exprs = self.expressions if not _is_multi_list(self.expressions) else self.expressions[dataset]
        losses = self.losses if not isinstance(self.losses, list) else self.losses[dataset]
        return exprs[int(np.nanargmin(np.where(np.isfinite(losses), losses, np.inf)))]


def _is_multi_list(x) -> bool:
    return isinstance(x, list) and len(x) > 0 and isinstance(x[0], list)


class Problem(NamedTuple):
    """What every candidate's objective shares: one dataset (or, folded, one y row per candidate) and its tape.

    ``y_RxN`` and ``w_RxN`` have R = 1 (one dataset for all candidates) or R = E_b (one row per candidate);
    ``y_RxN`` is already multiplied by ``y_scale_Rx1``, a power of two that brings max |y| into [0.5, 1) (or near
    it, at the ends of the dtype's exponent range), and the predictions are multiplied by the same factor before
    they are compared (``_residuals``), so squares and var(y) stay in range whatever the magnitude of y, and the
    loss is exactly the unscaled one. ``var_y_R``: var of the scaled y over the real points (1 where it is not
    positive).
    """

    arrays: dict  # the tape's index arrays for this dataset (interpreter._fill)
    x_NxD: jax.Array
    y_RxN: jax.Array
    w_RxN: jax.Array  # 1 on real points, 0 on padding
    y_scale_Rx1: jax.Array
    var_y_R: jax.Array


def make_problem(arrays, x_NxD, y, w) -> Problem:
    """The ``Problem`` for y and weights of shape (N,) or (R, N) (traced; the scale carries no gradient)."""
    y_RxN = y if y.ndim == 2 else y[None, :]
    w_RxN = jnp.broadcast_to(w if w.ndim == 2 else w[None, :], y_RxN.shape)
    max_abs = jnp.max(jnp.where(w_RxN > 0, jnp.abs(y_RxN), 0.0), axis=1, keepdims=True)
    _, exponent = jnp.frexp(jax.lax.stop_gradient(max_abs))  # max_abs = m 2^exponent, m in [0.5, 1)
    info = jnp.finfo(y_RxN.dtype)  # the scale stays a normal number: max |y| ends in [0.5, 4) or below 0.5 if tiny
    y_scale = jnp.ldexp(jnp.ones_like(max_abs), -jnp.clip(exponent, info.minexp + 2, info.maxexp - 2))
    y_RxN = y_RxN * y_scale
    return Problem(arrays, x_NxD, y_RxN, w_RxN, y_scale, _weighted_var(y_RxN, w_RxN))


def _losses(sig, problem: Problem, consts_ExP):
    """MSE / var(y) per candidate (E_b,)."""
    return _residuals(itp.run_tape(sig, problem.arrays, consts_ExP, problem.x_NxD), problem).loss_E


class _Residuals(NamedTuple):
    loss_E: jax.Array  # = 0.5 * scale_E * sum(w r^2)
    r_ExN: jax.Array  # scaled prediction - scaled y
    scale_E: jax.Array  # 2 / (sum(w) var(y))


def _residuals(pred_ExN, problem: Problem) -> _Residuals:
    r = pred_ExN * problem.y_scale_Rx1 - problem.y_RxN
    w = problem.w_RxN
    scale = jnp.broadcast_to(2.0 / (jnp.sum(w, axis=1) * problem.var_y_R), pred_ExN.shape[:1])
    return _Residuals(0.5 * scale * jnp.sum(w * r * r, axis=1), r, scale)


def _weighted_var(y_RxN, w_RxN):
    """var(y) over the real points per row; 1 where it is not positive."""
    sw = jnp.sum(w_RxN, axis=-1, keepdims=True)
    mean = jnp.sum(w_RxN * y_RxN, axis=-1, keepdims=True) / sw
    vary = jnp.sum(w_RxN * (y_RxN - mean) ** 2, axis=-1) / sw[..., 0]
    return jnp.where(vary > 0, vary, 1.0)


def _batch_value_and_grad(sig, problem: Problem, consts_ExP):
    """Per-candidate losses and gradients from one tape pass (guarded: non-finite candidates get zero gradient)."""

    def total(c):
        l = _losses(sig, problem, c)
        return jnp.sum(jnp.where(jnp.isfinite(l), l, 0.0)), l

    (_, l), g = jax.value_and_grad(total, has_aux=True)(consts_ExP)
    return l, g


def _batch_gauss_newton(sig, problem: Problem, consts_ExP, gn_below=None):
    """Per-candidate losses, gradients and Gauss-Newton matrices from ONE forward and ONE reverse sweep.

    Seeding the reverse sweep with the y scale s (not the residuals) leaves s d prediction(x_n) / d constant at
    every constant leaf and point, i.e. every candidate's scaled Jacobian J (P x N): each constant belongs to
    exactly one candidate, so one sweep serves the whole batch. Then gradient = 2 J W r / (sum(w) var) and
    Gauss-Newton matrix = 2 J W J' / (sum(w) var).
    ``gn_below`` (E_b,): B is only needed where the loss fell below it (zeros elsewhere). When few candidates need
    it (after the first iterations, typically a small fraction of a batch), only theirs are formed, since the Gram
    matrices of all candidates cost a sizeable part of an evaluation.
    """
    saved = itp._forward(sig, problem.arrays, consts_ExP, problem.x_NxD)
    pred = itp._roots(sig, problem.arrays, consts_ExP, saved[0])
    res = _residuals(pred, problem)
    losses, scale = res.loss_E, res.scale_E
    k_buf = itp._reverse(sig, problem.arrays, saved, jnp.broadcast_to(problem.y_scale_Rx1, pred.shape))
    e_b, p_b = consts_ExP.shape
    n = problem.x_NxD.shape[0]
    kpos_ExP = problem.arrays["cj_kpos"].reshape(e_b, p_b)  # K row per (candidate, constant); 0 (zeros) for padding
    mask_ExN = jnp.broadcast_to(problem.w_RxN > 0, (e_b, n))

    def jacobian(rows):  # (len(rows), P, N), zero on padded points and non-finite entries
        jac = k_buf[kpos_ExP[rows].reshape(-1)].reshape(rows.shape[0], p_b, n)
        return jnp.where(jnp.isfinite(jac) & mask_ExN[rows][:, None, :], jac, 0.0)

    all_rows = jnp.arange(e_b)
    wr = jnp.where(jnp.isfinite(res.r_ExN), problem.w_RxN * res.r_ExN, 0.0)
    grads = scale[:, None] * jnp.einsum("epn,en->ep", jacobian(all_rows), wr)

    def gram(rows):
        jac = jacobian(rows)
        return scale[rows][:, None, None] * jnp.einsum("epn,eqn->epq", jac, jac)

    cap = partial_capacity(e_b)
    if gn_below is None or cap == e_b:
        return losses, grads, gram(all_rows)
    need = jnp.where(jnp.isfinite(losses), losses, _big(losses.dtype)) <= gn_below

    def some():
        rows = jnp.argsort(~need, stable=True)[:cap]  # the candidates that need B first
        return jnp.zeros((e_b, p_b, p_b), losses.dtype).at[rows].set(gram(rows) * need[rows][:, None, None])

    return losses, grads, jax.lax.cond(jnp.sum(need) <= cap, some, lambda: gram(all_rows))


class _Lane(NamedTuple):
    """A candidate's own arguments to the objective (``jax.vmap``-ed over candidates with its constants)."""

    row: jax.Array  # int: the candidate's row in the batch (E_b,)
    active: jax.Array  # bool: a real candidate whose start is finite; other lanes are flat at 0
    gn_below: jax.Array  # its Gauss-Newton matrix is formed where its loss is <= this (set by lockstep.minimize)


def _make_objective(sig, use_gn: bool):
    """The per-candidate objective ``(c_P, lane, problem) -> ((loss, B_PxP), grad_P)`` for one tape signature.

    A ``custom_vmap`` function: vmapped over candidates, its rule evaluates the whole tape once for every lane.
    """
    e_b = sig.n_expressions

    def batch_eval(consts_ExP, lane: _Lane, problem: Problem):
        """(losses, gradients, Gauss-Newton matrices) of the whole batch from one tape pass."""
        if use_gn:
            below = jnp.full((e_b,), -jnp.inf, consts_ExP.dtype).at[lane.row].set(
                jnp.where(lane.active, lane.gn_below, -jnp.inf))
            return _batch_gauss_newton(sig, problem, consts_ExP, below)
        l, g = _batch_value_and_grad(sig, problem, consts_ExP)
        return l, g, jnp.zeros(g.shape + g.shape[-1:], g.dtype)

    @custom_vmap
    def objective(c_P, lane: _Lane, problem: Problem):
        # unbatched fallback (one candidate): evaluate the tape with this candidate's row set
        consts = jnp.zeros((e_b, c_P.shape[0]), c_P.dtype).at[lane.row].set(c_P)
        l, g, gn = batch_eval(consts, jax.tree_util.tree_map(lambda a: a[None], lane), problem)
        return _mask_value(l[lane.row], g[lane.row], gn[lane.row], lane.active)

    @objective.def_vmap
    def objective_rule(axis_size, in_batched, c, lane, problem):
        # The problem is shared by all candidates; a batched lax.cond inside jaxopt's line search may broadcast it
        # along the candidate axis, in which case every lane holds the same value: take lane 0.
        c_batched, lane_batched, problem_batched = in_batched
        problem = jax.tree_util.tree_map(lambda a, bt: a[0] if bt else a, problem, problem_batched)
        c, lane = jax.tree_util.tree_map(lambda a, bt: a if bt else jnp.broadcast_to(a, (axis_size,) + a.shape),
                                         (c, lane), (c_batched, lane_batched))
        consts = jnp.zeros((e_b, c.shape[-1]), c.dtype).at[lane.row].set(c)
        l, g, gn = batch_eval(consts, lane, problem)
        return jax.vmap(_mask_value)(l[lane.row], g[lane.row], gn[lane.row], lane.active), ((True, True), True)

    return objective


def _make_solver(sig, maxiter: int, tol: float, linesearch: str, implicit: bool, maxls: int = 30,
                 hessian: str = "hybrid"):
    """``solve(c0_ExP, rows_E, active_E, problem) -> (c_ExP, _SolverStats)``, vmapped over candidates.

    With ``implicit`` the solution is differentiable w.r.t. ``problem`` (``jaxopt.implicit_diff.custom_root`` with
    the batch gradient as optimality condition): d(refined constants)/d(x, y) by the implicit function theorem.
    """
    use_gn = linesearch == "lockstep" and hessian == "hybrid"
    objective = _make_objective(sig, use_gn)

    if linesearch == "lockstep":
        def gn_objective(c_P, gn_below, lane, problem):
            return objective(c_P, lane._replace(gn_below=gn_below), problem)

        run = functools.partial(lockstep_minimize, gn_objective, maxiter=maxiter, tol=tol, gauss_newton=use_gn)
    else:
        run = jaxopt.BFGS(fun=objective, value_and_grad=True, has_aux=True, maxiter=maxiter, tol=tol,
                          linesearch=linesearch, maxls=maxls, implicit_diff=False, jit=True,
                          linesearch_init="max").run

    def solve(c0_ExP, rows_E, active_E, problem: Problem):
        lane = _Lane(rows_E, active_E, jnp.full(rows_E.shape, jnp.inf, c0_ExP.dtype))
        params, state = jax.vmap(run, in_axes=(0, 0, None))(c0_ExP, lane, problem)
        if linesearch == "lockstep":  # masked initial and final losses, from the solver's own evaluations
            return params, _SolverStats(state.n_evaluations, state.grad_norm, state.initial_loss, state.loss)
        return params, _SolverStats(state.iter_num, state.error, None, None)

    if not implicit:
        return solve

    def optimality(c_ExP, rows_E, active_E, problem: Problem):
        l, g = _batch_value_and_grad(sig, problem, c_ExP)
        ok = active_E & jnp.isfinite(l) & jnp.all(jnp.isfinite(g), axis=1)
        return jnp.where(ok[:, None], g, 0.0)

    def lin_solve(matvec, b):
        return linear_solve.solve_cg(matvec, b, ridge=1e-8, maxiter=200)

    return custom_root(optimality, has_aux=True, solve=lin_solve)(solve)


class _SolverStats(NamedTuple):
    """Per candidate, from the solver's state; the losses only from the lockstep solver (None otherwise)."""

    n_iterations: jax.Array
    grad_norm: jax.Array
    initial_loss: Optional[jax.Array]  # masked: _big(dtype) where the start is not finite, 0 on padding lanes
    final_loss: Optional[jax.Array]


class Beaten(NamedTuple):
    """When a candidate stops refining early: it is beaten by another candidate of its dataset with no more nodes
    (``Expression.n_nodes``) that fits to a loss <= ``solved_loss`` (strictly fewer nodes, or as many while its own
    loss is above ``solved_loss``), or -- once it has had ``ratio_from`` evaluations, so that a poor start is not
    held against it -- whose loss is ``ratio`` times lower than its own. A caller that picks the simplest candidate
    within a small tolerance of the best loss loses nothing to the first rule, and to the second only a candidate
    that would still have improved ``ratio``-fold after the checkpoint. A third rule looks at the candidate alone:
    from ``stall_from`` evaluations on, a candidate whose loss fell by less than the fraction ``stall`` since the
    previous checkpoint has stalled (it is where it will stay, or creeping towards it) and stops. None: rule off."""

    solved_loss: Optional[float] = None
    ratio: Optional[float] = None
    ratio_from: int = 8
    stall: Optional[float] = None
    stall_from: int = 16

    def check(self) -> None:
        def number(v) -> bool:
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))

        if self.solved_loss is not None and not (number(self.solved_loss) and self.solved_loss >= 0):
            raise ValueError(f"Beaten.solved_loss must be a loss >= 0 (or None), got {self.solved_loss!r}")
        if self.ratio is not None and not (number(self.ratio) and self.ratio >= 1):
            raise ValueError(f"Beaten.ratio must be a number >= 1 (or None), got {self.ratio!r}")
        if self.stall is not None and not (number(self.stall) and 0 <= self.stall < 1):
            raise ValueError(f"Beaten.stall must be a fraction in [0, 1) (or None), got {self.stall!r}")
        for name in ("ratio_from", "stall_from"):
            v = getattr(self, name)
            if not (number(v) and int(v) == v and v >= 0):
                raise ValueError(f"Beaten.{name} must be an integer >= 0, got {v!r}")

    def mask(self, loss_E: np.ndarray, n_nodes_E: np.ndarray, dataset_E: np.ndarray,
             evaluations: Optional[int] = None, previous_loss_E: Optional[np.ndarray] = None) -> np.ndarray:
        """Which candidates are beaten (losses as now, inf where unknown), per dataset, after ``evaluations``
        objective evaluations (None: as many as the ratio and stall rules need); the stall rule compares with
        ``previous_loss_E``, the losses at the previous checkpoint (None: rule not applied)."""
        use_ratio = self.ratio is not None and (evaluations is None or evaluations >= self.ratio_from)
        loss_E = np.where(np.isnan(loss_E), np.inf, loss_E)
        out = np.zeros(len(loss_E), bool)
        if (self.stall is not None and previous_loss_E is not None
                and (evaluations is None or evaluations >= self.stall_from)):
            before = np.where(np.isnan(previous_loss_E), np.inf, previous_loss_E)
            with np.errstate(invalid="ignore"):
                out |= np.isfinite(loss_E) & (loss_E >= before * (1.0 - self.stall))
        for b in np.unique(dataset_E):
            idx = np.flatnonzero(dataset_E == b)
            order = idx[np.argsort(n_nodes_E[idx], kind="stable")]
            n, loss = n_nodes_E[order], loss_E[order]
            upto = np.minimum.accumulate(loss)  # best loss among candidates with at most as many nodes ...
            last = np.searchsorted(n, n, side="right") - 1
            first = np.searchsorted(n, n, side="left")
            at_most = upto[last]
            fewer = np.where(first > 0, upto[np.maximum(first - 1, 0)], np.inf)  # ... and with strictly fewer
            hit = np.zeros(len(order), bool)
            if self.solved_loss is not None:
                hit |= (fewer <= self.solved_loss) | ((at_most <= self.solved_loss) & (loss > self.solved_loss))
            if use_ratio:
                hit |= loss > self.ratio * at_most
            out[order] |= hit
        return out


def _mask_value(l, g, gn, active):
    """One candidate's ((value, Gauss-Newton matrix), gradient) as the solver sees it: padding lanes are flat at 0,
    a non-finite loss is a huge value with zero gradient (rejected as a trial point, frozen as a start)."""
    fin = jnp.isfinite(l)
    value = jnp.where(active, jnp.where(fin & (l < _big(l.dtype)), l, _big(l.dtype)), 0.0)
    good = active & fin & (l < _big(l.dtype)) & jnp.all(jnp.isfinite(g))
    grad = jnp.where(good, g, 0.0)
    gn = jnp.where(good & jnp.all(jnp.isfinite(gn)), gn, 0.0)
    return (value, gn), grad


# XLA:CPU maps every compiled program's code into memory (thousands of regions for a refinement program) and
# releases it when the program is dropped; these caches are kept small so that a long process stays far below the
# kernel's limit on mappings (vm.max_map_count, 65,530 by default), past which compilation aborts the process.
_PROGRAM_CACHE_SIZE = 16


@functools.lru_cache(maxsize=_PROGRAM_CACHE_SIZE)
def _refine_program(sig, maxiter: int, tol: float, linesearch: str, maxls: int, dtype: np.dtype,
                    hessian: str = "hybrid"):
    """Jitted refinement with jaxopt's BFGS and line search (or only the start's loss, with ``maxiter=0``) over the
    leading (dataset) axis (``_over_datasets``) for one tape signature and float dtype; cached so that a batch of the
    same bucket reuses it.
    Call it under ``interpreter.precision(dtype)``."""
    solve = _make_solver(sig, maxiter, tol, linesearch, False, maxls, hessian)

    def one_dataset(arrays, c0, real, x, y, w):
        problem = make_problem(arrays, x, y, w)
        rows = jnp.arange(sig.n_expressions)
        if maxiter == 0:  # nothing to run: the start is the answer
            l0, g0 = _batch_value_and_grad(sig, problem, c0)
            l0 = jnp.where(real & jnp.isfinite(l0), l0, jnp.inf)
            return dict(consts=c0, losses=l0, initial_losses=l0, improved=jnp.zeros_like(real),
                        n_iterations=jnp.zeros(rows.shape, jnp.int32),
                        grad_norm=jnp.where(jnp.isfinite(l0), jnp.sqrt(jnp.sum(g0 * g0, axis=1)), jnp.inf))
        l0 = _losses(sig, problem, c0)
        active = real & (l0 < _big(l0.dtype))
        l0 = jnp.where(active, l0, jnp.inf)
        c_end, stats = solve(c0, rows, active, problem)
        l_end = _losses(sig, problem, c_end)
        better = active & jnp.isfinite(l_end) & (l_end <= l0)
        c_best = jnp.where(better[:, None], c_end, c0)
        l_best = jnp.where(better, l_end, l0)
        return dict(consts=c_best, losses=l_best, initial_losses=l0, improved=better & (l_end < l0),
                    n_iterations=stats.n_iterations, grad_norm=stats.grad_norm)

    def program(arrays, c0, real, x, y, w):
        itp.COMPILE_COUNTER["refine"] += 1  # trace-time only
        return _over_datasets(one_dataset, (arrays, c0, real, x, y, w))

    return _jit(program)


def _over_datasets(one_dataset, per_dataset: tuple, *shared):
    """``one_dataset`` over the leading (dataset) axis of every array in ``per_dataset``, with ``shared`` passed as
    is: ``jax.vmap`` for several datasets; for one (a single dataset, or folded datasets: refinement's usual case) a
    plain call on the squeezed arrays, re-stacked. Why not always vmap: under vmap a ``lax.cond`` or ``lax.switch``
    whose predicate depends on the data becomes a select that computes every branch, and the objective's
    few-candidates paths (Gram matrices, Gauss-Newton inverses) exist precisely to skip the all-candidates branch."""
    if jax.tree_util.tree_leaves(per_dataset)[0].shape[0] == 1:
        squeezed = jax.tree_util.tree_map(lambda a: a[0], per_dataset)
        return jax.tree_util.tree_map(lambda a: a[None], one_dataset(*squeezed, *shared))
    return jax.vmap(one_dataset, in_axes=(0,) * len(per_dataset) + (None,) * len(shared))(*per_dataset, *shared)


def _jit(program):
    """``jax.jit`` of a refinement program; on CPU compiled at XLA's backend optimisation level 1 instead of the
    default 2, which compiles these large unrolled programs markedly faster at the same speed of the compiled code
    (BENCHMARKS.md, "sr_jax: constant refinement"). Per program: the user's global XLA flags are untouched."""
    if jax.default_backend() == "cpu":
        return jax.jit(program, compiler_options=_CPU_COMPILER_OPTIONS)
    return jax.jit(program)


_CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


@functools.lru_cache(maxsize=_PROGRAM_CACHE_SIZE)
def _lockstep_program(sig, tol: float, dtype: np.dtype, hessian: str):
    """Jitted chunk of lockstep refinement for one tape signature: ``(arrays, c, state, real, x, y, w, stop_at,
    until_running) -> (c, state)``, over the leading (dataset) axis (``_over_datasets``). Every candidate runs until
    its gradient norm is at most ``tol`` or its evaluation count reaches ``stop_at``, and the chunk ends early once at
    most ``until_running`` candidates still run (0: never); both are traced integers, so every chunk of a run,
    whatever its end, reuses one program. Call it under ``interpreter.precision(dtype)``."""
    use_gn = hessian == "hybrid"
    objective = _make_objective(sig, use_gn)

    def one_dataset(arrays, c_ExP, state, real_E, x, y, w, stop_at, until_running):
        problem = make_problem(arrays, x, y, w)
        lane = _Lane(jnp.arange(sig.n_expressions), real_E, jnp.full(real_E.shape, jnp.inf, c_ExP.dtype))

        def gn_objective(c_P, gn_below, ln):
            return objective(c_P, ln._replace(gn_below=gn_below), problem)

        return minimize_batch(gn_objective, c_ExP, lane, maxiter=stop_at, tol=tol, gauss_newton=use_gn, state=state,
                              until_running=until_running)

    def program(arrays, c, state, real, x, y, w, stop_at, until_running):
        itp.COMPILE_COUNTER["refine"] += 1  # trace-time only
        return _over_datasets(one_dataset, (arrays, c, state, real, x, y, w), stop_at, until_running)

    return _jit(program)


# Evaluation counts after which the host looks at which candidates still run (the ``beaten`` rules, the deadline, the
# datasets finished). With compaction a chunk also ends as soon as at most half of its tape's candidates still run,
# and those move to a smaller tape (a smaller compiled program) for the rest of the run.
_CHECKPOINTS = (8, 16, 32, 64)
# With compaction or ``beaten``, also a checkpoint after the first evaluation (the start point): candidates that start
# at their optimum (the least-squares bases) or are already beaten leave before the batch runs its first chunk.
# A deadline is only checked from ``_CHECKPOINTS[0]`` on.
_EARLY_CHECKPOINT = 1
# ``compact=None`` compacts batches of at least this many (bucketed) candidates. Each compaction may compile a
# program for a new, smaller tape; below this size the time saved rarely repays that compilation.
_COMPACT_MIN_EXPRESSIONS = 128
# The smallest tape a run continues on: a fraction of its batch's holding at least _MIN_ROWS candidates (below that
# a smaller program rarely repays its compilation). This bounds the programs per batch shape: at most five smaller
# fractions, each with at most two slacks (interpreter.SCALE_SLACKS).
_MIN_FRACTION = 1 / 32
_MIN_ROWS = 32


class _Run:
    """A lockstep refinement in progress on ONE tape (``batch`` with one entry on the vmapped axis): the live
    candidates' tape and arrays, where each row came from, and the finished rows' results in the original rows."""

    def __init__(self, batch: "_Batch", dtype, maxiter: int):
        self.batch, self.dtype, self.maxiter = batch, dtype, maxiter
        tape = batch.tape
        self.exprs = [e for _, _, ex in batch.slots for e in ex]
        self.folded = batch.y_BxN.ndim == 3
        self.d = batch.x_BxNxD.shape[2] // len(batch.slots) if self.folded else batch.x_BxNxD.shape[2]
        self.dataset = np.concatenate([[b] * len(ex) for b, (_, _, ex) in enumerate(batch.slots)]).astype(int)
        self.origin = np.arange(len(self.exprs))  # original row of each current row
        self.n_nodes = np.array([e.n_nodes for e in self.exprs])
        self.stopped = np.zeros(len(self.exprs), bool)  # original rows stopped early (their results are final)
        self.shrink_below: dict = {}  # per signature: after a compaction that found no smaller tape, how few must run
        e0, p0 = tape.consts.shape[1:]
        self.final = dict(consts=np.array(tape.consts[0], np.float64), n_evaluations=np.zeros(e0, np.int64),
                          grad_norm=np.full(e0, np.inf), initial_loss=np.full(e0, np.inf), loss=np.full(e0, np.inf))
        self.sig = tape.signature
        self.arrays, self.c = itp.device_arrays(tape, dtype)
        self.state = jax.tree_util.tree_map(jnp.asarray, init_lockstep_state(np.asarray(tape.consts, dtype)))
        self.real = jnp.asarray(batch.real_BxE)
        self.x, self.y, self.w = (jnp.asarray(a, dtype) for a in (batch.x_BxNxD, batch.y_BxN, batch.w_BxN))

    def step(self, stop_at: int, tol: float, hessian: str, until_running: int = 0) -> None:
        """Dispatch the next chunk: to ``stop_at`` evaluations, or until at most ``until_running`` candidates still
        run (it runs on the device while the host goes on: JAX dispatches asynchronously)."""
        program = _lockstep_program(self.sig, tol, self.dtype, hessian)
        self.c, self.state = program(self.arrays, self.c, self.state, self.real, self.x, self.y, self.w, stop_at,
                                     until_running)

    def shrink_target(self) -> int:
        """How few candidates must still run for ``compact`` to move them to a smaller tape (0: none is smaller)."""
        half = min(self.sig.n_expressions // 2, self.shrink_below.get(self.sig, self.sig.n_expressions))
        smallest = max(_MIN_ROWS, self.batch.tape.signature.n_expressions * _MIN_FRACTION)
        return 0 if half < smallest else half

    def ready(self) -> bool:
        """Whether the chunk last dispatched has finished."""
        return all(a.is_ready() for a in jax.tree_util.tree_leaves((self.c, self.state)))

    def record(self, c, state) -> None:
        """Copy the current rows' results (host arrays of the single vmapped entry) into their original rows
        (except rows stopped early: theirs were recorded when they stopped)."""
        keep = np.flatnonzero(~self.stopped[self.origin])
        rows = self.origin[keep]
        self.final["consts"][rows, : c.shape[-1]] = c[0, keep]
        for k in ("n_evaluations", "grad_norm", "initial_loss", "loss"):
            self.final[k][rows] = getattr(state, k)[0, keep]

    def running(self, state, tol: float) -> np.ndarray:
        n = len(self.origin)
        return (state.n_evaluations[0, :n] < self.maxiter) & (state.grad_norm[0, :n] > tol) & ~self.stopped[self.origin]

    def stop_beaten(self, live: np.ndarray, beaten: "Beaten", evaluations: int,
                    previous_loss: Optional[np.ndarray] = None) -> np.ndarray:
        """``live`` (current rows) without the candidates that ``beaten`` says can no longer be their dataset's
        choice after ``evaluations`` (or have stalled since ``previous_loss``, the original rows' losses at the
        previous checkpoint); those are marked stopped (their recorded results are final)."""
        rows = self.origin[live]
        out = beaten.mask(self.final["loss"][: len(self.exprs)], self.n_nodes, self.dataset, evaluations,
                          previous_loss)[rows]
        self.stopped[rows[out]] = True
        return live[~out]

    def halt_stopped(self, state) -> None:
        """End the stopped rows' lanes on the device (their evaluation count set to ``maxiter``; ``record`` keeps
        the count they stopped at), so that a chunk ends as soon as the rows still running are done."""
        halt = np.zeros(state.n_evaluations.shape, bool)
        halt[0, : len(self.origin)] = self.stopped[self.origin]
        self.state = self.state._replace(n_evaluations=jnp.asarray(
            np.where(halt, self.maxiter, state.n_evaluations).astype(state.n_evaluations.dtype)))

    def compact(self, c, state, live: np.ndarray) -> bool:
        """Continue with only the ``live`` current rows, on a smaller tape; False (nothing changed) when no smaller
        shape holds them.

        The smaller tapes are the batch's own signature scaled by 1/2, 1/4, ... with the tightest slack of
        ``interpreter.SCALE_SLACKS`` that holds them (``interpreter.scaled_signature``, a pure function of the batch's
        signature), so every call whose batch lands in the same signature reuses
        the same few compiled programs, whichever candidates are still running."""
        root, n = self.batch.tape.signature, len(live)
        exprs = [self.exprs[self.origin[i]] for i in live]
        offsets = None
        if self.folded:  # keep only the live datasets' columns (their variables are renumbered accordingly)
            datasets, rank = np.unique(self.dataset[self.origin[live]], return_inverse=True)
            offsets = list(rank * self.d)
        fraction = 1.0
        while int(root.n_expressions * fraction / 2) >= max(n, _MIN_ROWS) and fraction > _MIN_FRACTION:
            fraction /= 2
        shapes = []  # smallest first, each with the tightest capacities first (interpreter.SCALE_SLACKS)
        while int(root.n_expressions * fraction) < self.sig.n_expressions:
            e_b = int(root.n_expressions * fraction)
            n_cols = min(len(self.batch.slots), e_b) * self.d if self.folded else root.n_features
            shapes += [itp.scaled_signature(root, fraction, n_cols, slack) for slack in itp.SCALE_SLACKS]
            fraction *= 2
        tape = itp.compile_tape_into(shapes, exprs, offsets)  # the first shape that holds the running candidates
        if tape is None:
            return False
        x = self.batch.x_BxNxD
        if self.folded:
            cols = (datasets[:, None] * self.d + np.arange(self.d)).reshape(-1)
            x = np.zeros(x.shape[:2] + (tape.signature.n_features,), x.dtype)
            x[:, :, : len(cols)] = self.batch.x_BxNxD[:, :, cols]
        e_b, p_b = tape.consts.shape[1:]
        n = len(live)

        def rows(a, fill):  # (1, E, ...) live rows first, padded with ``fill`` rows, constant axes cut to p_b
            a = a[0, live]
            a = a[(slice(None),) + tuple(slice(0, p_b) for _ in a.shape[1:])]
            pad = np.broadcast_to(fill, (e_b - n,) + a.shape[1:])
            return np.concatenate([a, pad.astype(a.dtype)])[None]

        padding = init_lockstep_state(np.zeros((1, p_b), c.dtype))
        padding = padding._replace(grad_norm=np.zeros(1, c.dtype))  # padding rows never run
        self.state = jax.tree_util.tree_map(lambda a, f: jnp.asarray(rows(a, f[0])), state, padding)
        self.c = jnp.asarray(rows(c, np.zeros(p_b, c.dtype)))
        self.real = jnp.asarray((np.arange(e_b) < n)[None])
        if self.folded:
            y, w = np.zeros((1, e_b, x.shape[1])), np.ones((1, e_b, x.shape[1]))
            y[0, :n], w[0, :n] = self.batch.y_BxN[0, self.origin[live]], self.batch.w_BxN[0, self.origin[live]]
            self.y, self.w = jnp.asarray(y, self.dtype), jnp.asarray(w, self.dtype)
        self.x = jnp.asarray(x, self.dtype)
        self.sig, self.origin = tape.signature, self.origin[live]
        self.arrays = {k: jnp.asarray(v) for k, v in tape.arrays.items()}
        return True


def _lockstep_refine(batch: "_Batch", maxiter: int, tol: float, hessian: str, dtype, compact,
                     deadline: Optional[float] = None, beaten: Optional[Beaten] = None,
                     report: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Run the lockstep solver on ``batch``; per-candidate results as the host arrays ``refine`` reports.

    With ``compact``, a ``deadline`` or ``beaten`` (and one tape, i.e. one dataset or folded datasets) the run stops
    at ``_CHECKPOINTS`` (and, with ``compact`` or ``beaten``, at ``_EARLY_CHECKPOINT``). With ``compact``, as soon as
    the candidates still running fit in a bucket at most half the current one (a chunk ends early then:
    ``_Run.shrink_target``), they continue on a tape of their own, so candidates that have converged stop costing.
    Stopping and resuming is exact (``lockstep.minimize_batch`` carries its whole state), so the results are an
    uninterrupted run's up to rounding. Past the ``deadline`` (a ``time.perf_counter()`` value) the run ends at the
    next checkpoint. With ``beaten``, at each checkpoint the candidates it names stop (``_Run.stop_beaten``).
    ``report(slot, fields)`` (chunked runs): called for each user dataset (``batch.slots[slot]``, its
    ``_slot_result`` fields) once none of its candidates runs any more, while the device computes the next chunk
    (between datasets it checks whether the chunk is done, and then waits no longer), so that the caller's host
    work on finished datasets overlaps the refinement of the others; what is still unreported at the end, the
    caller reports.
    """
    if compact is None:
        compact = batch.tape.signature.n_expressions >= _COMPACT_MIN_EXPRESSIONS
    chunked = compact or deadline is not None or beaten is not None
    if not chunked or batch.x_BxNxD.shape[0] != 1:  # one uninterrupted run
        arrays, c0 = itp.device_arrays(batch.tape, dtype)
        program = _lockstep_program(batch.tape.signature, tol, dtype, hessian)
        state0 = jax.tree_util.tree_map(jnp.asarray, init_lockstep_state(np.asarray(batch.tape.consts, dtype)))
        c, state = jax.device_get(program(arrays, c0, state0, jnp.asarray(batch.real_BxE),
                                          *(jnp.asarray(a, dtype) for a in (batch.x_BxNxD, batch.y_BxN, batch.w_BxN)),
                                          maxiter, 0))
        final = dict(consts=c, n_evaluations=state.n_evaluations, grad_norm=state.grad_norm,
                     initial_loss=state.initial_loss, loss=state.loss)
    else:
        run = _Run(batch, dtype, maxiter)
        checkpoints = ([_EARLY_CHECKPOINT] if compact or beaten is not None else []) + list(_CHECKPOINTS)
        if deadline is not None:  # and every _CHECKPOINTS[-1] evaluations after the last
            checkpoints += list(range(2 * _CHECKPOINTS[-1], maxiter, _CHECKPOINTS[-1]))
        previous_loss = None  # the original rows' losses at the previous checkpoint (the stall rule's reference)
        finished: list[int] = []  # slots whose candidates have all stopped, not yet reported
        reported = np.zeros(len(batch.slots), bool)
        for stop_at in [k for k in checkpoints if k < maxiter] + [maxiter]:
            while True:  # to stop_at; with compaction, the chunk also ends once a smaller tape could take the rest
                run.step(stop_at, tol, hessian, run.shrink_target() if compact else 0)
                if finished:  # host work on finished datasets while the device computes this chunk
                    out = _outcome(batch, {k: v[None] for k, v in run.final.items()}, dtype)
                    while finished and not run.ready():
                        slot = finished.pop(0)
                        report(slot, _slot_result(batch, out, tol, slot))
                c, state = jax.device_get((run.c, run.state))
                run.record(c, state)
                live = np.flatnonzero(run.running(state, tol))
                if not (state.n_evaluations[0, live] < stop_at).any():
                    break  # the chunk reached its checkpoint (the candidates still running share one count)
                if not run.compact(c, state, live):  # no smaller tape holds them (too many nodes): try again
                    run.shrink_below[run.sig] = len(live) // 2  # when half as many still run
            stopping = beaten is not None and len(live)
            if stopping:
                live = run.stop_beaten(live, beaten, stop_at, previous_loss)
            if report is not None:
                done = ~reported
                done[run.dataset[run.origin[live]]] = False
                reported |= done
                finished += [int(slot) for slot in np.flatnonzero(done)]
            previous_loss = run.final["loss"][: len(run.exprs)].copy()
            late = deadline is not None and stop_at >= _CHECKPOINTS[0] and time.perf_counter() >= deadline
            if stop_at == maxiter or not len(live) or late:
                break
            if not (compact and len(live) <= run.sig.n_expressions // 2 and run.compact(c, state, live)) and stopping:
                run.halt_stopped(state)
        final = {k: v[None] for k, v in run.final.items()}
    return _outcome(batch, final, dtype)


def _outcome(batch: "_Batch", final: dict, dtype) -> dict:
    """What ``refine`` reports per candidate row from the solver's ``final`` host arrays (leading vmapped axis):
    the refined constants where they beat the given ones (else the given ones), losses, and the counts."""
    c0 = np.asarray(batch.tape.consts, np.float64)
    real = batch.real_BxE
    l0, l_end = np.asarray(final["initial_loss"], np.float64), np.asarray(final["loss"], np.float64)
    active = real & (l0 < _big(dtype))
    l0 = np.where(active, l0, np.inf)
    better = active & np.isfinite(l_end) & (l_end <= l0)
    return dict(consts=np.where(better[..., None], final["consts"], c0), losses=np.where(better, l_end, l0),
                initial_losses=l0, improved=better & (l_end < l0), n_iterations=final["n_evaluations"],
                grad_norm=final["grad_norm"])


_LINESEARCHES = ("lockstep", "backtracking", "zoom")


def _check_options(maxiter, tol, linesearch: str, hessian: str, maxls) -> None:
    if linesearch not in _LINESEARCHES:
        raise ValueError(f"linesearch must be one of {', '.join(repr(s) for s in _LINESEARCHES)}; got {linesearch!r}")
    if hessian not in ("hybrid", "bfgs"):
        raise ValueError(f"hessian must be 'hybrid' (Gauss-Newton/BFGS) or 'bfgs', got {hessian!r}")
    if int(maxiter) != maxiter or maxiter < 0:
        raise ValueError(f"maxiter must be an integer >= 0, got {maxiter!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    if int(maxls) != maxls or maxls < 1:
        raise ValueError(f"maxls must be an integer >= 1, got {maxls!r}")


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
        xs[b] = itp.validate_x(x, "X" + tag)
        if np.iscomplexobj(yy):
            raise ValueError(f"y{tag} is complex ({yy.dtype}); refinement fits real data: pass y.real if the "
                             "imaginary part is meant to be dropped")
        if yy.dtype == object or not (np.issubdtype(yy.dtype, np.number) or yy.dtype == bool):
            raise ValueError(f"y{tag} must be a numeric array, got dtype {yy.dtype}")
        if yy.ndim == 2 and yy.shape[1] == 1:
            yy = yy[:, 0]
        if yy.ndim != 1:
            raise ValueError(f"y{tag} must have shape (N,) or (N, 1), got {yy.shape}")
        yy = yy.astype(np.float64)
        ys[b] = yy
        if yy.shape[0] != x.shape[0]:
            raise ValueError(f"X{tag} has {x.shape[0]} rows but y has {yy.shape[0]}")
        if not np.isfinite(yy).all():
            raise ValueError(f"y{tag} contains NaN or inf (first at index {np.flatnonzero(~np.isfinite(yy))[0]}); "
                             "drop those rows first")
        if d is not None and x.shape[1] != d:
            raise ValueError(f"all datasets need the same number of columns; got {d} and {x.shape[1]}{tag}")
        d = x.shape[1]
    return exprs, xs, ys, multi


class _Batch(NamedTuple):
    """Host arrays of one refinement call (leading axis: the program's vmapped datasets) and where each user
    dataset's candidates sit in them: ``slots[b] = (row of the vmapped axis, first candidate row, expressions)``."""

    tape: itp.Tape
    real_BxE: np.ndarray
    x_BxNxD: np.ndarray
    y_BxN: np.ndarray  # (B, N) or, folded, (1, E_b, N): one y row per candidate
    w_BxN: np.ndarray
    slots: list


def _padded_y(y_N: np.ndarray, n_b: int) -> np.ndarray:
    return np.concatenate([y_N, np.repeat(y_N[:1], n_b - len(y_N))])


def _stacked_batch(exprs, xs, ys) -> _Batch:
    """One tape per dataset with a common signature; the program is ``jax.vmap``-ed over datasets."""
    tape = itp.compile_tape(exprs, xs[0].shape[1])
    n_b = itp.point_bucket(max(x.shape[0] for x in xs))
    real = np.stack([np.arange(tape.signature.n_expressions) < n for n in tape.n_expressions])
    return _Batch(tape, real, np.stack([itp.pad_points(x, n_b) for x in xs]),
                  np.stack([_padded_y(v, n_b) for v in ys]),
                  np.stack([(np.arange(n_b) < len(v)).astype(np.float64) for v in ys]),
                  [(b, 0, tape.expressions[b]) for b in range(len(xs))])


def _folded_batch(exprs, xs, ys) -> _Batch:
    """Several datasets as one tape: candidates of dataset b read columns [b*D, (b+1)*D) of the stacked inputs."""
    d = xs[0].shape[1]
    exprs = [itp._check_expressions(ex, d, f" of dataset {b}") for b, ex in enumerate(exprs)]
    flat = [e for ex in exprs for e in ex]
    offsets = [b * d for b, ex in enumerate(exprs) for _ in ex]
    tape = itp.compile_tape([flat], len(xs) * d, feature_offsets=[offsets])
    e_b = tape.signature.n_expressions
    n_b = itp.point_bucket(max(x.shape[0] for x in xs))
    ds_of = np.repeat(np.arange(len(xs)), [len(ex) for ex in exprs])
    y_ExN = np.zeros((e_b, n_b))
    w_ExN = np.ones((e_b, n_b))
    y_ExN[: len(flat)] = np.stack([_padded_y(v, n_b) for v in ys])[ds_of]
    w_ExN[: len(flat)] = np.stack([(np.arange(n_b) < len(v)).astype(np.float64) for v in ys])[ds_of]
    starts = np.concatenate([[0], np.cumsum([len(ex) for ex in exprs])])
    return _Batch(tape, (np.arange(e_b) < len(flat))[None],
                  np.concatenate([itp.pad_points(x, n_b) for x in xs], axis=1)[None], y_ExN[None], w_ExN[None],
                  [(0, int(starts[b]), ex) for b, ex in enumerate(exprs)])


@itp.gc_paused()
def refine(expressions: Sequence, X, y, *, maxiter: int = 100, tol: float = 1e-5,
           linesearch: str = "lockstep", hessian: str = "hybrid", maxls: int = 10, dtype=None,
           fold_datasets: bool = True, compact: Optional[bool] = None,
           max_time: Optional[float] = None, beaten: Optional[Beaten] = None,
           on_final: Optional[Callable[[int, RefineResult], None]] = None) -> RefineResult:
    """Refine the constants of every candidate with BFGS on MSE / var(y), all in one jitted call.

    ``expressions``: candidates (Expression or prefix lists) whose numbers are the initial constants; for several
    datasets a list of candidate lists, with X a list of (N_b, D) arrays or a (B, N, D) array and y likewise.
    X and y must be real and finite; any finite magnitude works (see the module doc on precision).
    ``maxiter``/``tol`` bound the function evaluations / gradient norm (scipy's gtol default is 1e-5);
    ``maxiter=0`` only evaluates the starting constants.
    ``linesearch="lockstep"`` (default): one batched evaluation per iteration (see ``sr_jax.lockstep.minimize``); or
    ``jaxopt.BFGS`` with its line search "backtracking" or "zoom" (capped by ``maxls``; under vmap every line
    search runs as long as the slowest candidate's, so these are slower). ``hessian`` (lockstep only): "hybrid"
    (default) switches between the Gauss-Newton matrix of the squared loss and the BFGS update (Fletcher & Xu),
    which converges in far fewer iterations on least squares; "bfgs" is plain BFGS from the identity.
    ``dtype``: None (default) or float64 refines in float64 inside a scoped ``jax.enable_x64``, whatever the
    global ``jax_enable_x64`` setting (which is left unchanged); float32 on request, for data and predictions
    within float32's range (a ValueError names X or y otherwise).
    ``fold_datasets`` (several datasets only): put every dataset's candidates into ONE tape over the
    column-concatenated inputs, with one y row per candidate (dataset b's variable x_j reads column b*D + j), so a
    batch of B datasets costs one tape pass per BFGS evaluation like a batch of candidates on one dataset. With
    False, the program is ``jax.vmap``-ed over datasets (much slower on CPU for many datasets of one candidate:
    batched gathers with per-dataset indices, and every dataset padded to the largest one's groups).
    ``compact`` (lockstep, one dataset or folded datasets): candidates that have converged stop costing: as soon as
    the candidates still running fit in a bucket at most half the current one, they move to a tape of their own (a
    smaller program, compiled once per shape). The solver's state carries over exactly, so the results are those of
    an uninterrupted run up to rounding (a different tape layout sums in another order). None (default): compact
    batches of at least ``_COMPACT_MIN_EXPRESSIONS`` (bucketed) candidates, where the time saved repays compiling
    the smaller programs; False: one uninterrupted program.
    ``max_time`` (seconds, lockstep on one tape): a soft limit on the solver's time (compilation included): past
    it, the run ends at its next checkpoint, and candidates still running keep the best constants found so far
    (``converged`` False).
    ``beaten`` (a ``Beaten``; lockstep on one tape): at each checkpoint, the candidates it says can no longer be
    their dataset's choice (or, with its stall rule, have stalled) stop, keeping what they have (``converged``
    False unless they had); their losses are where they stopped. ``SymbolicTransformerRegressor`` uses it to stop
    refining candidates that a simpler one already beats.
    ``on_final(b, result)``: called once for every dataset b (0 for one dataset) with its ``RefineResult`` (as
    ``refine`` of that dataset alone returns it: fields not lists) as soon as its results are final. In a run that
    stops at checkpoints (lockstep on one tape with ``compact``, ``max_time`` or ``beaten``) a dataset whose
    candidates have all stopped is reported while the device refines the others' (JAX dispatches asynchronously),
    so a caller's host work on finished datasets (``SymbolicTransformerRegressor`` selects and tidies their
    formulas) overlaps the refinement of the rest; every other dataset is reported before ``refine`` returns.
    The order of the calls depends on when datasets finish, never the results; the callback runs in the caller's
    ``jax_enable_x64`` setting.
    """
    t_start = time.perf_counter()
    exprs, xs, ys, multi = _as_datasets(expressions, X, y)
    _check_options(maxiter, tol, linesearch, hessian, maxls)
    if on_final is not None and not callable(on_final):
        raise ValueError(f"on_final must be a function f(dataset index, RefineResult) (or None), got "
                         f"{type(on_final).__name__}")
    if max_time is not None and not max_time >= 0:
        raise ValueError(f"max_time must be a number of seconds >= 0 (or None), got {max_time!r}")
    if beaten is not None:
        if not isinstance(beaten, Beaten):
            raise ValueError(f"beaten must be a sr_jax.refinement.Beaten (or None), got {type(beaten).__name__}")
        beaten.check()
        if linesearch != "lockstep" or (multi and not fold_datasets):
            raise ValueError("beaten works with the lockstep solver on one tape: use linesearch='lockstep' (the "
                             "default) and, for several datasets, fold_datasets=True (the default)")
    dtype = itp.resolve_dtype(dtype)
    batch = _folded_batch(exprs, xs, ys) if multi and fold_datasets else _stacked_batch(exprs, xs, ys)
    itp.check_range(batch.x_BxNxD, "X", dtype)
    itp.check_range(batch.y_BxN, "y", dtype)
    reported = np.zeros(len(batch.slots), bool)
    caller_x64 = jax.config.jax_enable_x64

    def report(slot: int, fields: dict) -> None:
        reported[slot] = True
        with itp.x64_as(caller_x64):  # the callback runs in the caller's JAX setting, not refinement's
            on_final(slot, RefineResult(**fields))

    with itp.precision(dtype):
        if linesearch == "lockstep" and maxiter > 0:
            deadline = None if max_time is None else t_start + float(max_time)
            out = _lockstep_refine(batch, int(maxiter), float(tol), hessian, dtype, compact, deadline, beaten,
                                   None if on_final is None else report)
        else:
            out = _jaxopt_refine(batch, int(maxiter), float(tol), linesearch, int(maxls), dtype, hessian)
    per = [_slot_result(batch, out, tol, s) for s in range(len(batch.slots))]
    if on_final is not None:
        for slot in np.flatnonzero(~reported):
            report(int(slot), per[slot])
    if not multi:
        return RefineResult(**per[0])
    return RefineResult(**{k: [p[k] for p in per] for k in per[0]})


def _jaxopt_refine(batch: "_Batch", maxiter: int, tol: float, linesearch: str, maxls: int, dtype, hessian: str):
    """jaxopt's BFGS with its line search (or, with ``maxiter=0``, the start only), in one call."""
    arrays, c0 = itp.device_arrays(batch.tape, dtype)
    program = _refine_program(batch.tape.signature, maxiter, tol, linesearch, maxls, dtype, hessian)
    return jax.device_get(program(arrays, c0, jnp.asarray(batch.real_BxE), jnp.asarray(batch.x_BxNxD, dtype),
                                  jnp.asarray(batch.y_BxN, dtype), jnp.asarray(batch.w_BxN, dtype)))


def _slot_result(batch: "_Batch", out: dict, tol: float, slot: int) -> dict:
    """The ``RefineResult`` fields of one user dataset (``batch.slots[slot]``) from ``out`` (``_outcome``'s)."""
    b, lo, ex = batch.slots[slot]
    rows = slice(lo, lo + len(ex))
    refined = [e.with_constants(out["consts"][b, lo + i, : len(e.constants)]) if len(e.constants) else e
               for i, e in enumerate(ex)]
    losses = np.asarray(out["losses"][b, rows], np.float64)
    failed = ~np.isfinite(losses)
    return dict(expressions=refined, losses=np.where(failed, np.inf, losses),
                initial_losses=np.asarray(out["initial_losses"][b, rows], np.float64), failed=failed,
                improved=np.array(out["improved"][b, rows]), n_iterations=np.array(out["n_iterations"][b, rows]),
                converged=np.asarray(out["grad_norm"][b, rows]) <= tol)


def make_refine_fn(expressions: Sequence, n_features: int, *, maxiter: int = 100, tol: float = 1e-5,
                   linesearch: str = "lockstep", hessian: str = "hybrid", maxls: int = 10, dtype=None):
    """A pure, jittable, differentiable ``f(X_NxD, y_N) -> (constants_ExP, losses_E)`` for fixed candidates.

    Gradients w.r.t. X and y flow through implicit differentiation of the BFGS solution (``jax.grad``,
    ``jax.jacobian``, ``jax.jit`` and ``jax.vmap`` of ``f`` all work). X must be finite; every row counts (no
    padding). Constants are returned padded to the tape's width (zeros beyond each candidate's own). ``f`` is
    traced in the caller's JAX setting: ``dtype`` defaults to float64 when ``jax_enable_x64`` is on where
    ``make_refine_fn`` is called, else float32 (wrap the calls in ``jax.enable_x64(True)`` for float64 without
    the global flag). Other options as in ``refine``.
    """
    _check_options(maxiter, tol, linesearch, hessian, maxls)
    dtype = np.dtype(dtype or itp.default_float_dtype())
    tape = itp.compile_tape([list(expressions)], n_features)
    arrays = {k: jnp.asarray(v[0]) for k, v in tape.arrays.items()}
    c0_ExP = jnp.asarray(tape.consts[0], dtype)
    sig = tape.signature
    solve = _make_solver(sig, int(maxiter), float(tol), linesearch, True, int(maxls), hessian)
    n_real = tape.n_expressions[0]
    rows = jnp.arange(sig.n_expressions)

    def f(x_NxD, y_N):
        x_NxD = jnp.asarray(x_NxD, dtype)
        y_N = jnp.asarray(y_N, dtype).reshape(-1)
        problem = make_problem(arrays, x_NxD, y_N, jnp.ones_like(y_N))
        l0 = _losses(sig, problem, c0_ExP)
        active = (rows < n_real) & jnp.isfinite(l0)
        c_end, _ = solve(c0_ExP, rows, active, problem)
        l_end = _losses(sig, problem, c_end)
        better = active & jnp.isfinite(l_end) & (l_end <= l0)
        c = jnp.where(better[:, None], c_end, c0_ExP)
        return c[:n_real], _losses(sig, problem, c)[:n_real]

    return f
