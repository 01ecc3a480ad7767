"""Stopping and restarting the training loop: bounded run-ahead, prompt save on SIGTERM/Ctrl-C, exit status
128 + signal from the CLI, and metrics.jsonl that reads as one run across restarts."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from core_jax import train as trainlib
from core_jax.config import load_config
from core_jax.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def default_sigint():
    """Each test starts with Python's own SIGINT handler, also when the suite runs as a background job (whose
    SIGINT the shell set to SIG_IGN): the tests check that training restores the handler it found."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def toy(steps=8, **kw):
    return load_config(TrainConfig, None, [f"steps={steps}", "log_every=1", "ckpt_every=1000",
                                           "optim.lr=0.1", *[f"{k}={v}" for k, v in kw.items()]])


def init_params(rng):
    return {"w": jnp.zeros(4)}


def loss_fn(params, batch, rng):
    return jnp.mean((params["w"] - batch["x"]) ** 2), {}


def batches(step):
    return {"x": np.full((2, 4), float(step % 3), np.float32)}


def read_metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_host_runs_at_most_two_steps_ahead(monkeypatch):
    """When batch_fn(s) runs (right after step s-1 was dispatched), steps up to s-3 have been waited for: the host
    never has more than MAX_STEPS_IN_FLIGHT = 2 earlier steps outstanding, even with no logging due (log_every
    100). Waiting for a step = fetching its metrics (`_to_host`), which is what is counted here; JAX's asynchronous
    dispatch would otherwise let the host run ahead of an accelerator by many steps."""
    fetched = []
    real_to_host = trainlib._to_host
    monkeypatch.setattr(trainlib, "_to_host", lambda m: fetched.append(1) or real_to_host(m))
    lag = []

    def batch_fn(step):
        lag.append(step - len(fetched))  # steps dispatched minus steps waited for
        return batches(step)

    result = train(toy(steps=12, log_every=100), None, init_params, loss_fn, batch_fn, progress=False)
    assert max(lag) == 3 and len(fetched) == 12 and len(result.history) == 1, lag


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_promptly_and_rerun_resumes(tmp_path, signum):
    def batch_fn(step):
        if step == 3:
            os.kill(os.getpid(), signum)  # arrives while step 2 runs
        return batches(step)

    cfg = toy(steps=50)
    first = train(cfg, tmp_path, init_params, loss_fn, batch_fn, progress=False)
    stopped = int(first.state.step)
    assert first.interrupted_by == signum
    assert 3 <= stopped <= 5  # within the steps in flight (MAX_STEPS_IN_FLIGHT = 2), not at 50
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [stopped]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    second = train(cfg, tmp_path, init_params, loss_fn, batches, progress=False)
    assert second.resumed_from == stopped and second.interrupted_by is None and int(second.state.step) == 50
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 51))  # one run: every step once, in order
    times = [r["time_s"] for r in rows]
    assert times == sorted(times)


def test_metrics_after_resume_read_as_one_run(tmp_path):
    """A run killed after its checkpoint at step 4 had logged steps 5..6: the rerun trains 5..6 again, and the
    file keeps one row per step with time_s continuing from the last kept row."""
    cfg = toy(steps=8)
    train(cfg, tmp_path, init_params, loss_fn, batches, progress=False, stop_at=4)
    rows = read_metrics(tmp_path)
    last_time = rows[-1]["time_s"]
    with open(tmp_path / "metrics.jsonl", "a") as f:  # what the killed process wrote after its last save
        f.write(json.dumps(dict(rows[-1], step=5, time_s=last_time + 50)) + "\n")
        f.write(json.dumps(dict(rows[-1], step=6, time_s=last_time + 60)) + "\n")
        f.write('{"loss": 0.1, "st')  # cut short by the kill
    result = train(cfg, tmp_path, init_params, loss_fn, batches, progress=False)
    assert result.resumed_from == 4
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["time_s"] >= last_time for r in rows[4:]) and rows[4]["time_s"] < last_time + 50
    assert [r["time_s"] for r in rows] == sorted(r["time_s"] for r in rows)


def test_time_continues_from_the_checkpoint_even_without_a_logged_row(tmp_path):
    """A run stopped by SIGTERM before logging anything (log_every 100): the checkpoint carries the seconds so far,
    so the resumed run's time_s starts from them, not from 0."""
    from core_jax.checkpoint import read_meta

    def slow_batches(step):
        time.sleep(0.05)
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return batches(step)

    cfg = toy(steps=30, log_every=100)
    assert train(cfg, tmp_path, init_params, loss_fn, slow_batches, progress=False).interrupted_by == signal.SIGTERM
    assert read_metrics(tmp_path) == []
    meta, step = read_meta(tmp_path / "checkpoints")
    assert step >= 3 and meta["elapsed"]["time_s"] >= 4 * 0.05
    train(cfg, tmp_path, init_params, loss_fn, batches, progress=False)
    (row,) = read_metrics(tmp_path)
    assert row["step"] == 30 and row["time_s"] >= meta["elapsed"]["time_s"]


def test_metrics_without_checkpoint_start_over(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 1.0, "time_s": 9.0}) + "\n")
    train(toy(steps=2), tmp_path, init_params, loss_fn, batches, progress=False)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert read_metrics(tmp_path)[0]["time_s"] < 9.0


TINY = str(ROOT / "configs" / "arith_tiny.yaml")
SMALL = ["model.width=16", "model.ffn=32", "model.heads=2", "model.recurrences=1", "data.batch_size=4",
         "train.log_every=1", "train.ckpt_every=1000"]


def test_cli_sigterm_exits_143_and_rerun_resumes(tmp_path, capsys):
    """A real SIGTERM to `run.py arith train`: checkpoint at the signal, no evaluation, exit status 143."""
    from arith_jax.cli import main

    work = tmp_path / "run"
    sets = [a for s in SMALL for a in ("--set", s)]
    cmd = ["train", "--config", TINY, "--workdir", str(work), *sets]
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "arith", *cmd, "--set", "train.steps=100000"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = work / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    t_signal = time.time()
    _, err = proc.communicate(timeout=120)
    assert time.time() - t_signal < 30, "the save should not wait for many dispatched steps"
    assert proc.returncode == 143, err[-2000:]
    assert "interrupted by SIGTERM" in err and "rerun the same command to resume" in err and "Traceback" not in err
    saved = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and saved[0] >= 3  # saved on the signal, not at ckpt_every=1000
    assert not (work / "eval.json").exists()  # no evaluation after an interruption
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] >= saved[0] - 2

    # the rerun (asked to stop where the checkpoint is, so it trains nothing) resumes from the saved step
    assert main(cmd + ["--set", f"train.steps={saved[0]}", "--eval-max-len", "0"]) == 0
    assert f"resumed from step {saved[0]}" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, saved[0] + 1))


@pytest.mark.parametrize("package,signum", [("arith", signal.SIGINT), ("sr", signal.SIGTERM)])
def test_cli_exit_status_is_128_plus_signal(monkeypatch, tmp_path, capsys, package, signum):
    """Both packages' train commands: an interrupted run exits 128 + signal (130 Ctrl-C, 143 SIGTERM) and skips
    the evaluation."""
    import importlib
    from types import SimpleNamespace

    def interrupted_run(cfg, workdir):
        return trainlib.TrainResult(state=SimpleNamespace(step=7), history=[{"step": 7, "loss": 1.0}],
                                    resumed_from=None, interrupted_by=signum)

    def no_evaluation(*a, **k):
        raise AssertionError("evaluated after an interruption")

    monkeypatch.setattr(importlib.import_module(f"{package}_jax.train"), "run_training", interrupted_run)
    monkeypatch.setattr("arith_jax.evaluate.run_evaluation", no_evaluation)
    config = {"arith": TINY, "sr": str(ROOT / "configs" / "sr_tiny.yaml")}[package]
    main = importlib.import_module(f"{package}_jax.cli").main
    assert main(["train", "--config", config, "--workdir", str(tmp_path)]) == 128 + signum
    err = capsys.readouterr().err
    assert f"interrupted by {signal.Signals(signum).name} at step 7" in err


@pytest.mark.parametrize("argv,message", [
    (["eval", "--n", "0"], "argument --n: expected an integer >= 1, got 0"),
    (["eval", "--beam-size", "-2"], "argument --beam-size: expected an integer >= 1, got -2"),
    (["eval", "--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
    (["eval", "--json", "/proc/r.json"], "cannot write --json '/proc/r.json'"),
    (["export", "--checkpoint", "x", "--out", "/proc/exported"], "cannot write --out '/proc/exported'"),
    (["train", "--config", str(ROOT / "configs" / "sr_tiny.yaml"), "--set", "train.steps=0"],
     "config key 'train.steps' must be >= 1, got 0"),
    (["train", "--config", str(ROOT / "configs" / "sr_tiny.yaml"), "--workdir", "/proc/run"],
     "cannot write --workdir '/proc/run'"),
    (["eval", "--decoding", "best"], "argument --decoding: invalid choice: 'best'"),
])
def test_sr_cli_one_line_errors_before_work(capsys, argv, message):
    from sr_jax.cli import main
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_empty_config_file_is_one_line(capsys, tmp_path):
    from arith_jax.cli import main
    (tmp_path / "empty.yaml").write_text("")
    assert main(["train", "--config", str(tmp_path / "empty.yaml")]) == 2
    assert f"config file '{tmp_path / 'empty.yaml'}' is empty" in capsys.readouterr().err


def test_config_file_in_another_encoding_is_one_line(capsys, tmp_path):
    from arith_jax.cli import main
    (tmp_path / "wide.yaml").write_bytes("name: x\n".encode("utf-16"))
    assert main(["train", "--config", str(tmp_path / "wide.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"config file '{tmp_path / 'wide.yaml'}' is not UTF-8 text (it is UTF-16)" in err and err.count("\n") == 1


def test_configs_built_in_python_are_checked_too(tmp_path):
    import dataclasses

    from core_jax.config import ConfigError
    with pytest.raises(ConfigError, match="'train.log_every' must be >= 1, got 0"):
        train(dataclasses.replace(toy(), log_every=0), None, init_params, loss_fn, batches, progress=False)
    from arith_jax.config import ArithConfig
    from arith_jax.train import run_training
    cfg = load_config(ArithConfig, ROOT / "configs" / "arith_tiny.yaml")
    bad = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, sweep=(0,)))
    with pytest.raises(ConfigError, match="'eval.sweep' must be a list of items each >= 1"):
        run_training(bad, tmp_path)


def test_second_ctrl_c_stops_at_once(tmp_path):
    def batch_fn(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # first: stop after saving ...
            os.kill(os.getpid(), signal.SIGINT)  # ... second: stop now
        return batches(step)

    with pytest.raises(KeyboardInterrupt):
        train(toy(steps=50), tmp_path, init_params, loss_fn, batch_fn, progress=False)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]  # no save was started
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ----- a disk that fills up during training (issue 10) ----------------------------------------------------------
def _failing_saves(monkeypatch, fail_at: int, error: Exception):
    """Orbax's save raises `error` for step `fail_at` after writing part of it (its temporary folder), as a full
    disk does; other steps save normally."""
    import orbax.checkpoint as ocp

    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == fail_at:
            (Path(self.directory) / f"{step}.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
            raise error
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
# what tensorstore raises for the same failure (its message abridged)
TENSORSTORE_ENOSPC = ValueError('OUT_OF_RANGE: Error writing "w/0.0" in OCDBT database at local file "ckpt/": '
                                "Failed to write 368956 bytes to file 7: No space left [os_error_code='28']")


@pytest.mark.parametrize("error", [ENOSPC, TENSORSTORE_ENOSPC], ids=["oserror", "tensorstore"])
def test_full_disk_at_a_save_keeps_the_previous_checkpoint(monkeypatch, tmp_path, error):
    from core_jax.checkpoint import CheckpointError

    cfg = toy(steps=6, ckpt_every=3)
    _failing_saves(monkeypatch, 6, error)
    with pytest.raises(CheckpointError) as err:
        train(cfg, tmp_path, init_params, loss_fn, batches, progress=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith("cannot write the checkpoint of step 6 in ")
    assert "No space left on device" in message and "resume from step 3" in message, message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]  # partial write removed
    monkeypatch.undo()  # the disk has room again: the rerun resumes
    result = train(cfg, tmp_path, init_params, loss_fn, batches, progress=False)
    assert result.resumed_from == 3 and int(result.state.step) == 6
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 7))


def test_full_disk_before_any_checkpoint(monkeypatch, tmp_path):
    from core_jax.checkpoint import CheckpointError

    _failing_saves(monkeypatch, 3, ENOSPC)
    with pytest.raises(CheckpointError, match="no checkpoint was written before it: free space there and rerun"):
        train(toy(steps=6, ckpt_every=3), tmp_path, init_params, loss_fn, batches, progress=False)


class _FullDiskFile:
    """A text file whose writes fail with ENOSPC after `room` of them succeeded."""

    def __init__(self, path, mode, room):
        self.file, self.room = open(path, mode), room

    def write(self, text):
        self.room -= 1
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(text)

    def flush(self):
        self.file.flush()

    def close(self):
        self.file.close()


def test_full_disk_at_a_metrics_row(monkeypatch, tmp_path):
    from core_jax.checkpoint import CheckpointError

    cfg = toy(steps=8, ckpt_every=3)
    monkeypatch.setattr(trainlib, "open", lambda path, mode: _FullDiskFile(path, mode, room=4), raising=False)
    with pytest.raises(CheckpointError) as err:
        train(cfg, tmp_path, init_params, loss_fn, batches, progress=False)
    message = str(err.value)
    assert message.startswith(f"cannot write {tmp_path / 'metrics.jsonl'}: No space left on device; the checkpoint "
                              f"of step 3 in "), message
    assert "\n" not in message and "resume from step 3" in message
    monkeypatch.undo()
    assert train(cfg, tmp_path, init_params, loss_fn, batches, progress=False).resumed_from == 3
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 9))


@pytest.mark.parametrize("package", ["arith", "sr"])
def test_cli_full_disk_is_one_line(monkeypatch, tmp_path, capsys, package):
    """Both packages' `train` through core_jax.train: the failed save is one `error:` line, exit 2, no evaluation
    (resuming afterwards is tested on the loop above)."""
    import importlib

    config = {"arith": TINY, "sr": str(ROOT / "configs" / "sr_tiny.yaml")}[package]
    main = importlib.import_module(f"{package}_jax.cli").main
    # the shipped tiny configs with train.steps=2, as in tests/arith/test_cli.py, tests/core/test_train.py and
    # tests/sr/test_train.py: the session's compilation cache compiles each package's training step once for all
    sets = ["train.steps=2", "train.ckpt_every=1"]
    _failing_saves(monkeypatch, 2, ENOSPC)
    monkeypatch.setattr("arith_jax.evaluate.run_evaluation", lambda *a, **k: pytest.fail("evaluated"))
    args = ["train", "--config", config, "--workdir", str(tmp_path), *[a for s in sets for a in ("--set", s)]]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot write the checkpoint of step 2 in ") and "Traceback" not in err
    assert "No space left on device" in err[-1] and "rerun the same command to resume from step 1" in err[-1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


_REAL_FULL_DISK = """
import resource, signal, sys
import numpy as np
from core_jax.checkpoint import Checkpointer, SaveError
ck = Checkpointer(sys.argv[1], keep=2)
ck.save(1, {"w": np.arange(100, dtype=np.float32)}, {})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    ck.save(2, {"w": np.random.default_rng(0).normal(size=100_000).astype(np.float32)}, {})
except SaveError as e:
    print(e, file=sys.stderr)
ck.close()
"""


def test_a_real_failed_write_through_orbax_is_one_line(tmp_path):
    """A write limit (RLIMIT_FSIZE, the same failure path in tensorstore as a full disk) hit inside Orbax: one line
    with the system's reason, no tracebacks logged by Orbax's threads, the partial step removed."""
    proc = subprocess.run([sys.executable, "-c", _REAL_FULL_DISK, str(tmp_path / "ck")], cwd=ROOT, text=True,
                          capture_output=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"cannot write the checkpoint of step 2 in {tmp_path / 'ck'}: File too large"
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["1"]


# ----- a signal during an evaluation (issue 10) -----------------------------------------------------------------
def _signal_then_wait(signum):
    """Sends `signum` to this process, then waits up to a minute as a long evaluation would."""
    os.kill(os.getpid(), signum)
    for _ in range(600):
        time.sleep(0.1)
    raise AssertionError("the evaluation was not stopped by the signal")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_a_validation_stops_at_once(tmp_path, signum):
    """The task's eval_fn is abandoned at the signal (not run to its end), the step it evaluated is saved, and the
    rerun resumes there."""
    calls = []

    def eval_fn(params, step):
        calls.append(step)
        return _signal_then_wait(signum) if step == 4 else {"score": 1.0}

    cfg = toy(steps=50, eval_every=2)
    t0 = time.time()
    result = train(cfg, tmp_path, init_params, loss_fn, batches, progress=False, eval_fn=eval_fn)
    assert time.time() - t0 < 30 and calls == [2, 4]
    assert result.interrupted_by == signum and int(result.state.step) == 4
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [4]
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "eval/score" in rows[1] and "eval/score" not in rows[3]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = train(toy(steps=6, eval_every=2), tmp_path, init_params, loss_fn, batches, progress=False,
                    eval_fn=lambda p, s: {"score": 2.0})
    assert resumed.resumed_from == 4 and int(resumed.state.step) == 6


def test_cli_signal_during_the_arith_evaluation_after_training(monkeypatch, tmp_path, capsys):
    """`run.py arith train` evaluates after training: SIGTERM there stops the evaluation, keeps the final
    checkpoint (saved before it) and exits 143 with one line."""
    from types import SimpleNamespace

    from arith_jax.cli import main

    def trained(cfg, workdir):
        return trainlib.TrainResult(state=SimpleNamespace(step=6, params=None), history=[], resumed_from=None)

    monkeypatch.setattr("arith_jax.train.run_training", trained)
    monkeypatch.setattr("arith_jax.evaluate.run_evaluation", lambda *a, **k: _signal_then_wait(signal.SIGTERM))
    handler = signal.getsignal(signal.SIGTERM)
    assert main(["train", "--config", TINY, "--workdir", str(tmp_path)]) == 143
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted by SIGTERM during the evaluation after training; the checkpoint of step 6 is saved in "
        f"{tmp_path}; evaluate it with `run.py arith eval --checkpoint {tmp_path}`")
    assert signal.getsignal(signal.SIGTERM) is handler  # the command's handlers are taken back


def test_cli_signal_during_the_sr_validation(monkeypatch, tmp_path, capsys):
    """`run.py sr train` with a validation hook (train.eval_every): SIGTERM inside it stops the run at once with the
    step saved, exit 143."""
    from sr_jax.cli import main

    monkeypatch.setattr("sr_jax.train.validate", lambda *a, **k: _signal_then_wait(signal.SIGTERM))
    sets = ["train.steps=4", "train.eval_every=2", "train.ckpt_every=100", "eval.n_problems=1"]
    assert main(["train", "--config", str(ROOT / "configs" / "sr_tiny.yaml"), "--workdir", str(tmp_path),
                 *[a for s in sets for a in ("--set", s)]]) == 143
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"interrupted by SIGTERM at step 2; the checkpoint is saved in {tmp_path}; rerun the same "
                       f"command to resume")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]


def test_sigterm_during_a_real_evaluation_after_training(tmp_path):
    """A real SIGTERM to `run.py arith train` while its evaluation runs (a grid far longer than the test waits):
    exit 143 within seconds, one line, the trained checkpoint kept, no eval.json."""
    import threading

    work = tmp_path / "run"
    sets = SMALL + ["train.steps=2", "eval.n_per_cell=100000", "eval.max_len=2"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "arith", "train", "--config", TINY, "--workdir",
                             str(work), *[a for s in sets for a in ("--set", s)]],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.time() + 240
    while time.time() < deadline and "eval:" not in "".join(err) and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(1.0)  # inside the evaluation's first batches
    proc.send_signal(signal.SIGTERM)
    t_signal = time.time()
    proc.wait(timeout=120)
    reader.join(timeout=10)
    stderr = "".join(err)
    assert time.time() - t_signal < 20, stderr[-2000:]
    assert proc.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr and stderr.rstrip().splitlines()[-1].endswith(
        f"interrupted by SIGTERM during the evaluation after training; the checkpoint of step 2 is saved in {work}; "
        f"evaluate it with `run.py arith eval --checkpoint {work}`"), stderr[-2000:]
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["2"] and not (work / "eval.json").exists()


def test_workdir_of_another_package_is_one_line(tmp_path):
    from core_jax.checkpoint import CheckpointError

    train(toy(steps=1), tmp_path, init_params, loss_fn, batches, meta={"task": "arith"}, progress=False)
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'checkpoints'} holds a 'arith' training run, not 'sr'; "
                                              f"train into another --workdir$"):
        train(toy(steps=2), tmp_path, init_params, loss_fn, batches, meta={"task": "sr"}, progress=False)
    assert train(toy(steps=2), tmp_path, init_params, loss_fn, batches, meta={"task": "arith"},
                 progress=False).resumed_from == 1


def test_commands_keep_ignoring_an_ignored_signal():
    """A background job started with SIGINT ignored keeps ignoring it; SIGTERM gets the command's one-line stop."""
    from core_jax.cli import run_command

    seen = {}
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert run_command(lambda: seen.update(int=signal.getsignal(signal.SIGINT),
                                               term=signal.getsignal(signal.SIGTERM))) == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)
    assert seen["int"] is signal.SIG_IGN and callable(seen["term"]) and seen["term"] is not signal.SIG_DFL


def test_a_warning_during_a_command_is_one_line(capsys):
    import warnings

    from core_jax.cli import run_command

    shown = warnings.showwarning
    assert run_command(lambda: warnings.warn("model.attention 'cudnn' runs on a GPU only;\n  using 'xla'")) == 0
    assert capsys.readouterr().err == "warning: model.attention 'cudnn' runs on a GPU only; using 'xla'\n"
    assert warnings.showwarning is shown  # restored after the command
