import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sr_jax.expressions import Expression
from sr_jax.float_tokens import FloatEncoder

ENC = FloatEncoder()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(min_value=-9.99e103, max_value=9.99e103, allow_nan=False, allow_infinity=False),
                min_size=1, max_size=30))
def test_round_trip_matches_printf(values):
    v = np.array(values)
    toks = ENC.encode(v)
    back = ENC.decode(toks)
    for x, b, t in zip(v, back, toks):
        ref = float("%.3e" % x)
        if abs(x) != 0 and int(("%.3e" % abs(x)).split("e")[1]) - 3 < -100:
            ref = 0.0
        assert b == pytest.approx(ref, rel=1e-12, abs=0), (x, t)
        if ref != 0:
            assert abs(b - x) <= 5e-4 * abs(x) * (1 + 1e-9)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.floats(min_value=1e-30, max_value=1e30))
def test_precision_is_configurable(p, x):
    enc = FloatEncoder(precision=p)
    assert enc.decode(enc.encode([x]))[0] == pytest.approx(float(f"%.{p}e" % x), rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(0, 999), st.integers(-95, 95), st.sampled_from([-1, 0, 1]), st.booleans())
def test_decimal_ties_round_as_printf(lead, digits, k, nudge, negative):
    """Values written with a 5 in the first dropped digit (d.ddd5 * 10**k, and the floats next to them), including
    the 9.9995 * 10**k boundary where the mantissa would round up to 10000: the tokens are printf's."""
    x = float(f"{lead}.{digits:03d}5e{k}")
    x = float(np.nextafter(x, np.inf * nudge)) if nudge else x
    x = -x if negative else x
    m_str, e_str = ("%.3e" % abs(x)).split("e")
    want = ["-" if negative else "+", "N" + m_str.replace(".", ""), f"E{int(e_str) - 3}"]
    assert ENC.encode_flat([x]) == want
    boundary = float(f"9.9995e{k}")
    assert ENC.encode_flat([boundary]) == ["+", "N" + ("%.3e" % boundary)[:5].replace(".", ""),
                                           f"E{int(('%.3e' % boundary).split('e')[1]) - 3}"]


def test_spec_examples_and_edge_cases():
    assert ENC.encode([3.14159]).tolist() == [["+", "N3142", "E-3"]]
    assert ENC.encode([-0.000123456]).tolist() == [["-", "N1235", "E-7"]]
    assert ENC.encode([0.0]).tolist() == [["+", "N0000", "E-3"]]
    assert ENC.encode([9.9996]).tolist() == [["+", "N1000", "E-2"]]  # mantissa rounds up to 10000
    assert ENC.encode_flat([9.9995]) == ["+", "N9999", "E-3"]  # 9.99949999... in binary: printf's 9.999e+00
    assert ENC.encode([1e-101]).tolist() == [["+", "N0000", "E0"]]  # underflow -> zero


def test_overflow_nan_inf():
    with pytest.raises(ValueError, match="exceeds the encodable range"):
        ENC.encode([1e104])
    assert FloatEncoder(overflow="clip").encode([-1e200]).tolist() == [["-", "N9999", "E100"]]
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="non-finite"):
            ENC.encode([1.0, bad])


def test_vocabulary_ids_match_reference():
    enc = ENC.encoder_vocab
    assert len(enc) == 10218
    assert [enc.word2id[w] for w in ["<EOS>", "<INPUT_PAD>", "<OUTPUT_PAD>", "<PAD>", "+", "-", "E-100", "E0",
                                     "E100", "N0000", "N9999"]] == [0, 6, 7, 8, 15, 16, 19, 117, 120, 218, 10217]
    dec = ENC.decoder_vocab
    assert len(dec) == 10292 and len(dec.word2id) == 10277
    assert [dec.word2id[w] for w in ["<EOS>", "<PAD>", "add", "CONSTANT", "pow2", "x_0", "|", "+", "-", "E-6", "E-2",
                                     "N0000", "N9999"]] == [74, 82, 42, 36, 56, 63, 73, 89, 90, 147, 103, 292, 10291]
    ids = dec.encode(["add", "x_0", "+", "N1000", "E-3"])
    assert dec.decode(ids) == ["add", "x_0", "+", "N1000", "E-3"]


def test_expression_token_round_trip():
    e = Expression(["add", -70.6, "mul", -0.601, "x_0"])
    toks = ENC.encode_expression(e)
    assert toks == ["add", "-", "N7060", "E-2", "mul", "-", "N6010", "E-4", "x_0"]
    assert ENC.decode_expression(toks) == e
    assert ENC.decode_expression(["<EOS>"] + toks + ["<EOS>", "<PAD>"], stop_at_eos=True) == e


@pytest.mark.parametrize("toks, msg", [
    (["add", "x_0", "+", "N12", "E-3"], "mantissa"),
    (["add", "x_0", "+", "N1200"], "truncated"),
    (["add", "x_0", "N1200", "E-3"], "not preceded by a sign"),
    (["add", "x_0", "CONSTANT"], "unsupported symbol 'CONSTANT'"),
    (["add", "x_0"], "incomplete"),
    (["x_0", "x_1"], "position 1"),
])
def test_malformed_expression_tokens(toks, msg):
    with pytest.raises(ValueError, match=msg):
        ENC.decode_expression(toks)
