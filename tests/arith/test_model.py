"""Abacus ids, model variants, looped == unrolled, progressive-loss gradient flow, parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arith_jax.model import ArithModel, ModelConfig, abacus_ids, count_params_formula
from core_jax.attention import KVCache
from arith_jax.tokenizer import Tokenizer

TOK = Tokenizer.for_task("add")


def small(**kw):
    base = dict(width=32, ffn=64, heads=4, layers=2, recurrences=3, input_injection=True, positions=("abacus",),
                abacus_max_k=5, table_size=64)
    base.update(kw)
    return ModelConfig(**base)


def test_abacus_ids_hand_made():
    # "321+7654=0964" + EOS + PAD: each number counts its own digits from 1; operators, '=', EOS, PAD get 0
    ids = jnp.array([TOK.encode("321+7654=0964") + [3, 0]])
    assert abacus_ids(ids).tolist() == [[1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 0]]
    sort_tok = Tokenizer.for_task("sort")
    ids = jnp.array([sort_tok.encode("A:21,B:5=B,A")])
    assert abacus_ids(ids).tolist() == [[0, 0, 1, 2, 0, 0, 0, 1, 0, 0, 0, 0]]


def test_training_forward_is_finite_and_random():
    """Training mode draws Abacus offsets, initial noise and (n, k): outputs differ across rngs, stay finite."""
    model = ArithModel(small(abacus_k_per_row=True), 19)
    params = model.init(jax.random.PRNGKey(0))
    tokens = jnp.array([TOK.encode("12+34=")] * 4)
    a = model.apply(params, tokens, rng=jax.random.PRNGKey(1), train=True)
    b = model.apply(params, tokens, rng=jax.random.PRNGKey(2), train=True)
    assert a.shape == (4, 6, 19) and bool(jnp.all(jnp.isfinite(a)))
    assert float(jnp.abs(a - b).max()) > 0
    np.testing.assert_allclose(model.apply(params, tokens), model.apply(params, tokens))  # eval is deterministic


def _manual_passes(model, params, tokens, passes):
    """The same computation with a Python loop: the 'unrolled' reference for the scan."""
    cfg = model.cfg
    pos = jnp.arange(tokens.shape[1])
    e = model.embed.apply({"params": params["embed"]}, tokens, abacus_ids(tokens), pos)
    h = jnp.zeros_like(e)
    for i in range(passes):
        if i == 0 or cfg.input_injection:
            h = h + e
        p = params["block"] if cfg.shared else jax.tree_util.tree_map(lambda x: x[i], params["block"])
        h, _ = model.block.apply({"params": p}, h, pos)
    return model.head.apply({"params": params["head"]}, h)


@pytest.mark.parametrize("kw", [dict(), dict(shared=False, layers=1, recurrences=4),
                                dict(layers=3, recurrences=1, input_injection=False),
                                dict(positions=("abacus", "fire")), dict(positions=("rope",)),
                                dict(positions=("learned",)), dict(positions=())])
def test_looped_equals_unrolled(kw):
    model = ArithModel(small(**kw), 19)
    params = model.init(jax.random.PRNGKey(0))
    tokens = jnp.array([TOK.encode("321+7654=0964"), TOK.encode("999+1111=0111")])
    ref = _manual_passes(model, params, tokens, model.cfg.recurrences)
    np.testing.assert_allclose(model.apply(params, tokens), ref, atol=2e-5)


def test_scan_unroll_does_not_change_results():
    tokens = jnp.array([TOK.encode("321+7654=0964")])
    a = ArithModel(small(scan_unroll=1), 19)
    b = ArithModel(small(scan_unroll=3), 19)
    params = a.init(jax.random.PRNGKey(0))
    np.testing.assert_allclose(a.apply(params, tokens), b.apply(params, tokens), atol=1e-6)


def test_more_recurrences_at_test_time():
    model = ArithModel(small(), 19)
    params = model.init(jax.random.PRNGKey(0))
    tokens = jnp.array([TOK.encode("12+34=64")])
    ref = _manual_passes(model, params, tokens, 6)
    np.testing.assert_allclose(model.apply(params, tokens, recurrences=6), ref, atol=2e-5)
    unshared = ArithModel(small(shared=False), 19)
    with pytest.raises(ValueError, match="only looped"):
        unshared.apply(unshared.init(jax.random.PRNGKey(0)), tokens, recurrences=6)


@pytest.mark.parametrize("kw", [dict(positions=("abacus", "fire"), eval_init_noise=True, init_noise=0.5),
                                dict(shared=False, layers=1, recurrences=2, positions=("learned", "rope")),
                                dict(layers=2, recurrences=2, positions=())])
def test_per_row_start_equals_each_row_alone(kw):
    """apply with a per-row start [B] (and one noise key per row) gives row b the logits and cache row of a
    one-row call at start[b] with key b (how decoding used to map the model over rows), with the stacked cache
    and with `unstack_cache`'s per-pass buffers (passes unrolled)."""
    model = ArithModel(small(**kw), 19)
    params = model.init(jax.random.PRNGKey(0))
    tokens = jnp.array([TOK.encode("321+7654=0964"), TOK.encode("999+1111=0111"), TOK.encode("55+66=0121+78")])
    B, S = tokens.shape[0], 16
    _, cache = model.apply(params, tokens[:, :9], cache=model.init_cache(B, S), start=0, rng=jax.random.PRNGKey(1))
    start = jnp.array([9, 4, 6])
    step = jnp.take_along_axis(tokens, start[:, None] + jnp.arange(2)[None], 1)
    keys = jax.random.split(jax.random.PRNGKey(2), B)

    def one_row(tok_Q, kv_row, index, key):
        kv_1 = jax.tree_util.tree_map(lambda x: x[:, :, None], kv_row)
        logits, kv_1 = model.apply(params, tok_Q[None], cache=kv_1, start=index, rng=key)
        return logits[0], jax.tree_util.tree_map(lambda x: x[:, :, 0], kv_1)

    rows = KVCache(2, 2)
    ref, ref_cache = jax.jit(jax.vmap(one_row, in_axes=(0, rows, 0, 0), out_axes=(0, rows)))(step, cache, start, keys)
    batched = jax.jit(lambda c: model.apply(params, step, cache=c, start=start, rng=keys))
    got, got_cache = batched(cache)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(got_cache.k_BxSxHxD, ref_cache.k_BxSxHxD, atol=1e-5)
    got_u, got_cache_u = batched(model.unstack_cache(cache))
    np.testing.assert_allclose(got_u, ref, atol=1e-5)
    stacked = model.stack_cache(got_cache_u)
    for a, b in zip(stacked, ref_cache):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(stacked.k_BxSxHxD, cache.k_BxSxHxD)   # the step wrote something
    if model.cfg.eval_init_noise:   # the rows' own keys matter
        other, _ = jax.jit(lambda c: model.apply(params, step, cache=c, start=start, rng=keys[::-1]))(cache)
        assert not np.allclose(other, got, atol=1e-4)
    with pytest.raises(ValueError, match="per-row start"):
        model.apply(params, step, start=start)


def _setup_progressive():
    model = ArithModel(small(recurrences=4, layers=1), 19)
    params = model.init(jax.random.PRNGKey(0))
    tokens = jnp.array([TOK.encode("321+7654=0964")])
    pos = jnp.arange(tokens.shape[1])
    e = model.embed.apply({"params": params["embed"]}, tokens, abacus_ids(tokens), pos)
    h0 = 0.02 * jax.random.normal(jax.random.PRNGKey(3), e.shape)
    return model, params, e, h0, pos


@pytest.mark.parametrize("n,k", [(0, 1), (0, 2), (1, 2), (2, 2), (3, 1)])
def test_progressive_forward_is_n_plus_k_passes(n, k):
    model, params, e, h0, pos = _setup_progressive()
    out = model.progressive_passes(params["block"], h0, e, pos, n, k)
    h = h0
    for i in range(n + k):
        h, _ = model._step(params["block"], h, e, pos, i)
    np.testing.assert_allclose(out, h, atol=1e-5)


@pytest.mark.parametrize("n,k", [(0, 2), (1, 1), (2, 2)])
def test_progressive_gradient_only_through_last_k_passes(n, k):
    model, params, e, h0, pos = _setup_progressive()
    w = jax.random.normal(jax.random.PRNGKey(9), e.shape)  # (a sum of squares is constant after LayerNorm)
    f = lambda bp, e: jnp.sum(model.progressive_passes(bp, h0, e, pos, n, k) * w)
    g_block, g_e = jax.grad(f, argnums=(0, 1))(params["block"], e)

    # reference: n passes whose result is detached, then k differentiated passes
    def reference(bp, e):
        h = h0
        for i in range(n):
            h, _ = model._step(bp, h, e, pos, i)
        h = jax.lax.stop_gradient(h)
        for i in range(n, n + k):
            h, _ = model._step(bp, h, e, pos, i)
        return jnp.sum(h * w)
    r_block, r_e = jax.grad(reference, argnums=(0, 1))(params["block"], e)
    np.testing.assert_allclose(g_e, r_e, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g_block), jax.tree_util.tree_leaves(r_block)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert float(jnp.abs(g_e).max()) > 0

    # and it differs from back-propagating through all n + k passes whenever n > 0
    def full(bp):
        h = h0
        for i in range(n + k):
            h, _ = model._step(bp, h, e, pos, i)
        return jnp.sum(h * w)
    f_block = jax.grad(full)(params["block"])
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(g_block),
                                                             jax.tree_util.tree_leaves(f_block)))
    scale = max(float(jnp.abs(a).max()) for a in jax.tree_util.tree_leaves(f_block))
    assert (diff > 1e-3 * scale) == (n > 0)


def test_sampled_progressive_ranges():
    model = ArithModel(small(recurrences=16, layers=1), 19)
    pairs = [tuple(int(x) for x in model.sample_progressive(jax.random.PRNGKey(s))) for s in range(300)]
    assert {n for n, _ in pairs} == set(range(16))
    assert all(1 <= k <= min(16 - n, 8) for n, k in pairs)


@pytest.mark.parametrize("kw", [dict(), dict(positions=("abacus", "fire")), dict(shared=False, layers=1),
                                dict(positions=("learned",))])
def test_param_count_formula(kw):
    model = ArithModel(small(**kw), 19)
    assert model.num_params(model.init(jax.random.PRNGKey(0))) == count_params_formula(model.cfg, 19)


def test_paper_param_counts():
    """Spec §4.4: 12.11M for the 1x16 looped Abacus model, 122.27M for the 16-layer standard one."""
    looped = ModelConfig(layers=1, recurrences=16, input_injection=True)
    standard = ModelConfig(layers=16, recurrences=1)
    assert round(count_params_formula(looped, 19) / 1e6, 2) == 12.11
    assert round(count_params_formula(standard, 19) / 1e6, 2) == 122.27


def test_config_errors():
    with pytest.raises(ValueError, match="unknown position"):
        ModelConfig(positions=("alibi",))
    with pytest.raises(ValueError, match="pick one"):
        ModelConfig(positions=("abacus", "learned"))


@pytest.mark.parametrize("mode,per_row", [("shift", False), ("shift", True), ("subset", True)])
def test_training_ids_keep_significance_aligned(mode, per_row):
    """Whatever the training scheme, digits of equal significance share an id, ids grow with significance,
    non-digits stay 0, and shift offsets stay within 0..max_k."""
    model = ArithModel(small(abacus_train_ids=mode, abacus_k_per_row=per_row, abacus_max_k=9), 19)
    tokens = jnp.array([TOK.encode("4321+87654=21975")] * 6)
    base = abacus_ids(tokens)
    ids = np.asarray(model._train_abacus_ids(base, jax.random.PRNGKey(0)))
    assert (ids[np.asarray(base) == 0] == 0).all()
    for row in ids:
        a, b, c = row[0:4], row[5:10], row[11:16]
        np.testing.assert_array_equal(a, b[:4])
        np.testing.assert_array_equal(b, c)
        assert (np.diff(c) > 0).all() and c.min() >= 1
        if mode == "shift":
            assert 0 <= c[0] - 1 <= 9 and (np.diff(c) == 1).all()
    if mode == "shift" and not per_row:
        assert (ids == ids[0]).all()


def test_subset_shift_raises_some_rows_and_keeps_the_rest():
    """abacus_subset_shift S: ids stay aligned and inside the table, about half the rows keep the unshifted ids
    (id 1 still trained), the others reach past the unshifted pool; S = 0 draws exactly what it drew before."""
    tokens = jnp.array([TOK.encode("4321+87654=21975")] * 256)
    base = abacus_ids(tokens)
    key = jax.random.PRNGKey(3)
    plain = ArithModel(small(abacus_train_ids="subset", abacus_k_per_row=True, abacus_max_k=9), 19)
    off = ArithModel(small(abacus_train_ids="subset", abacus_k_per_row=True, abacus_max_k=9, abacus_subset_shift=0), 19)
    np.testing.assert_array_equal(plain._train_abacus_ids(base, key), off._train_abacus_ids(base, key))
    S, pool = 30, 9 + tokens.shape[1]
    ids = np.asarray(ArithModel(small(abacus_train_ids="subset", abacus_k_per_row=True, abacus_max_k=9,
                                      abacus_subset_shift=S), 19)._train_abacus_ids(base, key))
    assert (ids[np.asarray(base) == 0] == 0).all()
    c = ids[:, 11:16]
    np.testing.assert_array_equal(ids[:, 5:10], c)
    assert (np.diff(c, axis=1) > 0).all() and c.min() >= 1 and c.max() <= 63
    assert c.max() > pool                       # shifted rows reach ids the unshifted pool cannot
    assert 0.3 < (c[:, 0] <= pool - 4).mean()   # and many rows still start low
    with pytest.raises(ValueError, match="abacus_subset_shift"):
        ModelConfig(abacus_subset_shift=-1)


def test_contiguous_frac_gives_some_rows_consecutive_ids_and_keeps_the_default():
    """abacus_contiguous_frac F: about F of the rows get consecutive ids k+1..k+L (so the answer's extra digit has the
    id right after the longest operand's last digit), the rest keep their subset draw; ids stay aligned and inside the
    table, also under the subset shift; F = 0 draws exactly what it drew before the option existed."""
    tokens = jnp.array([TOK.encode("4321+87654=91975")] * 512)
    base = abacus_ids(tokens)
    key = jax.random.PRNGKey(3)
    kw = dict(abacus_train_ids="subset", abacus_k_per_row=True, abacus_max_k=9)
    for S in (0, 30):
        plain = ArithModel(small(**kw, abacus_subset_shift=S), 19)._train_abacus_ids(base, key)
        off = ArithModel(small(**kw, abacus_subset_shift=S, abacus_contiguous_frac=0.0), 19)._train_abacus_ids(
            base, key)
        np.testing.assert_array_equal(plain, off)
        ids = np.asarray(ArithModel(small(**kw, abacus_subset_shift=S, abacus_contiguous_frac=0.25), 19)
                         ._train_abacus_ids(base, key))
        assert (ids[np.asarray(base) == 0] == 0).all()
        c = ids[:, 11:16]
        np.testing.assert_array_equal(ids[:, 5:10], c)
        np.testing.assert_array_equal(ids[:, 0:4], c[:, :4])
        assert (np.diff(c, axis=1) > 0).all() and c.min() >= 1 and c.max() <= 63
        contiguous = (np.diff(c, axis=1) == 1).all(axis=1)
        plain_contiguous = (np.diff(np.asarray(plain)[:, 11:16], axis=1) == 1).all(axis=1)
        # the subset draw alone is rarely consecutive over 5 digits; with F = 0.25 about a quarter more rows are
        assert plain_contiguous.mean() < 0.2 and 0.12 < contiguous.mean() - plain_contiguous.mean() < 0.35
        assert len(np.unique(c[contiguous, 0])) > 5   # the offset k varies across rows, not always 0
    everything = ArithModel(small(**kw, abacus_contiguous_frac=1.0), 19)._train_abacus_ids(base, key)
    assert (np.diff(np.asarray(everything)[:, 11:16], axis=1) == 1).all()
    with pytest.raises(ValueError, match="abacus_contiguous_frac"):
        ModelConfig(abacus_contiguous_frac=1.5)
    for option in (dict(abacus_contiguous_frac=0.25), dict(abacus_subset_shift=10)):  # no silent no-op with "shift"
        with pytest.raises(ValueError, match="subset' only"):
            ModelConfig(abacus_train_ids="shift", **option)

