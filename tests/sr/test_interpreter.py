import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
import sympy
from hypothesis import given, settings, strategies as st

from sr_jax import evaluate
from sr_jax.expressions import VARIABLES, Expression
from sr_jax.generator import sample
from sr_jax.interpreter import COMPILE_COUNTER, compile_tape


def _well_conditioned(s, x):
    """Skips expressions whose value moves by more than 1e-6 (relative) when x moves by 1e-13: e.g. sin of an
    argument near 1e30, where float64 and exact arithmetic disagree for any implementation."""
    a = s.expression.evaluate_numpy(x)
    b = s.expression.evaluate_numpy(x * (1 + 1e-13))
    return bool(np.all(np.abs(a - b) <= 1e-6 * np.abs(a) + 1e-12))


@settings(max_examples=8, deadline=None)  # each example compiles its own tape: few examples, more expressions each
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=8))
def test_matches_sympy_float64(seeds):
    samples = [sample(s) for s in seeds]
    d = max(s.x_NxD.shape[1] for s in samples)
    x = samples[0].x_NxD[:6]
    x = np.concatenate([x, np.zeros((6, d - x.shape[1]))], axis=1) if x.shape[1] < d else x
    samples = [s for s in samples if np.isfinite(s.expression.evaluate_numpy(x)).all() and _well_conditioned(s, x)]
    if not samples:
        return
    out = np.asarray(evaluate([s.expression for s in samples], x))
    assert out.dtype == np.float64
    syms = [sympy.Symbol(v, real=True) for v in VARIABLES[:d]]
    mpmath.mp.dps = 40
    for s, row in zip(samples, out):
        f = sympy.lambdify(syms, s.expression.to_sympy(), modules="mpmath")
        ref = np.array([complex(f(*[mpmath.mpf(float(v)) for v in pt])) for pt in x])
        assert np.all(np.abs(ref.imag) <= 1e-9 * np.abs(ref.real) + 1e-12)
        np.testing.assert_allclose(row, ref.real, rtol=1e-7, atol=1e-9 * np.abs(ref.real).max())


def test_batched_equals_one_by_one_and_numpy():
    samples = [sample([11, i]) for i in range(12)]
    x = np.random.default_rng(0).standard_normal((50, 10))
    exprs = [s.expression for s in samples]
    batch = np.asarray(evaluate(exprs, x))
    assert batch.shape == (12, 50)
    for i, (e, row) in enumerate(zip(exprs, batch)):
        if i in (0, 5, 11):  # each single expression compiles its own tape: a few suffice
            single = np.asarray(evaluate([e], x))[0]
            np.testing.assert_array_equal(np.isfinite(row), np.isfinite(single))
            np.testing.assert_allclose(row, single, rtol=1e-10, equal_nan=True)
        ref = e.evaluate_numpy(x)
        ok = np.isfinite(ref) & (np.abs(ref) < 1e30)
        np.testing.assert_allclose(row[ok], ref[ok], rtol=2e-3, atol=1e-4 * max(1.0, np.abs(ref[ok]).max(initial=0)))


def test_out_of_domain_is_consistent_nan_inf():
    x = np.array([[-1.0, 0.0], [0.0, 2.0], [4.0, -3.0]])
    exprs = [["log", "x_0"], ["inv", "x_1"], ["div", "x_0", "x_1"], ["sqrt", "x_0"], ["arcsin", "x_1"],
             ["pow", "x_0", 0.5], ["exp", "mul", 1000.0, "x_0"]]
    got = np.asarray(evaluate(exprs, x))
    ref = np.stack([Expression(e).evaluate_numpy(x) for e in exprs])
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(ref))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref))


def test_second_batch_of_same_bucket_does_not_recompile():
    x = np.random.default_rng(1).standard_normal((40, 3))
    a = [["add", 1.0, "mul", 2.0, "sin", "x_0"], ["mul", "x_1", "exp", "x_2"], ["sub", "x_0", 3.5]]
    b = [["add", -4.0, "mul", 0.5, "sin", "x_2"], ["mul", "x_0", "exp", "x_1"], ["sub", "x_2", 1.5]]
    sig_a = compile_tape([a], 3).signature
    assert compile_tape([b], 3).signature == sig_a
    evaluate(a, x)
    n = COMPILE_COUNTER["evaluate"]
    out = np.asarray(evaluate(b, x[:37]))  # other expressions, other N in the same bucket
    assert COMPILE_COUNTER["evaluate"] == n
    np.testing.assert_allclose(out[1], x[:37, 0] * np.exp(x[:37, 1]), rtol=1e-5)


@pytest.mark.parametrize("x, exprs, msg", [
    (np.array([[np.nan, 1.0]]), [["x_0"]], "NaN or inf"),
    (np.ones(5), [["x_0"]], "shape \\(N, D\\)"),
    (np.ones((5, 1)), [["x_3"]], "uses x_3 but X has only 1 column;"),
    (np.ones((5, 1)), [["sin", "q"]], "unknown symbol 'q'"),
    (np.ones((5, 1)), [], "no expressions"),
    (np.ones((5, 1)) * (2 - 1j), [["x_0"]], "X is complex .* pass X.real"),
])
def test_bad_inputs(x, exprs, msg):
    with pytest.raises(ValueError, match=msg):
        evaluate(exprs, x)


def test_gradient_wrt_constants_is_finite_and_correct():
    from sr_jax.interpreter import device_arrays, run_tape

    x = np.linspace(-1, 1, 16)[:, None]
    tape = compile_tape([[["add", 0.3, "mul", 2.0, "sin", "x_0"], ["log", "mul", 1.0, "x_0"]]], 1)
    arrays, c = device_arrays(tape, jnp.float32)
    arrays = jax.tree_util.tree_map(lambda a: a[0], arrays)

    def loss(c):
        p = run_tape(tape.signature, arrays, c, jnp.asarray(x, jnp.float32))
        return jnp.sum(jnp.where(jnp.isfinite(p), p, 0.0))

    g = np.asarray(jax.grad(loss)(c[0]))
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g[0, :2], [16.0, np.sin(x[:, 0]).sum()], rtol=1e-5, atol=1e-5)


def test_float64_by_default_beyond_float32_range_without_touching_the_global_flag():
    s = sample([7, 200])  # one of the generator's datasets, max |y| 4.1e84
    assert not jax.config.jax_enable_x64
    out = evaluate([s.expression], s.x_NxD)
    assert not jax.config.jax_enable_x64
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(out[0]), s.y_N, rtol=1e-10)
    out32 = evaluate([s.expression], s.x_NxD, dtype=jnp.float32)  # float32 on request: overflows here
    assert out32.dtype == jnp.float32 and not np.isfinite(np.asarray(out32)).all()
    with pytest.raises(ValueError, match="beyond float32's range"):
        evaluate([["x_0"]], np.full((3, 1), 1e39), dtype=jnp.float32)


def test_global_x64_setting_is_left_as_the_user_set_it():
    jax.config.update("jax_enable_x64", True)
    try:
        out = evaluate([["mul", 2.0, "x_0"]], np.ones((3, 1)), dtype=jnp.float32)
        assert jax.config.jax_enable_x64 and out.dtype == jnp.float32
    finally:
        jax.config.update("jax_enable_x64", False)


def _chain(depth: int, ops) -> Expression:
    tokens = []
    for i in range(depth):
        op = ops[i % len(ops)]
        tokens += [op] + ([0.5 + 0.01 * i] if op in ("add", "mul") else [])
    return Expression(tokens + ["x_0"])


def test_deep_tapes_are_runs_of_scanned_levels_equal_to_unrolled(monkeypatch):
    """Consecutive levels are padded into runs, each one lax.scan: a 30-level tape has few runs, its program is not
    bigger than a 10-level one's, and values and gradients equal the level-by-level (unrolled) evaluation."""
    from sr_jax import interpreter as itp

    x = jnp.asarray(np.linspace(-1, 1, 8)[:, None], jnp.float32)

    def value_and_grad(depth):
        tape = compile_tape([[_chain(depth, ["add", "mul", "sin"]), _chain(depth, ["mul", "exp", "add"]),
                              ["add", 1.0, "x_0"]]], 1)
        sig = tape.signature
        arrays, c = itp.device_arrays(tape, jnp.float32)
        arrays = jax.tree_util.tree_map(lambda a: a[0], arrays)

        @jax.jit
        def f(c, x):
            return jax.value_and_grad(lambda c: jnp.sum(jnp.tanh(itp.run_tape(sig, arrays, c, x))))(c)

        return sig, len(f.lower(c[0], x).as_text().splitlines()), f(c[0], x)

    sig10, size10, _ = value_and_grad(10)
    sig30, size30, scanned = value_and_grad(30)
    for sig, depth in ((sig10, 10), (sig30, 30)):
        assert len(sig.levels) >= depth and len(sig.runs) <= 3
        assert sum(count for count, _ in sig.runs) == len(sig.levels)
    assert size30 <= 1.1 * size10
    # the same tape evaluated level by level (every run cut into single levels) gives the same numbers
    monkeypatch.setattr(itp.TapeSignature, "runs", property(lambda s: tuple((1, e) for e in s.layout)))
    _, size_unrolled, unrolled = value_and_grad(30)
    assert size_unrolled > 2 * size30
    np.testing.assert_array_equal(np.asarray(unrolled[0]), np.asarray(scanned[0]))
    np.testing.assert_array_equal(np.asarray(unrolled[1]), np.asarray(scanned[1]))


def test_scaled_signatures_hold_a_subset_tightest_slack_first():
    """Compaction's smaller tapes: scaled by a fraction with the tight slack first; a subset that the tight tape
    cannot hold (here: the batch's deepest candidates only) fits the looser one of the same fraction.
    (test_refine's compaction test checks that the candidates run on such tapes exactly as on the full one.)"""
    from sr_jax.generator import GeneratorConfig
    from sr_jax.interpreter import SCALE_SLACKS, compile_tape_into, scaled_signature

    cfg = GeneratorConfig(min_input_dimension=1, max_input_dimension=3)
    exprs = [sample(seed, cfg).expression for seed in range(64)]
    root = compile_tape([exprs], n_features=3).signature
    tight, loose = (scaled_signature(root, 0.25, root.n_features, s) for s in SCALE_SLACKS)
    assert tight.n_expressions == loose.n_expressions == root.n_expressions // 4
    for (lt, lo) in zip(tight.levels, loose.levels):
        assert all(ct <= cl for (_, ct), (_, cl) in zip(lt, lo))
    deepest = sorted(exprs, key=lambda e: -e.n_nodes)[: tight.n_expressions]
    fits = [compile_tape_into(s, deepest) is not None for s in (tight, loose)]
    assert fits[1] and fits[0] <= fits[1]
    # several shapes at once: the first that holds them, the same tape as compiling into that one alone
    first = tight if fits[0] else loose
    both, alone = compile_tape_into((tight, loose), deepest), compile_tape_into(first, deepest)
    assert both.signature == first and all(np.array_equal(both.arrays[k], alone.arrays[k]) for k in alone.arrays)
    assert compile_tape_into((tight, loose), exprs) is None  # the whole batch fits in neither quarter


def test_rare_transcendentals_share_a_mixed_group_with_exact_derivatives(monkeypatch):
    """A level's few nodes of each transcendental share one "mixed" group (one group compiled, not one per operator);
    many nodes of one operator keep their own group; the mixed groups compute only the batch's transcendentals.
    Values match numpy, and first and second derivatives through the mixed group match finite differences: the
    operators a node does not use see an in-domain input, so they add no NaN (here exp, sin, ... of negative
    arguments, where the group's sqrt, log and arcsin are undefined)."""
    from sr_jax import interpreter as itp

    monkeypatch.setattr(itp, "_SIGNATURES", [])  # signatures are the batch's own, not recent ones reused

    def arg(op):  # inside op's domain; negative (outside sqrt's, log's, arcsin's) for the operators defined there
        return ["mul", 0.8, "x_0"] if op in ("sqrt", "log", "arcsin", "arccos") else ["sub", "mul", 0.8, "x_0", 3.0]

    ops = ("sqrt", "log", "exp", "sin", "arcsin")  # table order
    few = [Expression(["mul", 1.5, op] + arg(op)) for op in ops]
    many = [Expression(["sin", "mul", 0.1 * (k + 1), "x_0"]) for k in range(9)]
    x = np.linspace(0.1, 1.2, 16)[:, None]
    tape = compile_tape([few + many], 1)
    groups = [dict(level) for level in tape.signature.levels]
    assert groups[1][itp.MIXED] >= 3 and "sin" in groups[1]  # sqrt, log, arcsin of x mixed; 10 sin x: their own
    assert not any(op in g for g in groups for op in ops if op != "sin")
    assert tape.signature.mixed_ops == ops
    monkeypatch.setattr(itp, "_SIGNATURES", [])  # no recent signature to reuse: the batch's own
    assert compile_tape([[few[1], few[4]]], 1).signature.mixed_ops == ("log", "arcsin")
    want = np.stack([e.evaluate_numpy(x) for e in few + many])
    assert np.isfinite(want).all()
    with jax.enable_x64(True):
        arrays, c = itp.device_arrays(tape, jnp.float64)
        arrays = jax.tree_util.tree_map(lambda a: a[0], arrays)
        got = itp.run_tape(tape.signature, arrays, c[0], jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(got)[: len(want)], want, rtol=1e-12)

        def f(c):
            return jnp.sum(jnp.tanh(itp.run_tape(tape.signature, arrays, c, jnp.asarray(x))[: len(want)]))

        grad = jax.jit(jax.grad(f))
        e = jnp.zeros_like(c[0]).at[: len(few), 1].set(1.0)  # the inner constant (0.8) of each candidate
        hvp = jax.jit(lambda c: jax.vjp(grad, c)[1](e)[0])(c[0])  # reverse over the hand-written reverse
        assert np.isfinite(np.asarray(hvp)).all()
        h = 1e-6
        fd = (grad(c[0] + h * e) - grad(c[0] - h * e)) / (2 * h)  # candidates are separate: one probe for all
        np.testing.assert_allclose(np.asarray(hvp), np.asarray(fd), rtol=1e-5, atol=1e-6)
