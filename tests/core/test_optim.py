"""Schedules and the weight-decay mask."""

import jax.numpy as jnp
import numpy as np
import pytest

from core_jax.optim import OptimConfig, decay_mask, make_schedule


def test_trapezoid_shape():
    s = make_schedule(OptimConfig(lr=1.0, warmup_frac=0.1, decay_frac=0.2), 100)
    vals = np.array([float(s(i)) for i in range(101)])
    assert vals[0] == 0 and abs(vals[10] - 1) < 1e-6 and np.allclose(vals[10:80], 1)
    assert vals[100] == pytest.approx(0.0, abs=1e-6) and np.all(np.diff(vals[80:]) <= 1e-7)


def test_cosine_and_constant():
    c = make_schedule(OptimConfig(lr=2.0, schedule="cosine", warmup_frac=0.0, min_lr_frac=0.1), 50)
    assert float(c(0)) == pytest.approx(2.0) and float(c(50)) == pytest.approx(0.2)
    k = make_schedule(OptimConfig(lr=3.0, schedule="constant", warmup_frac=0.0), 50)
    assert float(k(37)) == pytest.approx(3.0)


def test_decay_mask_skips_norms_and_biases():
    params = {"layer0": {"attn": {"query": {"kernel": jnp.ones((2, 2))}}, "norm1": {"scale": jnp.ones(2),
                                                                               "bias": jnp.ones(2)}},
              "dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    mask = decay_mask(params)
    assert mask["layer0"]["attn"]["query"]["kernel"] and mask["dense"]["kernel"]
    assert not mask["layer0"]["norm1"]["scale"] and not mask["layer0"]["norm1"]["bias"]
    assert not mask["dense"]["bias"]


def test_inverse_sqrt_is_the_e2e_schedule():
    """lr(step) = 1e-7 + step (lr - 1e-7) / W for step < W, then lr sqrt(W) / sqrt(step) (spec e2e_sr §5)."""
    cfg = OptimConfig(lr=2e-4, schedule="inverse_sqrt", warmup_steps=100, warmup_init=1e-7)
    s = make_schedule(cfg, 10_000)
    assert float(s(0)) == pytest.approx(1e-7)
    assert float(s(50)) == pytest.approx(1e-7 + 50 * (2e-4 - 1e-7) / 100, rel=1e-5)
    assert float(s(100)) == pytest.approx(2e-4, rel=1e-6)
    assert float(s(400)) == pytest.approx(2e-4 * 10 / 20, rel=1e-6)
