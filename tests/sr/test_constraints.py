"""The prefix grammar: every decoder's output parses, and every generator target passes token by token."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from core_jax.decode import beam_search, greedy, sample
from sr_jax import generator
from sr_jax.constraints import (FLOAT_AFTER_MANTISSA, FLOAT_AFTER_SIGN, FLOAT_NONE, GrammarState, grammar_tables,
                                initial_state, prefix_grammar)
from sr_jax.vocab import (EOS, KIND_BINARY, KIND_EOS, KIND_EXPONENT, KIND_MANTISSA, KIND_PAD, KIND_SIGN, KIND_UNARY,
                          KIND_VARIABLE, PAD, DecoderVocab)

VOCAB = DecoderVocab()
V = len(VOCAB)
KIND = np.asarray(VOCAB.kind)


class StepCache(NamedTuple):
    steps_B: jnp.ndarray


def bigram_table(seed, binary_bias):
    """Random bigram logits; binary operators get a bias so that expressions grow into the length budget."""
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(V, V)).astype(np.float32) * 3.0
    table[:, KIND == KIND_BINARY] += binary_bias
    return table


def bigram_model(table):
    def tokens_to_logits(tokens_Bx1, cache: StepCache):
        return table[tokens_Bx1[:, 0]], StepCache(cache.steps_B + 1)
    return tokens_to_logits


@functools.partial(jax.jit, static_argnames=("decoder", "max_len", "temperature"))
def decode(table, n_vars_B, rng, *, decoder, max_len, temperature=1.0):
    """Generated ids [B, hypotheses, max_len], lengths [B, hypotheses], finished flags."""
    B = n_vars_B.shape[0]
    grammar = prefix_grammar(VOCAB, max_len)
    args = (bigram_model(table), StepCache(jnp.zeros((B,), jnp.int32)), jnp.full((B,), EOS, jnp.int32))
    kw = dict(max_len=max_len, eos_id=EOS, pad_id=PAD, constraint=grammar, constraint_state=initial_state(n_vars_B))
    if decoder == "beam":
        out = beam_search(*args, beam_size=3, **kw)
        return out.tokens_BxKxT, out.length_BxK, out.finished_BxK
    if decoder == "greedy":
        out = greedy(*args, **kw)
    else:
        out = sample(*args, rng, temperature=temperature, **kw)
    return out.tokens_BxT[:, None], out.length_B[:, None], jnp.ones((B, 1), bool)


def check_hypothesis(ids_T, length, n_vars, max_len):
    ids = np.asarray(ids_T)
    n = int(length)
    assert 2 <= n <= max_len
    assert ids[n - 1] == EOS and (ids[:n - 1] != EOS).all() and (ids[n:] == PAD).all()
    expr = VOCAB.decode_expression(ids)            # raises if not exactly one complete expression
    assert len(VOCAB.encode_expression(expr)) == n - 1
    used = VOCAB.variable[ids[:n - 1]]
    assert (used < n_vars).all()


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), n_vars=st.lists(st.integers(1, 10), min_size=4, max_size=4),
       max_len=st.sampled_from([11, 40]), binary_bias=st.sampled_from([0.0, 4.0]))  # few lengths: few compiles
def test_every_decoder_output_parses(seed, n_vars, max_len, binary_bias):
    n_vars = np.array(n_vars, np.int32)
    table = bigram_table(seed, binary_bias)
    for decoder, temperature in [("greedy", 1.0), ("sample", 1.0), ("sample", 3.0), ("beam", 1.0)]:
        tokens, lengths, finished = decode(table, n_vars, jax.random.PRNGKey(seed), decoder=decoder,
                                           max_len=max_len, temperature=temperature)
        assert np.asarray(finished).all()
        for b in range(len(n_vars)):
            for k in range(tokens.shape[1]):
                check_hypothesis(tokens[b, k], lengths[b, k], n_vars[b], max_len)


def test_the_length_budget_binds():
    """With binary operators strongly preferred, greedy grows the expression until the budget forces leaves (a
    binary operator fits while open + 2 tokens remain after it), and still ends with EOS."""
    table = bigram_table(0, 50.0)
    tokens, lengths, _ = decode(table, np.array([1, 4], np.int32), jax.random.PRNGKey(0), decoder="greedy",
                                max_len=11)
    assert (np.asarray(lengths) >= 9).all()
    for b, n in enumerate([1, 4]):
        check_hypothesis(tokens[b, 0], lengths[b, 0], n, 11)


TF_LEN = 256   # teacher forcing: padded sequence length and the grammar's max_len


@functools.partial(jax.jit, static_argnames=("operators",))
def accepted(ids_BxL, n_vars_B, start_B, operators=None):
    """bool [B, L]: each token allowed after the ones before it; rows start with start_B tokens already spent."""
    grammar = prefix_grammar(VOCAB, TF_LEN, operators)
    state = initial_state(n_vars_B)._replace(length_B=start_B)

    def step(s, tok_B):
        ok = jnp.take_along_axis(grammar.allowed(s), tok_B[:, None], axis=1)[:, 0]
        return grammar.advance(s, tok_B), ok

    _, ok_LxB = jax.lax.scan(step, state, ids_BxL.T)
    return ok_LxB.T


def teacher_force(ids, n_vars, max_len, operators=None):
    """Index of the first token of ids + [EOS] (+ PAD to the end) the grammar refuses; None: all accepted.

    The budget max_len is applied by starting the row with TF_LEN - max_len tokens already spent."""
    row = np.full((1, TF_LEN), PAD, np.int32)
    row[0, :len(ids) + 1] = list(ids) + [EOS]
    ok = np.asarray(accepted(row, np.array([n_vars], np.int32), np.array([TF_LEN - max_len], np.int32),
                             None if operators is None else tuple(operators)))[0]
    return None if ok.all() else int(np.argmin(ok))


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_generator_targets_are_accepted_token_by_token(seed):
    s = generator.sample(seed)
    ids = VOCAB.encode_expression(s.expression)
    assert len(ids) < TF_LEN
    n_vars = s.x_NxD.shape[1]
    assert teacher_force(ids, n_vars, max_len=len(ids) + 1) is None      # the tightest budget that fits
    assert teacher_force(ids, n_vars, max_len=len(ids)) is not None      # one token less does not
    used = int(VOCAB.variable[ids].max())
    if used >= 1:
        assert teacher_force(ids, used, max_len=len(ids) + 1) is not None   # x_used needs n_vars > used


def test_operator_subset():
    expr_ids = [VOCAB.word2id[w] for w in ["add", "sin", "x_0", "x_1"]]
    assert teacher_force(expr_ids, 2, 10, operators=["add", "sin"]) is None
    assert teacher_force(expr_ids, 2, 10, operators=["add", "cos"]) == 1
    grammar = prefix_grammar(VOCAB, 10, operators=["mul"])
    allowed = np.asarray(grammar.allowed(initial_state(np.array([3])))[0])
    ops = (KIND == KIND_BINARY) | (KIND == KIND_UNARY)
    assert [VOCAB.id2word[i] for i in np.where(allowed & ops)[0]] == ["mul"]
    assert allowed[KIND == KIND_VARIABLE].sum() == 3


def test_float_triples_and_eos_rules():
    g = prefix_grammar(VOCAB, 20)
    state = initial_state(np.array([2]))
    words = lambda s: {VOCAB.id2word[i] for i in np.where(np.asarray(g.allowed(s)[0]))[0]}
    assert "<EOS>" not in words(state) and "<PAD>" not in words(state)
    state = g.advance(state, jnp.array([VOCAB.word2id["-"]]))
    assert all(w.startswith("N") for w in words(state))
    state = g.advance(state, jnp.array([VOCAB.word2id["N1230"]]))
    assert words(state) == {f"E{k}" for k in range(-6, -1)}
    state = g.advance(state, jnp.array([VOCAB.word2id["E-3"]]))
    assert words(state) == {"<EOS>"} and isinstance(state, GrammarState)
    state = g.advance(state, jnp.array([EOS]))
    assert words(state) == {"<PAD>"} and bool(state.done_B[0])
    state = g.advance(state, jnp.array([PAD]))
    assert words(state) == {"<PAD>"} and int(state.length_B[0]) == 4


def rules_by_kind(open_, fpos, length, n_vars, done, max_len, token, usable=True):
    """The grammar's rules written per token kind, for one row and one token (the module docstring's list)."""
    kind, var = KIND[token], VOCAB.variable[token]
    if done:
        return kind == KIND_PAD
    if kind == KIND_PAD or not usable:
        return False
    extra = {KIND_BINARY: 2, KIND_SIGN: 2, KIND_UNARY: 1, KIND_MANTISSA: 1}.get(kind, 0)
    if open_ + extra > max_len - length - 1:
        return False
    if kind == KIND_MANTISSA:
        return fpos == FLOAT_AFTER_SIGN
    if kind == KIND_EXPONENT:
        return fpos == FLOAT_AFTER_MANTISSA
    if fpos != FLOAT_NONE:
        return False
    if kind == KIND_EOS:
        return open_ == 0
    return open_ > 0 and (kind != KIND_VARIABLE or var < n_vars)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_mask_equals_the_rules_by_kind_and_tables_may_be_arguments(seed):
    """The table-driven mask equals the per-kind rules on random states; tables traced as jit arguments give
    the same mask and the same next state as tables baked in as constants."""
    rng = np.random.default_rng(seed)
    B, max_len = 16, 12
    state = GrammarState(open_B=jnp.asarray(rng.integers(0, 8, B), jnp.int32),
                         float_pos_B=jnp.asarray(rng.integers(0, 3, B), jnp.int32),
                         length_B=jnp.asarray(rng.integers(0, max_len, B), jnp.int32),
                         n_vars_B=jnp.asarray(rng.integers(1, 11, B), jnp.int32),
                         done_B=jnp.asarray(rng.random(B) < 0.2))
    ops = ("add", "mul", "sin", "exp") if seed % 2 else None
    baked = prefix_grammar(VOCAB, max_len, ops)
    mask = np.asarray(baked.allowed(state))
    usable = np.array([ops is None or KIND[i] not in (KIND_BINARY, KIND_UNARY) or VOCAB.id2word[i] in ops
                       for i in range(V)])
    st_np = [np.asarray(x) for x in state]
    for b in range(B):
        want = [rules_by_kind(*(x[b] for x in st_np), max_len, i, usable[i]) for i in range(V)]
        np.testing.assert_array_equal(mask[b], want)
    tokens = jnp.asarray(rng.integers(0, V, B), jnp.int32)

    @jax.jit
    def traced(tables, state, tokens):
        g = prefix_grammar(VOCAB, max_len, tables=tables)
        return g.allowed(state), g.advance(state, tokens)

    got_mask, got_next = traced(grammar_tables(VOCAB, ops), state, tokens)
    np.testing.assert_array_equal(got_mask, mask)
    for a, b in zip(got_next, baked.advance(state, tokens)):
        np.testing.assert_array_equal(a, b)


def test_argument_errors():
    with pytest.raises(ValueError, match="max_len"):
        prefix_grammar(VOCAB, 1)
    with pytest.raises(ValueError, match="not in the decoder vocabulary"):
        prefix_grammar(VOCAB, 10, operators=["add", "sinh"])
    with pytest.raises(ValueError, match="at least one variable"):
        initial_state(np.array([2, 0]))
    with pytest.raises(ValueError, match="entries; the vocabulary has"):
        prefix_grammar(VOCAB, 10, tables=grammar_tables(DecoderVocab(max_exponent=-3)))
