"""Lockstep BFGS with a Gauss-Newton hybrid: ``minimize(objective, c0_P) -> (c_P, LockstepState)``.

A small pure-JAX solver for ``sr_jax.refinement`` (no private API of any library): written for ONE candidate's P
constants and meant to be ``jax.vmap``-ed over candidates, with exactly one objective evaluation per iteration, so
that a batch whose objective evaluates every candidate at once (one tape pass) costs one pass per iteration (see
``minimize``). ``minimize_batch`` is the same loop over a whole batch, which can also stop once few candidates
still run. The state's fields are named for what they hold; a run can stop and resume exactly (``state=``).

Glossary: P constants of a candidate; ``H`` inverse-Hessian estimate (P x P); ``B`` Gauss-Newton matrix of the
least-squares loss (P x P); ``t`` step length along the search direction ``d = -H g``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap


class LockstepState(NamedTuple):
    """One candidate's state in ``minimize`` (P constants)."""

    n_evaluations: jax.Array  # objective evaluations so far (``maxiter`` bounds them)
    n_accepted: jax.Array  # accepted points, the start included
    loss: jax.Array  # at the current constants (inf before the first evaluation)
    grad_P: jax.Array  # gradient there
    grad_norm: jax.Array  # |grad_P| (inf before the first evaluation, 0 for a non-finite start): stops at <= tol
    step: jax.Array  # length t of the next trial along -H grad (0: the first evaluation is the start itself)
    inv_hessian_PxP: jax.Array  # H
    initial_loss: jax.Array  # the objective's value at the start (as the objective reports it)
    gauss_newton_PxP: jax.Array  # the last Gauss-Newton matrix B the objective formed (zeros before)


def minimize(objective, c0_P, *args, maxiter, tol: float, gauss_newton: bool = False,
             state: Optional[LockstepState] = None):
    """Minimise ``objective`` from ``c0_P`` with exactly ONE objective evaluation per iteration; ``(c_P, state)``.

    ``objective(c_P, gn_below, *args) -> ((loss, B_PxP), grad_P)``: B is the Gauss-Newton matrix of a least-squares
    loss where ``loss <= gn_below`` (anything, e.g. zeros, elsewhere; unused without ``gauss_newton``). A pure
    function of JAX arrays: ``jax.vmap`` it over candidates (``args`` as the objective needs them).

    Why lockstep: under ``jax.vmap`` every lane of a ``while_loop`` runs as long as the slowest one, so with an
    inner line search each BFGS iteration costs the longest line search of the whole batch (one batched tape pass
    per trial). Here an iteration evaluates the trial point ``c + t d`` once: if the Armijo condition holds the step
    is accepted; otherwise the point is kept and the next iteration tries a shorter step along the same direction
    (safeguarded quadratic interpolation, within [0.1 t, 0.5 t]). ``maxiter`` counts evaluations; the loop stops
    when every lane's gradient norm is at most ``tol``. The start point is evaluated by the first iteration (t = 0),
    so the program holds one copy of the objective.

    Why Gauss-Newton (``gauss_newton=True``): the loss is a mean of squares. After an accepted step the next
    inverse-Hessian estimate H is (B + damping)^-1 when the loss fell by at least 10% (small residuals:
    Gauss-Newton converges fast), else the BFGS update of the previous H (large residuals: BFGS's curvature
    estimate is better) -- the hybrid of Fletcher & Xu (1987), with Marquardt damping. The first direction is the
    Gauss-Newton one. B is only needed (so the objective only forms it) where the loss fell by >= 10% in this
    evaluation: that threshold is the ``gn_below`` the objective receives.
    Without Gauss-Newton: plain BFGS from H = I, rescaled by y.s / y.y after the first step (Nocedal & Wright
    eq. 6.20), first step of length 1 as scipy's BFGS. BFGS updates are skipped when the curvature y.s is not
    positive, so H stays positive definite.

    Resuming: pass the ``state`` a previous call returned (with its ``c_P``) to continue where it stopped; ``maxiter``
    may be a traced integer (it bounds ``state.n_evaluations``, which counts from the very start), so one compiled
    program runs a minimisation in chunks (see ``refine``'s lane compaction).
    """
    if state is None:
        state = init_lockstep_state(c0_P)

    def cond(carry):
        return _running(carry[1], maxiter, tol)

    def body(carry):
        return _lockstep_update(objective, gauss_newton, *carry, args)

    return jax.lax.while_loop(cond, body, (c0_P, state))


def _running(state: LockstepState, maxiter, tol: float):
    """Whether a candidate still runs: evaluations left and its gradient norm above ``tol``."""
    return (state.n_evaluations < maxiter) & (state.grad_norm > tol)


def minimize_batch(objective, c0_ExP, lane_args, *, maxiter, tol: float, gauss_newton: bool = False,
                   state: Optional[LockstepState] = None, until_running=0):
    """``jax.vmap(minimize)`` over E candidates (the leading axis of ``c0_ExP``, of every leaf of ``lane_args`` and
    of ``state``), written as one loop over the batch so that it can also stop when at most ``until_running``
    candidates still run (a traced integer; 0: only when none does). A caller then moves those few to a smaller
    batch and resumes them (``state``) exactly where they stopped. ``objective(c_P, gn_below, lane_arg)`` as in
    ``minimize``, ``lane_arg`` the candidate's slice of ``lane_args``; ``(c_ExP, state)``.

    With ``until_running=0`` this is what ``jax.vmap`` makes of ``minimize``'s loop: every iteration updates every
    candidate and keeps the update only where that candidate was still running. Both loops share one iteration
    (``_lockstep_update``, ``_running``); neither is written as the other because ``minimize`` cannot see the batch
    (no count of running lanes under ``jax.vmap``), and ``minimize`` as a batch of one under an outer ``jax.vmap``
    would nest the factorisation's batching rule inside another vmap, which turns its few-lanes branch into a
    select that factorises every lane.
    """
    if state is None:
        state = init_lockstep_state(c0_ExP)

    def cond(carry):
        n = jnp.sum(_running(carry[1], maxiter, tol))
        return (n > 0) & (n > until_running)

    def body(carry):
        c_ExP, st = carry
        keep_E = _running(st, maxiter, tol)
        new = jax.vmap(lambda c_P, s, a: _lockstep_update(objective, gauss_newton, c_P, s, (a,)))(c_ExP, st, lane_args)
        return jax.tree_util.tree_map(lambda n, o: jnp.where(keep_E.reshape(keep_E.shape + (1,) * (n.ndim - 1)), n, o),
                                      new, carry)

    return jax.lax.while_loop(cond, body, (c0_ExP, state))


def init_lockstep_state(c0_P) -> LockstepState:
    """The state ``minimize`` starts from (nothing evaluated yet; works on numpy or JAX arrays, with any
    leading batch axes)."""
    xp = np if isinstance(c0_P, np.ndarray) else jnp
    lead, n, dtype = c0_P.shape[:-1], c0_P.shape[-1], c0_P.dtype
    inf = xp.full(lead, np.inf, dtype)
    zero_i = xp.zeros(lead, np.int32)
    return LockstepState(n_evaluations=zero_i, n_accepted=zero_i, loss=inf, grad_P=xp.zeros_like(c0_P),
                         grad_norm=inf, step=xp.zeros(lead, dtype),
                         inv_hessian_PxP=xp.broadcast_to(xp.eye(n, dtype=dtype), lead + (n, n)),
                         initial_loss=inf, gauss_newton_PxP=xp.zeros(lead + (n, n), dtype))


def _lockstep_update(objective, gauss_newton: bool, c_P, state: LockstepState, args):
    """One evaluation of ``minimize``: try ``c + t d``, accept or shorten, update H."""
    g, f, H, t = state.grad_P, state.loss, state.inv_hessian_PxP, state.step
    B = state.gauss_newton_PxP
    n = c_P.shape[-1]
    eye = jnp.eye(n, dtype=c_P.dtype)
    first = state.n_evaluations == 0  # t = 0: evaluate the start point
    d = -H @ g
    slope = jnp.dot(g, d)
    bad = ~(slope < 0) & ~first  # not a descent direction (roundoff): restart from steepest descent
    H = jnp.where(bad, eye, H)
    d = jnp.where(bad, -g, d)
    slope = jnp.where(bad, -jnp.dot(g, g), slope)
    trial = c_P + t * d
    # Gauss-Newton after a >= 10% decrease (inf at the start: every candidate); -inf: never
    gn_below = (0.9 * f if gauss_newton else jnp.full_like(f, -jnp.inf)).astype(c_P.dtype)
    (f_new, B_new), g_new = objective(trial, gn_below, *args)
    fresh_B = f_new <= gn_below  # the objective formed B exactly here
    ok = jnp.isfinite(f_new) & (first | (f_new <= f + 1e-4 * t * slope))
    s, yv = t * d, g_new - g
    ys = jnp.dot(yv, s)
    rho = 1.0 / jnp.where(ys > 0, ys, 1.0)
    if gauss_newton:
        H0 = H
    else:  # plain BFGS: scale H = I to the curvature seen along the first accepted step
        scale_now = (state.n_accepted == 1) & (ys > 0)
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
    eps = jnp.finfo(c_P.dtype).eps
    stalled = ~ok & (t_rej * jnp.sqrt(jnp.dot(d, d)) <= eps * (jnp.sqrt(jnp.dot(c_P, c_P)) + eps))
    gnorm = jnp.sqrt(jnp.dot(g, g))
    if gauss_newton:  # B at the point we stay at
        B = jnp.where(ok & fresh_B, B_new, B)
        H_new = _gn_inverse_where((ok & fresh_B) | stalled, B, H_new)
        t_restart = 1.0
    else:
        H_new = jnp.where(stalled, eye, H_new)
        t_restart = jnp.minimum(1.0, 1.0 / jnp.maximum(gnorm, 1e-30))
    H_new = jnp.where(jnp.all(jnp.isfinite(H_new)), H_new, eye)
    t_rej = jnp.where(stalled, t_restart, t_rej)
    # the first step of plain BFGS has length 1 (t = 1 / |g|), as scipy's; a Gauss-Newton step is t = 1
    g_acc = jnp.where(ok, g_new, g)
    gnorm_acc = jnp.sqrt(jnp.dot(g_acc, g_acc))
    t_first = 1.0 if gauss_newton else jnp.where(gnorm_acc > 1.0, 1.0 / jnp.maximum(gnorm_acc, 1e-30), 1.0)
    t_acc = jnp.where(first, t_first, 1.0)
    new_state = LockstepState(
        n_evaluations=state.n_evaluations + 1, n_accepted=state.n_accepted + ok.astype(jnp.int32),
        loss=jnp.where(ok, f_new, f), grad_P=g_acc, grad_norm=jnp.where(ok | ~first, gnorm_acc, 0.0).astype(f.dtype),
        step=jnp.where(ok, t_acc, t_rej).astype(t.dtype), inv_hessian_PxP=H_new,
        initial_loss=jnp.where(first, f_new, state.initial_loss), gauss_newton_PxP=B)
    return jnp.where(ok, trial, c_P), new_state


def _gn_inverse(B):
    """(B + damping)^-1 by Gauss-Jordan elimination (Levenberg-Marquardt damping); identity on directions B does
    not see."""
    n = B.shape[-1]
    diag = jnp.diag(B)
    damp = 1e-4 * diag + 1e-7 * jnp.max(diag)  # Marquardt's scale-free damping, plus a floor for flat ones
    reg = B + jnp.diag(jnp.where(diag > 0, damp, 1.0))
    # Gauss-Jordan without pivoting (the damped matrix is symmetric positive definite), in plain jnp ops: a LAPACK
    # call inside the lax.switch of _gn_inverse_where deadlocked XLA's CPU runtime (jax 0.10)
    # (in place: after step k, column k holds the inverse's column, so no augmented matrix is needed)
    # (a fori_loop, not a Python loop: one copy of the step in the program instead of P, which compiles faster)
    def eliminate(k, m):
        inv_piv = 1.0 / m[k, k]
        row = m[k] * inv_piv
        col = m[:, k]
        m = m - col[:, None] * row[None, :]
        return m.at[k].set(row).at[:, k].set(-col * inv_piv).at[k, k].set(inv_piv)

    m = jax.lax.fori_loop(0, n, eliminate, reg)
    return 0.5 * (m + m.T)  # a zero pivot gives inf/NaN: the caller falls back to the identity


@custom_vmap
def _gn_inverse_where(take, B, H):
    """``_gn_inverse(B)`` where ``take``, else ``H``.

    Why custom_vmap: under vmap a ``lax.cond`` becomes a select that runs both branches, so every lane would pay for
    a factorisation every iteration. The batched rule factorises only the lanes that take it (typically a small part of
    the batch once it has left its fast-decrease phase; all of them when more than a quarter do).
    """
    return jax.lax.cond(take, lambda: _gn_inverse(B), lambda: H)


@_gn_inverse_where.def_vmap
def _gn_inverse_where_rule(axis_size, in_batched, take, B, H):
    take, B, H = [a if bt else jnp.broadcast_to(a, (axis_size,) + a.shape) for a, bt in zip((take, B, H), in_batched)]
    cap = partial_capacity(axis_size)

    def some():
        rows = jnp.argsort(~take, stable=True)[:cap]
        return H.at[rows].set(jnp.where(take[rows][:, None, None], jax.vmap(_gn_inverse)(B[rows]), H[rows]))

    def every():
        return jnp.where(take[:, None, None], jax.vmap(_gn_inverse)(B), H)

    n_take = jnp.sum(take)
    branch = jnp.where(n_take == 0, 0, jnp.where(n_take <= cap, 1, 2))
    return jax.lax.switch(branch, [lambda: H, some, every]), True


def partial_capacity(n: int) -> int:
    """Rows formed by the few-candidates paths (Gram matrices in the objective, factorisations here): a quarter of
    ``n``, or all of them below 64."""
    return n // 4 if n >= 64 else n
