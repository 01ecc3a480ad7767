"""The training step's speed-ups change nothing but float rounding: the dense layers' custom kernel gradient,
and the loss's output head restricted to the positions the loss scores (`loss_pos`)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from arith_jax.data import DataConfig, loss_positions, make_batch
from arith_jax.model import ArithModel, ModelConfig
from core_jax.attention import dense_dot_general


@settings(max_examples=5, deadline=None)
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=3), contract=st.lists(st.integers(1, 4), min_size=1,
       max_size=2), features=st.lists(st.integers(1, 4), min_size=1, max_size=2), seed=st.integers(0, 2**16))
def test_dense_dot_general_matches_dot_general(lead, contract, features, seed):
    """Values and both gradients equal lax.dot_general's for every dense contraction (trailing x leading axes)."""
    rx, rw, rg = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(rx, (*lead, *contract))
    w = jax.random.normal(rw, (*contract, *features))
    n = len(contract)
    dims = ((tuple(range(len(lead), len(lead) + n)), tuple(range(n))), ((), ()))
    g = jax.random.normal(rg, (*lead, *features))

    def vjp(dot):
        def values_and_gradients(x, w, g):
            y, pull = jax.vjp(lambda a, b: dot(a, b, dims), x, w)
            return (y, *pull(g))

        # one program per example: faster than eager mode, which compiles every primitive for each new shape
        return jax.jit(values_and_gradients)(x, w, g)

    for ours, ref in zip(vjp(dense_dot_general), vjp(lax.dot_general)):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_dense_dot_general_falls_back_for_other_contractions():
    x, w = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
    batched = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_array_equal(dense_dot_general(x, w, batched), lax.dot_general(x, w, batched))
    leading = (((0,), (0,)), ((), ()))
    np.testing.assert_array_equal(dense_dot_general(x, x, leading), lax.dot_general(x, x, leading))


@pytest.mark.parametrize("task", ["add", "mul", "sort"])
def test_loss_positions_are_the_mask_targets(task):
    cfg = DataConfig(task, max_len=5, max_count=4, batch_size=24, seed=2)
    batch = make_batch(cfg, 3)
    pos = batch["loss_pos"]
    assert pos.shape == (24, cfg.answer_len) and pos.dtype == np.int32
    for row_pos, row_mask in zip(pos, batch["mask"]):
        kept = row_pos[row_pos >= 0]
        assert kept.tolist() == (np.flatnonzero(row_mask[1:])).tolist()
        assert (row_pos[len(kept):] == -1).all()


def test_loss_positions_rejects_too_narrow():
    with pytest.raises(ValueError, match="3 loss targets"):
        loss_positions(np.array([[0, 0, 1, 1, 1]], np.float32), 2)


def _assert_same_step(out_a, g_a, out_b, g_b):
    """Two (loss, metrics) outputs and their gradients agree (float32 rounding)."""
    (loss_a, met_a), (loss_b, met_b) = out_a, out_b
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
    for k in met_b:
        np.testing.assert_allclose(met_a[k], met_b[k], rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g_a), jax.tree_util.tree_leaves(g_b)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("task, kw", [("sort", dict()), ("add", dict(layers=1, recurrences=3, input_injection=True)),
                                     ("add", dict(positions=("abacus", "fire"), recurrences=1)),
                                     ("add", dict(positions=("rope",), recurrences=1))])
def test_loss_with_positions_equals_full_loss(task, kw):
    """Loss, metrics and gradients with the head at the loss positions only == with the head everywhere."""
    data = DataConfig(task, max_len=4, max_count=3, batch_size=6, seed=1)
    base = dict(width=32, ffn=64, heads=4, layers=2, recurrences=1, positions=("abacus",), abacus_max_k=5,
                table_size=64)
    model = ArithModel(ModelConfig(**(base | kw)), data.tokenizer.vocab_size)
    params = model.init(jax.random.PRNGKey(0))
    batch = {k: jnp.asarray(v) for k, v in make_batch(data, 0).items()}
    full = {k: batch[k] for k in ("tokens", "mask")}
    rng = jax.random.PRNGKey(3)
    grad = jax.jit(jax.value_and_grad(model.loss, has_aux=True))
    (loss_a, met_a), g_a = grad(params, batch, rng)
    (loss_b, met_b), g_b = grad(params, full, rng)
    _assert_same_step((loss_a, met_a), g_a, (loss_b, met_b), g_b)


def test_progressive_branches_equal_scan():
    """The progressive loss with its gradient inside a switch over k (the default) == the scan under lax.cond:
    loss, metrics and gradients, over enough steps' draws to cover every k. Without input injection, so the
    first differentiated pass injects e only when n = 0 (one case: each config compiles two programs)."""
    data = DataConfig("add", max_len=4, max_count=3, batch_size=6, seed=1)
    cfg = ModelConfig(width=32, ffn=64, heads=4, layers=1, recurrences=4, positions=("abacus", "fire"),
                      abacus_max_k=5, table_size=64, input_injection=False, max_backprop=3)
    assert cfg.progressive_grad == "branches"
    ours = ArithModel(cfg, data.tokenizer.vocab_size)
    ref = ArithModel(dataclasses.replace(cfg, progressive_grad="scan"), data.tokenizer.vocab_size)
    params = jax.jit(ours.init)(jax.random.PRNGKey(0))
    batch = {k: jnp.asarray(v) for k, v in make_batch(data, 0).items()}
    fast = {"xla_backend_optimization_level": 0}   # quick to compile; the two programs are compared, not timed
    grad_ours = jax.jit(jax.value_and_grad(ours.loss, has_aux=True), compiler_options=fast)
    grad_ref = jax.jit(jax.value_and_grad(ref.loss, has_aux=True), compiler_options=fast)
    seen_k = set()
    for seed in range(12):
        if len(seen_k) == cfg.backprop and seed >= 3:
            break
        rng = jax.random.PRNGKey(seed)
        (loss_a, met_a), g_a = grad_ours(params, batch, rng)
        (loss_b, met_b), g_b = grad_ref(params, batch, rng)
        _assert_same_step((loss_a, met_a), g_a, (loss_b, met_b), g_b)
        # the (n, k) this step drew: the rng left after the Abacus offset and the initial-state noise
        left = jax.random.split(jax.random.split(rng)[0])[0]
        seen_k.add(int(ours.sample_progressive(left)[1]))
    assert seen_k == set(range(1, cfg.backprop + 1))


def test_xla_attention_kernel_equals_einsum():
    """model.attention "xla" (jax.nn.dot_product_attention; "cudnn" is its GPU kernel, which falls back to it
    off a GPU) gives the einsum path's loss, metrics and gradients, looped progressive model included."""
    data = DataConfig("add", max_len=4, batch_size=6, seed=1)
    base = dict(width=32, ffn=64, heads=4, layers=1, recurrences=3, input_injection=True, positions=("abacus",),
                abacus_max_k=5, table_size=64)
    batch = {k: jnp.asarray(v) for k, v in make_batch(data, 0).items()}
    outs = []
    for attention in ("einsum", "xla"):
        model = ArithModel(ModelConfig(**base, attention=attention), data.tokenizer.vocab_size)
        grad = jax.jit(jax.value_and_grad(model.loss, has_aux=True))
        outs.append(grad(model.init(jax.random.PRNGKey(0)), batch, jax.random.PRNGKey(3)))
    _assert_same_step(*outs[0], *outs[1])
    if jax.default_backend() == "gpu":
        cudnn = ArithModel(ModelConfig(**base, attention="cudnn", dtype="bfloat16"), data.tokenizer.vocab_size)
        assert cudnn.cfg.attention == "cudnn"
    else:  # said, not silent
        with pytest.warns(UserWarning, match="'cudnn' runs on a GPU only; using 'xla'"):
            cudnn = ArithModel(ModelConfig(**base, attention="cudnn", dtype="bfloat16"), data.tokenizer.vocab_size)
        assert cudnn.cfg.attention == "xla"
    with pytest.raises(ValueError, match="bfloat16"):
        ModelConfig(**base, attention="cudnn")
    with pytest.raises(ValueError, match="attention must be one of"):
        ModelConfig(**base, attention="flash")
