import importlib
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sr_jax import Expression, make_refine_fn, refine
from sr_jax.interpreter import COMPILE_COUNTER

RNG = np.random.default_rng(0)
X = RNG.standard_normal((60, 2))
Y = 1.5 + 2.0 * np.sin(0.7 * X[:, 0]) - 0.3 * X[:, 1]
TRUE = Expression(["add", 1.5, "add", "mul", 2.0, "sin", "mul", 0.7, "x_0", "mul", -0.3, "x_1"])


def perturbed(scale, seed):
    r = np.random.default_rng(seed)
    return TRUE.with_constants(TRUE.constants * (1 + scale * r.uniform(-1, 1, len(TRUE.constants))))


# the batch most tests share (one compiled program per option set): three perturbed starts of the true expression,
# one candidate that fails (log of negative x) and one wrong skeleton
CANDS = [perturbed(0.3, s) for s in range(3)] + [Expression(["log", "x_0"]), Expression(["mul", 2.0, "x_1"])]
MAXITER = 300  # for plain BFGS; the hybrid stops long before


def _check_recovered(res, max_loss):
    assert res.failed.tolist() == [False, False, False, True, False]  # log of negative x fails, batch unaffected
    assert np.isinf(res.losses[3]) and res.expressions[3] == CANDS[3]
    for e, l in zip(res.expressions[:3], res.losses[:3]):
        assert l < max_loss
        np.testing.assert_allclose(e.constants, TRUE.constants, rtol=5e-3, atol=5e-3)
    assert (res.losses[[0, 1, 2, 4]] <= res.initial_losses[[0, 1, 2, 4]]).all()
    # the wrong skeleton c * x_1 is fitted by least squares: its best c is x_1.y / x_1.x_1 (no intercept)
    slope = X[:, 1] @ Y / (X[:, 1] @ X[:, 1])
    np.testing.assert_allclose(res.expressions[4].constants, [slope], rtol=1e-3)


def test_default_lockstep_recovers_constants_in_float64_and_isolates_failures():
    """Both Hessian models recover the constants; the Gauss-Newton hybrid needs far fewer evaluations; float64
    (the default) without touching the global x64 flag."""
    assert not jax.config.jax_enable_x64
    hyb = refine(CANDS, X, Y, maxiter=MAXITER)
    plain = refine(CANDS, X, Y, hessian="bfgs", maxiter=MAXITER)
    assert not jax.config.jax_enable_x64
    _check_recovered(hyb, max_loss=1e-12)  # float32 could not get below ~1e-7 relative
    _check_recovered(plain, max_loss=1e-6)
    np.testing.assert_allclose(hyb.expressions[0].constants, TRUE.constants, rtol=1e-6)
    assert hyb.converged.all() and plain.converged[[0, 1, 2, 4]].all()
    assert hyb.n_iterations[:3].mean() < 0.7 * plain.n_iterations[:3].mean()


@pytest.mark.parametrize("linesearch", ["backtracking", pytest.param("zoom", marks=pytest.mark.slow)])
def test_jaxopt_line_searches_recover_constants(linesearch):
    _check_recovered(refine(CANDS, X, Y, linesearch=linesearch, maxls=20), max_loss=1e-6)


def test_batched_equals_one_by_one():
    batch = refine(CANDS, X, Y, maxiter=MAXITER)  # the program of the test above
    for i in (1, 4):
        one = refine([CANDS[i]], X, Y, maxiter=MAXITER)
        np.testing.assert_allclose(batch.losses[i], one.losses[0], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(batch.expressions[i].constants, one.expressions[0].constants, rtol=1e-6)


def test_never_worse_than_start_and_no_recompile():
    cands = [Expression(["add", 1.5, "mul", 2.0, "x_0"]), Expression(["mul", 3.0, "cos", "x_1"])]
    r1 = refine(cands, X, Y)
    n = COMPILE_COUNTER["refine"]
    cands2 = [Expression(["add", -1.0, "mul", 0.5, "x_1"]), Expression(["mul", 1.0, "cos", "x_0"])]
    r2 = refine(cands2, X[:50], Y[:50])  # same bucket: no new program
    assert COMPILE_COUNTER["refine"] == n
    for r in (r1, r2):
        assert (r.losses <= r.initial_losses + 1e-7).all()


def _padded(x, d):
    return np.concatenate([x, np.zeros((x.shape[0], d - x.shape[1]))], axis=1)


def test_generator_datasets_beyond_float32_range():
    """The generator's own datasets with max |y| of 2e21 (> 1e19: squares overflow float32), 8.8e60 and 4.1e84
    (> 3.4e38: y itself overflows float32) refine to small losses, in one folded call."""
    from sr_jax.generator import sample

    samples = [sample([7, i]) for i in (180, 0, 200)]
    assert [f"{np.abs(s.y_N).max():.2g}" for s in samples] == ["2.2e+21", "8.8e+60", "4.1e+84"]
    r = np.random.default_rng(0)
    cands = [[s.expression.with_constants(c * (1 + 1e-3 * r.uniform(-1, 1, len(c))))]
             for c, s in ((s.expression.constants, s) for s in samples)]
    res = refine(cands, [_padded(s.x_NxD, 10) for s in samples], [s.y_N for s in samples])
    assert not jax.config.jax_enable_x64
    for b, s in enumerate(samples):
        assert not res.failed[b][0]
        assert res.losses[b][0] < 1e-8 and res.losses[b][0] <= res.initial_losses[b][0]
        assert 0 < res.initial_losses[b][0] < np.inf
        # the reported loss is the plain MSE / var(y) of the returned expression, computed in float64 numpy
        pred = res.expressions[b][0].evaluate_numpy(s.x_NxD)
        want = np.mean(((pred - s.y_N) / np.std(s.y_N)) ** 2)
        np.testing.assert_allclose(res.losses[b][0], want, rtol=1e-6, atol=1e-14)


@settings(max_examples=20, deadline=None)
@given(st.integers(-300, 300), st.sampled_from(["float32", "float64"]))
def test_loss_is_exact_for_any_magnitude_of_y(k, dtype):
    """MSE / var(y) of a prediction 1.1 y: squares of y overflow (or underflow) for |k| > 154 in float64, |k| > 19
    in float32, but y is compared after scaling by a power of two."""
    import importlib

    rf = importlib.import_module("sr_jax.refinement")
    if dtype == "float32":
        k = k // 9  # within float32's range
    base = 1.0 + np.sin(np.arange(50.0))
    with jax.enable_x64(dtype == "float64"):
        y = jnp.asarray(base * 10.0**k, dtype)
        problem = rf.make_problem({}, jnp.zeros((50, 1), dtype), y, jnp.ones(50, dtype))
        loss = float(rf._residuals(1.1 * y[None], problem).loss_E[0])
    np.testing.assert_allclose(loss, 0.01 * np.mean(base**2) / np.var(base), rtol=1e-12 if dtype == "float64" else 1e-5)


def test_float32_on_request_scales_y_and_rejects_what_it_cannot_hold():
    y = np.exp(70.0 + 0.5 * X[:, 0])  # up to ~1e31: squares overflow float32 unless y is scaled
    cand = Expression(["exp", "add", 69.5, "mul", 0.6, "x_0"])
    res = refine([cand], X, y, dtype=jnp.float32)
    assert not res.failed[0] and res.losses[0] < 1e-6
    np.testing.assert_allclose(res.expressions[0].constants, [70.0, 0.5], rtol=1e-4)
    with pytest.raises(ValueError, match="beyond float32's range"):
        refine([cand], X, y * 1e10, dtype=jnp.float32)
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        refine([cand], X, y, dtype=jnp.float16)


@pytest.mark.parametrize("x, y, msg", [
    (np.ones((5, 1)), np.array([1.0, 2, 3, np.nan, 4]), "y contains NaN"),
    (np.ones((5, 1)), np.ones(4), "5 rows but y has 4"),
    (np.ones((5, 1)), np.ones((5, 2)), "shape \\(N,\\)"),
    (np.full((5, 1), np.inf), np.ones(5), "X contains NaN or inf"),
])
def test_bad_inputs(x, y, msg):
    with pytest.raises(ValueError, match=msg):
        refine([Expression(["mul", 1.0, "x_0"])], x, y)


@pytest.mark.parametrize("x, y, kw, msg", [
    (np.ones((5, 1)) * (1 + 1j), np.ones(5), {}, "X is complex"),
    (np.ones((5, 1)), np.ones(5) * (1 + 0.5j), {}, "y is complex"),
    ([np.ones((5, 1))], [np.ones(5) * 1j], {}, "y \\(dataset 0\\) is complex"),
    (np.ones((5, 1)), np.ones(5), dict(linesearch="wolfe"),
     "linesearch must be one of 'lockstep', 'backtracking', 'zoom'; got 'wolfe'"),
    (np.ones((5, 1)), np.ones(5), dict(maxiter=-1), "maxiter must be an integer >= 0"),
    (np.ones((5, 1)), np.ones(5), dict(tol=float("nan")), "tol must be >= 0"),
])
def test_bad_inputs_and_options(x, y, kw, msg):
    cands = [Expression(["mul", 1.0, "x_0"])]
    with pytest.raises(ValueError, match=msg):
        refine([cands] if isinstance(x, list) else cands, x, y, **kw)


def test_maxiter_zero_returns_the_initial_losses():
    cands = [perturbed(0.3, 0), Expression(["log", "x_0"]), Expression(["x_1"])]
    res = refine(cands, X, Y, maxiter=0)
    assert res.failed.tolist() == [False, True, False]
    for i in (0, 2):
        want = np.mean((cands[i].evaluate_numpy(X) - Y) ** 2) / np.var(Y)
        np.testing.assert_allclose(res.losses[i], want, rtol=1e-9)
        assert res.expressions[i] == cands[i]
    np.testing.assert_array_equal(res.losses, res.initial_losses)
    assert not res.improved.any() and (res.n_iterations == 0).all()


def test_gauss_newton_pass_matches_autodiff():
    """One reverse sweep seeded with the y scale gives the same loss/gradient as jax.grad, and B = 2 J'J / (N var)."""
    import importlib

    import sr_jax.interpreter as itp
    rf = importlib.import_module("sr_jax.refinement")
    cands = [perturbed(0.3, 0), Expression(["add", 0.5, "mul", 1.2, "cos", "x_1"]), Expression([3.0])]
    tape = itp.compile_tape([cands], 2)
    arrays, c0 = itp.device_arrays(tape, jnp.float32)
    arrays = jax.tree_util.tree_map(lambda a: a[0], arrays)
    x, y, w = jnp.asarray(X, jnp.float32), jnp.asarray(Y, jnp.float32), jnp.ones(len(Y), jnp.float32)
    problem = rf.make_problem(arrays, x, y, w)  # y is scaled by a power of two: B and g are not
    vary = np.var(Y)
    # under jit, as refinement runs them (op by op, the tape's many small operations cost a minute to dispatch)
    l1, g1 = jax.jit(rf._batch_value_and_grad, static_argnums=0)(tape.signature, problem, c0[0])
    l2, g2, gn = jax.jit(rf._batch_gauss_newton, static_argnums=0)(tape.signature, problem, c0[0])
    np.testing.assert_allclose(l2[:3], l1[:3], rtol=1e-5)
    np.testing.assert_allclose(l1[0], np.mean((cands[0].evaluate_numpy(X) - Y) ** 2) / vary, rtol=1e-5)
    np.testing.assert_allclose(g2[:3], g1[:3], rtol=1e-4, atol=1e-6)
    # the constant expression 3.0: d pred / d c = 1 everywhere, so B = 2 / var(y)
    np.testing.assert_allclose(gn[2, 0, 0], 2.0 / float(vary), rtol=1e-5)
    jac = jax.jit(jax.jacrev(lambda c: itp.run_tape(tape.signature, arrays, c, x)))(c0[0])  # (E, N, E, P)
    j1 = jac[1, :, 1, :]  # second candidate's Jacobian, (N, P)
    np.testing.assert_allclose(gn[1], 2 * j1.T @ j1 / (len(Y) * float(vary)), rtol=1e-4, atol=1e-6)


def test_unknown_hessian_is_a_clear_error():
    with pytest.raises(ValueError, match="hessian must be"):
        refine([TRUE], X, Y, hessian="newton")


def test_gauss_newton_only_where_needed_equals_full():
    """The few-candidates path (Gram matrices and factorisations for <= a quarter of the batch) matches the full one."""
    import importlib

    import sr_jax.interpreter as itp
    from sr_jax import lockstep
    rf = importlib.import_module("sr_jax.refinement")
    cands = [perturbed(0.3, s) for s in range(64)]
    tape = itp.compile_tape([cands], 2)
    arrays, c0 = itp.device_arrays(tape, jnp.float32)
    arrays = jax.tree_util.tree_map(lambda a: a[0], arrays)
    x, y, w = jnp.asarray(X, jnp.float32), jnp.asarray(Y, jnp.float32), jnp.ones(len(Y), jnp.float32)
    problem = rf.make_problem(arrays, x, y, w)
    sig = tape.signature
    gauss_newton = jax.jit(rf._batch_gauss_newton, static_argnums=0)  # as refinement runs it
    l, g, gn_all = gauss_newton(sig, problem, c0[0])
    below = jnp.where(jnp.arange(sig.n_expressions) % 7 == 0, jnp.inf, -jnp.inf)  # 10 of 64 need B
    assert int(jnp.sum(below > 0)) <= lockstep.partial_capacity(sig.n_expressions)
    l2, g2, gn_some = gauss_newton(sig, problem, c0[0], below)
    need = np.asarray(below > 0)
    np.testing.assert_allclose(gn_some[need], gn_all[need], rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(gn_some[~need]).max()) == 0.0
    np.testing.assert_allclose(g2, g, rtol=1e-6)
    # factorisations: batched with few lanes taking them == one by one
    take = jnp.asarray(need[:64])
    B = gn_all[:64] + jnp.eye(gn_all.shape[-1])[None] * 1e-3
    H = jnp.broadcast_to(jnp.eye(B.shape[-1]), B.shape)
    out = jax.jit(jax.vmap(lockstep._gn_inverse_where))(take, B, H)
    gn_inverse = jax.jit(lockstep._gn_inverse)
    for i in range(64):
        want = gn_inverse(B[i]) if need[i] else H[i]
        np.testing.assert_allclose(out[i], want, rtol=1e-5, atol=1e-6)
    k = int(np.flatnonzero(need)[0])
    reg = np.asarray(B[k], np.float64)
    d = np.diag(reg)
    reg = reg + np.diag(np.where(d > 0, 1e-4 * d + 1e-7 * d.max(), 1.0))
    np.testing.assert_allclose(out[k] @ reg, np.eye(reg.shape[0]), atol=2e-3)


def test_one_dataset_program_keeps_the_few_candidates_paths_as_branches():
    """With one dataset (or folded datasets) the lockstep program is not vmapped over datasets: a vmapped
    ``lax.cond`` on data becomes a select that runs every branch, so every evaluation would form all Gram matrices."""
    import sr_jax.interpreter as itp
    from sr_jax.lockstep import init_lockstep_state
    rf = importlib.import_module("sr_jax.refinement")
    cands = [perturbed(0.3, s) for s in range(64)]
    tape = itp.compile_tape([cands], 2)
    sig = tape.signature
    e_b, p_b = sig.n_expressions, sig.n_consts

    def gram_shapes(jaxpr, in_cond=False, out=None):  # (E_b, P_b, P_b) products, and whether inside a cond
        out = [] if out is None else out
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.shape[-3:] == (e_b, p_b, p_b):
                out.append(in_cond)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None:
                        gram_shapes(getattr(inner, "jaxpr", inner), in_cond or eqn.primitive.name == "cond", out)
        return out

    with itp.precision(np.float64):
        program = rf._lockstep_program(sig, 1e-6, np.dtype(np.float64), "hybrid")
        arrays, c = itp.device_arrays(tape, np.float64)
        state = jax.tree_util.tree_map(jnp.asarray, init_lockstep_state(np.asarray(tape.consts, np.float64)))
        x = jnp.asarray(X[None], jnp.float64)
        y, w = jnp.asarray(Y[None], jnp.float64), jnp.ones((1, len(Y)), jnp.float64)
        jaxpr = program.trace(arrays, c, state, jnp.ones((1, e_b), bool), x, y, w, 8, 0).jaxpr.jaxpr
    found = gram_shapes(jaxpr)
    assert found and all(found), found  # the all-candidates Gram exists, only inside a branch


def test_folded_datasets_equal_vmapped_and_one_by_one():
    """Several datasets folded into one tape (default) give the vmapped path's / per-dataset results."""
    X2 = RNG.standard_normal((40, 2))  # different number of points: padded, masked per candidate
    Y2 = -2.0 + 0.5 * X2[:, 1] * X2[:, 0]
    prod = Expression(["add", 0.3, "mul", 0.8, "mul", "x_0", "x_1"])
    cands = [CANDS, [prod, Expression(["add", 0.0, "mul", 1.0, "x_1"]), Expression(["log", "x_0"])]]
    folded = refine(cands, [X, X2], [Y, Y2], maxiter=MAXITER)
    vm = refine(cands, [X, X2], [Y, Y2], fold_datasets=False, maxiter=MAXITER)
    for b, (xx, yy) in enumerate([(X, Y), (X2, Y2)]):
        one = refine(cands[b], xx, yy, maxiter=MAXITER)  # dataset 0: the program of the tests above
        np.testing.assert_allclose(folded.losses[b], vm.losses[b], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(folded.losses[b], one.losses, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(folded.initial_losses[b], one.initial_losses, rtol=1e-9)
    assert folded.failed[1].tolist() == [False, False, True]
    assert folded.losses[1][0] < 1e-12
    np.testing.assert_allclose(folded.expressions[1][0].constants, [-2.0, 0.5], rtol=1e-6)


def test_make_refine_fn_is_differentiable_end_to_end():
    """``make_refine_fn`` under jax.jit(jax.value_and_grad): the gradient w.r.t. y of a function of the refined
    constants (implicit differentiation of the solver) matches central finite differences of the refinement itself
    along random directions (float64 in a scoped x64 context)."""
    lin = Expression(["add", 0.3, "mul", 0.2, "x_1"])
    wave = Expression(["add", 1.0, "mul", 1.5, "sin", "mul", 0.8, "x_0"])
    y = 1.5 + 2.0 * np.sin(0.7 * X[:, 0]) + 0.05 * np.cos(3.0 * X[:, 1])  # not an exact fit: residuals != 0
    with jax.enable_x64(True):
        f = make_refine_fn([lin, wave], 2, tol=1e-12)
        weights = jnp.asarray([[0.5, -2.0, 0.0], [0.3, -1.0, 2.0]])  # over the padded constants of both

        def score(yy):
            c_ExP, losses_E = f(X, yy)
            return jnp.sum(c_ExP[:, :3] * weights) + losses_E[1]

        value_and_grad = jax.jit(jax.value_and_grad(score))
        _, g = value_and_grad(jnp.asarray(y))
        h = 1e-3  # at 1e-4 the solver's own stopping (~1e-8 in the constants) shows in the differences
        for seed in range(2):
            v = np.random.default_rng(seed).standard_normal(len(Y))
            up, down = value_and_grad(jnp.asarray(y + h * v))[0], value_and_grad(jnp.asarray(y - h * v))[0]
            np.testing.assert_allclose(float(np.asarray(g) @ v), (float(up) - float(down)) / (2 * h), rtol=1e-5)
    assert not jax.config.jax_enable_x64


def test_compaction_continues_the_running_candidates_exactly(monkeypatch):
    """Converged candidates stop costing: as soon as the ones still running fit in half the tape (a chunk ends
    early then), they move to a smaller tape (a smaller bucket, only their datasets' columns), and the results are
    an uninterrupted run's up to rounding, on one dataset and on folded datasets."""
    refine_mod = importlib.import_module("sr_jax.refinement")
    sizes = []
    original = refine_mod._Run.compact

    def spy(self, c, state, live):
        done = original(self, c, state, live)
        if done:
            sizes.append((len(live), self.sig.n_expressions))
        return done

    monkeypatch.setattr(refine_mod._Run, "compact", spy)
    monkeypatch.setattr(refine_mod, "_CHECKPOINTS", (8,))  # compactions only as candidates stop, not at checkpoints
    monkeypatch.setattr(refine_mod, "_MIN_ROWS", 1)  # this tiny batch may shrink to its 2 running candidates
    fast = [perturbed(0.05, s) for s in range(5)]  # near their solution: 3-4 evaluations each
    slow = [Expression(["add", 0.1, "mul", 3.0, "sin", "add", 2.0, "mul", 4.0, "x_0"]),  # ~12 evaluations
            Expression(["div", 1.0, "add", 0.1, "mul", 1.0, "x_1"])]  # ~55 evaluations
    cands = fast + slow
    one = refine(cands, X, Y, compact=False)
    comp = refine(cands, X, Y, compact=True)
    assert sizes == [(4, 4), (2, 2), (1, 1)]  # halved as soon as the running ones fit: 8 -> 4 -> 2 -> 1
    np.testing.assert_allclose(comp.losses, one.losses, rtol=1e-6, atol=1e-14)
    np.testing.assert_array_equal(comp.n_iterations, one.n_iterations)
    for a, b in zip(comp.expressions, one.expressions):
        np.testing.assert_allclose(a.constants, b.constants, rtol=1e-6, atol=1e-12)
    # folded datasets: dataset b's candidates read its own columns, also after the running ones were renumbered
    sizes.clear()
    xs = [X * (1 + 0.1 * b) for b in range(len(cands))]
    ys = [1.5 + 2.0 * np.sin(0.7 * x[:, 0]) - 0.3 * x[:, 1] for x in xs]
    one = refine([[e] for e in cands], xs, ys, compact=False)
    comp = refine([[e] for e in cands], xs, ys, compact=True)
    assert sizes == [(3, 4), (2, 2), (1, 1)]  # (its data differ: two candidates stop at the same evaluation)
    for b in range(len(cands)):
        np.testing.assert_allclose(comp.losses[b], one.losses[b], rtol=1e-6, atol=1e-14)
        np.testing.assert_array_equal(comp.n_iterations[b], one.n_iterations[b])


def test_max_time_ends_the_run_at_the_next_checkpoint():
    slow = Expression(["add", 1.0, "mul", 1.0, "exp", "mul", 3.0, "x_1"])  # runs to maxiter without a limit
    res = refine([slow, perturbed(0.05, 0)], X, Y, max_time=0)
    first_checkpoint = importlib.import_module("sr_jax.refinement")._CHECKPOINTS[0]
    assert res.n_iterations[0] == first_checkpoint and not res.converged[0]
    assert res.converged[1] and res.losses[1] < 1e-10
    assert res.losses[0] <= res.initial_losses[0]
    with pytest.raises(ValueError, match="max_time must be a number of seconds"):
        refine([slow], X, Y, max_time=-1.0)


def _beaten_by_definition(beaten, loss, n_nodes, dataset, evaluations=None, previous=None):
    """Beaten.mask written out pair by pair (and candidate by candidate for the stall rule)."""
    loss = np.where(np.isnan(loss), np.inf, loss)
    out = np.zeros(len(loss), bool)
    for i in range(len(loss)):
        stall_on = beaten.stall is not None and (evaluations is None or evaluations >= beaten.stall_from)
        if stall_on and previous is not None and np.isfinite(loss[i]):
            before = np.inf if np.isnan(previous[i]) else previous[i]
            out[i] |= bool(loss[i] >= before * (1 - beaten.stall))
        if beaten.ratio is not None and evaluations is not None and evaluations < beaten.ratio_from:
            ratio = None
        else:
            ratio = beaten.ratio
        for j in range(len(loss)):
            if j == i or dataset[j] != dataset[i] or n_nodes[j] > n_nodes[i]:
                continue
            s = beaten.solved_loss
            if s is not None and loss[j] <= s and (n_nodes[j] < n_nodes[i] or loss[i] > s):
                out[i] = True
            if ratio is not None and loss[i] > ratio * loss[j]:
                out[i] = True
    return out


_LOSSES = st.sampled_from([0.0, 1e-12, 1e-10, 1e-6, 1e-3, 0.1, 0.5, 0.9995, 1.0, np.inf, np.nan])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_LOSSES, _LOSSES, st.integers(1, 6), st.integers(0, 2)), min_size=1, max_size=12),
       st.sampled_from([None, 1e-10, 1e-6]), st.sampled_from([None, 1.0, 100.0]), st.sampled_from([None, 0.0, 1e-3]),
       st.sampled_from([None, 1, 8, 16, 32]), st.booleans())
def test_beaten_mask_matches_its_definition(rows, solved_loss, ratio, stall, evaluations, with_previous):
    from sr_jax import Beaten

    loss, previous, n_nodes, dataset = (np.array(c) for c in zip(*rows))
    previous = previous.astype(float) if with_previous else None
    beaten = Beaten(solved_loss=solved_loss, ratio=ratio, stall=stall)
    np.testing.assert_array_equal(
        beaten.mask(loss.astype(float), n_nodes, dataset, evaluations, previous),
        _beaten_by_definition(beaten, loss.astype(float), n_nodes, dataset, evaluations, previous))


def test_stalled_candidates_stop_and_improving_ones_run_on():
    """With the stall rule, a candidate that cannot fit (it reads the wrong variable) stops at the first checkpoint
    from ``stall_from`` on where its loss fell by less than ``stall``, near where it would have ended; a candidate
    still converging is unchanged."""
    from sr_jax import Beaten

    # y depends on x_0 only; alone, this candidate (a generator draw) creeps on to maxiter
    wrong = Expression(["add", -80.5, "mul", "x_1", "abs", "add", -71.4, "mul", 0.791, "x_1"])
    right = Expression(["add", 0.3, "mul", 1.7, "exp", "mul", 0.2, "x_0"])
    y = 0.5 + 2.0 * X[:, 0]
    plain = refine([wrong, right], X, y)
    res = refine([wrong, right], X, y, beaten=Beaten(stall=1e-3))
    checkpoints = importlib.import_module("sr_jax.refinement")._CHECKPOINTS
    assert plain.n_iterations[0] > 32
    assert res.n_iterations[0] in [k for k in checkpoints if k >= 16] and res.n_iterations[0] < plain.n_iterations[0]
    assert res.losses[0] <= plain.losses[0] * 1.01 and not res.converged[0]
    np.testing.assert_allclose(res.losses[1], plain.losses[1], atol=1e-15)
    np.testing.assert_array_equal(res.n_iterations[1], plain.n_iterations[1])
    with pytest.raises(ValueError, match=r"Beaten.stall must be a fraction in \[0, 1\)"):
        refine([wrong], X, y, beaten=Beaten(stall=1.5))
    with pytest.raises(ValueError, match="Beaten.stall_from must be an integer >= 0"):
        refine([wrong], X, y, beaten=Beaten(stall=1e-3, stall_from=-1))


def test_beaten_candidates_stop_at_a_checkpoint_and_the_others_are_unchanged():
    """A slow, more complex candidate stops at the first checkpoint once a simpler one fits exactly (or is 100x
    better); the others' results are those of a run without stopping; on folded datasets the rule is per dataset."""
    from sr_jax import Beaten

    simple = Expression(["add", 1.0, "mul", 1.0, "x_0"])  # y below is exactly linear: solved in a few evaluations
    slow = Expression(["add", 1.0, "mul", 1.0, "exp", "mul", 3.0, "x_1"])  # more nodes; runs to maxiter alone
    y = 0.5 + 2.0 * X[:, 0]
    plain = refine([simple, slow], X, y)
    assert plain.n_iterations[1] > 8 and plain.losses[0] < 1e-15
    first_checkpoint = importlib.import_module("sr_jax.refinement")._CHECKPOINTS[0]
    for rule in (Beaten(solved_loss=1e-10), Beaten(ratio=100.0)):
        res = refine([simple, slow], X, y, beaten=rule)
        assert res.n_iterations[1] == first_checkpoint and not res.converged[1]  # simple is solved within 8
        assert res.losses[1] <= res.initial_losses[1]
        np.testing.assert_allclose(res.losses[0], plain.losses[0], atol=1e-15)
        np.testing.assert_array_equal(res.n_iterations[0], plain.n_iterations[0])
    # a candidate that starts solved (as the least-squares bases do) stops the others after the first evaluation
    res = refine([simple.with_constants([0.5, 2.0]), slow], X, y, beaten=Beaten(solved_loss=1e-10))
    assert res.n_iterations.tolist() == [1, 1] and res.losses[0] < 1e-15
    # folded: dataset 1 has no simple exact fit (y is exponential there), so its slow candidate runs on
    y_exp = 1.0 + np.exp(0.5 * X[:, 1])
    res = refine([[simple, slow], [simple, slow]], [X, X], [y, y_exp], beaten=Beaten(solved_loss=1e-10))
    assert res.n_iterations[0][1] == first_checkpoint
    assert res.n_iterations[1][1] > first_checkpoint and res.losses[1][1] < 1e-10
    with pytest.raises(ValueError, match="Beaten.ratio must be a number >= 1"):
        refine([simple], X, y, beaten=Beaten(ratio=0.5))
    with pytest.raises(ValueError, match="beaten must be a sr_jax.refinement.Beaten"):
        refine([simple], X, y, beaten=1e-10)
    with pytest.raises(ValueError, match="Beaten.solved_loss must be a loss >= 0"):
        refine([simple], X, y, beaten=Beaten(solved_loss="1e-10"))
    with pytest.raises(ValueError, match="Beaten.ratio_from must be an integer >= 0"):
        refine([simple], X, y, beaten=Beaten(ratio=10.0, ratio_from=2.5))
    with pytest.raises(ValueError, match="beaten works with the lockstep solver on one tape"):
        refine([simple], X, y, beaten=Beaten(solved_loss=1e-10), linesearch="zoom")
    with pytest.raises(ValueError, match="beaten works with the lockstep solver on one tape"):
        refine([[simple], [simple]], [X, X], [y, y], beaten=Beaten(solved_loss=1e-10), fold_datasets=False)


def test_on_final_reports_every_dataset_once_and_finished_ones_while_the_others_refine(monkeypatch):
    """``on_final`` gets every dataset once, with what ``refine`` returns for it; in a run that stops at checkpoints
    a dataset whose candidates have all stopped is reported while the next chunk runs (the device is made to look
    busy here), before the dataset still refining; a run without checkpoints reports at its end."""
    from sr_jax import Beaten
    from sr_jax import refinement

    simple = Expression(["add", 1.0, "mul", 1.0, "x_0"])  # the shapes of the test above: its programs are reused
    slow = Expression(["add", 1.0, "mul", 1.0, "exp", "mul", 3.0, "x_1"])
    y, y_exp = 0.5 + 2.0 * X[:, 0], 1.0 + np.exp(0.5 * X[:, 1])
    cands = [[simple.with_constants([0.5, 2.0]), slow], [simple, slow]]  # dataset 0 is solved at its start
    events, got = [], {}
    step = refinement._Run.step

    def logged_step(run, stop_at, *args):
        events.append(("chunk", stop_at))
        step(run, stop_at, *args)

    def on_final(b, result):
        assert not jax.config.jax_enable_x64  # the caller's setting, not refinement's scoped float64
        events.append(("final", b))
        got[b] = result

    monkeypatch.setattr(refinement._Run, "step", logged_step)
    monkeypatch.setattr(refinement._Run, "ready", lambda run: False)
    res = refine(cands, [X, X], [y, y_exp], beaten=Beaten(solved_loss=1e-10), on_final=on_final)
    assert events[:3] == [("chunk", 1), ("chunk", 8), ("final", 0)] and events[-1] == ("final", 1)
    assert [e for e in events if e[0] == "final"] == [("final", 0), ("final", 1)]
    for b in (0, 1):
        assert got[b].expressions == res.expressions[b]
        for field in ("losses", "initial_losses", "failed", "improved", "n_iterations", "converged"):
            np.testing.assert_array_equal(getattr(got[b], field), getattr(res, field)[b])
    assert res.n_iterations[0].tolist() == [1, 1] and res.n_iterations[1][1] > 8
    events.clear()
    one = refine(CANDS, X, Y, on_final=on_final)  # one dataset, one uninterrupted program
    assert events == [("final", 0)]
    np.testing.assert_array_equal(got[0].losses, one.losses)
    assert got[0].expressions == one.expressions
    with pytest.raises(ValueError, match="on_final must be a function"):  # before any work, not at the first report
        refine(CANDS, X, Y, on_final=3)
