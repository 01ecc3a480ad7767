"""E2E training on the shared loop: a golden loss after one step, resumption, the CLI, export and loading."""
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from core_jax.config import load_config
from sr_jax.config import SRConfig
from sr_jax.train import export_params, load_trained, run_training

ROOT = Path(__file__).resolve().parents[2]


def _cfg(*overrides):
    return load_config(SRConfig, ROOT / "configs/sr_tiny.yaml", list(overrides))


def test_golden_first_step():
    """One step of the tiny config from seed 0: the loss is ~log(V) at init and fixed by the seed."""
    r = run_training(_cfg("train.steps=1", "train.log_every=1"), None, progress=False)
    loss = r.history[0]["loss"]
    assert abs(loss - np.log(937)) < 1.5
    assert loss == pytest.approx(7.577055, rel=1e-4)


def test_resume_gives_the_same_run(tmp_path):
    cfg = _cfg()
    straight = run_training(cfg, None, progress=False)
    first = run_training(cfg, tmp_path, stop_at=3, progress=False)
    assert first.state.step == 3
    resumed = run_training(cfg, tmp_path, progress=False)
    assert resumed.resumed_from == 3
    np.testing.assert_allclose(resumed.history[-1]["loss"], straight.history[-1]["loss"], rtol=1e-5)
    tm = load_trained(tmp_path)
    leaves = jax.tree_util.tree_leaves(tm.params)
    want = jax.tree_util.tree_leaves(straight.state.params)
    for a, b in zip(leaves, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    out = export_params(tm, tmp_path / "export")
    again = load_trained(out)
    assert again.config == tm.config
    with pytest.raises(Exception, match="refusing"):
        export_params(tm, tmp_path / "checkpoints")


def test_cli_train_and_errors(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(ROOT / "run.py"), "sr", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=600)
    r = run("train", "--config", "configs/sr_tiny.yaml", "--workdir", str(tmp_path / "w"), "--set", "train.steps=2")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 2
    assert (tmp_path / "w" / "metrics.jsonl").is_file()
    bad = run("train", "--config", "configs/sr_tiny.yaml", "--set", "model.widht=3")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: unknown config key 'model.widht'")
    missing = run("export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x"))
    assert missing.returncode == 2 and "not found" in missing.stderr and "Traceback" not in missing.stderr


def test_validation_hook_logs_in_domain_scores(tmp_path):
    """train.eval_every: greedy candidates of a fixed generated set (1- and 2-variable problems in one refinement
    call) before and after refinement, logged with an eval/ prefix."""
    cfg = _cfg("train.steps=2", "train.eval_every=2", "eval.n_problems=3", "eval.refine_maxiter=5")
    r = run_training(cfg, tmp_path, progress=False)
    last = r.history[-1]
    for key in ("eval/valid", "eval/r2>0.99", "eval/r2>0.99_refined", "eval/acc0.1", "eval/acc0.1_refined"):
        assert 0.0 <= last[key] <= 1.0
    assert last["eval/valid"] == 1.0  # the grammar makes every greedy candidate parse
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "eval/r2>0.99_refined" in logged[-1]
