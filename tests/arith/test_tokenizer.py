"""The tokenizers reproduce the original ids exactly (spec section 2)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arith_jax.tokenizer import (
    BOS, DIGIT_IDS, EOS, PAD, SORT_LABELS, SORT_VOCAB_LABELS, UNK, Tokenizer,
)


def test_special_and_digit_ids():
    assert (PAD, UNK, BOS, EOS) == (0, 1, 2, 3)
    assert DIGIT_IDS == tuple(range(4, 14))
    for task in ("add", "mul", "sort"):
        tok = Tokenizer.for_task(task)
        assert tok.encode("0123456789") == list(DIGIT_IDS)
        assert tok.eq_id == 17


def test_pad_vocabulary():
    tok = Tokenizer.for_task("add")
    assert tok is Tokenizer.for_task("add")
    assert tok.vocab_size == 19
    assert tok.encode("+-x=") == [14, 15, 16, 17]
    assert tok.encode("1 2") == [5, PAD, 6]  # a space becomes [PAD]
    assert tok.encode("321+7654=0964") == [7, 6, 5, 14, 11, 10, 9, 8, 17, 4, 13, 10, 8]
    assert Tokenizer.for_task("mul").vocab_size == 19
    assert tok.id_to_char[16] == "x" and tok.id_to_char[18] == " "


def test_sort_vocabulary():
    tok = Tokenizer.for_task("sort")
    assert tok.vocab_size == 118
    assert tok.encode("D,:=") == [14, 15, 16, 17]
    assert tok.encode("".join(SORT_VOCAB_LABELS)) == list(range(19, 118))
    assert tok.encode("ABCE") == [19, 20, 21, 22]  # 'D' is skipped, as in the original
    assert tok.id_to_char[117] == "ω"


def test_label_lists():
    assert len(SORT_LABELS) == 102 and len(set(SORT_LABELS)) == 102
    assert SORT_LABELS[:4] == ("A", "B", "C", "D") and SORT_LABELS[-1] == "ω"
    assert "x" not in SORT_LABELS and "£" in SORT_LABELS
    assert SORT_VOCAB_LABELS == tuple(c for c in SORT_LABELS if c not in "D,:")
    assert not set(SORT_VOCAB_LABELS) & set("0123456789D,:= ")


def test_unknown_characters_raise_with_the_character():
    with pytest.raises(ValueError, match="'a'"):
        Tokenizer.for_task("add").encode("12a")
    with pytest.raises(ValueError, match="'x'"):
        Tokenizer.for_task("sort").encode("A:1x")
    with pytest.raises(ValueError, match="unknown task"):
        Tokenizer.for_task("div")


def test_decode_drops_specials_and_stops_at_eos():
    tok = Tokenizer.for_task("add")
    assert tok.decode([BOS, 7, PAD, 6, 14, 5, 17, 4, EOS, 9, 9]) == "32+1=0"
    assert tok.decode([UNK, 4]) == "\ufffd0"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([19])


@pytest.mark.parametrize("task", ["add", "mul", "sort"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_round_trips(task, data):
    tok = Tokenizer.for_task(task)
    printable = tok.chars.replace(" ", "")  # a space encodes to PAD, which decode drops
    text = data.draw(st.text(alphabet=printable, max_size=40))
    assert tok.decode(tok.encode(text)) == text
    ids = data.draw(st.lists(st.integers(4, tok.vocab_size - 1).filter(lambda i: i != 18), max_size=40))
    assert tok.encode(tok.decode(ids)) == ids
