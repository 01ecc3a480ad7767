"""Evaluation: exact match needs the EOS in place; grids run for every task and compile one program per length
bucket; solve_prompts answers as decoding each prompt alone."""

import json
from collections import Counter

import jax
import numpy as np
import pytest

from arith_jax.config import ArithConfig
from arith_jax.decode import compiled_programs
from arith_jax.evaluate import accuracy_grid, exact_match, run_evaluation, solve_prompts
from arith_jax.train import build_model
from arith_jax.tokenizer import EOS, PAD
from core_jax.config import load_config
from pathlib import Path

TINY = Path(__file__).resolve().parents[2] / "configs" / "arith_tiny.yaml"


def test_exact_match_requires_eos():
    target = [[5, 6, EOS]]
    assert exact_match(np.array([[5, 6, EOS, PAD]]), target)[0]
    assert not exact_match(np.array([[5, 6, 7, EOS]]), target)[0]   # no EOS where it belongs
    assert not exact_match(np.array([[5, 7, EOS, PAD]]), target)[0]
    assert not exact_match(np.array([[5, 6]]), target)[0]            # too short to hold the EOS


@pytest.mark.parametrize("task", ["add", "mul", "sort"])
def test_grid_runs_for_every_task(task, tmp_path):
    cfg = load_config(ArithConfig, TINY, [f"data.task={task}", "data.max_len=3", "data.max_count=3"])
    model = build_model(cfg)
    params = model.init(jax.random.PRNGKey(0))
    before = compiled_programs()
    report = run_evaluation(model, params, task, 2, 3, 3, (4,), tmp_path / "r.json", tmp_path / "r.png",
                            batch_size=4, progress=False)
    assert compiled_programs() - before <= 1  # every prompt of grid and sweep fits the first bucket
    grid = np.array(json.loads((tmp_path / "r.json").read_text())["grid"])
    assert grid.shape == (3, 3) and ((grid >= 0) & (grid <= 1)).all()
    assert "4" in report["sweep"] and (tmp_path / "r.png").exists() and (tmp_path / "r_sweep.png").exists()


def test_solve_prompts_equals_per_prompt():
    cfg = load_config(ArithConfig, TINY)
    model = build_model(cfg)
    params = model.init(jax.random.PRNGKey(0))
    tok = cfg.data.tokenizer
    prompts = [np.array(tok.encode(p), np.int32) for p in ["21+3=", "1+1=", "321+54=", "9+9="]]
    together = solve_prompts(model, params, prompts, [5] * 4, batch_size=2)
    alone = [solve_prompts(model, params, [p], [5])[0] for p in prompts]
    for a, b in zip(together, alone):
        np.testing.assert_array_equal(a[:5], b[:5])


def test_oracle_model_scores_one(monkeypatch):
    """With decoding replaced by the true answers, the grid is all ones: the bookkeeping is right."""
    import arith_jax.evaluate as ev
    from arith_jax.data import make_eval_cell

    cfg = load_config(ArithConfig, TINY)
    tok = cfg.data.tokenizer
    answers = {}
    for la in (1, 2):
        for lb in (1, 2):
            prompts, ans = make_eval_cell("add", la, lb, 3, 1234)
            for p, a in zip(prompts, ans):
                answers[tuple(p[p != PAD])] = tok.encode(a) + [EOS]

    def oracle(model, params, prompts, max_new, **kw):
        out = []
        for p, n in zip(prompts, max_new):
            t = answers[tuple(p)]
            out.append(np.array(t + [PAD] * (n + 4 - len(t)), np.int32))
        return out
    monkeypatch.setattr(ev, "solve_prompts", oracle)
    grid = accuracy_grid(None, None, "add", 2, 3, progress=False)
    np.testing.assert_array_equal(grid, np.ones((2, 2)))


def test_error_breakdown_counts_wrong_tokens_and_positions(monkeypatch):
    """A decoder that breaks answer digit 2 of every second problem and the EOS of every third: the breakdown finds
    exactly those problems, positions and counts, and the grid agrees with it."""
    import arith_jax.evaluate as ev

    real = ev.decode_cells

    def damaged(model, params, task, cells, n, **kw):
        decoded = real(model, params, task, cells, n, **kw)
        generated = []
        for i, t in enumerate(decoded.targets):
            g = np.array(t + [PAD] * 3, np.int32)
            if i % 2:
                g[1] = 4 + (g[1] - 4 + 1) % 10   # answer position 2 (for addition, the tens digit)
            if i % 3 == 0:
                g[len(t) - 1] = 4                # the EOS replaced by a digit
            generated.append(g)
        return decoded._replace(generated=generated)

    monkeypatch.setattr(ev, "solve_prompts", lambda m, p, prompts, max_new, **kw: [np.zeros(n, np.int32)
                                                                                    for n in max_new])
    monkeypatch.setattr(ev, "decode_cells", damaged)
    report = ev.run_evaluation(None, None, "add", 2, 2, 6, sweep=(3,), errors=3, progress=False)
    assert report["sweep_errors"]["problems"] == 6
    assert report["sweep_errors"]["wrong"] == round(6 * (1 - report["sweep"]["3"]))
    e = report["errors"]
    decoded = damaged(None, None, "add", ev.grid_cells(2), 6, progress=False)
    expected = {}  # problem -> wrong positions, from the damage rules alone
    for i, t in enumerate(decoded.targets):
        positions = ({2} if i % 2 else set()) | ({len(t)} if i % 3 == 0 else set())
        if positions:
            expected[i] = sorted(positions)
    assert e["problems"] == 24 and e["wrong"] == len(expected)
    assert e["wrong"] == round(24 * (1 - float(np.mean(report["grid"]))))
    assert sum(e["by_cell"].values()) == e["wrong"]
    assert e["by_wrong_tokens"] == {str(k): v for k, v in
                                    sorted(Counter(len(p) for p in expected.values()).items())}
    assert e["by_position"] == {str(k): v for k, v in
                                sorted(Counter(q for p in expected.values() for q in p).items())}
    first = min(expected)
    assert len(e["examples"]) == 3 and e["examples"][0]["positions"] == expected[first]
    tok = load_config(ArithConfig, TINY).data.tokenizer
    assert e["examples"][0]["prompt"] == tok.decode(decoded.prompts[first]).strip()
    assert e["examples"][0]["expected"] == tok.decode(decoded.targets[first])
