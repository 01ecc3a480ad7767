"""Batched greedy decoding under jit, with a KV cache (default) or by re-running the whole buffer (reference).

Both modes are `core_jax.decode.greedy` over a one-token step function. Prompts in a batch share one length
(exact operand lengths, as in the original's eval), so no left padding is needed: the prompt minus its last token
is the context, its last token is the first input of the loop. Decoding stops as soon as every row has produced
EOS; positions after a row's EOS are PAD.

Cached: the context's keys/values are written into the cache in one call, then every step feeds one token at the
cache's write index. Its Abacus id (the index of a digit within its number, from 1; 0 for non-digits) follows
from the previous token's: a digit continues the previous token's count, anything else resets it to 0.
Uncached: the step writes the token into a token buffer and re-runs the model on the whole buffer.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from arith_jax.model import ArithModel, abacus_ids
from arith_jax.tokenizer import DIGIT_IDS, EOS, PAD
from core_jax import decode
from core_jax.attention import KVCache


class _CachedState(NamedTuple):
    """The step function's cache in cached mode (greedy never looks inside it)."""

    kv: KVCache              # leaves [passes, layers, B, S, heads, head_dim]
    index: jnp.ndarray       # int32 scalar: absolute position of the token fed next
    abacus_B: jnp.ndarray    # int32: Abacus id of the token fed last


class _BufferState(NamedTuple):
    """The step function's cache in uncached mode: every token so far, and where the next one goes."""

    tokens_BxS: jnp.ndarray
    index: jnp.ndarray


def _is_digit(tokens):
    return (tokens >= DIGIT_IDS[0]) & (tokens <= DIGIT_IDS[-1])


def _pad_after_eos(tokens_BxT):
    """PAD after each row's first EOS (for runs that do not stop at EOS)."""
    seen = jnp.cumsum(tokens_BxT == EOS, axis=1) - (tokens_BxT == EOS)
    return jnp.where(seen > 0, PAD, tokens_BxT)


@functools.lru_cache(maxsize=64)
def _compiled(model: ArithModel, max_new: int, recurrences: int | None, use_cache: bool, stop_at_eos: bool):
    # without the stop, no token counts as EOS inside the loop (every row runs max_new steps); PAD after EOS is
    # applied afterwards, so the answers are the same either way
    eos_id = EOS if stop_at_eos else -1

    def cached(params, prompts_BxP):
        B, P = prompts_BxP.shape
        kv = model.init_cache(B, P + max_new, recurrences)
        if P > 1:
            _, kv = model.apply(params, prompts_BxP[:, :-1], cache=kv, start=0, recurrences=recurrences)
        start = _CachedState(kv, jnp.int32(P - 1), abacus_ids(prompts_BxP)[:, P - 2] if P > 1
                             else jnp.zeros((B,), jnp.int32))

        def tokens_to_logits(tokens_Bx1, s: _CachedState):
            aba_Bx1 = jnp.where(_is_digit(tokens_Bx1), s.abacus_B[:, None] + 1, 0)
            logits, kv = model.apply(params, tokens_Bx1, abacus_BxQ=aba_Bx1, cache=s.kv, start=s.index,
                                     recurrences=recurrences)
            return logits[:, 0], _CachedState(kv, s.index + 1, aba_Bx1[:, 0])

        return decode.greedy(tokens_to_logits, start, prompts_BxP[:, -1], max_len=max_new, eos_id=eos_id,
                             pad_id=PAD).tokens_BxT

    def uncached(params, prompts_BxP):
        B, P = prompts_BxP.shape
        buffer = jnp.concatenate([prompts_BxP, jnp.full((B, max_new), PAD, jnp.int32)], axis=1)

        def tokens_to_logits(tokens_Bx1, s: _BufferState):
            tokens = jax.lax.dynamic_update_slice(s.tokens_BxS, tokens_Bx1, (0, s.index))
            logits = model.apply(params, tokens, recurrences=recurrences)
            return (jax.lax.dynamic_index_in_dim(logits, s.index, axis=1, keepdims=False),
                    _BufferState(tokens, s.index + 1))

        return decode.greedy(tokens_to_logits, _BufferState(buffer, jnp.int32(P - 1)), prompts_BxP[:, -1],
                             max_len=max_new, eos_id=eos_id, pad_id=PAD).tokens_BxT

    fn = cached if use_cache else uncached
    if stop_at_eos:
        return jax.jit(fn)
    return jax.jit(lambda params, prompts: _pad_after_eos(fn(params, prompts)))


def greedy_decode(model: ArithModel, params, prompts_BxP, max_new: int, *, recurrences: int | None = None,
                  use_cache: bool = True, stop_at_eos: bool = True) -> np.ndarray:
    """Generated token ids [B, max_new] (EOS included, PAD after it).

    `stop_at_eos=False` always runs max_new steps (for benchmarks, where an untrained model's early EOS would
    flatter the timing); the returned ids are the same.
    """
    if int(max_new) < 1:
        raise ValueError(f"max_new must be >= 1 (the answer needs at least its EOS), got {max_new}")
    prompts = np.asarray(prompts_BxP)
    if prompts.ndim != 2 or prompts.shape[1] < 1:
        raise ValueError(f"prompts must be a [batch, length >= 1] array of token ids, got shape {prompts.shape}")
    fn = _compiled(model, int(max_new), recurrences, bool(use_cache), bool(stop_at_eos))
    return np.asarray(fn(params, jnp.asarray(prompts, jnp.int32)))
