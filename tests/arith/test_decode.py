"""Cached decoding equals uncached decoding; generation stops at EOS and pads after it."""

import jax
import numpy as np
import pytest

from arith_jax.data import make_eval_cell
from arith_jax.decode import greedy_decode
from arith_jax.model import ArithModel, ModelConfig
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
