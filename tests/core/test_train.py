"""The shared training loop: golden loss, resume after a kill, 8 simulated devices == 1 device."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from arith_jax.config import ArithConfig
from arith_jax.train import run_training
from core_jax.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "arith_tiny.yaml"


def tiny(*overrides):
    return load_config(ArithConfig, TINY, ["train.log_every=1", *overrides])


def test_golden_loss_first_steps():
    """Regression guard: the loss of the first two steps of the tiny config (CPU, float32)."""
    hist = run_training(tiny("train.steps=2"), None, progress=False).history
    losses = [h["loss"] for h in hist]
    np.testing.assert_allclose(losses, GOLDEN, rtol=2e-4)
    assert losses[1] != losses[0]


GOLDEN = [2.9639297, 2.9150553]


def test_resume_matches_uninterrupted(tmp_path):
    cfg = tiny("train.steps=6", "train.ckpt_every=2")
    full = run_training(cfg, tmp_path / "a", progress=False).history
    first = run_training(cfg, tmp_path / "b", stop_at=3, progress=False)  # "killed" after saving step 3
    assert first.history[-1]["step"] == 3
    second = run_training(cfg, tmp_path / "b", progress=False)
    assert second.resumed_from == 3
    resumed = [h["loss"] for h in second.history]
    np.testing.assert_allclose(resumed, [h["loss"] for h in full[3:]], rtol=1e-5)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6


def test_killed_process_resumes(tmp_path):
    """A real SIGKILL mid-run: the restarted command continues from the last checkpoint, not from zero."""
    work = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "run.py"), "arith", "train", "--config", str(TINY), "--workdir", str(work),
           "--set", "train.steps=400", "--set", "train.ckpt_every=5", "--eval-max-len", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = work / "checkpoints"
    import time
    deadline = time.time() + 120
    while time.time() < deadline:
        steps = [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
        if steps and max(steps) >= 10:
            break
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    steps = sorted(int(p.name) for p in ckpts.glob("*") if p.name.isdigit())
    assert steps and steps[-1] >= 10
    out = subprocess.run(cmd[:-4] + ["--set", "train.steps=" + str(steps[-1] + 5), "--eval-max-len", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resumed from step {steps[-1]}" in out.stderr


def test_eight_devices_match_one():
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from arith_jax.config import ArithConfig
        from arith_jax.train import run_training
        from core_jax.config import load_config
        from core_jax.sharding import data_mesh
        assert jax.device_count() == 8, jax.devices()
        cfg = load_config(ArithConfig, {str(TINY)!r}, ["train.steps=3", "train.log_every=1"])
        one = run_training(cfg, None, progress=False, mesh=data_mesh(jax.devices()[:1]))
        eight = run_training(cfg, None, progress=False, mesh=data_mesh())
        l1 = [h["loss"] for h in one.history]; l8 = [h["loss"] for h in eight.history]
        np.testing.assert_allclose(l1, l8, rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(one.state.params), jax.tree_util.tree_leaves(eight.state.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
        print("OK", l1, l8)
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout


def test_batch_not_divisible_by_devices_is_a_clear_error():
    from core_jax.sharding import check_batch_size
    with pytest.raises(ValueError, match="not divisible"):
        check_batch_size(7, _FakeMesh(8))


class _FakeMesh:
    def __init__(self, n):
        self.devices = np.zeros(n)
