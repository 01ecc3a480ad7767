"""Token vocabularies of the E2E model: the point embedder's input ids and the (pruned) expression decoder's.

Glossary
  point tokens   each (x, y) point is 33 ids of the original's float vocabulary (spec §3.1, §4.1): 3 tokens per
                 x value (sign, mantissa, exponent), ``<INPUT_PAD>`` x 3 for each missing dimension up to
                 ``max_dim``, then 3 tokens for y.  Ids are the original's (``FloatEncoder().encoder_vocab``).
  decoder ids    the expression vocabulary, pruned to the tokens that can occur in a target (spec §3.3: the
                 original's 10 292 rows hold ~940 that ever occur).  Ids do not match the original's (its weights
                 cannot be loaded here anyway).  Layout: ``<PAD>`` 0, ``<EOS>`` 1 (also BOS), then operators,
                 variables, the two signs, mantissas, exponents.
  kinds          every decoder id has a kind (``KIND_*``) and, for variables, an index: the grammar of prefix
                 expressions (``sr_jax.constraints``) is written against these arrays, not against strings.

Target constants: the generator's constants have ``precision`` significant digits (3), so a mantissa token's last
digit is always 0 (N1000..N9990 in steps of 10) and exponents span a small range (E-6..E-2 by default).  A
constant outside that set cannot be a training target; ``encode_expression`` says which constant and why.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import numpy as np

from .expressions import MAX_VARIABLES, OPERATORS, Expression, variable_index
from .float_tokens import FloatEncoder

PAD, EOS = 0, 1
KIND_PAD, KIND_EOS, KIND_BINARY, KIND_UNARY, KIND_VARIABLE, KIND_SIGN, KIND_MANTISSA, KIND_EXPONENT = range(8)
TOKENS_PER_FLOAT = 3


@dataclasses.dataclass(frozen=True)
class DecoderVocab:
    """The pruned expression vocabulary.

    ``precision``: significant digits of target constants (the generator's ``float_precision``);
    ``min_exponent``/``max_exponent``: the exponent tokens kept (``E<k>``, value = mantissa * 10**k).
    """

    precision: int = 3
    min_exponent: int = -6
    max_exponent: int = -2
    operators: tuple[str, ...] = tuple(OPERATORS)
    max_variables: int = MAX_VARIABLES

    def __post_init__(self):
        bad = [o for o in self.operators if o not in OPERATORS]
        if bad:
            raise ValueError(f"unknown operator {bad[0]!r} in the decoder vocabulary; known: {', '.join(OPERATORS)}")
        if not 1 <= self.precision <= 4:
            raise ValueError(f"precision must be 1..4 significant digits, got {self.precision}")
        if self.min_exponent > self.max_exponent:
            raise ValueError("min_exponent must be <= max_exponent")

    # ----- layout ----------------------------------------------------------------------------------------------
    @property
    def float_encoder(self) -> FloatEncoder:
        return FloatEncoder(precision=3)  # 4-digit mantissa tokens, as in the original

    @functools.cached_property
    def mantissas(self) -> tuple[int, ...]:
        step = 10 ** (4 - self.precision)
        return tuple(range(1000, 10000, step))

    @functools.cached_property
    def id2word(self) -> tuple[str, ...]:
        words = ["<PAD>", "<EOS>"] + list(self.operators) + [f"x_{i}" for i in range(self.max_variables)]
        words += ["+", "-"] + [f"N{m:04d}" for m in self.mantissas]
        words += [f"E{k}" for k in range(self.min_exponent, self.max_exponent + 1)]
        return tuple(words)

    @functools.cached_property
    def word2id(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.id2word)}

    def __len__(self) -> int:
        return len(self.id2word)

    @functools.cached_property
    def kind(self) -> np.ndarray:
        """int32[V]: the KIND_* of every id."""
        out = np.empty(len(self), np.int32)
        for i, w in enumerate(self.id2word):
            if w == "<PAD>":
                out[i] = KIND_PAD
            elif w == "<EOS>":
                out[i] = KIND_EOS
            elif w in OPERATORS:
                out[i] = KIND_BINARY if OPERATORS[w].arity == 2 else KIND_UNARY
            elif variable_index(w) is not None:
                out[i] = KIND_VARIABLE
            elif w in ("+", "-"):
                out[i] = KIND_SIGN
            elif w.startswith("N"):
                out[i] = KIND_MANTISSA
            else:
                out[i] = KIND_EXPONENT
        return out

    @functools.cached_property
    def variable(self) -> np.ndarray:
        """int32[V]: the variable index of x_i ids, -1 elsewhere."""
        return np.array([variable_index(w) if variable_index(w) is not None else -1 for w in self.id2word],
                        np.int32)

    # ----- expressions <-> ids ---------------------------------------------------------------------------------
    def encode_expression(self, expr: Expression) -> np.ndarray:
        """int32 ids of ``expr`` in prefix order, constants as three tokens, without BOS/EOS.

        Raises ValueError naming the constant when it is not representable (more significant digits than
        ``precision`` or an exponent outside the kept range) or the token is not in the vocabulary.
        """
        words = self.float_encoder.encode_expression(expr)
        try:
            return np.array([self.word2id[w] for w in words], np.int32)
        except KeyError as err:
            word = err.args[0]
            consts = ", ".join(f"{c:.6g}" for c in expr.constants)
            raise ValueError(
                f"token {word!r} of expression {expr.infix()} is not in the decoder vocabulary "
                f"(constants must have {self.precision} significant digits and exponents "
                f"E{self.min_exponent}..E{self.max_exponent}; the expression's constants: {consts})") from None

    def decode_expression(self, ids) -> Expression:
        """Expression from decoder ids; a leading EOS (BOS) is skipped and parsing stops at the next EOS/PAD."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if ids and ids[0] == EOS:
            ids = ids[1:]
        end = next((k for k, i in enumerate(ids) if i in (EOS, PAD)), len(ids))
        bad = [i for i in ids[:end] if not 0 <= i < len(self)]
        if bad:
            raise ValueError(f"decoder id {bad[0]} is outside the vocabulary (0..{len(self) - 1})")
        return self.float_encoder.decode_expression([self.id2word[i] for i in ids[:end]])


# ----- point tokens ----------------------------------------------------------------------------------------------
class PointTables(NamedTuple):
    """Point-vocabulary ids (the original float vocabulary) of each kind of point token."""

    sign_ids: np.ndarray       # [2]: "+", "-"
    mantissa_ids: np.ndarray   # [10000]: N0000 .. N9999
    exponent_ids: np.ndarray   # [201]: E-100 .. E100
    input_pad: int             # <INPUT_PAD>, a dimension the dataset does not have


@functools.lru_cache(maxsize=1)
def point_tables() -> PointTables:
    vocab = FloatEncoder().encoder_vocab.word2id
    return PointTables(np.array([vocab["+"], vocab["-"]], np.int32),
                       np.array([vocab[f"N{m:04d}"] for m in range(10000)], np.int32),
                       np.array([vocab[f"E{k}"] for k in range(-100, 101)], np.int32),
                       int(vocab["<INPUT_PAD>"]))


POINT_VOCAB_SIZE = len(FloatEncoder().encoder_vocab)
POINT_PAD = FloatEncoder().encoder_vocab.word2id["<PAD>"]


def float_ids(values) -> np.ndarray:
    """int32[..., 3] point-vocabulary ids of ``values`` (finite; magnitudes beyond 1e104 saturate)."""
    values = np.asarray(values, np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("point values must be finite (NaN/inf found); drop or impute those rows first")
    neg, mant, exp = FloatEncoder(overflow="clip").to_parts(values)
    t = point_tables()
    return np.stack([t.sign_ids[np.asarray(neg, np.int64)], t.mantissa_ids[np.asarray(mant, np.int64)],
                     t.exponent_ids[np.asarray(exp, np.int64) + 100]], axis=-1).astype(np.int32)


def encode_points(x_NxD, y_N, max_dim: int = MAX_VARIABLES) -> np.ndarray:
    """int32[N, 3 * (max_dim + 1)] point tokens: x values, <INPUT_PAD> for missing dimensions, then y."""
    x = np.asarray(x_NxD, np.float64)
    y = np.asarray(y_N, np.float64).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need x of shape (N, D) and y of shape (N,), got {x.shape} and {y.shape}")
    n, d = x.shape
    if d > max_dim:
        raise ValueError(f"{d} input dimensions; the model reads at most {max_dim}")
    out = np.full((n, max_dim + 1, TOKENS_PER_FLOAT), point_tables().input_pad, np.int32)
    out[:, :d] = float_ids(x)
    out[:, max_dim] = float_ids(y)
    return out.reshape(n, -1)
