"""sr_jax.lockstep: the pure lockstep BFGS / Gauss-Newton hybrid on a small least-squares problem."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sr_jax.lockstep import init_lockstep_state, minimize

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
