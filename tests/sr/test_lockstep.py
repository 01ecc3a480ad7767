"""sr_jax.lockstep: the pure lockstep BFGS / Gauss-Newton hybrid on a small least-squares problem."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sr_jax.lockstep import init_lockstep_state, minimize, minimize_batch

T = np.linspace(-1.0, 1.0, 30)
Y = 2.0 * np.exp(-0.5 * T)  # the model a * exp(b t) fits exactly at (a, b) = (2, -0.5)


def objective(c_P, gn_below):
    """((loss, Gauss-Newton matrix), gradient) of 0.5 * mean(r^2), r = a exp(b t) - y."""
    a, b = c_P[0], c_P[1]
    e = jnp.exp(b * T)
    r = a * e - Y
    jac_NxP = jnp.stack([e, a * T * e], axis=1)
    scale = 1.0 / len(T)
    return (0.5 * scale * jnp.sum(r * r), scale * jac_NxP.T @ jac_NxP), scale * jac_NxP.T @ r


STARTS = np.array([[1.0, 0.0], [3.0, -1.5], [0.5, 0.8]])


@pytest.mark.parametrize("gauss_newton", [True, False])
def test_minimize_vmapped_over_starts_finds_the_exact_fit(gauss_newton):
    with jax.enable_x64(True):
        run = jax.jit(jax.vmap(lambda c: minimize(objective, c, maxiter=200, tol=1e-12, gauss_newton=gauss_newton)))
        c, state = run(jnp.asarray(STARTS))
        np.testing.assert_allclose(np.asarray(c), [[2.0, -0.5]] * 3, rtol=1e-6)
        assert (np.asarray(state.loss) < 1e-14).all() and (np.asarray(state.grad_norm) <= 1e-12).all()
        assert (np.asarray(state.initial_loss) > np.asarray(state.loss)).all()
        if gauss_newton:  # exact residuals at the optimum: Gauss-Newton converges in far fewer evaluations
            assert (np.asarray(state.n_evaluations) < 40).all()


def test_stopping_and_resuming_equals_one_run():
    with jax.enable_x64(True):
        c0 = jnp.asarray(STARTS)
        whole = jax.vmap(lambda c: minimize(objective, c, maxiter=30, tol=0.0, gauss_newton=True))(c0)
        first = jax.vmap(lambda c: minimize(objective, c, maxiter=4, tol=0.0, gauss_newton=True))(c0)
        assert (np.asarray(first[1].n_evaluations) == 4).all()
        rest = jax.vmap(lambda c, s: minimize(objective, c, maxiter=30, tol=0.0, gauss_newton=True, state=s))(*first)
        np.testing.assert_array_equal(np.asarray(rest[0]), np.asarray(whole[0]))
        for a, b in zip(jax.tree_util.tree_leaves(rest[1]), jax.tree_util.tree_leaves(whole[1])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        fresh = init_lockstep_state(np.asarray(STARTS))
        assert fresh.n_evaluations.shape == (3,) and np.isinf(fresh.loss).all()


def test_minimize_batch_is_the_vmapped_loop_and_can_stop_when_few_still_run():
    """``minimize_batch`` with ``until_running=0`` equals ``jax.vmap(minimize)`` exactly; with ``until_running=k`` it
    stops once at most k candidates still run, and resuming those from its state ends exactly as one run."""
    def lane_objective(c_P, gn_below, lane):  # a per-candidate argument, as refinement's objective has
        return objective(c_P * lane, gn_below)

    starts = np.concatenate([STARTS, [[2.0, -0.5], [1.9, -0.45]]])  # two start at or near the fit: they stop first
    kw = dict(maxiter=200, tol=1e-12, gauss_newton=True)
    with jax.enable_x64(True):
        c0, ones = jnp.asarray(starts), jnp.ones(len(starts))
        whole = jax.vmap(lambda c: minimize(objective, c, **kw))(c0)
        batch = jax.jit(lambda c, k: minimize_batch(lane_objective, c, ones, until_running=k, **kw))
        for a, b in zip(jax.tree_util.tree_leaves(batch(c0, 0)), jax.tree_util.tree_leaves(whole)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        c, state = batch(c0, 3)
        running = (np.asarray(state.n_evaluations) < 200) & (np.asarray(state.grad_norm) > 1e-12)
        assert 1 <= running.sum() <= 3
        assert np.asarray(state.n_evaluations).max() < np.asarray(whole[1].n_evaluations).max()
        rest = minimize_batch(lane_objective, c, ones, state=state, **kw)
        for a, b in zip(jax.tree_util.tree_leaves(rest), jax.tree_util.tree_leaves(whole)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
