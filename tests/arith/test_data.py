"""Data formats, sampling, masks and the user-facing parser (spec sections 1, 6 and 8)."""

import collections
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arith_jax.data import (
    DataConfig, answer_length, encode_sample, format_answer, format_problem, format_sort_problem,
    length_cells, loss_positions, make_batch, make_eval_cell, parse_problem, sample_problems,
)
from arith_jax.tokenizer import EOS, PAD, SORT_VOCAB_LABELS, Tokenizer


def decode_rows(cfg, batch):
    """Each row as (prompt text, answer text), read back from the tokens."""
    tok = cfg.tokenizer
    out = []
    for row in batch["tokens"]:
        text = tok.decode(row)
        prompt, answer = text.split("=")
        out.append((prompt + "=", answer))
    return out


def operands(prompt):
    """Reversed operand strings of an add/mul prompt -> ordinary ints as strings."""
    a, b = re.fullmatch(r"(\d+)[+x](\d+)=", prompt).groups()
    return a[::-1], b[::-1]


def sort_entries(prompt):
    return [(e[0], e[2:][::-1]) for e in prompt[:-1].split(",")]


# --- golden examples --------------------------------------------------------------------------


def test_golden_addition():
    prompt, answer = format_problem("add", 123, 4567)
    assert (prompt, answer) == ("321+7654=", "0964")
    tokens, mask = encode_sample("add", prompt, answer, 16)
    assert tokens.tolist() == [7, 6, 5, 14, 11, 10, 9, 8, 17, 4, 13, 10, 8, EOS, PAD, PAD]
    assert mask.tolist() == [0] * 9 + [1] * 5 + [0] * 2
    assert tokens.dtype == np.int32 and mask.dtype == np.float32


def test_golden_multiplication():
    prompt, answer = format_problem("mul", 12, 34)  # 408
    assert (prompt, answer) == ("21x43=", "804")
    tokens, mask = encode_sample("mul", prompt, answer, 11)
    assert tokens.tolist() == [6, 5, 16, 8, 7, 17, 12, 4, 8, EOS, PAD]
    assert mask.tolist() == [0] * 6 + [1] * 4 + [0]


def test_golden_sort_with_a_stable_tie():
    prompt, answer = format_sort_problem(["A", "B", "C"], [12, 5, 12])
    assert (prompt, answer) == ("A:21,B:5,C:21=", "B,A,C")
    tokens, mask = encode_sample("sort", prompt, answer, 21)
    expected = [19, 16, 6, 5, 15, 20, 16, 9, 15, 21, 16, 6, 5, 17, 20, 15, 19, 15, 21, EOS, PAD]
    assert tokens.tolist() == expected
    assert mask.tolist() == [0] * 14 + [1] * 6 + [0]


def test_sample_too_long_for_seq_len_raises():
    with pytest.raises(ValueError, match="does not fit"):
        encode_sample("add", "1+1=", "2", 4)


@pytest.mark.parametrize("cfg, expected", [
    (DataConfig("add", max_len=20), 64),
    (DataConfig("mul", max_len=15), 63),
    (DataConfig("sort", max_len=10, max_count=10), 150),
])
def test_paper_sequence_lengths(cfg, expected):
    assert cfg.seq_len == expected


@pytest.mark.parametrize("task", ["add", "mul", "sort"])
def test_seq_len_is_the_longest_possible_sample(task):
    n, m = 7, 5
    cfg = DataConfig(task, max_len=n, max_count=m)
    if task == "sort":
        labels = SORT_VOCAB_LABELS[:m]
        prompt, answer = format_sort_problem(labels, [10 ** n - 1] * m)
    else:
        prompt, answer = format_problem(task, 10 ** n - 1, 10 ** n - 1)
    assert len(prompt) + len(answer) + 1 == cfg.seq_len


# --- batches ----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["add", "mul", "sort"])
def test_batch_layout_and_mask(task):
    cfg = DataConfig(task, max_len=6, max_count=5, batch_size=32, seed=3)
    batch = make_batch(cfg, step=7)
    tokens, mask = batch["tokens"], batch["mask"]
    assert tokens.shape == mask.shape == (32, cfg.seq_len)
    assert tokens.dtype == np.int32 and mask.dtype == np.float32
    for row, m in zip(tokens, mask):
        assert (row == cfg.tokenizer.eq_id).sum() == 1
        eq = int(np.argmax(row == cfg.tokenizer.eq_id))
        eos = int(np.argmax(row == EOS))
        assert (row == EOS).sum() == 1 and eos > eq + 1
        assert np.flatnonzero(m).tolist() == list(range(eq + 1, eos + 1))
        assert (row[eos + 1:] == PAD).all() and (row[:eos] != PAD).all()
        assert set(np.unique(m)) <= {0.0, 1.0}


@pytest.mark.parametrize("task", ["add", "mul", "sort"])
def test_batches_are_deterministic_in_seed_and_step(task):
    cfg = DataConfig(task, max_len=8, batch_size=16, seed=11)
    a, b = make_batch(cfg, 5), make_batch(cfg, 5)
    assert all(np.array_equal(a[k], b[k]) for k in ("tokens", "mask"))
    assert not np.array_equal(a["tokens"], make_batch(cfg, 6)["tokens"])
    other_seed = DataConfig(task, max_len=8, batch_size=16, seed=12)
    assert not np.array_equal(a["tokens"], make_batch(other_seed, 5)["tokens"])


@pytest.mark.parametrize("task", ["add", "mul"])
def test_bucket_cycle_is_exactly_balanced(task):
    cfg = DataConfig(task, min_len=2, max_len=5, batch_size=7, sampling="cycle")  # 16 pairs, not a multiple of 7
    cells = length_cells(cfg)
    assert cells[:5] == [(2, 2), (2, 3), (2, 4), (2, 5), (3, 2)]
    counts = collections.Counter()
    for step in range(2 * len(cells)):  # two full cycles of 7 * 16 samples each
        for r, (prompt, _) in enumerate(decode_rows(cfg, make_batch(cfg, step))):
            a, b = operands(prompt)
            assert a[0] != "0" and b[0] != "0"  # exact lengths: leading digit nonzero
            assert (len(a), len(b)) == cells[(step * cfg.batch_size + r) % len(cells)]
            counts[len(a), len(b)] += 1
    assert set(counts) == set(cells) and set(counts.values()) == {14}


def test_sort_cells_are_balanced_and_digit_counts_bounded():
    cfg = DataConfig("sort", min_len=1, max_len=3, max_count=4, batch_size=5, sampling="cycle")
    cells = length_cells(cfg)
    assert len(cells) == 12 and cells[0] == (1, 1) and cells[-1] == (3, 4)
    counts = collections.Counter()
    for step in range(len(cells)):
        for r, (prompt, _) in enumerate(sample_problems(cfg, step)):
            max_digits, count = cells[(step * cfg.batch_size + r) % len(cells)]
            entries = sort_entries(prompt)
            assert len(entries) == count
            assert all(1 <= len(n) <= max_digits and n[0] != "0" for _, n in entries)
            counts[max_digits, count] += 1
    assert set(counts.values()) == {5}


@settings(max_examples=25, deadline=None)
@given(task=st.sampled_from(["add", "mul"]), seed=st.integers(0, 2**31), step=st.integers(0, 10**6))
def test_arithmetic_answers_are_correct(task, seed, step):
    cfg = DataConfig(task, max_len=12, batch_size=16, seed=seed)
    for prompt, answer in decode_rows(cfg, make_batch(cfg, step)):
        a, b = map(int, operands(prompt))
        assert answer[::-1] == str(a + b if task == "add" else a * b)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), step=st.integers(0, 10**6))
def test_sort_answers_are_correct(seed, step):
    cfg = DataConfig("sort", max_len=4, max_count=12, batch_size=16, seed=seed)
    for prompt, answer in decode_rows(cfg, make_batch(cfg, step)):
        entries = sort_entries(prompt)
        labels = [lab for lab, _ in entries]
        assert len(set(labels)) == len(labels) and set(labels) <= set(SORT_VOCAB_LABELS)
        start = SORT_VOCAB_LABELS.index(labels[0])  # a cyclic window of the 99 labels
        assert labels == [SORT_VOCAB_LABELS[(start + k) % 99] for k in range(len(labels))]
        expected = [lab for lab, _ in sorted(entries, key=lambda e: int(e[1]))]
        assert answer.split(",") == expected


def test_long_operands_do_not_overflow():
    cfg = DataConfig("mul", min_len=60, max_len=61, batch_size=4)
    for prompt, answer in decode_rows(cfg, make_batch(cfg, 0)):
        a, b = map(int, operands(prompt))
        assert answer[::-1] == str(a * b) and len(answer) >= 119


@pytest.mark.parametrize("kwargs", [
    dict(task="div"), dict(min_len=0), dict(min_len=5, max_len=4), dict(task="sort", max_count=100),
    dict(batch_size=0),
])
def test_bad_configs_raise(kwargs):
    with pytest.raises(ValueError):
        DataConfig(**kwargs)


# --- evaluation cells -------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["add", "mul"])
def test_eval_cell(task):
    prompts, answers = make_eval_cell(task, 7, 3, n=20, seed=42)
    tok = Tokenizer.for_task(task)
    assert prompts.shape == (20, 7 + 1 + 3 + 1) and prompts.dtype == np.int32
    assert (prompts[:, -1] == tok.eq_id).all()
    for row, answer in zip(prompts, answers):
        a, b = map(int, operands(tok.decode(row)))
        assert (len(str(a)), len(str(b))) == (7, 3)
        assert answer[::-1] == str(a + b if task == "add" else a * b)
        assert len(answer) + 1 <= answer_length(task, 7, 3)
    again, _ = make_eval_cell(task, 7, 3, n=20, seed=42)
    assert np.array_equal(prompts, again)
    assert not np.array_equal(prompts, make_eval_cell(task, 7, 3, n=20, seed=43)[0])


def test_eval_cell_sort_is_left_padded():
    prompts, answers = make_eval_cell("sort", 5, 6, n=30, seed=0)
    tok = Tokenizer.for_task("sort")
    assert (prompts[:, -1] == tok.eq_id).all()
    for row, answer in zip(prompts, answers):
        prompt = row[row != PAD]
        assert (row[: len(row) - len(prompt)] == PAD).all()
        entries = sort_entries(tok.decode(prompt))
        assert len(entries) == 6 and all(len(n) <= 5 for _, n in entries)
        assert answer.split(",") == [lab for lab, _ in sorted(entries, key=lambda e: int(e[1]))]
        assert len(answer) + 1 == answer_length("sort", 5, 6)


def test_answer_length_is_tight():
    assert answer_length("add", 3, 5) == len(format_problem("add", 999, 99999)[1]) + 1
    assert answer_length("mul", 3, 5) == len(format_problem("mul", 999, 99999)[1]) + 1
    assert answer_length("sort", 9, 4) == len("A,B,C,D") + 1


# --- user-facing parsing ----------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("123+456", ("add", "321+654=")),
    ("12*34", ("mul", "21x43=")),
    ("12x34", ("mul", "21x43=")),
    ("  12 + 0034\n", ("add", "21+43=")),
    ("0+0", ("add", "0+0=")),
])
def test_parse_problem(text, expected):
    assert parse_problem(text) == expected


@pytest.mark.parametrize("text, kwargs, message", [
    ("", {}, "empty problem"),
    ("   ", {}, "empty problem"),
    ("12a+3", {}, "invalid character 'a'"),
    ("12-3", {}, "unsupported operator '-'"),
    ("12/3", {}, "unsupported operator '/'"),
    ("123", {}, "missing operator"),
    ("1+2+3", {}, "exactly one operator"),
    ("+3", {}, "missing operand"),
    ("1 2+3", {}, "space inside operand"),
    ("123456+1", {"max_operand_len": 5}, "limit is 5 digits"),
])
def test_parse_problem_errors(text, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        parse_problem(text, **kwargs)
    assert "\n" not in str(err.value)


def test_format_answer():
    assert format_answer("add", "975") == "579"
    for bad in ("", "9a", "9,1"):
        with pytest.raises(ValueError, match="not a number"):
            format_answer("mul", bad)
    with pytest.raises(ValueError):
        format_answer("sort", "A,B")


@settings(max_examples=50, deadline=None)
@given(a=st.integers(0, 10**30), b=st.integers(0, 10**30), op=st.sampled_from(["+", "*", "x"]))
def test_parse_then_format_round_trip(a, b, op):
    task, prompt = parse_problem(f"{a}{op}{b}", max_operand_len=31)
    expected_prompt, answer = format_problem(task, a, b)
    assert prompt == expected_prompt
    assert format_answer(task, answer) == str(a + b if op == "+" else a * b)


@pytest.mark.parametrize("task", ["add", "mul"])
@pytest.mark.parametrize("sampling", ["iid", "cycle"])
def test_batch_sampler_rows_are_the_rows_samplers_encoding_of_correct_problems(task, sampling):
    """sampler "batch": every row is exactly what `encode_sample` makes of a correct problem (operands of the
    configured digit counts, no leading zero, the true sum or product), and the batch is a pure function of
    (seed, step)."""
    cfg = DataConfig(task, min_len=2, max_len=6, batch_size=200, seed=3, sampling=sampling, sampler="batch")
    tok = Tokenizer.for_task(task)
    op = {"add": "+", "mul": "x"}[task]
    batch = make_batch(cfg, 5)
    lengths = set()
    for tokens, mask in zip(batch["tokens"], batch["mask"]):
        prompt, _ = tok.decode(tokens).split("=")
        a, b = prompt.split(op)
        assert a[-1] != "0" and b[-1] != "0" and 2 <= len(a) <= 6 and 2 <= len(b) <= 6
        lengths.add((len(a), len(b)))
        want_tokens, want_mask = encode_sample(task, *format_problem(task, a[::-1], b[::-1]), cfg.seq_len)
        np.testing.assert_array_equal(tokens, want_tokens)
        np.testing.assert_array_equal(mask, want_mask)
    assert len(lengths) > 10   # many cells in one batch
    np.testing.assert_array_equal(batch["loss_pos"], loss_positions(batch["mask"], cfg.answer_len))
    again = make_batch(cfg, 5)
    assert all(np.array_equal(batch[k], again[k]) for k in batch)
    assert not np.array_equal(batch["tokens"], make_batch(cfg, 6)["tokens"])


def test_batch_sampler_is_for_add_and_mul():
    with pytest.raises(ValueError, match="sort takes sampler 'rows'"):
        DataConfig("sort", sampler="batch")
    with pytest.raises(ValueError, match="unknown data.sampler"):
        DataConfig("add", sampler="fast")
