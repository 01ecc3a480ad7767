"""The grammar of prefix expressions as a decoding constraint (`core_jax.decode.Constraint`).

Under this constraint every hypothesis stays a prefix of a complete expression that `DecoderVocab.decode_expression`
parses, using only the variables x_i with i < n_vars of its own dataset, and ending with EOS within `max_len`
generated tokens. The rules, per row, over the decoder vocabulary's kinds (`sr_jax.vocab`):

  * `open` counts the expression slots still to fill (1 at the start). A binary operator adds one, a unary
    operator keeps it, a variable fills one, a constant (sign, mantissa, exponent) fills one with its exponent.
  * After a sign only a mantissa may follow, after a mantissa only an exponent.
  * EOS only when open == 0 (and no constant is half written); it finishes the row. A finished row allows only
    PAD (decoders emit PAD there anyway).
  * Length budget: a token is allowed only if, after it, the tokens still needed fit into max_len: the rest of a
    constant being written (2 after a sign, 1 after a mantissa), one token per other open slot (a variable; every
    dataset has at least one) and EOS. So a hypothesis never reaches a state it cannot complete.
  * `operators` (optional) restricts the operators to a subset of the vocabulary's.

Everything is jnp and vectorised over the rows; `prefix_grammar` closes over static int arrays of the vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from core_jax.decode import Constraint
from .vocab import (KIND_BINARY, KIND_EOS, KIND_EXPONENT, KIND_MANTISSA, KIND_PAD, KIND_SIGN, KIND_UNARY,
                    KIND_VARIABLE, DecoderVocab)

# float_pos_B values
FLOAT_NONE, FLOAT_AFTER_SIGN, FLOAT_AFTER_MANTISSA = 0, 1, 2


class GrammarState(NamedTuple):
    """Per-row grammar state (every field has a leading batch axis B)."""

    open_B: jnp.ndarray        # int32: expression slots still to fill
    float_pos_B: jnp.ndarray   # int32: FLOAT_NONE, FLOAT_AFTER_SIGN (mantissa next), FLOAT_AFTER_MANTISSA (exponent)
    length_B: jnp.ndarray      # int32: tokens emitted so far (EOS included, PAD not)
    n_vars_B: jnp.ndarray      # int32: variables of the row's dataset (x_i allowed for i < n_vars)
    done_B: jnp.ndarray        # bool: EOS emitted


def initial_state(n_vars_B) -> GrammarState:
    """The state before the first generated token; n_vars_B: int[B], each at least 1 (checked when concrete)."""
    n_vars_B = jnp.asarray(n_vars_B, jnp.int32)
    if n_vars_B.ndim != 1:
        raise ValueError(f"n_vars_B must be a 1-D array (one variable count per row), got shape {n_vars_B.shape}")
    if not isinstance(n_vars_B, jax.core.Tracer) and n_vars_B.size and int(n_vars_B.min()) < 1:
        raise ValueError(f"every row needs at least one variable (n_vars >= 1), got {int(n_vars_B.min())}")
    B = n_vars_B.shape[0]
    zeros = jnp.zeros((B,), jnp.int32)
    return GrammarState(open_B=zeros + 1, float_pos_B=zeros, length_B=zeros, n_vars_B=n_vars_B,
                        done_B=jnp.zeros((B,), bool))


def prefix_grammar(vocab: DecoderVocab, max_len: int, operators: Sequence[str] | None = None) -> Constraint:
    """Constraint for decoding prefix expressions of at most max_len generated tokens (EOS included).

    `operators`: the operators that may be generated (default: all of the vocabulary's).
    """
    if not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len must be an int >= 2 (the shortest expression is a variable, then EOS), "
                         f"got {max_len!r}")
    kind_np = np.asarray(vocab.kind, np.int32)
    usable_np = np.ones(len(vocab), bool)
    if operators is not None:
        unknown = [o for o in operators if o not in vocab.operators]
        if unknown:
            raise ValueError(f"operator {unknown[0]!r} is not in the decoder vocabulary; it has "
                             f"{', '.join(vocab.operators)}")
        is_op = (kind_np == KIND_BINARY) | (kind_np == KIND_UNARY)
        usable_np &= ~is_op | np.array([w in set(operators) for w in vocab.id2word])
    kind = jnp.asarray(kind_np)[None, :]                          # [1, V]
    variable = jnp.asarray(vocab.variable, jnp.int32)[None, :]    # [1, V]
    usable = jnp.asarray(usable_np)[None, :]
    kind_flat = jnp.asarray(kind_np)

    # open slots after a token, relative to before (a constant's slot is filled by its exponent)
    open_delta = jnp.asarray(np.select([kind_np == KIND_BINARY, kind_np == KIND_VARIABLE, kind_np == KIND_EXPONENT],
                                       [1, -1, -1], 0), jnp.int32)
    # tokens still needed after a token = open (before it) + extra: binary (open + 1 slots, EOS), unary (open, EOS),
    # sign (open - 1 slots, mantissa, exponent, EOS), mantissa (open - 1, exponent, EOS); variable, exponent
    # (open - 1, EOS) and EOS (open is 0) need exactly open
    extra = jnp.asarray(np.select([(kind_np == KIND_BINARY) | (kind_np == KIND_SIGN),
                                   (kind_np == KIND_UNARY) | (kind_np == KIND_MANTISSA)], [2, 1], 0),
                        jnp.int32)[None, :]

    def allowed(s: GrammarState):
        open_ = s.open_B[:, None]
        fpos = s.float_pos_B[:, None]
        fits = open_ + extra <= max_len - s.length_B[:, None] - 1
        in_float = fpos != FLOAT_NONE
        ok = jnp.select(
            [kind == KIND_MANTISSA, kind == KIND_EXPONENT, kind == KIND_EOS, kind == KIND_PAD],
            [fpos == FLOAT_AFTER_SIGN, fpos == FLOAT_AFTER_MANTISSA, ~in_float & (open_ == 0),
             jnp.zeros_like(open_, bool)],
            ~in_float & (open_ > 0))                              # operators, variables, signs
        ok = ok & usable & fits
        ok = ok & ((kind != KIND_VARIABLE) | (variable < s.n_vars_B[:, None]))
        done = s.done_B[:, None]
        return jnp.where(done, kind == KIND_PAD, ok)

    def advance(s: GrammarState, token_B):
        k = kind_flat[token_B]
        live = ~s.done_B
        fpos = jnp.select([k == KIND_SIGN, k == KIND_MANTISSA], [FLOAT_AFTER_SIGN, FLOAT_AFTER_MANTISSA],
                          FLOAT_NONE)
        return GrammarState(open_B=jnp.where(live, s.open_B + open_delta[token_B], s.open_B),
                            float_pos_B=jnp.where(live, fpos, s.float_pos_B).astype(jnp.int32),
                            length_B=s.length_B + live.astype(jnp.int32),
                            n_vars_B=s.n_vars_B,
                            done_B=s.done_B | (k == KIND_EOS))

    return Constraint(allowed=allowed, advance=advance)
