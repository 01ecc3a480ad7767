"""Cached decoding equals uncached decoding; generation stops at EOS and pads after it; prompts of different
lengths padded into one batch decode exactly as alone, and a mix of lengths compiles one program per bucket."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arith_jax.data import make_eval_cell
from arith_jax.decode import compiled_programs, greedy_decode, length_bucket
from arith_jax.evaluate import solve_prompts
from arith_jax.model import ArithModel, ModelConfig, abacus_ids
from arith_jax.tokenizer import EOS, PAD


@pytest.mark.parametrize("positions,shared", [(("abacus",), True), (("abacus", "fire"), True), (("rope",), False),
                                              (("learned",), True), ((), True)])
def test_cached_equals_uncached(positions, shared):
    cfg = ModelConfig(width=32, ffn=64, heads=4, layers=1, recurrences=2, shared=shared, input_injection=True,
                      positions=positions, table_size=64)
    model = ArithModel(cfg, 19)
    params = model.init(jax.random.PRNGKey(1))
    prompts, _ = make_eval_cell("add", 5, 3, 8, seed=0)
    a = greedy_decode(model, params, prompts, 9, use_cache=True)
    b = greedy_decode(model, params, prompts, 9, use_cache=False)
    np.testing.assert_array_equal(a, b)
    # and the first token equals the argmax of a plain forward pass
    first = np.argmax(np.asarray(model.apply(params, prompts))[:, -1], -1)
    np.testing.assert_array_equal(a[:, 0], first)


def test_pad_after_eos():
    cfg = ModelConfig(width=32, ffn=64, heads=4, layers=1, recurrences=1, table_size=64)
    model = ArithModel(cfg, 19)
    params = model.init(jax.random.PRNGKey(0))
    # make EOS the likeliest token everywhere by boosting its decoder column
    params = jax.tree_util.tree_map(lambda x: x, params)
    params["head"]["decoder"]["kernel"] = params["head"]["decoder"]["kernel"].at[:, EOS].add(100.0)
    prompts, _ = make_eval_cell("add", 3, 3, 4, seed=0)
    out = greedy_decode(model, params, prompts, 6)
    assert (out[:, 0] == EOS).all() and (out[:, 1:] == PAD).all()


def test_running_past_eos_gives_the_same_ids():
    """stop_at_eos=False (benchmarks) runs every step but returns the same ids, PAD after EOS included."""
    cfg = ModelConfig(width=32, ffn=64, heads=4, layers=1, recurrences=1, positions=("abacus",), table_size=64)
    model = ArithModel(cfg, 19)
    params = model.init(jax.random.PRNGKey(2))
    params["head"]["decoder"]["kernel"] = params["head"]["decoder"]["kernel"].at[:, EOS].add(0.3)
    prompts, _ = make_eval_cell("add", 4, 2, 8, seed=1)
    for use_cache in (True, False):
        a = greedy_decode(model, params, prompts, 7, use_cache=use_cache)
        b = greedy_decode(model, params, prompts, 7, use_cache=use_cache, stop_at_eos=False)
        np.testing.assert_array_equal(a, b)
    eos_at = [list(row).index(EOS) for row in a if EOS in row]
    assert min(eos_at) < 6 < max(eos_at) + 2  # EOS early in some rows and late in others
    # a one-token prompt has no context to prefill
    np.testing.assert_array_equal(greedy_decode(model, params, prompts[:, -1:], 5),
                                  greedy_decode(model, params, prompts[:, -1:], 5, use_cache=False))


# ---------------------------------------------------------------------------------------- padded decoding
# Prompts of different lengths decoded in one padded batch must get exactly the tokens greedy decoding gives each
# prompt alone at its exact length. The reference below is the definition of greedy decoding: one plain forward
# pass over prompt + generated answer, unpadded (all rows have the same total length), whose argmax at every
# answer position must be the generated token. Parameters are drawn with unit variance so the argmax depends on
# every input, and FIRE's threshold is lowered so its normaliser max(query position, L) varies with the position.

def _spread_params(model, seed):
    """Weights and embeddings of unit variance (LayerNorms as initialised): answers that vary with every input."""
    params = model.init(jax.random.PRNGKey(seed))
    paths, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(paths))
    leaves = [jax.random.normal(k, x.shape) if str(path[-1].key) in ("kernel", "embedding") else x
              for k, (path, x) in zip(keys, paths)]
    params = jax.tree_util.tree_unflatten(tree, leaves)
    for layer in params["block"].values():
        if "fire" in layer["attn"]:
            fire = layer["attn"]["fire"]
            fire["c"] = jnp.ones_like(fire["c"])
            fire["L_multiplier"] = jnp.full_like(fire["L_multiplier"], 0.01)  # L = 5.12
    return params


def _mixed_prompts(rng, lengths):
    """Random prompts over digits, operators and '=' (so Abacus ids restart inside them)."""
    return [rng.integers(4, 18, size=n).astype(np.int32) for n in lengths]


def _assert_greedy_at_exact_length(model, params, prompts, budgets, gens, total):
    """gens[b] is the greedy continuation of prompts[b] alone: checked by one unpadded forward of each row."""
    seqs = np.stack([np.concatenate([p, g[:n]]) for p, g, n in zip(prompts, gens, budgets)])
    assert seqs.shape[1] == total
    logits = np.asarray(_forward(model)(params, jnp.asarray(seqs[:, :-1]), 0))
    checked = 0
    for b, (p, g, n) in enumerate(zip(prompts, gens, budgets)):
        for t in range(n):
            assert np.argmax(logits[b, len(p) - 1 + t]) == g[t], (b, t, g)
            checked += 1
            if g[t] == EOS:
                assert (g[t + 1:] == PAD).all()
                break
    assert checked >= len(prompts)
    assert len(set(np.concatenate(gens).tolist())) >= 3, "the model answers too uniformly to test anything"
    return logits


@functools.lru_cache(maxsize=None)
def _forward(model):
    return jax.jit(lambda params, tokens, start: model.apply(params, tokens, start=start))


@pytest.mark.parametrize("positions,looped", [
    (("abacus", "fire"), False), (("abacus", "fire"), True), (("rope",), False), (("rope",), True),
    ((), False), ((), True), (("learned", "fire"), False)],
    ids=["abacus+fire-standard", "abacus+fire-looped", "rope-standard", "rope-looped", "nope-standard",
         "nope-looped", "learned+fire-standard"])
def test_padded_decoding_equals_exact_length(positions, looped):
    cfg = ModelConfig(width=16, ffn=32, heads=2, layers=1 if looped else 2, recurrences=3 if looped else 1,
                      input_injection=looped, positions=positions, table_size=64)
    model = ArithModel(cfg, 19)
    params = _spread_params(model, 3)
    rng = np.random.default_rng(0)
    lengths = [3, 9, 12, 17]
    budgets = [15 - n + 3 for n in lengths]      # prompt + budget = 18 tokens for every row
    prompts = _mixed_prompts(rng, lengths)
    gens = solve_prompts(model, params, prompts, budgets)          # one bucket: rows padded to 32 tokens
    assert [len(g) for g in gens] == budgets
    logits = _assert_greedy_at_exact_length(model, params, prompts, budgets, gens, total=18)

    # what follows a row's prompt is never seen: garbage there instead of PAD changes nothing
    rows = np.stack([np.concatenate([p, rng.integers(0, 19, size=32 - len(p))]) for p in prompts]).astype(np.int32)
    again = greedy_decode(model, params, rows, 32, lengths_B=lengths, max_new_B=budgets)
    for g, a, n in zip(gens, again, budgets):
        np.testing.assert_array_equal(g, a[:n])
        assert (a[n:] == PAD).all()
    if positions == ("learned", "fire"):
        # absolute positions matter to this model (RoPE alone would not care): a row left-padded by 3 would have
        # its positions shifted by 3 and answer differently
        seqs = np.stack([np.concatenate([p, g]) for p, g in zip(prompts, gens)])
        shifted = np.asarray(_forward(model)(params, jnp.asarray(seqs[:, :-1]), 3))
        assert (np.argmax(shifted, -1) != np.argmax(logits, -1)).any()


def test_bucketing_bounds_the_compiled_programs():
    """Prompts of 38 different lengths compile one program per bucket (32 and 64) and batch size."""
    cfg = ModelConfig(width=16, ffn=32, heads=2, layers=1, recurrences=2, input_injection=True,
                      positions=("abacus", "fire"), table_size=128)
    model = ArithModel(cfg, 19)
    params = _spread_params(model, 5)
    rng = np.random.default_rng(1)
    lengths = list(range(3, 41))
    budgets = [44 - n for n in lengths]
    prompts = _mixed_prompts(rng, lengths)
    before = compiled_programs()
    gens = solve_prompts(model, params, prompts, budgets, batch_size=8)
    assert compiled_programs() - before == 2 == len({length_bucket(n) for n in lengths})
    _assert_greedy_at_exact_length(model, params, prompts, budgets, gens, total=44)
    # another mix inside the same buckets compiles nothing new
    more = [5, 33, 20, 40, 7, 9, 11, 30]   # 6 in the first bucket: chunks of 8 rows again
    solve_prompts(model, params, _mixed_prompts(rng, more), [44 - n for n in more], batch_size=8)
    assert compiled_programs() - before == 2
    # the uncached reference decodes the same padded batches to the same answers (first bucket: one program)
    plain = solve_prompts(model, params, prompts[:30], budgets[:30], batch_size=8, use_cache=False)
    for a, b in zip(gens, plain):
        np.testing.assert_array_equal(a, b)


def test_decode_rejects_bad_lengths():
    cfg = ModelConfig(width=16, ffn=32, heads=2, layers=1, recurrences=1, table_size=64)
    model = ArithModel(cfg, 19)
    prompts = np.full((2, 5), 4, np.int32)
    with pytest.raises(ValueError, match="lengths_B"):
        greedy_decode(model, None, prompts, 4, lengths_B=[5, 6])
    with pytest.raises(ValueError, match="max_new_B"):
        greedy_decode(model, None, prompts, 4, max_new_B=[4, 5])


def test_abacus_offsets_per_row():
    """abacus_offset_B: cached == uncached with a different offset per row; row b equals decoding it alone with its
    offset; the first token is the argmax of a forward pass on ids raised by the offset; offsets change answers."""
    cfg = ModelConfig(width=32, ffn=64, heads=4, layers=1, recurrences=2, input_injection=True,
                      positions=("abacus", "fire"), table_size=64)
    model = ArithModel(cfg, 19)
    params = model.init(jax.random.PRNGKey(1))
    prompts, _ = make_eval_cell("add", 5, 3, 6, seed=0)
    offsets = np.array([0, 3, 7, 0, 3, 7], np.int32)
    a = greedy_decode(model, params, prompts, 9, abacus_offset_B=offsets)
    np.testing.assert_array_equal(a, greedy_decode(model, params, prompts, 9, abacus_offset_B=offsets, use_cache=False))
    for b in (1, 2):
        np.testing.assert_array_equal(a[b:b + 1], greedy_decode(model, params, prompts[b:b + 1], 9,
                                                                abacus_offset_B=offsets[b:b + 1]))
    ids = abacus_ids(jnp.asarray(prompts))
    raised = jnp.where(ids > 0, ids + offsets[:, None], 0)
    first = np.argmax(np.asarray(model.apply(params, prompts, abacus_BxQ=raised))[:, -1], -1)
    np.testing.assert_array_equal(a[:, 0], first)
    np.testing.assert_array_equal(greedy_decode(model, params, prompts, 9),
                                  greedy_decode(model, params, prompts, 9, abacus_offset_B=np.zeros(6, np.int32)))
    shifted = greedy_decode(model, params, prompts, 9, abacus_offset_B=np.full(6, 7, np.int32))
    assert (shifted != greedy_decode(model, params, prompts, 9)).any()
    with pytest.raises(ValueError, match="abacus_offset_B"):
        greedy_decode(model, params, prompts, 9, abacus_offset_B=[0, -1, 0, 0, 0, 0])


def test_vote_over_offsets_is_the_majority_of_every_decode(monkeypatch):
    """solve_prompts(abacus_offsets=(a, b, c)): each answer is what most of the three full decodes agree on (ties:
    the first offset's), yet the third offset decodes only the problems whose first two answers differ."""
    import arith_jax.evaluate as ev

    cfg = ModelConfig(width=32, ffn=64, heads=4, layers=1, recurrences=2, input_injection=True,
                      positions=("abacus",), table_size=64)
    model = ArithModel(cfg, 19)
    params = model.init(jax.random.PRNGKey(2))
    prompts = [p[p != PAD] for n in (2, 4, 6) for p in make_eval_cell("add", n, 3, 8, seed=n)[0]]
    max_new = [len(p) - 2 for p in prompts]
    offsets = (0, 4, 9)
    each = [solve_prompts(model, params, prompts, max_new, abacus_offsets=(o,)) for o in offsets]
    expected = []
    for answers in zip(*each):
        keys = [a.tobytes() for a in answers]
        best = max(range(3), key=lambda j: (keys.count(keys[j]), -j))
        expected.append(answers[best])
    decoded_rows = []
    real = ev._decode
    monkeypatch.setattr(ev, "_decode", lambda m, p, prompts, *a: decoded_rows.append(len(prompts)) or
                        real(m, p, prompts, *a))
    voted = solve_prompts(model, params, prompts, max_new, abacus_offsets=offsets)
    for v, e in zip(voted, expected):
        np.testing.assert_array_equal(v, e)
    disagree = sum(a.tobytes() != b.tobytes() for a, b in zip(each[0], each[1]))
    assert 0 < disagree < len(prompts) and decoded_rows == [len(prompts), len(prompts), disagree]
    assert len({tuple(np.concatenate(e)) for e in each}) == 3      # the offsets do change answers
    for bad in [(), (0, 0), (-1,), (1.5,)]:
        with pytest.raises(ValueError, match="abacus_offsets"):
            solve_prompts(model, params, prompts[:2], max_new[:2], abacus_offsets=bad)
