"""The transformer's candidates: grammar-constrained decoding of a (random) model always yields usable expressions."""
import jax
import numpy as np
import pytest

from core_jax.config import load_config
from sr_jax.candidates import model_candidates, start_model_candidates
from sr_jax.config import SRConfig
from sr_jax.generator import GeneratorConfig, sample
from sr_jax.train import TrainedModel, build_model


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(SRConfig, "configs/sr_tiny.yaml")
    model = build_model(cfg)
    return TrainedModel(cfg, model, model.init(jax.random.PRNGKey(3)))


@pytest.fixture(scope="module")
def datasets():
    gen = GeneratorConfig(max_input_dimension=3, max_len=30)
    return [(s.x_NxD, s.y_N) for s in (sample([11, i], gen) for i in range(3))]


def test_beam_candidates_parse_and_use_only_the_datasets_variables(tiny, datasets):
    """Random weights, beam search under the grammar: every hypothesis is a complete expression in the dataset's
    variables (the original threw away what failed to parse; here nothing fails); beam 1 = greedy."""
    out = model_candidates(tiny, datasets, decoding="beam", beam_size=1, max_len=24)
    assert len(out) == 3
    for (x, _), cands in zip(datasets, out):
        assert cands and cands[0].source == "greedy"
        assert len(cands) == 1, "beam search of width 1 must find the greedy sequence"
        for c in cands:
            assert all(v < x.shape[1] for v in c.expression.variables)
            assert np.isfinite(c.log_prob) and c.log_prob <= 0


def test_samples_parse_and_are_reproducible(tiny, datasets):
    a = model_candidates(tiny, datasets[:2], decoding="sample", n_samples=4, temperature=2.0, max_len=24, seed=5)
    b = model_candidates(tiny, datasets[:2], decoding="sample", n_samples=4, temperature=2.0, max_len=24, seed=5)
    assert [[c.expression for c in cs] for cs in a] == [[c.expression for c in cs] for cs in b]
    for (x, _), cands in zip(datasets, a):
        assert 1 <= len(cands) <= 5
        assert all(v < x.shape[1] for c in cands for v in c.expression.variables)


def test_started_decoding_finishes_with_the_same_candidates(tiny, datasets):
    """``start_model_candidates`` dispatches and returns a function that waits: the same candidates as
    ``model_candidates``; bad requests fail at the start, before anything is dispatched."""
    finish = start_model_candidates(tiny, datasets[:2], decoding="sample", n_samples=4, temperature=2.0, max_len=24,
                                    seed=5)
    a = model_candidates(tiny, datasets[:2], decoding="sample", n_samples=4, temperature=2.0, max_len=24, seed=5)
    assert [[(c.expression, c.source) for c in cs] for cs in finish()] == [[(c.expression, c.source) for c in cs]
                                                                           for cs in a]
    assert start_model_candidates(tiny, [], decoding="greedy")() == []
    with pytest.raises(ValueError, match="unknown decoding"):
        start_model_candidates(tiny, datasets, decoding="nucleus")


def test_bad_requests_are_clear_errors(tiny, datasets):
    with pytest.raises(ValueError, match="unknown decoding"):
        model_candidates(tiny, datasets, decoding="nucleus")
    x = np.random.default_rng(0).normal(size=(300, 1))
    with pytest.raises(ValueError, match="at most 200"):
        model_candidates(tiny, [(x, x[:, 0])], decoding="greedy")


@pytest.mark.parametrize("group", [1, 2])
def test_a_batch_decodes_like_its_datasets_one_by_one(tiny, datasets, group):
    """Datasets are decoded `group` at a time inside one program (`lax.map` over groups; 3 datasets pad to 4):
    each dataset gets the beam candidates it gets alone, log-probabilities equal up to float32 rounding."""
    together = model_candidates(tiny, datasets, decoding="beam", beam_size=3, max_len=24, group=group)
    alone = [model_candidates(tiny, [d], decoding="beam", beam_size=3, max_len=24)[0] for d in datasets]
    assert [[c.expression for c in cs] for cs in together] == [[c.expression for c in cs] for cs in alone]
    np.testing.assert_allclose([c.log_prob for cs in together for c in cs],
                               [c.log_prob for cs in alone for c in cs], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="group must be a positive"):
        model_candidates(tiny, datasets, decoding="greedy", max_len=24, group=0)
