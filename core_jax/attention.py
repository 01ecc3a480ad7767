"""Multi-head attention shared by both packages: self/cross, causal and padding masks, RoPE, FIRE, KV cache.

The KV cache is an explicit pytree passed in and returned (not a Flax 'cache' collection), so it can be threaded
through `lax.scan` over the passes of a looped model and through a decoding loop without mutable state.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from core_jax.positions import FireBias, apply_rope

NEG_INF = -1e30


class KVCache(NamedTuple):
    """Keys/values of every slot of a fixed-length buffer; slots at or past the write index are garbage."""

    k_BxSxHxD: jnp.ndarray
    v_BxSxHxD: jnp.ndarray

    @classmethod
    def zeros(cls, batch: int, length: int, num_heads: int, head_dim: int, dtype=jnp.float32) -> "KVCache":
        shape = (batch, length, num_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


class HeadsKVCache(NamedTuple):
    """A KV cache laid out heads before slots, [B, heads, S, head_dim]: the layout the attention's products read
    directly (batch axes b, h leading). With `KVCache`'s [B, S, H, D], XLA:CPU transposes the whole cache for the
    products at every call, which dominates one-token decoding steps over a long cache. Same semantics otherwise."""

    k_BxHxSxD: jnp.ndarray
    v_BxHxSxD: jnp.ndarray

    @classmethod
    def zeros(cls, batch: int, length: int, num_heads: int, head_dim: int, dtype=jnp.float32) -> "HeadsKVCache":
        return cls.from_cache(KVCache.zeros(batch, length, num_heads, head_dim, dtype))

    @classmethod
    def from_cache(cls, cache: KVCache) -> "HeadsKVCache":
        """The same keys/values in this layout (any leading axes before B are kept)."""
        swap = lambda x: jnp.swapaxes(x, -3, -2)
        return cls(swap(cache.k_BxSxHxD), swap(cache.v_BxSxHxD))


def _write_cache(buf, new_BxQxHxD, index, heads_major: bool):
    """`buf` with the Q new keys (or values) at slots index..index+Q-1: a shared index (scalar) or one per row
    ([B]: row b at index[b]..index[b]+Q-1, one scatter for the batch; slots past the buffer are dropped)."""
    new = new_BxQxHxD.astype(buf.dtype)
    if jnp.ndim(index) == 0:
        if heads_major:
            return lax.dynamic_update_slice(buf, jnp.swapaxes(new, 1, 2), (0, 0, index, 0))
        return lax.dynamic_update_slice(buf, new, (0, index, 0, 0))
    B, Q = new.shape[:2]
    rows_BxQ = jnp.arange(B)[:, None]
    slots_BxQ = index[:, None] + jnp.arange(Q)[None, :]
    if heads_major:   # advanced indices apart: their [B, Q] leads the update's shape, then H, D
        return buf.at[rows_BxQ, :, slots_BxQ].set(new, mode="drop")
    return buf.at[rows_BxQ, slots_BxQ].set(new, mode="drop")


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` for dense layers (`dot_general=` of `nn.Dense` / `nn.DenseGeneral`), with a CPU-friendly
    weight gradient.

    For the dense pattern — the input's trailing axes contracted with the kernel's leading axes, no batch axes —
    the forward pass and the input gradient are the usual products; the kernel gradient x^T g is computed from an
    explicitly transposed copy of x ([K, M] row-major), because XLA:CPU runs a product that contracts the leading
    axis of both operands on a slow generic path (and transposes g, the larger operand, to get there). On other
    platforms the transpose is left for XLA to fold. Any other contraction falls back to `lax.dot_general`.
    """
    (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
    n = len(lhs_c)
    dense = (not lhs_b and not rhs_b and precision is None and preferred_element_type is None and n > 0
             and tuple(d % lhs.ndim for d in lhs_c) == tuple(range(lhs.ndim - n, lhs.ndim))
             and tuple(d % rhs.ndim for d in rhs_c) == tuple(range(n)))
    if not dense:
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
    return _dense_product(lhs, rhs, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_product(x, w, n_contract):
    return lax.dot_general(x, w, ((tuple(range(x.ndim - n_contract, x.ndim)), tuple(range(n_contract))), ((), ())))


def _dense_product_fwd(x, w, n_contract):
    return _dense_product(x, w, n_contract), (x, w)


def _transposed_copy(x_MxK):
    """x^T as its own [K, M] array.

    On CPU the transpose runs inside a `lax.cond` whose two branches are the same plain transpose: nothing outside
    can be fused into it, so XLA keeps it a pure transpose of a materialised x (its fast transpose kernel) instead of
    recomputing x's elementwise producer (a LayerNorm, the GLU product) at every transposed index, a strided loop
    several times slower; and it cannot fold the transpose back into the product. The predicate (is x[0, 0] NaN)
    only has to be unknown at compile time: both branches return the same array.
    """
    return lax.platform_dependent(x_MxK, cpu=_cpu_transposed_copy, default=lambda x: x.T)


def _cpu_transposed_copy(x_MxK):
    if x_MxK.size == 0:
        return x_MxK.T
    return lax.cond(jnp.isnan(x_MxK[0, 0]), lambda x: x.T, lambda x: x.T, x_MxK)


def _dense_product_bwd(n_contract, residuals, g):
    x, w = residuals
    k = math.prod(w.shape[:n_contract])
    n = math.prod(w.shape[n_contract:])
    m = math.prod(x.shape[:x.ndim - n_contract])
    g_MxN = g.reshape(m, n)
    w_KxN = w.reshape(k, n)
    dx = lax.dot_general(g_MxN, w_KxN, (((1,), (1,)), ((), ()))).reshape(x.shape)
    dw = lax.dot_general(_transposed_copy(x.reshape(m, k)), g_MxN, (((1,), (0,)), ((), ()))).reshape(w.shape)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_dense_product.defvjp(_dense_product_fwd, _dense_product_bwd)


def xavier(gain: float = 1.0):
    """Xavier-normal with a gain (the deepnorm-style init of the Abacus code)."""
    return nn.initializers.variance_scaling(gain * gain, "fan_avg", "normal")


def fused_attention(q_BxQxHxD, k_BxQxHxD, v_BxQxHxD, causal: bool, implementation: str, pad_to_even: bool = False):
    """`jax.nn.dot_product_attention` of a self-attention (queries and keys at the same positions). cuDNN's fused
    kernel refuses odd sequence lengths when training (JAX reports an unsupported sequence length), so
    `pad_to_even` appends one zero query and one zero key: the extra query's output is dropped, and the extra key
    is hidden from every real query by the causal mask or, without one, by `key_value_seq_lengths`."""
    n = q_BxQxHxD.shape[1]
    if not pad_to_even or n % 2 == 0:
        return jax.nn.dot_product_attention(q_BxQxHxD, k_BxQxHxD, v_BxQxHxD, is_causal=causal,
                                            implementation=implementation)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))
    lengths = None if causal else jnp.full((q_BxQxHxD.shape[0],), n, jnp.int32)
    out = jax.nn.dot_product_attention(pad(q_BxQxHxD), pad(k_BxQxHxD), pad(v_BxQxHxD), is_causal=causal,
                                       key_value_seq_lengths=lengths, implementation=implementation)
    return out[:, :n]


class Attention(nn.Module):
    """Scaled dot-product attention with fp32 scores/softmax.

    Call with `x_BxQxD` (queries) and optionally `kv_BxKxD` (cross-attention). Positions are 1-D unless given per
    row (below); with a cache, the Q new tokens are written at slots [index, index+Q) and queries attend to all
    slots up to their own.
    Returns (y_BxQxD, new_cache or None).

    Cross-attention to a fixed memory (an encoder's output) need not re-project the memory at every decoding step:
    `attn(None, memory, kv_only=True)` returns its keys/values as a KVCache once, and
    `attn(x, memory_kv=that_cache, kv_mask_BxK=...)` attends to them (same parameters, no key/value projection).

    Queries at positions of their own in each row (e.g. only some positions of a sequence, against keys at all
    of them): pass `q_pos_Q` as [B, Q] with `kv_BxKxD` and `k_pos_K` (no cache).

    Rows at positions of their own with a cache (decoding right-padded prompts of different lengths): pass
    `cache_index` as [B]; row b's Q tokens are written at slots cache_index[b]..+Q-1, are at those positions
    (`q_pos_Q` default; RoPE, FIRE and the causal mask per row), and attend to the slots up to their own. The cache
    may be a `KVCache` or a `HeadsKVCache` (same function, a layout the products read without a transpose);
    the new cache has the layout of the one given.

    Packed rows (several sequences back to back in one row): with `q_segment_BxQ` and `kv_segment_BxK` (integer
    segment ids), a query attends only to keys of its own segment, on top of the causal and key masks. Not with a
    KV cache (decoding runs one sequence per row).

    `deferred_norm=True` divides by the softmax denominator after the product with the values (on [B, Q, H, D]
    rather than on the [B, H, Q, K] probabilities), with the scores' 1/sqrt(D) applied to the queries: the same
    function up to rounding, fewer passes over the score array.

    `kernel` picks how plain self-attention over whole sequences (no cache, FIRE, masks or segments; `k_pos_K` not
    given, so keys sit at the queries' 1-D positions, increasing along the sequence: the fused kernels' causal mask
    compares indices) is computed: "einsum" (default) writes it out as above; "xla" and "cudnn" call
    `jax.nn.dot_product_attention` with that implementation ("cudnn": the fused flash-attention kernel, GPU only,
    bf16/fp16; odd lengths padded, see `fused_attention`). Every other case runs the einsum path whatever `kernel`
    says. Same function up to rounding.
    """

    num_heads: int
    use_bias: bool = False
    rope: bool = False
    rope_base: float = 10000.0
    fire: bool = False
    v_gain: float = 1.0
    out_gain: float = 1.0
    dtype: Any = jnp.float32
    deferred_norm: bool = False
    kernel: str = "einsum"

    @nn.compact
    def __call__(self, x_BxQxD, kv_BxKxD=None, *, q_pos_Q=None, k_pos_K=None, causal: bool = False,
                 kv_mask_BxK=None, cache: KVCache | HeadsKVCache | None = None, cache_index=None,
                 memory_kv: KVCache | None = None, kv_only: bool = False, q_segment_BxQ=None,
                 kv_segment_BxK=None):
        if (q_segment_BxQ is None) != (kv_segment_BxK is None):
            raise ValueError("segment ids restrict attention to a query's own segment: pass both q_segment_BxQ "
                             "and kv_segment_BxK, or neither")
        per_row_index = cache is not None and cache_index is not None and jnp.ndim(cache_index) == 1
        if (q_pos_Q is not None and jnp.ndim(q_pos_Q) == 2 and not per_row_index
                and (cache is not None or k_pos_K is None)):
            raise ValueError("per-row query positions q_pos_Q [B, Q] need k_pos_K and no KV cache, or a cache "
                             "with a per-row cache_index [B]")
        if q_segment_BxQ is not None and cache is not None:
            raise ValueError("segment ids are for full-sequence passes over packed rows, not with a KV cache")
        d_model = (kv_BxKxD if kv_only else x_BxQxD).shape[-1]
        if d_model % self.num_heads:
            raise ValueError(f"model width {d_model} is not divisible by num_heads={self.num_heads}")
        head_dim = d_model // self.num_heads
        dense = lambda name, gain: nn.DenseGeneral((self.num_heads, head_dim), use_bias=self.use_bias,
                                                   kernel_init=xavier(gain), dtype=self.dtype,
                                                   dot_general=dense_dot_general, name=name)
        out = nn.DenseGeneral(d_model, axis=(-2, -1), use_bias=self.use_bias, kernel_init=xavier(self.out_gain),
                              dtype=self.dtype, dot_general=dense_dot_general, name="out")
        if kv_only:
            if kv_BxKxD is None:
                raise ValueError("kv_only projects a cross-attention memory: pass it as kv_BxKxD")
            return KVCache(dense("key", 1.0)(kv_BxKxD), dense("value", self.v_gain)(kv_BxKxD))
        q = dense("query", 1.0)(x_BxQxD)
        if memory_kv is not None:
            if cache is not None or self.rope or self.fire:
                raise ValueError("a precomputed memory_kv is for plain cross-attention (no cache, RoPE or FIRE)")
            k, v = memory_kv.k_BxSxHxD.astype(q.dtype), memory_kv.v_BxSxHxD.astype(q.dtype)
        else:
            source = x_BxQxD if kv_BxKxD is None else kv_BxKxD
            k = dense("key", 1.0)(source)
            v = dense("value", self.v_gain)(source)

        cross = kv_BxKxD is not None or memory_kv is not None
        n_q = x_BxQxD.shape[1]
        if q_pos_Q is None:
            start = 0 if cache_index is None else cache_index
            q_pos_Q = (start[:, None] if per_row_index else start) + jnp.arange(n_q)
        # plain self-attention: keys at the queries' own positions (what the fused kernels compute)
        keys_at_query_positions = cache is None and not cross and k_pos_K is None
        if cache is None and k_pos_K is None:
            k_pos_K = jnp.arange(k.shape[1]) if cross else q_pos_Q

        if self.rope:
            q = apply_rope(q, q_pos_Q, self.rope_base)
            k = apply_rope(k, k_pos_K if cross else q_pos_Q, self.rope_base)

        new_cache = None
        if cache is not None:
            if cross:
                raise ValueError("the KV cache is for self-attention; cache cross-attention keys outside")
            heads_major = isinstance(cache, HeadsKVCache)
            new_cache = type(cache)(*(_write_cache(buf, new, cache_index, heads_major)
                                      for buf, new in zip(cache, (k, v))))
            k, v = new_cache[0].astype(q.dtype), new_cache[1].astype(q.dtype)
            k_pos_K = jnp.arange(k.shape[2 if heads_major else 1])

        if (self.kernel != "einsum" and keys_at_query_positions and not self.fire and kv_mask_BxK is None
                and q_segment_BxQ is None and q_pos_Q.ndim == 1):
            out_BxQxHxD = fused_attention(q, k.astype(q.dtype), v.astype(q.dtype), causal, self.kernel,
                                          pad_to_even=self.kernel == "cudnn")
            return out(out_BxQxHxD), None
        if self.deferred_norm:
            q = q * (1.0 / math.sqrt(head_dim))
        kv_heads_major = isinstance(new_cache, HeadsKVCache)   # k, v [B, H, K, D]
        kv_spec = "bhkd" if kv_heads_major else "bkhd"
        n_k = k.shape[2 if kv_heads_major else 1]
        scores_BxHxQxK = jnp.einsum(f"bqhd,{kv_spec}->bhqk", q, k, preferred_element_type=jnp.float32)
        if not self.deferred_norm:
            scores_BxHxQxK = scores_BxHxQxK / jnp.sqrt(jnp.float32(head_dim))
        per_row = q_pos_Q.ndim == 2   # queries at their own positions in each row ([B, Q])
        if self.fire:
            fire = FireBias(self.num_heads, name="fire")
            if per_row:   # the bias is a function of each (query, key) position pair: run it on the flat rows
                bias = fire(q_pos_Q.reshape(-1), k_pos_K).reshape(self.num_heads, *q_pos_Q.shape, -1)
                scores_BxHxQxK = scores_BxHxQxK + jnp.transpose(bias, (1, 0, 2, 3))
            else:
                scores_BxHxQxK = scores_BxHxQxK + fire(q_pos_Q, k_pos_K)[None]
        allowed = jnp.ones((1, 1, n_q, n_k), bool)
        if causal and per_row:
            allowed = allowed & (k_pos_K[None, None, :] <= q_pos_Q[:, :, None])[:, None]
        elif causal:
            allowed = allowed & (k_pos_K[None, :] <= q_pos_Q[:, None])[None, None]
        if kv_mask_BxK is not None:
            allowed = allowed & kv_mask_BxK[:, None, None, :].astype(bool)
        if q_segment_BxQ is not None:
            allowed = allowed & (q_segment_BxQ[:, None, :, None] == kv_segment_BxK[:, None, None, :])
        scores_BxHxQxK = jnp.where(allowed, scores_BxHxQxK, NEG_INF)
        if self.deferred_norm:
            exp_BxHxQxK = jnp.exp(scores_BxHxQxK - lax.stop_gradient(scores_BxHxQxK.max(-1, keepdims=True)))
            inv_BxQxH = jnp.transpose(1.0 / exp_BxHxQxK.sum(-1), (0, 2, 1))
            out_BxQxHxD = (jnp.einsum(f"bhqk,{kv_spec}->bqhd", exp_BxHxQxK.astype(v.dtype), v)
                           * inv_BxQxH[..., None].astype(v.dtype))
        else:
            probs = jax.nn.softmax(scores_BxHxQxK, axis=-1).astype(v.dtype)
            out_BxQxHxD = jnp.einsum(f"bhqk,{kv_spec}->bqhd", probs, v)
        return out(out_BxQxHxD), new_cache
