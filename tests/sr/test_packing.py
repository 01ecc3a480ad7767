"""Packed training batches (sr_jax.data, `pack=True`): the same examples as the padded layout, several per row with
segment ids. Loss, token accuracy and gradients equal the padded layout's; rows fill better; the layout holds each
example once; batches are deterministic in (seed, step) and come in a bounded set of shapes."""
import dataclasses
import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from core_jax.config import ConfigError, load_config
from sr_jax.config import SRConfig
from sr_jax.data import BatchStream, Example, make_batch, pack_rows, packed_batch, padded_batch, step_examples
from sr_jax.model import E2EModel, ModelConfig, _packed_seq_acc
from sr_jax.vocab import EOS, PAD, POINT_VOCAB_SIZE

CFG = ModelConfig(emb_dim=8, width=32, heads=4, enc_layers=1, dec_layers=2, max_len=32)
CAP, TARGET_LEN = 16, 32


def _examples(seed: int, k: int) -> list[Example]:
    """k synthetic examples (random point tokens and decoder ids) of 1..CAP points and 1..TARGET_LEN-2 ids."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(k):
        n = int(rng.integers(1, CAP + 1))
        ids = rng.integers(2, 900, size=int(rng.integers(1, 12))).tolist()
        out.append(Example(rng.integers(0, POINT_VOCAB_SIZE, (n, CFG.point_tokens)).astype(np.int32), ids, 1))
    return out


@pytest.fixture(scope="module")
def model_params():
    model = E2EModel(CFG)
    return model, model.init(jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def tiny():
    return load_config(SRConfig, "configs/sr_tiny.yaml", ["data.points_per_batch=200"])


def test_packed_loss_and_gradients_equal_the_padded_layout(model_params):
    model, params = model_params
    ex = _examples(0, 10)
    padded = padded_batch(ex, CAP, (TARGET_LEN,))
    packed = packed_batch(ex, CAP, TARGET_LEN, 1)
    assert packed["point_segment"].max() >= 2 and len(packed["target"]) < len(ex)  # several examples in a row
    loss_fn = jax.jit(jax.value_and_grad(model.loss, has_aux=True))
    (la, ma), ga = loss_fn(params, padded)
    (lb, mb), gb = loss_fn(params, packed)
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    np.testing.assert_allclose(mb["token_acc"], ma["token_acc"], atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_a_neighbour_in_the_row_changes_nothing(model_params):
    """An example's per-token losses do not depend on what else its row holds."""
    model, params = model_params
    ex = _examples(1, 2)
    ex = [ex[0]._replace(points_nxP=ex[0].points_nxP[:5]), ex[1]._replace(points_nxP=ex[1].points_nxP[:5])]
    alone = packed_batch(ex[:1], CAP, TARGET_LEN, 1)
    other = _examples(2, 1)[0]
    pair = packed_batch([ex[0], other._replace(points_nxP=other.points_nxP[:CAP - 5])], CAP, TARGET_LEN, 1)
    assert pair["point_segment"].max() == 2 and len(pair["target"]) == 1

    def logits(b):
        return model.logits(params, b["points"], b["point_mask"], b["target"][:, :-1],
                            point_segment_BxN=b["point_segment"], segment_BxT=b["target_segment"][:, :-1],
                            position_BxT=b["target_position"][:, :-1])
    seg = next(s for s in (1, 2) if np.array_equal(pair["points"][0][pair["point_segment"][0] == s],
                                                     ex[0].points_nxP))
    where = pair["target_segment"][0, :-1] == seg
    t = len(ex[0].ids) + 2
    np.testing.assert_allclose(logits(pair)[0][where][:t - 1], logits(alone)[0, :t - 1], atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(3, 40)), min_size=1, max_size=40))
def test_pack_rows_places_every_item_within_capacity(sizes):
    sizes = np.array(sizes)
    row = pack_rows(sizes, (20, 40))
    assert len(row) == len(sizes)
    used = np.zeros((row.max() + 1, 2), int)
    np.add.at(used, row, sizes)
    assert (used <= [20, 40]).all() and (used > 0).all()
    assert row.max() + 1 >= math.ceil((sizes.sum(0) / [20, 40]).max())
    # first fit: an item of a later row would have fitted into an earlier row that ended at most half full
    half = (used <= [10, 20]).all(1)
    assert half.sum() <= 1


def test_packed_layout_holds_each_example_once():
    ex = _examples(3, 12)
    b = packed_batch(ex, CAP, TARGET_LEN, 4)
    rows = len(b["target"])
    assert rows % 4 == 0 and rows <= 12
    np.testing.assert_array_equal(b["point_mask"], b["point_segment"] > 0)
    found = []
    for r in range(rows):
        for s in range(1, b["point_segment"][r].max() + 1):
            pts = b["points"][r][b["point_segment"][r] == s]
            tgt = b["target"][r][b["target_segment"][r] == s]
            pos = b["target_position"][r][b["target_segment"][r] == s]
            np.testing.assert_array_equal(pos, np.arange(len(tgt)))  # positions restart at each example
            assert tgt[0] == EOS and tgt[-1] == EOS
            found.append((pts.tobytes(), tuple(tgt[1:-1])))
    assert sorted(found) == sorted((e.points_nxP.tobytes(), tuple(e.ids)) for e in ex)
    assert (b["target"][b["target_segment"] == 0] == PAD).all()


def test_packed_seq_acc_counts_examples():
    """Per-(row, segment) counting against a direct loop over the examples."""
    rng = np.random.default_rng(0)
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 2, 2, 3, 3, 3, 3]])
    m = (seg > 0) & (rng.random(seg.shape) < 0.9)
    correct = rng.random(seg.shape) < 0.8
    want = []
    for r in range(2):
        for s in range(1, seg[r].max() + 1):
            sel = (seg[r] == s) & m[r]
            if sel.any():
                want.append(correct[r][sel].all())
    got = _packed_seq_acc(correct.astype(np.float32), m.astype(np.float32), seg)
    assert float(got) == pytest.approx(np.mean(want))


def test_make_batch_packs_the_padded_layouts_examples(tiny):
    on = dataclasses.replace(tiny.data, pack=True, pack_row_multiple=2)
    for step in (0, 1):
        padded = make_batch(tiny.data, tiny.vocab, tiny.model.max_dim, step)
        packed = make_batch(on, tiny.vocab, tiny.model.max_dim, step)
        again = make_batch(on, tiny.vocab, tiny.model.max_dim, step)
        for k in packed:
            np.testing.assert_array_equal(packed[k], again[k])   # deterministic in (seed, step)
        assert packed["points"].shape[1] == padded["points"].shape[1]
        assert packed["target"].shape[1] == max(tiny.data.target_buckets)
        assert len(packed["target"]) % 2 == 0 and len(packed["target"]) <= len(padded["target"])
        # the same examples: the same multiset of target tokens and of valid points
        assert sorted(packed["target"][packed["target"] != PAD]) == sorted(padded["target"][padded["target"] != PAD])
        assert packed["point_mask"].sum() == padded["point_mask"].sum()
    with BatchStream(dataclasses.replace(on, workers=1, prefetch=1), tiny.vocab, tiny.model.max_dim) as stream:
        got = stream(1)
    for k in packed:
        np.testing.assert_array_equal(got[k], packed[k])


def test_rows_fill_better_and_shapes_are_bounded(tiny):
    """Over the steps, packing uses fewer point and target slots; row counts are multiples of pack_row_multiple
    up to the examples per step, so shapes <= sum over caps of ceil(examples / multiple)."""
    cfg = dataclasses.replace(tiny.data, point_buckets=(10, 20), bucket_weights=(0.5, 0.5))
    slots = {"padded": [0, 0], "packed": [0, 0]}
    shapes = set()
    for step in range(4):
        cap, ex = step_examples(cfg, tiny.vocab, tiny.model.max_dim, step)
        for name, b in (("padded", padded_batch(ex, cap, cfg.target_buckets)),
                        ("packed", packed_batch(ex, cap, max(cfg.target_buckets), 3))):
            slots[name][0] += b["points"].shape[0] * b["points"].shape[1]
            slots[name][1] += b["target"].size
        shapes.add(b["points"].shape[:2])
        assert b["points"].shape[0] in range(3, -(-len(ex) // 3) * 3 + 1, 3)
    assert slots["packed"][0] < slots["padded"][0] and slots["packed"][1] <= slots["padded"][1]
    assert len(shapes) <= sum(-(-(cfg.points_per_batch // c) // 3) for c in cfg.point_buckets)


def test_pack_config_errors():
    with pytest.raises(ConfigError, match="pack_row_multiple"):
        load_config(SRConfig, "configs/sr_tiny.yaml", ["data.pack_row_multiple=0"])
