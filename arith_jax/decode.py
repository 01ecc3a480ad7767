"""Batched greedy decoding under jit, with a KV cache (default) or by re-running the whole buffer (reference).

Both modes are `core_jax.decode.greedy` over a one-token step function. Prompts of different lengths share one
program: they are right-padded to the batch's width P and `lengths_B` says where each ends. Padding on the right
keeps every prompt token at the position it has unpadded (absolute index from 0, hence the same RoPE angle,
learned position and FIRE query normaliser; Abacus ids count digits from the left), and causal attention never
lets a real token see the padding to its right. Each row then continues from its own last prompt token at its
own position, so row b computes exactly what it would compute alone at its exact length. `max_new_B` gives every
row its own answer budget: a row that has generated that many tokens is finished (its later slots are PAD), so a
batch stops once every row has produced EOS or used its budget.

Cached: the padded prompt minus its last column is prefilled in one call into a cache of that length (slots past a
row's own prompt get keys/values of padding, which its queries never attend to and which its own decoding
overwrites), then widened by empty slots for the answer (the prefill's queries never see those); every
step then feeds one token per row, row b at cache slot (= position) lengths_B[b] - 1 + t: one model call for the
batch with per-row positions (`ArithModel.apply` with `start` [B]), on the cache split into one buffer per pass and
layer (`ArithModel.unstack_cache`, heads before slots), so the passes run unrolled and every step writes each
row's new key and value into those buffers in place. The Abacus id of a fed token (the index of a digit within its
number, from 1; 0 for non-digits) follows from the previous token's: a digit continues the count, anything else
resets it.
Uncached: every step writes each row's token into a token buffer at its own index and re-runs the model on the
whole buffer (positions 0..S-1 for every row, exact for the same reason).

A model with `eval_init_noise` (the original's evaluation: h0 = init_noise * N(0, I) on every forward call) draws
its initial state from `rng`: cached, the prefill's positions get one draw and each later token a draw keyed by its
row and position (so every position's state is computed once, from one draw); uncached, every step re-runs the
buffer with a fresh draw for every position, as the original (which has no cache) does. Row b's answer then depends
on the key and on its row index, not only on its prompt. Without that option `rng` is ignored and decoding is
deterministic.

`compiled_programs()` counts the programs traced so far (one compilation each); the callers that decode many
problems (`arith_jax.evaluate.solve_prompts`) pad prompts into `length_bucket`s to keep that count small. Programs
are cached per model configuration and shapes, not per model instance: a second `ArithModel` (or `Solver.load`)
of the same configuration reuses the first one's programs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from arith_jax.model import ArithModel, ModelConfig, abacus_ids
from arith_jax.tokenizer import DIGIT_IDS, EOS, PAD
from core_jax import decode
from core_jax.attention import KVCache

SMALLEST_BUCKET = 32  # prompts (and answers) shorter than this share one padded length
_programs = 0         # programs traced by greedy_decode in this process


def compiled_programs() -> int:
    """Number of decoding programs traced (each one compiled once) by `greedy_decode` in this process."""
    return _programs


def length_bucket(n: int, smallest: int = SMALLEST_BUCKET) -> int:
    """The padded length for a prompt or answer of n tokens: the smallest power of two >= max(n, smallest)."""
    if n < 1:
        raise ValueError(f"a length to bucket must be >= 1, got {n}")
    return max(smallest, 1 << (n - 1).bit_length())


class _CachedState(NamedTuple):
    """The step function's cache in cached mode (greedy never looks inside it)."""

    kv: tuple                # `ArithModel.unstack_cache`: [pass][layer] HeadsKVCache [B, heads, S, head_dim]
    index_B: jnp.ndarray     # int32: absolute position (= cache slot) of each row's token fed next
    abacus_B: jnp.ndarray    # int32: Abacus id of each row's token fed last


class _BufferState(NamedTuple):
    """The step function's cache in uncached mode: every token so far, and where each row's next one goes."""

    tokens_BxS: jnp.ndarray
    index_B: jnp.ndarray


def _is_digit(tokens):
    return (tokens >= DIGIT_IDS[0]) & (tokens <= DIGIT_IDS[-1])


def _raise(abacus_BxQ, offset_B):
    """Abacus ids raised by each row's offset (digits only: non-digits keep id 0)."""
    return jnp.where(abacus_BxQ > 0, abacus_BxQ + offset_B[:, None], 0)


def _pad_after_eos(tokens_BxT):
    """PAD after each row's first EOS (for runs that do not stop at EOS)."""
    seen = jnp.cumsum(tokens_BxT == EOS, axis=1) - (tokens_BxT == EOS)
    return jnp.where(seen > 0, PAD, tokens_BxT)


def _force_eos_past_budget(logits_BxV, step_B, max_new_B):
    """Rows that have generated their budget emit EOS (cut away afterwards), so the loop can stop."""
    eos_only = jnp.where(jnp.arange(logits_BxV.shape[-1]) == EOS, 0.0, -jnp.inf)
    return jnp.where((step_B >= max_new_B)[:, None], eos_only[None, :], logits_BxV)


@functools.lru_cache(maxsize=64)
def _compiled(model_type: type, cfg: ModelConfig, vocab_size: int, max_new: int, recurrences: int | None,
              use_cache: bool, stop_at_eos: bool):
    """One jitted decoding program per (model class, config, vocabulary, options): keyed by value, not by model
    instance, so every instance of one model (e.g. two `Solver.load` of one folder) shares its compiled programs.
    The model's computation depends on nothing else (`ArithModel` holds no parameters)."""
    # without the stop, no token counts as EOS inside the loop (every row runs max_new steps); PAD after EOS is
    # applied afterwards, so the answers are the same either way
    eos_id = EOS if stop_at_eos else -1
    # the prefill's passes run as a rolled loop: unrolling speeds training up but makes programs slower to compile
    # (the steps' passes are unrolled anyway: their cache is one buffer per pass)
    model = model_type(dataclasses.replace(cfg, scan_unroll=1), vocab_size)

    def cached(params, prompts_BxP, lengths_B, max_new_B, rng, offset_B):
        B, P = prompts_BxP.shape
        r_prefill, r_steps = jax.random.split(rng)
        if P > 1:   # prefill a cache of the prompts' length (its queries see no more), then widen it for the answer
            head_BxQ = prompts_BxP[:, :-1]
            _, kv = model.apply(params, head_BxQ, abacus_BxQ=_raise(abacus_ids(head_BxQ), offset_B),
                                cache=model.init_cache(B, P - 1, recurrences), start=0, recurrences=recurrences,
                                rng=r_prefill)
            kv = KVCache(*(jnp.pad(x, [(0, 0)] * 3 + [(0, max_new + 1), (0, 0), (0, 0)]) for x in kv))
        else:
            kv = model.init_cache(B, P + max_new, recurrences)
        first_B = lengths_B - 1
        prev_abacus_B = jnp.take_along_axis(abacus_ids(prompts_BxP), jnp.maximum(first_B - 1, 0)[:, None], 1)[:, 0]
        start = _CachedState(model.unstack_cache(kv), first_B, jnp.where(first_B > 0, prev_abacus_B, 0))
        row_B = jnp.arange(B)
        # the initial-state noise (a model with eval_init_noise) of row b's token at position i: key (r_steps, b, i)
        row_keys = jax.vmap(lambda row, index: jax.random.fold_in(jax.random.fold_in(r_steps, row), index))

        def tokens_to_logits(tokens_Bx1, s: _CachedState):
            aba_Bx1 = jnp.where(_is_digit(tokens_Bx1), s.abacus_B[:, None] + 1, 0)
            logits_BxQxV, kv = model.apply(params, tokens_Bx1, abacus_BxQ=_raise(aba_Bx1, offset_B), cache=s.kv,
                                           start=s.index_B,
                                           recurrences=recurrences, rng=row_keys(row_B, s.index_B))
            logits = _force_eos_past_budget(logits_BxQxV[:, 0], s.index_B - first_B, max_new_B)
            return logits, _CachedState(kv, s.index_B + 1, aba_Bx1[:, 0])

        last_B = jnp.take_along_axis(prompts_BxP, first_B[:, None], 1)[:, 0]
        return decode.greedy(tokens_to_logits, start, last_B, max_len=max_new, eos_id=eos_id,
                             pad_id=PAD).tokens_BxT

    def uncached(params, prompts_BxP, lengths_B, max_new_B, rng, offset_B):
        B, P = prompts_BxP.shape
        buffer = jnp.concatenate([prompts_BxP, jnp.full((B, max_new), PAD, jnp.int32)], axis=1)
        first_B = lengths_B - 1
        slots_S = jnp.arange(buffer.shape[1])

        def tokens_to_logits(tokens_Bx1, s: _BufferState):
            tokens = jnp.where(slots_S[None, :] == s.index_B[:, None], tokens_Bx1, s.tokens_BxS)
            step = s.index_B[0] - first_B[0]  # every row is at the same step
            logits = model.apply(params, tokens, abacus_BxQ=_raise(abacus_ids(tokens), offset_B),
                                 recurrences=recurrences, rng=jax.random.fold_in(rng, step))
            logits = jnp.take_along_axis(logits, s.index_B[:, None, None], axis=1)[:, 0]
            return (_force_eos_past_budget(logits, s.index_B - first_B, max_new_B),
                    _BufferState(tokens, s.index_B + 1))

        last_B = jnp.take_along_axis(prompts_BxP, first_B[:, None], 1)[:, 0]
        return decode.greedy(tokens_to_logits, _BufferState(buffer, first_B), last_B,
                             max_len=max_new, eos_id=eos_id, pad_id=PAD).tokens_BxT

    fn = cached if use_cache else uncached

    def program(params, prompts_BxP, lengths_B, max_new_B, rng, offset_B):
        global _programs
        _programs += 1  # runs once per trace, i.e. once per compiled program
        tokens_BxT = fn(params, prompts_BxP, lengths_B, max_new_B, rng, offset_B)
        if not stop_at_eos:
            tokens_BxT = _pad_after_eos(tokens_BxT)
        return jnp.where(jnp.arange(max_new)[None, :] < max_new_B[:, None], tokens_BxT, PAD)

    return jax.jit(program)


def greedy_decode(model: ArithModel, params, prompts_BxP, max_new: int, *, lengths_B=None, max_new_B=None,
                  recurrences: int | None = None, use_cache: bool = True, stop_at_eos: bool = True,
                  rng=None, abacus_offset_B=None) -> np.ndarray:
    """Generated token ids [B, max_new] (EOS included, PAD after it).

    prompts_BxP: token ids; with `lengths_B`, row b's prompt is prompts_BxP[b, :lengths_B[b]] and the rest of the
    row is ignored (any ids), otherwise every row is a whole prompt. `max_new_B` (default: max_new for every row)
    caps row b's answer at max_new_B[b] tokens; its slots after that are PAD. Row b's ids are the same as
    decoding its prompt alone at its exact length with max_new_B[b] (see the module docstring).
    `stop_at_eos=False` always runs max_new steps (for benchmarks, where an untrained model's early EOS would
    flatter the timing); the returned ids are the same. `rng` (default `jax.random.PRNGKey(0)`) keys the
    initial-state noise of a model with `eval_init_noise` and is ignored otherwise (module docstring).
    `abacus_offset_B` (default 0 for every row) raises row b's Abacus ids by abacus_offset_B[b]: digit i of a
    number gets id offset + i instead of i (the offsets `arith_jax.evaluate.solve_prompts` votes over); a model
    without Abacus embeddings ignores it. It is an argument of the compiled program: no offset compiles anew.
    """
    if int(max_new) < 1:
        raise ValueError(f"max_new must be >= 1 (the answer needs at least its EOS), got {max_new}")
    prompts = np.asarray(prompts_BxP)
    if prompts.ndim != 2 or prompts.shape[1] < 1:
        raise ValueError(f"prompts must be a [batch, length >= 1] array of token ids, got shape {prompts.shape}")
    B, P = prompts.shape
    lengths = np.full(B, P, np.int32) if lengths_B is None else np.asarray(lengths_B, np.int32)
    if lengths.shape != (B,) or (lengths < 1).any() or (lengths > P).any():
        raise ValueError(f"lengths_B must hold one prompt length in 1..{P} per row ({B} rows), got {lengths_B}")
    budgets = np.full(B, max_new, np.int32) if max_new_B is None else np.asarray(max_new_B, np.int32)
    if budgets.shape != (B,) or (budgets < 1).any() or (budgets > max_new).any():
        raise ValueError(f"max_new_B must hold one answer budget in 1..{max_new} per row ({B} rows), "
                         f"got {max_new_B}")
    offsets = np.zeros(B, np.int32) if abacus_offset_B is None else np.asarray(abacus_offset_B)
    if offsets.shape != (B,) or not np.issubdtype(offsets.dtype, np.integer) or (offsets < 0).any():
        raise ValueError(f"abacus_offset_B must hold one integer >= 0 per row ({B} rows), got {abacus_offset_B}")
    fn = _compiled(type(model), model.cfg, int(model.vocab_size), int(max_new), recurrences, bool(use_cache),
                   bool(stop_at_eos))
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return np.asarray(fn(params, jnp.asarray(prompts, jnp.int32), jnp.asarray(lengths), jnp.asarray(budgets), rng,
                         jnp.asarray(offsets, jnp.int32)))
