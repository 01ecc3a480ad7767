"""The E2E transformer: embedder shapes and padding, point-order invariance, cached = uncached decoding steps and
beam search, grouped decoding rows, config validation, the paper config's size."""
import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core_jax.config import ConfigError, load_config
from core_jax.decode import beam_search
from sr_jax.config import SRConfig
from sr_jax.model import EXPONENT_TABLE_MIN_EMB, E2EModel, ModelConfig, PointEmbedder, bos
from sr_jax.train import build_model
from sr_jax.vocab import EOS, PAD, POINT_PAD, POINT_VOCAB_SIZE, encode_points

CFG = ModelConfig(emb_dim=8, width=32, heads=4, enc_layers=1, dec_layers=2, max_len=16)


@pytest.fixture(scope="module")
def model_params():
    model = E2EModel(CFG)
    return model, model.init(jax.random.PRNGKey(0))


def _inputs(B=2, N=5, T=6, seed=1):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    points = jax.random.randint(k1, (B, N, CFG.point_tokens), 0, 10000)
    mask = jnp.arange(N)[None, :] < jnp.array([N - 1, N])[:, None]
    tokens = jax.random.randint(k2, (B, T), 2, 900)
    return points, mask, tokens


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_embedder_and_encoder_shapes_and_padding(norm):
    cfg = ModelConfig(emb_dim=8, width=32, heads=4, enc_layers=1, dec_layers=1, max_len=16, norm=norm)
    model = E2EModel(cfg)
    params = model.init(jax.random.PRNGKey(0))
    points, mask, _ = _inputs()
    memory = model.encode(params, points, mask)
    assert memory.shape == (2, 5, 32)
    assert np.all(np.asarray(memory[0, 4]) == 0)  # padded point zeroed
    # what sits in a padded point's slot does not change the real points' encodings
    other = points.at[0, 4].set(POINT_PAD)
    np.testing.assert_allclose(model.encode(params, other, mask)[0, :4], memory[0, :4], atol=1e-6)


def test_encoder_is_invariant_to_point_order(model_params):
    model, params = model_params
    points, mask, tokens = _inputs(B=1, N=7)
    mask = jnp.ones_like(mask)
    perm = jnp.array([4, 0, 6, 2, 1, 5, 3])
    a = model.logits(params, points, mask, tokens)
    b = model.logits(params, points[:, perm], mask[:, perm], tokens)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_cached_decoding_equals_full_forward(model_params):
    model, params = model_params
    points, mask, tokens = _inputs()
    full = model.logits(params, points, mask, tokens)
    step = model.decoder_fn(params, model.context(params, points, mask))
    cache = model.init_cache(2, 16)
    outs = []
    for t in range(tokens.shape[1]):
        logits, cache = step(tokens[:, t:t + 1], cache)
        outs.append(logits)
    np.testing.assert_allclose(np.stack(outs, 1), full, atol=1e-5)


def test_rows_of_a_dataset_share_its_memory(model_params):
    """R = B * G decoding rows: rows b*G..b*G+G-1 attend to dataset b (no memory copy per beam)."""
    model, params = model_params
    points, mask, tokens = _inputs()
    full = model.logits(params, points, mask, tokens[:, :1])
    step = model.decoder_fn(params, model.context(params, points, mask))
    logits, _ = step(jnp.repeat(tokens[:, :1], 3, axis=0), model.init_cache(6, 16))
    np.testing.assert_allclose(logits.reshape(2, 3, -1), np.repeat(full[:, :1], 3, axis=1), atol=1e-5)


class History(NamedTuple):
    tokens_RxL: jnp.ndarray   # tokens fed so far
    index: jnp.ndarray


def test_beam_search_with_the_kv_cache_equals_recomputing_the_prefix(model_params):
    """Beam search over the real KV cache, beams' histories copied up to the current position only (stale entries
    past it stay in the buffer), finds the same hypotheses as beam search over a cache of plain tokens that
    recomputes the whole prefix at every step."""
    model, params = model_params
    points, mask, _ = _inputs()
    context = model.context(params, points, mask)
    K, T = 4, 10

    def uncached(tokens_Rx1, h: History):
        fed = jax.lax.dynamic_update_slice(h.tokens_RxL, tokens_Rx1, (0, h.index))
        logits, _ = model.decoder.apply({"params": params["decoder"]}, fed, memory_kvs=context.memory_kvs,
                                        memory_mask_BxN=context.memory_mask_BxN)
        return jnp.take(logits, h.index, axis=1), History(fed, h.index + 1)

    kw = dict(beam_size=K, max_len=T, eos_id=EOS, pad_id=PAD, early_stopping=False)
    cached = jax.jit(lambda: beam_search(model.decoder_fn(params, context), model.init_cache(2, T + 1), bos(2),
                                         prefix_axis=1, copy_chunk=4, **kw))()
    ref = jax.jit(lambda: beam_search(uncached, History(jnp.zeros((2, T + 1), jnp.int32), jnp.int32(0)), bos(2),
                                      **kw))()
    np.testing.assert_array_equal(cached.tokens_BxKxT, ref.tokens_BxKxT)
    np.testing.assert_allclose(cached.log_prob_BxK, ref.log_prob_BxK, rtol=1e-4, atol=1e-4)


def test_loss_masks_padding(model_params):
    model, params = model_params
    points, mask, tokens = _inputs()
    batch = {"points": points, "point_mask": mask, "target": tokens}
    padded = {"points": points, "point_mask": mask, "target": jnp.pad(tokens, ((0, 0), (0, 3)))}
    l1, _ = model.loss(params, batch)
    l2, _ = model.loss(params, padded)
    assert float(l1) == pytest.approx(float(l2), rel=1e-5)


def test_paper_config_matches_the_original_sizes():
    """Embedder and 4-layer encoder as spec §4.3 (6 198 464 and 12 610 560); the decoder has the pruned vocabulary
    and a 200-position table instead of 10 292 rows and 4 096 positions."""
    cfg = load_config(SRConfig, "configs/sr_e2e_paper.yaml")
    shapes = jax.eval_shape(build_model(cfg).init, jax.random.PRNGKey(0))
    size = lambda t: sum(int(x.size) for x in jax.tree_util.tree_leaves(t))
    assert size(shapes["encoder"]["embedder"]) == 6_198_464
    assert size(shapes["encoder"]) == 6_198_464 + 12_610_560
    spec_decoder = 74_642_484
    assert size(shapes["decoder"]) == spec_decoder - (10_292 - 937) * 513 - (4096 - 200) * 512


@pytest.mark.parametrize("override,needle", [
    ("model.width=30", "divisible"),
    ("model.heads=0", "model.heads"),
    ("model.max_dim=11", "max_dim"),
    ("data.point_buckets=[500]", "point_buckets"),
    ("data.target_buckets=[300]", "max_len"),
    ("model.norm=mid", "model.norm"),
])
def test_bad_configs_are_one_line_errors(override, needle):
    with pytest.raises((ConfigError, ValueError), match=needle):
        load_config(SRConfig, "configs/sr_tiny.yaml", [override])


def test_deferred_norm_model_is_the_same_function(model_params):
    """model.deferred_norm (attention normalised after the value product) keeps the parameters and the logits."""
    model, params = model_params
    other = E2EModel(dataclasses.replace(CFG, deferred_norm=True))
    points, mask, tokens = _inputs()
    np.testing.assert_allclose(other.logits(params, points, mask, tokens), model.logits(params, points, mask, tokens),
                               atol=1e-4)


class _DenseEmbedder(nn.Module):
    """The point embedder as one dense product over all P embedded tokens (the formulation PointEmbedder computes
    per kind of slot)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, points_BxNxP):
        cfg = self.cfg
        e = nn.Embed(POINT_VOCAB_SIZE, cfg.emb_dim, embedding_init=nn.initializers.normal(cfg.emb_dim ** -0.5),
                     name="token")(points_BxNxP)
        e = e.reshape(*points_BxNxP.shape[:2], -1)
        h = nn.relu(nn.Dense(e.shape[-1] * cfg.emb_expansion, name="hidden")(e))
        return nn.Dense(cfg.width, name="out")(h)


@pytest.mark.parametrize("emb_dim", [8, EXPONENT_TABLE_MIN_EMB])   # exponent slots dense / from tables
def test_point_embedder_per_slot_kind_equals_one_dense_product(emb_dim):
    cfg = ModelConfig(emb_dim=emb_dim, width=32, heads=4, enc_layers=1, dec_layers=1, max_len=16)
    rng = np.random.default_rng(0)
    rows = [encode_points(rng.normal(size=(6, d)) * 10.0 ** rng.integers(-30, 30, size=d), rng.normal(size=6) * 1e5)
            for d in (1, 3, 10)]
    points = np.stack([*rows, np.zeros_like(rows[0]), np.full_like(rows[0], POINT_PAD)])   # + padding points
    points[0, 0, 0] = np.int32(np.asarray(rows[0])[0, 0] == 15) + 15                        # both signs occur
    ours, ref = PointEmbedder(cfg), _DenseEmbedder(cfg)
    params = ours.init(jax.random.PRNGKey(3), points)
    jax.tree.map(np.testing.assert_array_equal, params, ref.init(jax.random.PRNGKey(3), points))   # same init
    w = jax.random.normal(jax.random.PRNGKey(4), (points.shape[0], points.shape[1], 32))
    f = lambda module: lambda p: jnp.vdot(module.apply(p, points), w)
    np.testing.assert_allclose(ours.apply(params, points), ref.apply(params, points), rtol=1e-5, atol=1e-5)
    g_ours, g_ref = jax.grad(f(ours))(params), jax.grad(f(ref))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max())),
                 g_ours, g_ref)
