"""Attention: KV-cached incremental computation equals the full causal pass; masks; RoPE and FIRE properties."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core_jax.attention import Attention, HeadsKVCache, KVCache
from core_jax.positions import FireBias, apply_rope


@pytest.mark.parametrize("rope,fire", [(False, False), (True, False), (False, True), (True, True)])
def test_cache_equals_full_pass(rope, fire):
    attn = Attention(num_heads=4, rope=rope, fire=fire)
    apply = jax.jit(functools.partial(attn.apply, causal=True))  # cache_index traced: one program per shape
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 16))
    params = jax.jit(functools.partial(attn.init, causal=True))(jax.random.PRNGKey(1), x)
    full, _ = apply(params, x)
    cache = KVCache.zeros(2, 12, 4, 4)
    out, cache = apply(params, x[:, :5], cache=cache, cache_index=0)
    outs = [out]
    for t in range(5, 9):
        o, cache = apply(params, x[:, t:t + 1], cache=cache, cache_index=t)
        outs.append(o)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)



@pytest.mark.parametrize("layout", [KVCache, HeadsKVCache])
@pytest.mark.parametrize("rope,fire", [(False, False), (True, True)])
def test_per_row_cache_index_equals_each_row_alone(layout, rope, fire):
    """A per-row cache_index [B] (row b's tokens at slots and positions index[b]..) gives every row the output and
    cache row it gets alone with that index as a shared scalar, in either cache layout; the heads-major layout
    holds the same keys/values as KVCache."""
    attn = Attention(num_heads=2, rope=rope, fire=fire)
    B, S, Q = 3, 10, 2
    x = jax.random.normal(jax.random.PRNGKey(0), (B, 6, 8))
    params = attn.init(jax.random.PRNGKey(1), x, causal=True)
    apply = jax.jit(functools.partial(attn.apply, causal=True))
    cache = layout.zeros(B, S, 2, 4)
    _, cache = apply(params, x[:, :4], cache=cache, cache_index=0)   # a shared prefix, then rows go their own way
    index = jnp.array([4, 1, 7])
    new = jax.random.normal(jax.random.PRNGKey(2), (B, Q, 8))
    out, new_cache = apply(params, new, cache=cache, cache_index=index)
    for b in range(B):
        one = jax.tree_util.tree_map(lambda c: c[b:b + 1], cache)
        ref, ref_cache = apply(params, new[b:b + 1], cache=one, cache_index=int(index[b]))
        np.testing.assert_allclose(out[b:b + 1], ref, atol=1e-6)
        for got, want in zip(new_cache, ref_cache):
            np.testing.assert_array_equal(got[b:b + 1], want)
    assert not np.allclose(out[0], out[1], atol=1e-3)   # the rows differ
    if layout is HeadsKVCache:   # the same function as the [B, S, H, D] cache, keys and values transposed
        plain = KVCache.zeros(B, S, 2, 4)
        _, plain = apply(params, x[:, :4], cache=plain, cache_index=0)
        out_plain, plain = apply(params, new, cache=plain, cache_index=index)
        np.testing.assert_allclose(out, out_plain, atol=1e-6)
        for got, want in zip(new_cache, HeadsKVCache.from_cache(plain)):
            np.testing.assert_allclose(got, want, atol=1e-6)


def test_per_row_query_positions_equal_the_full_pass_rows():
    """Queries at their own positions in each row (q_pos_Q [B, A]) against keys at all positions give the full
    causal pass's outputs at those positions, with RoPE and FIRE (the arith loss's last layer uses this)."""
    attn = Attention(num_heads=4, rope=True, fire=True)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 16))
    params = jax.jit(functools.partial(attn.init, causal=True))(jax.random.PRNGKey(1), x)
    full, _ = jax.jit(functools.partial(attn.apply, causal=True))(params, x)
    idx = jnp.array([[1, 4, 6], [5, 0, 2]])
    x_q = jnp.take_along_axis(x, idx[..., None], axis=1)
    rows, _ = jax.jit(functools.partial(attn.apply, causal=True))(params, x_q, x, q_pos_Q=idx,
                                                                  k_pos_K=jnp.arange(7))
    np.testing.assert_allclose(rows, jnp.take_along_axis(full, idx[..., None], axis=1), atol=1e-5)
    with pytest.raises(ValueError, match="per-row query positions"):
        attn.apply(params, x_q, x, q_pos_Q=idx, causal=True)

def test_causal_and_padding_masks():
    attn = Attention(num_heads=2)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 8))
    params = attn.init(jax.random.PRNGKey(1), x)
    y, _ = attn.apply(params, x, causal=True)
    x2 = x.at[:, 4:].set(100.0)  # the future must not change the past
    y2, _ = attn.apply(params, x2, causal=True)
    np.testing.assert_allclose(y[:, :4], y2[:, :4], atol=1e-5)
    mask = jnp.array([[1, 1, 1, 0, 0, 0]])
    ya, _ = attn.apply(params, x, kv_mask_BxK=mask)
    yb, _ = attn.apply(params, x.at[:, 3:].set(-7.0), kv_mask_BxK=mask)
    np.testing.assert_allclose(ya[:, :3], yb[:, :3], atol=1e-5)


def test_cross_attention_shapes():
    attn = Attention(num_heads=2)
    q = jnp.ones((3, 4, 8))
    kv = jnp.ones((3, 7, 8))
    params = attn.init(jax.random.PRNGKey(0), q, kv)
    y, cache = attn.apply(params, q, kv)
    assert y.shape == (3, 4, 8) and cache is None


def test_rope_is_relative():
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 1, 8))
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 5, 1, 8))
    pos = jnp.arange(5)
    s1 = jnp.einsum("bqhd,bkhd->qk", apply_rope(q, pos), apply_rope(k, pos))
    s2 = jnp.einsum("bqhd,bkhd->qk", apply_rope(q, pos + 11), apply_rope(k, pos + 11))
    np.testing.assert_allclose(s1, s2, atol=1e-4)


def test_fire_shape_and_shift_invariance_below_L():
    fire = FireBias(num_heads=3)
    q, k = jnp.arange(6), jnp.arange(6)
    params = fire.init(jax.random.PRNGKey(0), q, k)
    b = fire.apply(params, q, k)
    assert b.shape == (3, 6, 6)
    # positions below L = 512 use the constant normaliser, so the bias depends only on p_i - p_j
    np.testing.assert_allclose(fire.apply(params, q + 50, k + 50), b, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_segments_of_a_packed_row_attend_as_separate_rows(causal):
    """Two sequences back to back in one row with segment ids give what each gives alone (self and cross)."""
    attn = Attention(num_heads=2)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 7, 8))
    mem = jax.random.normal(jax.random.PRNGKey(2), (1, 6, 8))
    params = attn.init(jax.random.PRNGKey(1), x)
    seg_q = jnp.array([[1, 1, 1, 2, 2, 2, 0]])
    seg_k = jnp.array([[2, 2, 1, 1, 1, 0]])
    y, _ = attn.apply(params, x, causal=causal, q_segment_BxQ=seg_q, kv_segment_BxK=seg_q)
    np.testing.assert_allclose(y[:, :3], attn.apply(params, x[:, :3], causal=causal)[0], atol=1e-5)
    np.testing.assert_allclose(y[:, 3:6], attn.apply(params, x[:, 3:6], causal=causal)[0], atol=1e-5)
    c, _ = attn.apply(params, x, mem, q_segment_BxQ=seg_q, kv_segment_BxK=seg_k, kv_mask_BxK=seg_k > 0)
    np.testing.assert_allclose(c[:, :3], attn.apply(params, x[:, :3], mem[:, 2:5])[0], atol=1e-5)
    np.testing.assert_allclose(c[:, 3:6], attn.apply(params, x[:, 3:6], mem[:, :2])[0], atol=1e-5)


def test_segment_ids_need_both_sides_and_no_cache():
    attn = Attention(num_heads=2)
    x = jnp.ones((1, 3, 8))
    params = attn.init(jax.random.PRNGKey(0), x)
    seg = jnp.ones((1, 3), jnp.int32)
    with pytest.raises(ValueError, match="pass both"):
        attn.apply(params, x, q_segment_BxQ=seg)
    with pytest.raises(ValueError, match="KV cache"):
        attn.apply(params, x, causal=True, cache=KVCache.zeros(1, 4, 2, 4), cache_index=0, q_segment_BxQ=seg,
                   kv_segment_BxK=seg)


@pytest.mark.parametrize("causal", [False, True])
def test_deferred_norm_is_the_same_function(causal):
    """Normalising after the value product (and scaling the queries) changes only rounding: outputs and gradients,
    with key padding, segments, a cross memory and a KV cache."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 8))
    mem = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 8))
    std, dfr = Attention(num_heads=2), Attention(num_heads=2, deferred_norm=True)
    params = std.init(jax.random.PRNGKey(1), x)
    mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    seg = jnp.array([[1, 1, 2, 2, 2, 0], [1, 2, 2, 2, 3, 3]])
    for kwargs in ({"kv_mask_BxK": mask}, {"q_segment_BxQ": seg, "kv_segment_BxK": seg, "kv_mask_BxK": seg > 0}):
        def f(p, a, **kw):
            return jnp.sum(jnp.sin(a.apply(p, x, causal=causal, **kw)[0]))
        np.testing.assert_allclose(f(params, dfr, **kwargs), f(params, std, **kwargs), rtol=1e-5)
        ga, gb = jax.grad(f)(params, dfr, **kwargs), jax.grad(f)(params, std, **kwargs)
        for a, b in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(dfr.apply(params, x, mem)[0], std.apply(params, x, mem)[0], atol=1e-5)
    kv = std.apply(params, None, mem, kv_only=True)
    np.testing.assert_allclose(dfr.apply(params, x, memory_kv=kv)[0], std.apply(params, x, memory_kv=kv)[0],
                               atol=1e-5)
    cache = KVCache.zeros(2, 8, 2, 4)
    a, _ = dfr.apply(params, x[:, :3], causal=True, cache=cache, cache_index=0)
    b, _ = std.apply(params, x[:, :3], causal=True, cache=cache, cache_index=0)
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("rope", [False, True])
def test_xla_kernel_equals_einsum(causal, rope, monkeypatch):
    """kernel="xla" (jax.nn.dot_product_attention) computes the einsum path's function: outputs and gradients
    with respect to the input and the parameters (same parameter tree); the fused kernel really ran, and keys at
    explicitly given positions go to the einsum path."""
    import core_jax.attention as attention

    calls = []
    fused_attention = attention.fused_attention
    monkeypatch.setattr(attention, "fused_attention", lambda *a, **k: calls.append(1) or fused_attention(*a, **k))
    ein, fused = Attention(num_heads=4, rope=rope), Attention(num_heads=4, rope=rope, kernel="xla")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 16))
    params = ein.init(jax.random.PRNGKey(1), x, causal=causal)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        fused.init(jax.random.PRNGKey(1), x, causal=causal))

    def loss(module, p, x):
        return jnp.sum(jnp.sin(module.apply(p, x, causal=causal)[0]))

    for a, b in zip(jax.grad(functools.partial(loss, ein), argnums=(0, 1))(params, x),
                    jax.grad(functools.partial(loss, fused), argnums=(0, 1))(params, x)):
        for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ein.apply(params, x, causal=causal)[0], fused.apply(params, x, causal=causal)[0],
                               atol=1e-5)
    assert calls
    calls.clear()
    pos = jnp.arange(7)
    fused.apply(params, x, q_pos_Q=pos, k_pos_K=pos, causal=causal)
    assert not calls


def test_fused_kernel_leaves_other_cases_to_einsum():
    """What jax.nn.dot_product_attention does not cover here (FIRE, a KV cache) runs the einsum path: the very
    same numbers as kernel="einsum"."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
    for kw in (dict(fire=True), dict()):
        ein, fused = Attention(num_heads=2, **kw), Attention(num_heads=2, kernel="cudnn", **kw)
        params = ein.init(jax.random.PRNGKey(1), x, causal=True)
        if kw:   # FIRE: whole-sequence pass
            np.testing.assert_array_equal(ein.apply(params, x, causal=True)[0],
                                          fused.apply(params, x, causal=True)[0])
        cache = KVCache.zeros(2, 8, 2, 4)
        np.testing.assert_array_equal(ein.apply(params, x, causal=True, cache=cache, cache_index=0)[0],
                                      fused.apply(params, x, causal=True, cache=cache, cache_index=0)[0])


@pytest.mark.parametrize("causal", [True, False])
def test_fused_attention_padding_to_even_changes_nothing(causal):
    """The padding cuDNN's kernel needs for odd lengths (one zero query and key) gives the unpadded outputs and
    gradients: checked with the xla implementation, which takes both."""
    from core_jax.attention import fused_attention

    q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 7, 4, 8))

    def loss(pad, q, k, v):
        return jnp.sum(jnp.sin(fused_attention(q, k, v, causal, "xla", pad_to_even=pad)))

    np.testing.assert_allclose(fused_attention(q, k, v, causal, "xla", pad_to_even=True),
                               fused_attention(q, k, v, causal, "xla"), atol=1e-6)
    for a, b in zip(jax.grad(functools.partial(loss, True), argnums=(0, 1, 2))(q, k, v),
                    jax.grad(functools.partial(loss, False), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, atol=1e-5)
