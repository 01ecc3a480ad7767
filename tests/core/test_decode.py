"""core_jax.decode against step-by-step numpy references and brute-force enumeration.

The fake model is a random trigram table read through a cache that stores the tokens fed so far: the logits
for the next token depend on the last two inputs, so beam search only matches the reference if it gathers the
cache rows by beam. The cache also carries a per-row step counter and a shared scalar write index (ndim 0,
which tiling and gathering must leave alone).
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from core_jax.decode import BeamOutput, Constraint, DecodeOutput, _assign_rows, beam_search, greedy, sample, tile_beams

PAD, EOS = 0, 1


class FakeCache(NamedTuple):
    history_BxL: jnp.ndarray   # tokens fed so far
    steps_B: jnp.ndarray       # model calls per row
    index: jnp.ndarray         # shared write index (ndim 0)


def make_table(seed, vocab, scale=2.0, eos_bias=0.0):
    """Trigram logits [prev, cur, next]; PAD is never predicted."""
    table = np.random.default_rng(seed).normal(size=(vocab, vocab, vocab)).astype(np.float32) * scale
    table[..., PAD] = -np.inf
    table[..., EOS] += eos_bias
    return table


def fake_model(table):
    table = jnp.asarray(table)

    def tokens_to_logits(tokens_Bx1, cache: FakeCache):
        hist = jax.lax.dynamic_update_slice(cache.history_BxL, tokens_Bx1, (0, cache.index))
        prev = jnp.where(cache.index > 0, jnp.take(hist, jnp.maximum(cache.index - 1, 0), axis=1), PAD)
        logits = table[prev, tokens_Bx1[:, 0]]
        return logits, FakeCache(hist, cache.steps_B + 1, cache.index + 1)

    return tokens_to_logits


def history_model(table_MxVxV):
    """Logits table[h, current token], h = sum over every token fed so far of (position + 1) * token, mod M: a
    model that reads its whole cache history (entries past the write index are garbage and must not matter)."""
    table = jnp.asarray(table_MxVxV)

    def tokens_to_logits(tokens_Bx1, cache: FakeCache):
        hist = jax.lax.dynamic_update_slice(cache.history_BxL, tokens_Bx1, (0, cache.index))
        pos = jnp.arange(hist.shape[1])
        h = jnp.sum(jnp.where(pos <= cache.index, (pos + 1) * hist, 0), axis=1) % table.shape[0]
        return table[h, tokens_Bx1[:, 0]], FakeCache(hist, cache.steps_B + 1, cache.index + 1)

    return tokens_to_logits


def ref_history_logp(table_MxVxV, bos, seq):
    fed = [bos] + list(seq)
    h = sum((i + 1) * tok for i, tok in enumerate(fed)) % table_MxVxV.shape[0]
    return np_log_softmax(table_MxVxV[h, fed[-1]])


def fresh_cache(batch, max_len):
    return FakeCache(jnp.zeros((batch, max_len + 1), jnp.int32), jnp.zeros((batch,), jnp.int32), jnp.int32(0))


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = np.max(x)
    return x - m - np.log(np.sum(np.exp(x - m)))


# ------------------------------------------------------------------ a constraint: no immediate repeats, EOS late
class NoRepeat(NamedTuple):
    last_B: jnp.ndarray
    count_B: jnp.ndarray


def no_repeat_allowed(vocab, min_len):
    def allowed(s: NoRepeat):
        ids = jnp.arange(vocab)[None, :]
        ok = ids != s.last_B[:, None]
        return ok & ((ids != EOS) | (s.count_B[:, None] >= min_len))
    return allowed


def no_repeat(vocab, min_len=2) -> Constraint:
    return Constraint(no_repeat_allowed(vocab, min_len), lambda s, tok: NoRepeat(tok, s.count_B + 1))


def np_no_repeat_mask(vocab, min_len, seq):
    ok = np.ones(vocab, bool)
    if seq:
        ok[seq[-1]] = False
    if len(seq) < min_len:
        ok[EOS] = False
    return ok


# ------------------------------------------------------------------------------------------ numpy references
def ref_logp(table, bos, seq, mask_fn=None):
    """log-probs over the vocabulary for the token after `seq` (fed: bos, then seq)."""
    fed = [bos] + list(seq)
    prev = fed[-2] if len(fed) >= 2 else PAD
    logits = np.array(table[prev, fed[-1]], np.float64)
    if mask_fn is not None:
        logits = np.where(mask_fn(list(seq)), logits, -np.inf)
    return np_log_softmax(logits)


def ref_greedy(table, bos, max_len, mask_fn=None):
    seq, total = [], 0.0
    while len(seq) < max_len and (not seq or seq[-1] != EOS):
        lp = ref_logp(table, bos, seq, mask_fn)
        tok = int(np.argmax(lp))
        seq.append(tok)
        total += lp[tok]
    return seq, total


def ref_beam(table, bos, K, max_len, length_penalty, early_stopping, mask_fn=None, never_stop=False, logp_fn=None):
    """Plain-Python beam search with the documented semantics (the original's loop over ranked extensions);
    logp_fn(bos, seq) -> next-token log-probs replaces the trigram table's."""
    score = lambda lp, n: lp / (n + 1) ** length_penalty
    logp_fn = logp_fn or (lambda b, seq: ref_logp(table, b, seq, mask_fn))
    alive, fin = [((), 0.0)], []
    for t in range(max_len):
        cands = []
        for seq, lp in alive:
            step = logp_fn(bos, seq)
            cands += [(lp + step[v], seq + (v,)) for v in range(len(step)) if np.isfinite(step[v])]
        cands.sort(key=lambda c: -c[0])
        alive = []
        for lp, seq in cands[:2 * K]:   # ranked; EOS ones count only until K alive ones are collected
            if len(alive) == K:
                break
            if seq[-1] == EOS:
                fin.append((score(lp, len(seq)), seq, lp))
            else:
                alive.append((seq, lp))
        fin = sorted(fin, key=lambda f: -f[0])[:K]
        if never_stop:
            continue
        if not alive:
            break
        if len(fin) == K:
            if early_stopping:
                break
            best_len = max_len if length_penalty > 0 else t + 2
            bound = score(alive[0][1], best_len) if t + 1 < max_len else -np.inf
            if fin[-1][0] >= bound:
                break
    out = [(s, seq, lp, True) for s, seq, lp in fin]
    out += [(score(lp, len(seq)), seq, lp, False) for seq, lp in alive][:K - len(out)]
    return out


def brute_force(table, bos, max_len, length_penalty):
    """Every sequence that ends with EOS within max_len, best score first: [(score, seq, log_prob)]."""
    vocab = table.shape[0]
    out = []
    for n in range(max_len):
        for body in itertools.product(range(2, vocab), repeat=n):
            seq = body + (EOS,)
            lp = sum(ref_logp(table, bos, seq[:i])[seq[i]] for i in range(len(seq)))
            out.append((lp / (len(seq) + 1) ** length_penalty, seq, lp))
    return sorted(out, key=lambda o: -o[0])


def row_tokens(tokens_T, length):
    return [int(x) for x in np.asarray(tokens_T)[:int(length)]]


# ------------------------------------------------------------------------------------------------ jitted runs
@functools.partial(jax.jit, static_argnames=("max_len", "constrained", "min_len"))
def run_greedy(table, bos_B, *, max_len, constrained=False, min_len=2):
    B, V = bos_B.shape[0], table.shape[0]
    kw = {}
    if constrained:
        kw = dict(constraint=no_repeat(V, min_len),
                  constraint_state=NoRepeat(jnp.full((B,), -1, jnp.int32), jnp.zeros((B,), jnp.int32)))
    return greedy(fake_model(table), fresh_cache(B, max_len), bos_B, max_len=max_len, eos_id=EOS, pad_id=PAD, **kw)


@functools.partial(jax.jit, static_argnames=("max_len", "temperature"))
def run_sample(table, bos_B, rng, *, max_len, temperature):
    B = bos_B.shape[0]
    return sample(fake_model(table), fresh_cache(B, max_len), bos_B, rng, temperature=temperature,
                  max_len=max_len, eos_id=EOS, pad_id=PAD)


@functools.partial(jax.jit, static_argnames=("beam_size", "max_len", "early_stopping", "constrained", "min_len",
                                             "prefix_axis", "copy_chunk", "history"))
def run_beam(table, bos_B, *, beam_size, max_len, length_penalty, early_stopping, constrained=False, min_len=2,
             prefix_axis=1, copy_chunk=32, history=False):
    B, V = bos_B.shape[0], table.shape[-1]
    kw = {}
    if constrained:
        kw = dict(constraint=no_repeat(V, min_len),
                  constraint_state=NoRepeat(jnp.full((B,), -1, jnp.int32), jnp.zeros((B,), jnp.int32)))
    model = history_model(table) if history else fake_model(table)
    return beam_search(model, fresh_cache(B, max_len), bos_B, beam_size=beam_size, max_len=max_len,
                       eos_id=EOS, pad_id=PAD, length_penalty=length_penalty, early_stopping=early_stopping,
                       prefix_axis=prefix_axis, copy_chunk=copy_chunk, **kw)


def check_layout(tokens_T, length, eos_id=EOS):
    """EOS only as the last generated token, PAD exactly after the generated ones."""
    toks = np.asarray(tokens_T)
    n = int(length)
    assert (toks[n:] == PAD).all() and (toks[:n] != PAD).all()
    assert (toks[:max(n - 1, 0)] != eos_id).all()


# ------------------------------------------------------------------------------------------------------ greedy
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), eos_bias=st.sampled_from([0.0, 2.0]))
def test_greedy_equals_numpy_reference(seed, eos_bias):
    table = make_table(seed, 7, eos_bias=eos_bias)
    bos = np.array([1, 2, 3, 4, 5, 6], np.int32)
    out = run_greedy(table, bos, max_len=9)
    assert isinstance(out, DecodeOutput) and out.tokens_BxT.shape == (6, 9)
    for b in range(6):
        seq, lp = ref_greedy(table, int(bos[b]), 9)
        assert row_tokens(out.tokens_BxT[b], out.length_B[b]) == seq
        np.testing.assert_allclose(out.log_prob_B[b], lp, rtol=1e-5, atol=1e-5)
        check_layout(out.tokens_BxT[b], out.length_B[b])


def test_greedy_stops_when_every_row_has_finished():
    calls = []

    def counted(table):
        inner = fake_model(table)

        def f(tokens_Bx1, cache):
            jax.debug.callback(lambda: calls.append(1))
            return inner(tokens_Bx1, cache)
        return f

    table = make_table(0, 5)
    table[:, 2:, EOS] = 50.0   # EOS right after the first generated token (which is >= 2, never PAD/EOS)
    table[:, :2, EOS] = -50.0
    table[:, :2, 2] = 40.0
    out = jax.jit(lambda bos: greedy(counted(table), fresh_cache(3, 20), bos, max_len=20, eos_id=EOS,
                                     pad_id=PAD))(jnp.array([1, 1, 1], jnp.int32))
    jax.effects_barrier()
    np.testing.assert_array_equal(out.length_B, [2, 2, 2])
    assert len(calls) == 2


def test_row_without_eos_keeps_max_len_tokens():
    table = make_table(1, 5)
    table[..., EOS] = -np.inf
    out = run_greedy(table, np.array([2, 3], np.int32), max_len=6)
    np.testing.assert_array_equal(out.length_B, [6, 6])
    assert (np.asarray(out.tokens_BxT) >= 2).all()


def test_greedy_respects_constraint_and_matches_masked_reference():
    table = make_table(3, 6, eos_bias=1.0)
    bos = np.array([1, 2, 3, 4], np.int32)
    out = run_greedy(table, bos, max_len=10, constrained=True, min_len=3)
    mask = functools.partial(np_no_repeat_mask, 6, 3)
    for b in range(4):
        seq, lp = ref_greedy(table, int(bos[b]), 10, mask)
        got = row_tokens(out.tokens_BxT[b], out.length_B[b])
        assert got == seq
        np.testing.assert_allclose(out.log_prob_B[b], lp, rtol=1e-5, atol=1e-5)
        assert all(a != b_ for a, b_ in zip(got, got[1:])) and EOS not in got[:3]


def test_argument_errors():
    table = make_table(0, 5)
    cache, bos = fresh_cache(2, 4), jnp.array([1, 1], jnp.int32)
    with pytest.raises(ValueError, match="max_len"):
        greedy(fake_model(table), cache, bos, max_len=0, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="constraint_state"):
        greedy(fake_model(table), cache, bos, max_len=4, eos_id=EOS, pad_id=PAD, constraint=no_repeat(5))
    with pytest.raises(ValueError, match="temperature"):
        sample(fake_model(table), cache, bos, jax.random.PRNGKey(0), temperature=0.0, max_len=4, eos_id=EOS,
               pad_id=PAD)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(fake_model(table), cache, bos, beam_size=0, max_len=4, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="prefix_axis"):
        beam_search(fake_model(table), cache, bos, beam_size=2, max_len=4, eos_id=EOS, pad_id=PAD, prefix_axis=0)
    with pytest.raises(ValueError, match="copy_chunk"):
        beam_search(fake_model(table), cache, bos, beam_size=2, max_len=4, eos_id=EOS, pad_id=PAD, copy_chunk=0)
    with pytest.raises(ValueError, match="logits of shape"):
        greedy(lambda t, c: (jnp.zeros((2, 1, 5)), c), cache, bos, max_len=4, eos_id=EOS, pad_id=PAD)


# ----------------------------------------------------------------------------------------------------- sample
def test_sample_at_low_temperature_equals_greedy():
    table = make_table(5, 7, eos_bias=1.0)
    bos = np.arange(1, 7, dtype=np.int32)
    g = run_greedy(table, bos, max_len=8)
    s = run_sample(table, bos, jax.random.PRNGKey(3), max_len=8, temperature=1e-6)
    np.testing.assert_array_equal(s.tokens_BxT, g.tokens_BxT)
    np.testing.assert_allclose(s.log_prob_B, g.log_prob_B, rtol=1e-6)


def test_sample_frequencies_match_model_probabilities():
    table = make_table(7, 5, scale=1.0)
    n = 4000
    out = run_sample(table, np.full((n,), 2, np.int32), jax.random.PRNGKey(0), max_len=2, temperature=1.0)
    toks = np.asarray(out.tokens_BxT)
    p_first = np.exp(ref_logp(table, 2, []))
    freq = np.bincount(toks[:, 0], minlength=5) / n
    np.testing.assert_allclose(freq, p_first, atol=0.03)
    # second token, conditioned on the commonest non-EOS first token
    a = int(np.argmax(np.where(np.arange(5) >= 2, freq, 0)))
    rows = toks[toks[:, 0] == a, 1]
    np.testing.assert_allclose(np.bincount(rows, minlength=5) / len(rows), np.exp(ref_logp(table, 2, [a])),
                               atol=0.06)
    # reported log-probs are the model's, per sampled sequence
    for b in range(5):
        seq = row_tokens(out.tokens_BxT[b], out.length_B[b])
        lp = sum(ref_logp(table, 2, seq[:i])[seq[i]] for i in range(len(seq)))
        np.testing.assert_allclose(out.log_prob_B[b], lp, rtol=1e-5, atol=1e-5)


def test_sample_temperature_changes_draws_not_log_probs():
    table = make_table(8, 6, scale=1.0)
    bos = np.full((64,), 3, np.int32)
    hot = run_sample(table, bos, jax.random.PRNGKey(1), max_len=5, temperature=3.0)
    for b in range(4):
        seq = row_tokens(hot.tokens_BxT[b], hot.length_B[b])
        lp = sum(ref_logp(table, 3, seq[:i])[seq[i]] for i in range(len(seq)))
        np.testing.assert_allclose(hot.log_prob_B[b], lp, rtol=1e-5, atol=1e-5)
        check_layout(hot.tokens_BxT[b], hot.length_B[b])


# ------------------------------------------------------------------------------------------------ beam search
def test_tile_beams_repeats_rows_and_keeps_scalars():
    cache = fresh_cache(2, 3)._replace(steps_B=jnp.array([5, 7], jnp.int32))
    tiled = tile_beams(cache, 3)
    np.testing.assert_array_equal(tiled.steps_B, [5, 5, 5, 7, 7, 7])
    assert tiled.history_BxL.shape == (6, 4) and tiled.index.shape == ()


def test_beam_size_one_equals_greedy():
    table = make_table(11, 7, eos_bias=1.0)
    bos = np.arange(1, 7, dtype=np.int32)
    g = run_greedy(table, bos, max_len=8)
    b = run_beam(table, bos, beam_size=1, max_len=8, length_penalty=1.0, early_stopping=True)
    assert isinstance(b, BeamOutput) and b.tokens_BxKxT.shape == (6, 1, 8)
    np.testing.assert_array_equal(b.tokens_BxKxT[:, 0], g.tokens_BxT)
    np.testing.assert_allclose(b.log_prob_BxK[:, 0], g.log_prob_B, rtol=1e-6)
    np.testing.assert_array_equal(b.length_BxK[:, 0], g.length_B)
    np.testing.assert_array_equal(b.finished_BxK[:, 0], np.asarray(g.tokens_BxT)[np.arange(6), g.length_B - 1]
                                  == EOS)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
@pytest.mark.parametrize("early_stopping", [True, False])
def test_beam_finds_the_brute_force_best(length_penalty, early_stopping):
    # vocab PAD, EOS, two real tokens, at most 4 tokens: 15 sequences end with EOS. 17 beams outnumber the
    # extensions without EOS of every step (at most 8 x 2), so no extension is pruned and all 15 finish.
    max_len, K = 4, 17
    for seed in range(3):
        table = make_table(100 + seed, 4)
        bos = np.array([1, 2, 3], np.int32)
        out = run_beam(table, bos, beam_size=K, max_len=max_len, length_penalty=length_penalty,
                       early_stopping=early_stopping)
        for b in range(3):
            best = brute_force(table, int(bos[b]), max_len, length_penalty)
            assert len(best) == 15
            np.testing.assert_array_equal(out.finished_BxK[b], [True] * 15 + [False] * 2)
            np.testing.assert_allclose(out.scores_BxK[b, :15], [s for s, _, _ in best], rtol=1e-5)
            assert row_tokens(out.tokens_BxKxT[b, 0], out.length_BxK[b, 0]) == list(best[0][1])
            np.testing.assert_allclose(out.log_prob_BxK[b, 0], best[0][2], rtol=1e-5)


def compare_with_reference(out, table, bos, K, max_len, lp, early, mask_fn=None, never_stop=False, logp_fn=None):
    for b in range(len(bos)):
        ref = ref_beam(table, int(bos[b]), K, max_len, lp, early, mask_fn, never_stop, logp_fn)
        for k, (score, seq, logp, fin) in enumerate(ref):
            assert bool(out.finished_BxK[b, k]) == fin
            assert row_tokens(out.tokens_BxKxT[b, k], out.length_BxK[b, k]) == list(seq)
            np.testing.assert_allclose(out.scores_BxK[b, k], score, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(out.log_prob_BxK[b, k], logp, rtol=1e-5, atol=1e-6)
            check_layout(out.tokens_BxKxT[b, k], out.length_BxK[b, k])
        assert not np.isfinite(np.asarray(out.scores_BxK[b, len(ref):])).any()


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), lp=st.sampled_from([0.0, 1.0, 2.0, -0.5]), early=st.booleans())
def test_beam_equals_python_reference(seed, lp, early):
    """Non-exhaustive beams (K=3, vocab 8): same hypotheses, scores and flags as the plain-Python search."""
    table = make_table(seed, 8, eos_bias=1.5)
    bos = np.array([1, 2, 5, 7], np.int32)
    out = run_beam(table, bos, beam_size=3, max_len=7, length_penalty=lp, early_stopping=early)
    compare_with_reference(out, table, bos, 3, 7, lp, early)


@pytest.mark.parametrize("K,prefix_axis,chunk", [(9, None, 32), (5, 1, 3), (2, 1, 4)])
def test_beam_moves_whole_histories(K, prefix_axis, chunk):
    """A model that reads every token of its cache history: beams that take another beam's history (copied
    row, whole or 0..t in chunks, windows clamped at the end of an 11-entry buffer) decode as the reference."""
    bos = np.array([2, 3, 5], np.int32)
    for seed in range(2):
        rng = np.random.default_rng(seed)
        table = (rng.normal(size=(13, 6, 6)) * 2.0).astype(np.float32)
        table[..., PAD] = -np.inf
        out = run_beam(table, bos, beam_size=K, max_len=10, length_penalty=1.0, early_stopping=False,
                       prefix_axis=prefix_axis, copy_chunk=chunk, history=True)
        compare_with_reference(out, None, bos, K, 10, 1.0, False,
                               logp_fn=functools.partial(ref_history_logp, table))


@settings(max_examples=30, deadline=None)
@given(parents=st.lists(st.lists(st.integers(0, 5), min_size=6, max_size=6), min_size=1, max_size=4))
def test_assign_rows_keeps_first_children_in_place(parents):
    parent_BxK = np.array(parents, np.int32)
    row, copied = map(np.asarray, _assign_rows(jnp.asarray(parent_BxK)))
    for b in range(parent_BxK.shape[0]):
        assert sorted(row[b]) == list(range(6))                      # every row holds exactly one beam
        for k in range(6):
            first = parent_BxK[b, k] not in parent_BxK[b, :k]
            assert copied[b, k] == (not first)
            if first:
                assert row[b, k] == parent_BxK[b, k]                 # history stays where it is
            else:
                assert row[b, k] not in parent_BxK[b]               # copied into a row no beam keeps


@pytest.mark.parametrize("lp", [0.0, 1.0, -0.5])
def test_beam_without_early_stopping_equals_running_to_max_len(lp):
    table = make_table(21, 8, eos_bias=2.0)
    bos = np.array([1, 3, 6], np.int32)
    out = run_beam(table, bos, beam_size=3, max_len=9, length_penalty=lp, early_stopping=False)
    compare_with_reference(out, table, bos, 3, 9, lp, False, never_stop=True)


def test_beam_respects_constraint():
    table = make_table(31, 7, eos_bias=1.0)
    bos = np.array([1, 4, 6], np.int32)
    out = run_beam(table, bos, beam_size=4, max_len=6, length_penalty=1.0, early_stopping=True,
                   constrained=True, min_len=3)
    compare_with_reference(out, table, bos, 4, 6, 1.0, True, functools.partial(np_no_repeat_mask, 7, 3))
    for b, k in itertools.product(range(3), range(4)):
        seq = row_tokens(out.tokens_BxKxT[b, k], out.length_BxK[b, k])
        assert all(x != y for x, y in zip(seq, seq[1:])) and EOS not in seq[:3]


def test_beam_fills_unfinished_slots_with_alive_hypotheses():
    table = make_table(41, 6)
    table[..., EOS] = -np.inf      # nothing ever finishes
    out = run_beam(table, np.array([2, 3], np.int32), beam_size=3, max_len=4, length_penalty=1.0,
                   early_stopping=True)
    assert not np.asarray(out.finished_BxK).any()
    np.testing.assert_array_equal(out.length_BxK, 4)
    compare_with_reference(out, table, np.array([2, 3]), 3, 4, 1.0, True)


def test_beam_rows_are_independent_of_the_batch():
    table = make_table(51, 8, eos_bias=1.0)
    both = run_beam(table, np.array([2, 5], np.int32), beam_size=3, max_len=8, length_penalty=1.0,
                    early_stopping=True)
    alone = run_beam(table, np.array([5], np.int32), beam_size=3, max_len=8, length_penalty=1.0,
                     early_stopping=True)
    for a, b in zip(both, alone):
        np.testing.assert_array_equal(np.asarray(a)[1], np.asarray(b)[0])


def test_greedy_is_the_same_eagerly_and_under_jit():
    table = make_table(61, 6, eos_bias=1.0)
    bos = jnp.array([1, 2, 3], jnp.int32)
    eager = greedy(fake_model(table), fresh_cache(3, 6), bos, max_len=6, eos_id=EOS, pad_id=PAD)
    for a, b in zip(eager, run_greedy(table, bos, max_len=6)):
        np.testing.assert_array_equal(a, b)
