"""The shared training loop: golden loss, resume after a real kill, 8 simulated devices == 1 device.

One uninterrupted in-process run (`reference`) serves all three: its first losses are the golden values, the
resumed run must continue it exactly, and the 8-device subprocess must reproduce its losses."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from arith_jax.config import ArithConfig
from arith_jax.train import run_training
from core_jax.config import load_config
from core_jax.optim import make_schedule

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "arith_tiny.yaml"
# long enough that the subprocess below is killed mid-run; no warmup, so the learning rate of the first steps is
# the one of `train.steps=2` (the golden values' config): trapezoid with warmup 0 starts at lr
STEPS = 200
SETS = [f"train.steps={STEPS}", "train.ckpt_every=5", "train.optim.warmup_frac=0"]


def tiny(*overrides):
    return load_config(ArithConfig, TINY, ["train.log_every=1", *overrides])


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted run on this process's one device: every step's loss."""
    return run_training(tiny(*SETS), None, progress=False).history


def test_golden_loss_first_steps(reference):
    """Regression guard: the loss of the first two steps of the tiny config (CPU, float32)."""
    losses = [h["loss"] for h in reference[:2]]
    np.testing.assert_allclose(losses, GOLDEN, rtol=2e-4)
    assert losses[1] != losses[0]
    golden_cfg = tiny("train.steps=2")  # the golden values' config has the same first learning rates
    assert make_schedule(golden_cfg.train.optim, 2)(0) == make_schedule(tiny(*SETS).train.optim, STEPS)(0)


GOLDEN = [2.9639297, 2.9150553]


def test_killed_process_resumes_exactly(tmp_path, reference):
    """A real SIGKILL mid-run of `run.py arith train`: the rerun continues from the last periodic checkpoint, not
    from zero, with the uninterrupted run's losses (parameters, optimizer state and data stream restored), and
    metrics.jsonl reads as one run (the rows the killed process logged after its last save are dropped)."""
    work = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "run.py"), "arith", "train", "--config", str(TINY), "--workdir", str(work),
           *[a for s in ["train.log_every=1", *SETS] for a in ("--set", s)], "--eval-max-len", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = work / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
        if steps and max(steps) >= 10:
            break
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    steps = sorted(int(p.name) for p in ckpts.glob("*") if p.name.isdigit())
    assert steps and 10 <= steps[-1] < STEPS - 2, steps  # killed mid-run, after two periodic checkpoints
    last = steps[-1]

    resumed = run_training(tiny(*SETS), work, stop_at=last + 2, progress=False)
    assert resumed.resumed_from == last
    np.testing.assert_allclose([h["loss"] for h in resumed.history],
                               [h["loss"] for h in reference[last:last + 2]], rtol=1e-5)
    logged = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, last + 3))


def test_eight_devices_match_one(reference):
    """The same run split over 8 simulated CPU devices (a subprocess: the device count is fixed at JAX start-up)
    has the one-device losses; steps 2 and 3 see the parameters after the all-reduced updates."""
    script = textwrap.dedent(f"""
        import jax
        from arith_jax.config import ArithConfig
        from arith_jax.train import run_training
        from core_jax.config import load_config
        from core_jax.sharding import data_mesh
        assert jax.device_count() == 8, jax.devices()
        cfg = load_config(ArithConfig, {str(TINY)!r}, ["train.log_every=1", *{SETS!r}])
        eight = run_training(cfg, None, progress=False, mesh=data_mesh(), stop_at=3)
        print("LOSSES", [h["loss"] for h in eight.history])
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("LOSSES"))
    eight = json.loads(line.removeprefix("LOSSES "))
    np.testing.assert_allclose(eight, [h["loss"] for h in reference[:3]], rtol=1e-5)


def test_batch_not_divisible_by_devices_is_a_clear_error():
    from core_jax.sharding import check_batch_size
    with pytest.raises(ValueError, match="not divisible"):
        check_batch_size(7, _FakeMesh(8))


class _FakeMesh:
    def __init__(self, n):
        self.devices = np.zeros(n)
