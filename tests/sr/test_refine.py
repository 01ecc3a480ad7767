import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sr_jax import Expression, make_refine_fn, refine
from sr_jax.interpreter import COMPILE_COUNTER

RNG = np.random.default_rng(0)
X = RNG.standard_normal((60, 2))
Y = 1.5 + 2.0 * np.sin(0.7 * X[:, 0]) - 0.3 * X[:, 1]
TRUE = Expression(["add", 1.5, "add", "mul", 2.0, "sin", "mul", 0.7, "x_0", "mul", -0.3, "x_1"])


def perturbed(scale, seed):
    r = np.random.default_rng(seed)
    return TRUE.with_constants(TRUE.constants * (1 + scale * r.uniform(-1, 1, len(TRUE.constants))))


def test_recovers_known_constants_from_perturbed_starts():
    cands = [perturbed(0.2, s) for s in range(4)] + [Expression(["log", "x_0"])]
    res = refine(cands, X, Y, maxiter=100, linesearch="zoom", maxls=20)
    assert res.failed.tolist() == [False] * 4 + [True]  # log of negative x -> failed, batch unaffected
    for e, l in zip(res.expressions[:4], res.losses[:4]):
        assert l < 1e-6
        np.testing.assert_allclose(e.constants, TRUE.constants, rtol=2e-3, atol=2e-3)
    assert np.isinf(res.losses[4]) and res.expressions[4] == cands[4]
    assert (res.losses[:4] <= res.initial_losses[:4]).all()


def test_batched_equals_one_by_one():
    cands = [perturbed(0.3, s) for s in range(3)] + [Expression(["add", 0.1, "mul", 0.2, "x_1"])]
    batch = refine(cands, X, Y, linesearch="zoom", maxls=20)
    for i, c in enumerate(cands):
        one = refine([c], X, Y, linesearch="zoom", maxls=20)
        np.testing.assert_allclose(batch.losses[i], one.losses[0], rtol=1e-3, atol=1e-6)


def test_never_worse_than_start_and_no_recompile():
    cands = [Expression(["add", 1.5, "mul", 2.0, "x_0"]), Expression(["mul", 3.0, "cos", "x_1"])]
    r1 = refine(cands, X, Y)
    n = COMPILE_COUNTER["refine"]
    cands2 = [Expression(["add", -1.0, "mul", 0.5, "x_1"]), Expression(["mul", 1.0, "cos", "x_0"])]
    r2 = refine(cands2, X[:50], Y[:50])  # same bucket: no new program
    assert COMPILE_COUNTER["refine"] == n
    for r in (r1, r2):
        assert (r.losses <= r.initial_losses + 1e-7).all()


def test_several_datasets_vmap():
    X2 = RNG.standard_normal((60, 2))
    Y2 = -2.0 + 0.5 * X2[:, 1]
    lin = Expression(["add", 0.0, "mul", 1.0, "x_1"])
    res = refine([[perturbed(0.1, 0), lin], [lin, perturbed(0.1, 1)]], np.stack([X, X2]), np.stack([Y, Y2]),
                 linesearch="zoom", maxls=20)
    assert res.losses[0][0] < 1e-6 and res.losses[1][0] < 1e-6
    np.testing.assert_allclose(res.expressions[1][0].constants, [-2.0, 0.5], atol=1e-3)


def test_float64():
    jax.config.update("jax_enable_x64", True)
    try:
        res = refine([perturbed(0.1, 3)], X, Y, linesearch="zoom", maxls=20, tol=1e-10)
        assert res.losses[0] < 1e-9
        np.testing.assert_allclose(res.expressions[0].constants, TRUE.constants, rtol=1e-5)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_gradient_through_refinement_matches_least_squares():
    """Implicit differentiation: d(refined constants)/dy for a linear model equals pinv(A)."""
    f = make_refine_fn([Expression(["add", 0.3, "mul", 0.2, "x_1"])], 2, linesearch="zoom", maxls=20)
    y = jnp.asarray(Y, jnp.float32)
    jac = np.asarray(jax.jacobian(lambda yy: f(X, yy)[0][0, :2])(y))
    a = np.stack([np.ones(len(Y)), X[:, 1]], axis=1)
    np.testing.assert_allclose(jac, np.linalg.pinv(a), atol=2e-4)
    g = np.asarray(jax.grad(lambda xx: f(xx, y)[1].sum())(jnp.asarray(X, jnp.float32)))
    assert np.isfinite(g).all() and np.abs(g).max() > 0


@pytest.mark.parametrize("x, y, msg", [
    (np.ones((5, 1)), np.array([1.0, 2, 3, np.nan, 4]), "y contains NaN"),
    (np.ones((5, 1)), np.ones(4), "5 rows but y has 4"),
    (np.ones((5, 1)), np.ones((5, 2)), "shape \\(N,\\)"),
    (np.full((5, 1), np.inf), np.ones(5), "X contains NaN or inf"),
])
def test_bad_inputs(x, y, msg):
    with pytest.raises(ValueError, match=msg):
        refine([Expression(["mul", 1.0, "x_0"])], x, y)


def test_folded_datasets_equal_vmapped_and_one_by_one():
    """Several datasets folded into one tape (default) give the vmapped path's / per-dataset results."""
    X2 = RNG.standard_normal((40, 2))  # different number of points: padded, masked per candidate
    Y2 = -2.0 + 0.5 * X2[:, 1] * X2[:, 0]
    lin = Expression(["add", 0.0, "mul", 1.0, "x_1"])
    prod = Expression(["add", 0.3, "mul", 0.8, "mul", "x_0", "x_1"])
    cands = [[perturbed(0.2, 0), lin], [prod, lin, Expression(["log", "x_0"])]]
    kw = dict(linesearch="zoom", maxls=20)
    folded = refine(cands, [X, X2], [Y, Y2], **kw)
    vm = refine(cands, [X, X2], [Y, Y2], fold_datasets=False, **kw)
    for b, (xx, yy) in enumerate([(X, Y), (X2, Y2)]):
        one = refine(cands[b], xx, yy, **kw)
        np.testing.assert_allclose(folded.losses[b], vm.losses[b], rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(folded.losses[b], one.losses, rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(folded.initial_losses[b], one.initial_losses, rtol=1e-5)
    assert folded.failed[1].tolist() == [False, False, True]
    assert folded.losses[1][0] < 1e-6


@pytest.mark.parametrize("hessian", ["hybrid", "bfgs"])
def test_default_lockstep_recovers_constants_and_isolates_failures(hessian):
    cands = [perturbed(0.3, s) for s in range(3)] + [Expression(["log", "x_0"]), Expression(["mul", 2.0, "x_1"])]
    res = refine(cands, X, Y, hessian=hessian, maxiter=100 if hessian == "hybrid" else 300)
    assert res.failed.tolist() == [False, False, False, True, False]
    assert np.isinf(res.losses[3]) and res.expressions[3] == cands[3]
    for e, l in zip(res.expressions[:3], res.losses[:3]):
        assert l < 1e-6
        np.testing.assert_allclose(e.constants, TRUE.constants, rtol=5e-3, atol=5e-3)
    assert (res.losses[[0, 1, 2, 4]] <= res.initial_losses[[0, 1, 2, 4]]).all()
    # the wrong skeleton c * x_1 is fitted by least squares: its best c is x_1.y / x_1.x_1 (no intercept)
    slope = X[:, 1] @ Y / (X[:, 1] @ X[:, 1])
    np.testing.assert_allclose(res.expressions[4].constants, [slope], rtol=1e-3)


def test_hybrid_needs_fewer_evaluations_than_plain_bfgs():
    cands = [perturbed(0.3, s) for s in range(6)]
    hyb = refine(cands, X, Y, hessian="hybrid", maxiter=300)
    plain = refine(cands, X, Y, hessian="bfgs", maxiter=300)
    assert hyb.converged.all() and plain.converged.all()
    assert hyb.n_iterations.mean() < 0.7 * plain.n_iterations.mean()


def test_gauss_newton_pass_matches_autodiff():
    """One reverse sweep seeded with ones gives the same loss/gradient as jax.grad, and B = 2 J'J / (N var)."""
    import importlib

    import sr_jax.interpreter as itp
    rf = importlib.import_module("sr_jax.refine")
    cands = [perturbed(0.3, 0), Expression(["add", 0.5, "mul", 1.2, "cos", "x_1"]), Expression([3.0])]
    tape = itp.compile_tape([cands], 2)
    arrays, c0 = itp.device_arrays(tape, jnp.float32)
    arrays = jax.tree_util.tree_map(lambda a: a[0], arrays)
    x, y, w = jnp.asarray(X, jnp.float32), jnp.asarray(Y, jnp.float32), jnp.ones(len(Y), jnp.float32)
    vary = rf._weighted_var(y, w)
    l1, g1 = rf._batch_value_and_grad(tape.signature, arrays, c0[0], x, y, w, vary)
    l2, g2, gn = rf._batch_gauss_newton(tape.signature, arrays, c0[0], x, y, w, vary)
    np.testing.assert_allclose(l2[:3], l1[:3], rtol=1e-5)
    np.testing.assert_allclose(g2[:3], g1[:3], rtol=1e-4, atol=1e-6)
    # the constant expression 3.0: d pred / d c = 1 everywhere, so B = 2 / var(y)
    np.testing.assert_allclose(gn[2, 0, 0], 2.0 / float(vary), rtol=1e-5)
    jac = jax.jacrev(lambda c: itp.run_tape(tape.signature, arrays, c, x))(c0[0])  # (E, N, E, P)
    j1 = jac[1, :, 1, :]  # second candidate's Jacobian, (N, P)
    np.testing.assert_allclose(gn[1], 2 * j1.T @ j1 / (len(Y) * float(vary)), rtol=1e-4, atol=1e-6)


def test_unknown_hessian_is_a_clear_error():
    with pytest.raises(ValueError, match="hessian must be"):
        refine([TRUE], X, Y, hessian="newton")


def test_gauss_newton_only_where_needed_equals_full():
    """The few-candidates path (Gram matrices and factorisations for <= a quarter of the batch) matches the full one."""
    import importlib

    import sr_jax.interpreter as itp
    rf = importlib.import_module("sr_jax.refine")
    cands = [perturbed(0.3, s) for s in range(64)]
    tape = itp.compile_tape([cands], 2)
    arrays, c0 = itp.device_arrays(tape, jnp.float32)
    arrays = jax.tree_util.tree_map(lambda a: a[0], arrays)
    x, y, w = jnp.asarray(X, jnp.float32), jnp.asarray(Y, jnp.float32), jnp.ones(len(Y), jnp.float32)
    vary = rf._weighted_var(y, w)
    sig = tape.signature
    l, g, gn_all = rf._batch_gauss_newton(sig, arrays, c0[0], x, y, w, vary)
    below = jnp.where(jnp.arange(sig.n_expressions) % 7 == 0, jnp.inf, -jnp.inf)  # 10 of 64 need B
    assert int(jnp.sum(below > 0)) <= rf._partial_capacity(sig.n_expressions)
    l2, g2, gn_some = rf._batch_gauss_newton(sig, arrays, c0[0], x, y, w, vary, below)
    need = np.asarray(below > 0)
    np.testing.assert_allclose(gn_some[need], gn_all[need], rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(gn_some[~need]).max()) == 0.0
    np.testing.assert_allclose(g2, g, rtol=1e-6)
    # factorisations: batched with few lanes taking them == one by one
    take = jnp.asarray(need[:64])
    B = gn_all[:64] + jnp.eye(gn_all.shape[-1])[None] * 1e-3
    H = jnp.broadcast_to(jnp.eye(B.shape[-1]), B.shape)
    out = jax.vmap(rf._gn_inverse_where)(take, B, H)
    for i in range(64):
        want = rf._gn_inverse(B[i]) if need[i] else H[i]
        np.testing.assert_allclose(out[i], want, rtol=1e-5, atol=1e-6)
    k = int(np.flatnonzero(need)[0])
    reg = np.asarray(B[k], np.float64)
    d = np.diag(reg)
    reg = reg + np.diag(np.where(d > 0, 1e-4 * d + 1e-7 * d.max(), 1.0))
    np.testing.assert_allclose(out[k] @ reg, np.eye(reg.shape[0]), atol=2e-3)
