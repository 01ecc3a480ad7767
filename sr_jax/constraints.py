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

Everything is jnp and vectorised over the rows. The rules are read from per-token tables (`GrammarTables`, one
entry per decoder id) with no per-kind branching, so the mask is a few comparisons of [B, 1] state against [1, V]
tables. The tables are numpy arrays baked into the program by default; a jitted caller can pass them as arguments
(`prefix_grammar(..., tables=traced)`), which keeps XLA from folding anything about them at compile time.
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


_BIG = np.iinfo(np.int32).max


class GrammarTables(NamedTuple):
    """The grammar's rules per decoder id (arrays of shape [V]; numpy, or jnp arrays traced as jit arguments)."""

    float_pos_V: object     # int32: the float position the token needs (FLOAT_NONE outside a constant)
    min_open_V: object      # int32: open slots needed before it, at least ...
    max_open_V: object      # int32: ... and at most (EOS: exactly 0)
    extra_V: object         # int32: tokens needed after it beyond one per open slot (see the module docstring)
    variable_V: object      # int32: i for x_i, -1 otherwise (x_i needs i < n_vars)
    usable_V: object        # bool: may be generated at all (not PAD, not an excluded operator)
    pad_V: object           # bool: PAD (the only token of a finished row)
    open_delta_V: object    # int32: open slots after it minus before it
    float_after_V: object   # int32: float position after it
    eos_V: object           # bool: EOS (finishes the row)


def grammar_tables(vocab: DecoderVocab, operators: Sequence[str] | None = None) -> GrammarTables:
    """The numpy tables of the prefix grammar over `vocab`; `operators`: the operators that may be generated."""
    kind = np.asarray(vocab.kind, np.int32)
    is_op = (kind == KIND_BINARY) | (kind == KIND_UNARY)
    usable = kind != KIND_PAD
    if operators is not None:
        unknown = [o for o in operators if o not in vocab.operators]
        if unknown:
            raise ValueError(f"operator {unknown[0]!r} is not in the decoder vocabulary; it has "
                             f"{', '.join(vocab.operators)}")
        usable &= ~is_op | np.array([w in set(operators) for w in vocab.id2word])
    in_float = (kind == KIND_MANTISSA) | (kind == KIND_EXPONENT)
    i32 = lambda x: np.asarray(x, np.int32)
    return GrammarTables(
        float_pos_V=i32(np.select([kind == KIND_MANTISSA, kind == KIND_EXPONENT],
                                  [FLOAT_AFTER_SIGN, FLOAT_AFTER_MANTISSA], FLOAT_NONE)),
        # inside a constant: no condition on open; EOS: open == 0; operators, variables, signs: open > 0
        min_open_V=i32(np.where(in_float | (kind == KIND_EOS), 0, 1)),
        max_open_V=i32(np.where(kind == KIND_EOS, 0, _BIG)),
        # tokens still needed after a token = open (before it) + extra: binary (open + 1 slots, EOS), unary (open,
        # EOS), sign (open - 1 slots, mantissa, exponent, EOS), mantissa (open - 1, exponent, EOS); variable,
        # exponent (open - 1, EOS) and EOS (open is 0) need exactly open
        extra_V=i32(np.select([(kind == KIND_BINARY) | (kind == KIND_SIGN),
                               (kind == KIND_UNARY) | (kind == KIND_MANTISSA)], [2, 1], 0)),
        variable_V=i32(vocab.variable),
        usable_V=usable,
        pad_V=kind == KIND_PAD,
        # open slots after a token, relative to before (a constant's slot is filled by its exponent)
        open_delta_V=i32(np.select([kind == KIND_BINARY, kind == KIND_VARIABLE, kind == KIND_EXPONENT],
                                   [1, -1, -1], 0)),
        float_after_V=i32(np.select([kind == KIND_SIGN, kind == KIND_MANTISSA],
                                    [FLOAT_AFTER_SIGN, FLOAT_AFTER_MANTISSA], FLOAT_NONE)),
        eos_V=kind == KIND_EOS)


def prefix_grammar(vocab: DecoderVocab, max_len: int, operators: Sequence[str] | None = None, *,
                   tables: GrammarTables | None = None) -> Constraint:
    """Constraint for decoding prefix expressions of at most max_len generated tokens (EOS included).

    `operators`: the operators that may be generated (default: all of the vocabulary's). `tables`: the per-token
    tables to read, e.g. `grammar_tables(vocab, operators)` passed through a jitted function's arguments (default:
    those tables as constants of the program; `operators` is then ignored).
    """
    if not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len must be an int >= 2 (the shortest expression is a variable, then EOS), "
                         f"got {max_len!r}")
    t = grammar_tables(vocab, operators) if tables is None else tables
    if jnp.shape(t.usable_V) != (len(vocab),):
        raise ValueError(f"grammar tables have {jnp.shape(t.usable_V)} entries; the vocabulary has {len(vocab)} ids")
    row = lambda x: jnp.asarray(x)[None, :]                       # [1, V]

    def allowed(s: GrammarState):
        open_ = s.open_B[:, None]
        ok = (row(t.usable_V) & (s.float_pos_B[:, None] == row(t.float_pos_V))
              & (open_ >= row(t.min_open_V)) & (open_ <= row(t.max_open_V))
              & (open_ + row(t.extra_V) <= max_len - 1 - s.length_B[:, None])
              & (row(t.variable_V) < s.n_vars_B[:, None]))
        return jnp.where(s.done_B[:, None], row(t.pad_V), ok)

    def advance(s: GrammarState, token_B):
        live = ~s.done_B
        return GrammarState(open_B=jnp.where(live, s.open_B + jnp.asarray(t.open_delta_V)[token_B], s.open_B),
                            float_pos_B=jnp.where(live, jnp.asarray(t.float_after_V)[token_B], s.float_pos_B),
                            length_B=s.length_B + live.astype(jnp.int32),
                            n_vars_B=s.n_vars_B,
                            done_B=s.done_B | jnp.asarray(t.eos_V)[token_B])

    return Constraint(allowed=allowed, advance=advance)
