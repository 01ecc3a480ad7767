"""Batched greedy decoding under jit, with a KV cache (default) or by re-running the whole buffer (reference).

Prompts in a batch share one length (exact operand lengths, as in the original's eval), so no left padding is
needed. Decoding stops as soon as every row has produced EOS; positions after a row's EOS are PAD.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from arith_jax.model import ArithModel, abacus_ids
from arith_jax.tokenizer import EOS, PAD


@functools.lru_cache(maxsize=64)
def _compiled(model: ArithModel, max_new: int, recurrences: int | None, use_cache: bool, stop_at_eos: bool):
    def pick(logits_BxV):
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

    def finish(out, done, t, nxt):
        nxt = jnp.where(done, PAD, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, t))
        return out, done | (nxt == EOS)

    def cached(params, prompts_BxP):
        B, P = prompts_BxP.shape
        cache = model.init_cache(B, P + max_new, recurrences)
        logits, cache = model.apply(params, prompts_BxP, cache=cache, start=0, recurrences=recurrences)
        out = jnp.full((B, max_new), PAD, jnp.int32)
        out, done = finish(out, jnp.zeros((B,), bool), 0, pick(logits[:, -1]))

        def cond(carry):
            t, _, done, _ = carry
            return (t < max_new) & ~(stop_at_eos & jnp.all(done))

        def body(carry):
            t, out, done, cache = carry
            buffer = jnp.concatenate([prompts_BxP, out], axis=1)
            pos = P + t - 1
            tok = jax.lax.dynamic_slice_in_dim(buffer, pos, 1, axis=1)
            aba = jax.lax.dynamic_slice_in_dim(abacus_ids(buffer), pos, 1, axis=1)
            logits, cache = model.apply(params, tok, abacus_BxQ=aba, cache=cache, start=pos,
                                        recurrences=recurrences)
            out, done = finish(out, done, t, pick(logits[:, 0]))
            return t + 1, out, done, cache

        _, out, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out, done, cache))
        return out

    def uncached(params, prompts_BxP):
        B, P = prompts_BxP.shape

        def cond(carry):
            t, _, done = carry
            return (t < max_new) & ~(stop_at_eos & jnp.all(done))

        def body(carry):
            t, out, done = carry
            buffer = jnp.concatenate([prompts_BxP, out], axis=1)
            logits = model.apply(params, buffer, recurrences=recurrences)
            step_logits = jax.lax.dynamic_index_in_dim(logits, P + t - 1, axis=1, keepdims=False)
            out, done = finish(out, done, t, pick(step_logits))
            return t + 1, out, done

        out = jnp.full((B, max_new), PAD, jnp.int32)
        _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), out, jnp.zeros((B,), bool)))
        return out

    return jax.jit(cached if use_cache else uncached)


def greedy_decode(model: ArithModel, params, prompts_BxP, max_new: int, *, recurrences: int | None = None,
                  use_cache: bool = True, stop_at_eos: bool = True) -> np.ndarray:
    """Generated token ids [B, max_new] (EOS included, PAD after it).

    `stop_at_eos=False` always runs max_new steps (for benchmarks, where an untrained model's early EOS would
    flatter the timing).
    """
    fn = _compiled(model, int(max_new), recurrences, bool(use_cache), bool(stop_at_eos))
    return np.asarray(fn(params, jnp.asarray(prompts_BxP, jnp.int32)))
