"""The original's float encoding (sign, mantissa, exponent tokens) and the encoder/decoder vocabularies.

A scalar v becomes three tokens ``[sign, "N<digits>", "E<exp>"]`` with v = sign * int(digits) * 10**exp and
``precision + 1`` significant digits, rounded exactly like ``"%.{precision}e"`` (correct decimal rounding of the
binary value, including the mantissa rounding up to 10**(precision+1)). Values whose token exponent is below
``-max_exponent`` underflow to ``sign N0000 E0``. Values too large for the exponent range, NaN and inf are never
encoded silently: ``overflow="raise"`` (default) raises a ValueError naming the offending value; ``overflow="clip"``
saturates finite values at +-N9999 E<max_exponent> (NaN/inf still raise: they carry no number to clip).

Vocabularies reproduce the original ids (spec section 3): the encoder/float vocabulary is the 15 special words
followed by the lexicographically sorted float words (10 218 tokens, <EOS>=0, <PAD>=8, "+"=15, N0000=218).
The decoder vocabulary is the original's *list with duplicates* (special words + sorted equation symbols +
float words, 10 292 rows, word->id by last occurrence: <EOS>=74, <PAD>=82, add=42, x_0=63, N0000=292), so that
ported weights line up; rows 0..14 are never produced by ``word2id``.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from .expressions import OPERATORS, Expression, variable_index

SPECIAL_WORDS = ("<EOS>", "<X>", "</X>", "<Y>", "</Y>", "</POINTS>", "<INPUT_PAD>", "<OUTPUT_PAD>", "<PAD>",
                 "(", ")", "SPECIAL", "OOD_unary_op", "OOD_binary_op", "OOD_constant")
# the original vocabulary's operator words, in its order (their ids are the original's; every one is in
# sr_jax.operators.OPERATORS, see tests/sr/test_operators.py)
_REAL_OPERATORS = ("add", "sub", "mul", "div", "abs", "inv", "sqrt", "log", "exp", "sin", "arcsin", "cos", "arccos",
                   "tan", "arctan", "pow2", "pow3")
EQUATION_SYMBOLS = tuple(
    list(_REAL_OPERATORS)
    + [str(i) for i in range(-10, 11) if i != 0]
    + ["e", "pi", "euler_gamma", "CONSTANT", "rand"]
    + [f"x_{i}" for i in range(10)]
    + ["|", "INT+", "INT-", "FLOAT+", "FLOAT-", "pow", "0"]
)
_NAMED_CONSTANTS = {"e": float(np.e), "pi": float(np.pi), "euler_gamma": 0.5772156649015329}


@dataclasses.dataclass(frozen=True)
class FloatEncoder:
    """Vectorised float <-> token encoding; ``precision`` digits after the point (the original uses 3)."""

    precision: int = 3
    max_exponent: int = 100
    overflow: str = "raise"  # "raise" or "clip"

    def __post_init__(self):
        if self.overflow not in ("raise", "clip"):
            raise ValueError(f"overflow must be 'raise' or 'clip', got {self.overflow!r}")
        if not 0 <= self.precision <= 15:
            raise ValueError(f"precision must be in 0..15, got {self.precision}")

    @property
    def n_digits(self) -> int:
        return self.precision + 1

    @property
    def max_value(self) -> float:
        """Largest encodable magnitude: N9..9 E<max_exponent>."""
        return float((10**self.n_digits - 1) * 10.0**self.max_exponent)

    # ----- numeric core ----------------------------------------------------------------------------------------
    def to_parts(self, values) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(negative mask, integer mantissa, token exponent) arrays; value == (-1)**neg * mantissa * 10**exp."""
        v = np.asarray(values, dtype=np.float64)
        bad = ~np.isfinite(v)
        if bad.any():
            i = np.flatnonzero(bad.reshape(-1))[0]
            raise ValueError(
                f"cannot encode non-finite value {v.reshape(-1)[i]!r} (flat index {i}); remove or replace NaN/inf "
                "before tokenising"
            )
        p = self.precision
        neg = np.signbit(v) & (v != 0)
        a = np.abs(v)
        nz = a > 0
        safe = np.where(nz, a, 1.0)
        e10 = np.floor(np.log10(safe)).astype(np.int64)  # printf exponent estimate (may be off by one)
        # exactness: the scaling may be off by an ulp, so a value whose scaled form is close to a rounding tie at
        # ANY exponent tried is settled by Python's printf below (9.9995 is 9.99949999... in binary: "9.999e+00",
        # although its inexactly scaled 9999.5 would round up to 10000 and move the exponent)
        near_tie = np.zeros(v.shape, dtype=bool)
        for _ in range(3):  # fix-up loop: recompute after exponent corrections
            scaled = _scale(safe, p - e10)
            near_tie |= nz & (np.abs(scaled - np.floor(scaled) - 0.5) < 1e-6)
            rounded = np.rint(scaled)  # round-half-even on the (slightly inexact) scaled value
            low = rounded < 10**p
            high = rounded >= 10 ** (p + 1)
            if not (low | high)[nz].any():
                break
            # a mantissa that rounds up to 10**(p+1): one exponent up (9.9996 -> 1.000e1)
            e10 = np.where(low & nz, e10 - 1, np.where(high & nz, e10 + 1, e10))
        mant = rounded.astype(np.int64)
        if near_tie.any():
            for idx in zip(*np.nonzero(near_tie)) if v.ndim else [()]:
                m_str, e_str = (f"%.{p}e" % float(safe[idx])).split("e")
                mant[idx] = int(m_str.replace(".", ""))
                e10[idx] = int(e_str)
        exp = e10 - p
        mant = np.where(nz, mant, 0)
        exp = np.where(nz, exp, -p)
        under = nz & (exp < -self.max_exponent)
        mant = np.where(under, 0, mant)
        exp = np.where(under, 0, exp)
        over = exp > self.max_exponent
        if over.any():
            if self.overflow == "raise":
                i = np.flatnonzero(over.reshape(-1))[0]
                raise ValueError(
                    f"value {v.reshape(-1)[i]!r} (flat index {i}) exceeds the encodable range "
                    f"|x| <= {self.max_value:.4g}"
                    f"; rescale the data or use FloatEncoder(overflow='clip') to saturate"
                )
            mant = np.where(over, 10**self.n_digits - 1, mant)
            exp = np.where(over, self.max_exponent, exp)
        return neg, mant, exp

    def from_parts(self, neg, mant, exp) -> np.ndarray:
        mant = np.asarray(mant, dtype=np.float64)
        exp = np.asarray(exp, dtype=np.int64)
        # 10.0**exp is exact for |exp| <= 22; combine as mant * 10**exp with one rounding via division when negative
        val = np.where(exp >= 0, mant * _pow10(np.maximum(exp, 0)), mant / _pow10(np.maximum(-exp, 0)))
        return np.where(np.asarray(neg, bool), -val, val)

    # ----- token level -----------------------------------------------------------------------------------------
    def encode(self, values) -> np.ndarray:
        """Array of shape values.shape + (3,) holding the sign, mantissa and exponent tokens."""
        neg, mant, exp = self.to_parts(values)
        sign = np.where(neg, "-", "+")
        mant_tok = np.char.add("N", np.char.zfill(mant.astype(str), self.n_digits))
        exp_tok = np.char.add("E", exp.astype(str))
        return np.stack([sign, mant_tok, exp_tok], axis=-1)

    def encode_flat(self, values) -> list[str]:
        """Token list for a 1-D (or any) array, row-major, 3 tokens per value."""
        return self.encode(np.asarray(values, dtype=np.float64).reshape(-1)).reshape(-1).tolist()

    def decode(self, tokens) -> np.ndarray:
        """Inverse of ``encode``: tokens of shape (..., 3) -> values (...). Malformed tokens raise ValueError."""
        t = np.asarray(tokens, dtype=str)
        if t.ndim == 0 or t.shape[-1] != 3:
            raise ValueError(f"float tokens must have a last axis of size 3 (sign, mantissa, exponent); got {t.shape}")
        sign, mant, exp = t[..., 0], t[..., 1], t[..., 2]
        bad_sign = ~np.isin(sign, ("+", "-"))
        if bad_sign.any():
            raise ValueError(f"invalid sign token {sign[bad_sign].reshape(-1)[0]!r}: expected '+' or '-'")
        digits = np.char.lstrip(mant, "N")
        ok_m = np.char.startswith(mant, "N") & (np.char.str_len(mant) == self.n_digits + 1) & np.char.isdigit(digits)
        if not ok_m.all():
            raise ValueError(
                f"invalid mantissa token {mant[~ok_m].reshape(-1)[0]!r}: expected 'N' followed by "
                f"{self.n_digits} digits"
            )
        e_body = np.char.lstrip(exp, "E")
        ok_e = (np.char.startswith(exp, "E") & np.char.isdigit(np.char.lstrip(e_body, "-"))
                & (np.char.str_len(e_body) > 0))
        ok_e &= np.char.count(e_body, "-") <= 1
        if ok_e.all():
            e_int = np.where(ok_e, e_body, "0").astype(np.int64)
            ok_e &= np.abs(e_int) <= self.max_exponent
        if not ok_e.all():
            raise ValueError(
                f"invalid exponent token {exp[~ok_e].reshape(-1)[0]!r}: expected 'E<int>' with "
                f"|int| <= {self.max_exponent}"
            )
        return self.from_parts(sign == "-", digits.astype(np.int64), e_int)

    def round(self, values) -> np.ndarray:
        """The value that survives an encode/decode round trip."""
        return self.from_parts(*self.to_parts(values))

    # ----- vocabularies ----------------------------------------------------------------------------------------
    @functools.cached_property
    def float_words(self) -> tuple[str, ...]:
        words = ["+", "-"] + [f"N{i:0{self.n_digits}d}" for i in range(10**self.n_digits)]
        words += [f"E{i}" for i in range(-self.max_exponent, self.max_exponent + 1)]
        return tuple(sorted(words))

    @functools.cached_property
    def encoder_vocab(self) -> "Vocabulary":
        """Vocabulary of the point embedder: specials + sorted float words (original ids)."""
        return Vocabulary(SPECIAL_WORDS + self.float_words)

    @functools.cached_property
    def decoder_vocab(self) -> "Vocabulary":
        """Vocabulary of the expression decoder, original layout with duplicated special rows (see module doc)."""
        return Vocabulary(SPECIAL_WORDS + tuple(sorted(EQUATION_SYMBOLS)) + SPECIAL_WORDS + self.float_words)

    # ----- expressions -----------------------------------------------------------------------------------------
    def encode_expression(self, expr: Expression) -> list[str]:
        """Prefix tokens with each constant written as its three float tokens (constants get rounded)."""
        out: list[str] = []
        consts = expr.constants
        ctoks = self.encode(consts).tolist() if len(consts) else []
        j = 0
        for t in expr.tokens:
            if isinstance(t, float):
                out.extend(ctoks[j])
                j += 1
            else:
                out.append(t)
        return out

    def decode_expression(self, tokens, stop_at_eos: bool = False) -> Expression:
        """Parse prefix tokens with float triples back into an Expression.

        Integer tokens "-10".."10", "0" and e/pi/euler_gamma become constants. Unknown or unsupported symbols,
        broken float triples and incomplete/overlong sequences raise ValueError naming the position.
        With ``stop_at_eos`` parsing ends at the first <EOS> token (leading <EOS> is skipped).
        """
        toks = list(tokens)
        if stop_at_eos:
            if toks and toks[0] == "<EOS>":
                toks = toks[1:]
            if "<EOS>" in toks:
                toks = toks[: toks.index("<EOS>")]
        out: list = []
        i = 0
        while i < len(toks):
            t = toks[i]
            if not isinstance(t, str):
                raise ValueError(f"token {t!r} at position {i} is not a string")
            if t in ("+", "-"):
                if i + 2 >= len(toks):
                    raise ValueError(f"truncated float at position {i}: sign {t!r} needs a mantissa and an exponent")
                try:
                    out.append(float(self.decode([toks[i : i + 3]])[0]))
                except ValueError as err:
                    raise ValueError(f"malformed float tokens {toks[i:i + 3]} at position {i}: {err}") from None
                i += 3
                continue
            if t in OPERATORS or variable_index(t) is not None:
                out.append(t)
            elif t in _NAMED_CONSTANTS:
                out.append(_NAMED_CONSTANTS[t])
            elif _is_small_int(t):
                out.append(float(int(t)))
            elif t.startswith("N") or t.startswith("E"):
                raise ValueError(f"float token {t!r} at position {i} is not preceded by a sign token")
            else:
                raise ValueError(f"unknown or unsupported symbol {t!r} at position {i} in expression tokens")
            i += 1
        return Expression(out)


def _is_small_int(t: str) -> bool:
    try:
        return -10 <= int(t) <= 10 and str(int(t)) == t
    except ValueError:
        return False


def _pow10(k: np.ndarray) -> np.ndarray:
    return np.power(10.0, k.astype(np.float64))


def _scale(a: np.ndarray, k: np.ndarray) -> np.ndarray:
    """a * 10**k with one rounding where 10**|k| is exact (|k| <= 22), two otherwise."""
    k = np.asarray(k, dtype=np.int64)
    with np.errstate(over="ignore", under="ignore"):
        pos = a * _pow10(np.clip(k, 0, 308))
        neg = a / _pow10(np.clip(-k, 0, 308))
        big = np.abs(k) > 300  # subnormal range: split the scaling to avoid overflow of 10**k
        split = (a * _pow10(np.clip(k // 2, -300, 300))) * _pow10(np.clip(k - k // 2, -300, 300))
    return np.where(big, split, np.where(k >= 0, pos, neg))


class Vocabulary:
    """Ordered id->word list with a word->id map (last occurrence wins, as in the original)."""

    def __init__(self, words):
        self.id2word = tuple(words)
        self.word2id = {w: i for i, w in enumerate(self.id2word)}

    def __len__(self) -> int:
        return len(self.id2word)

    def encode(self, words) -> np.ndarray:
        try:
            return np.array([self.word2id[w] for w in words], dtype=np.int32)
        except KeyError as err:
            raise ValueError(f"word {err.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> list[str]:
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise ValueError(f"token id out of range 0..{len(self) - 1}: {ids[(ids < 0) | (ids >= len(self))][0]}")
        return [self.id2word[i] for i in ids]
