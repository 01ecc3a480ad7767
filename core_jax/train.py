"""The one training loop of the library: jitted, donated, data-parallel, checkpointed, resumable.

A task supplies three pure pieces — `init_params(rng)`, `loss_fn(params, batch, rng) -> (loss, metrics)` and
`batch_fn(step) -> dict of numpy arrays` (deterministic in the step, so the step *is* the data-stream position;
batches may come in a few different shapes, each compiled once) — and optionally `eval_fn(params, step) -> dict`
(validation, logged with an `eval/` prefix every `eval_every` steps); `train` does the rest: AdamW, sharding over
all devices, Orbax checkpoints every `ckpt_every` steps and promptly on SIGTERM/Ctrl-C (the host never runs more
than two steps ahead of the device), metrics as JSON lines that read as one run across restarts, and a progress
bar of finished steps. Restarting with the same workdir resumes exactly.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from tqdm.auto import tqdm

from core_jax import sharding as shd
from core_jax.checkpoint import Checkpointer, CheckpointError, SaveError, read_meta, write_reason
from core_jax.config import Rule, at_least, between, positive, validate
from core_jax.optim import OptimConfig, make_optimizer


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    log_every: int = 50
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 0           # > 0: call the task's eval_fn(params, step) every this many steps (and at the end)
    seed: int = 0
    optim: OptimConfig = OptimConfig()

    @staticmethod
    def config_rules(section: dict) -> list[tuple[str, Rule]]:
        """Allowed ranges (checked by core_jax.config when the config is loaded)."""
        below_one = Rule(lambda v: 0 <= v < 1, "in [0, 1)")
        return [("steps", at_least(1)), ("log_every", at_least(1)), ("ckpt_every", at_least(1)),
                ("keep_checkpoints", at_least(1)), ("eval_every", at_least(0)),
                ("optim.lr", positive()), ("optim.warmup_frac", between(0, 1)), ("optim.warmup_steps", at_least(0)),
                ("optim.warmup_init", at_least(0)), ("optim.decay_frac", between(0, 1)),
                ("optim.min_lr_frac", between(0, 1)), ("optim.b1", below_one), ("optim.b2", below_one),
                ("optim.eps", positive()), ("optim.weight_decay", at_least(0)), ("optim.clip_norm", at_least(0)),
                ("optim.accumulate", at_least(1)), ("optim.batch_ramp", between(0, 1))]


class TrainState(struct.PyTreeNode):
    step: jnp.ndarray
    params: Any
    opt_state: Any
    rng: jnp.ndarray


LossFn = Callable[[Any, dict, jnp.ndarray], tuple[jnp.ndarray, dict]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation):
    """train_step(state, batch) -> (state, metrics); the step's randomness is fold_in(rng, step)."""
    def train_step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
    return train_step


def init_state(cfg: TrainConfig, init_params: Callable, tx: optax.GradientTransformation) -> TrainState:
    rng_init, rng_train = jax.random.split(jax.random.PRNGKey(cfg.seed))
    params = init_params(rng_init)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng_train)


def _to_host(metrics: dict) -> dict:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    history: list[dict]
    resumed_from: int | None
    data_wait_s: float = 0.0   # time spent inside batch_fn (host-side data the step did not hide)
    interrupted_by: int | None = None  # the signal (SIGINT, SIGTERM) that stopped training early, after saving


MAX_STEPS_IN_FLIGHT = 2  # dispatched steps not yet finished; bounds how long a signal waits for the device


class _Pending(NamedTuple):
    step: int          # the step count once this step has run
    metrics: dict      # its metrics, still on the device
    log: bool          # whether this step writes a metrics record


class _MetricsLog:
    """metrics.jsonl of one run across restarts: rows past the restored step are dropped (they were trained again
    after the resume), and `time_s`/`data_wait_s` continue from the restored checkpoint's (``saved``: its metadata's
    seconds, which count the steps after the last logged row too), else from the last kept row. A failed write
    (disk full, ...) raises `SaveError`; the file keeps every row written before it."""

    def __init__(self, path: Path | None, start: int, saved: dict | None = None):
        self.path, self.file = path, None
        self.time_offset = self.wait_offset = 0.0
        kept = []
        if path is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= start:
                    kept.append(line)
                    self.time_offset = float(row.get("time_s", self.time_offset))
                    self.wait_offset = float(row.get("data_wait_s", self.wait_offset))
            tmp = path.with_name(path.name + ".tmp")
            try:
                tmp.write_text("".join(line + "\n" for line in kept))
                tmp.replace(path)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise SaveError(str(path), write_reason(e)) from None
        saved = saved or {}
        self.time_offset = float(saved.get("time_s", self.time_offset))
        self.wait_offset = float(saved.get("data_wait_s", self.wait_offset))
        if path is None:
            return
        try:
            self.file = open(path, "a")
        except OSError as e:
            raise SaveError(str(path), write_reason(e)) from None

    def write(self, record: dict) -> None:
        if self.file:
            try:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
            except OSError as e:
                raise SaveError(str(self.path), write_reason(e)) from None

    def close(self) -> None:
        if self.file:
            try:
                self.file.close()
            except OSError:  # the failed write was reported; what it could not write is lost either way
                pass


class _EvalStopped(BaseException):
    """Raised inside the task's eval_fn by a first SIGTERM/SIGINT: the evaluation is dropped and training stops
    (a BaseException, so that no `except Exception` in the evaluation swallows it)."""


class _StopSignals:
    """SIGTERM and SIGINT set `signum` instead of killing the process (main thread only); during `evaluating()` they
    also abandon the evaluation (`_EvalStopped`); a second SIGINT raises KeyboardInterrupt as usual. The previous
    handlers come back on exit."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}
        self._in_eval = False

    def _handle(self, signum, frame):
        self.signum = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self._old.get(signal.SIGINT, signal.default_int_handler))
        if self._in_eval:
            self._in_eval = False  # raise once
            raise _EvalStopped

    def evaluating(self, evaluate: Callable[[], dict]) -> dict | None:
        """`evaluate()`, or None when a signal came before or during it."""
        if self.signum is not None:
            return None
        self._in_eval = True
        try:
            try:
                return evaluate()
            finally:
                self._in_eval = False
        except _EvalStopped:
            return None

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                break
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _check_same_task(ckpt: Checkpointer, meta: dict) -> None:
    """A workdir that holds another package's training run is a one-line error, not a tree-structure mismatch."""
    try:
        stored, _ = read_meta(ckpt.directory)
    except CheckpointError:  # unreadable newest step: restore() falls back to an older one or says so
        return
    if "task" in meta and stored.get("task", meta["task"]) != meta["task"]:
        ckpt.close()
        raise CheckpointError(f"{ckpt.directory} holds a {stored['task']!r} training run, not {meta['task']!r}; "
                              f"train into another --workdir")


def _resume_hint(ckpt: Checkpointer | None) -> str:
    last = ckpt.latest_step() if ckpt is not None else None
    if last is None:
        return "no checkpoint was written before it: free space there and rerun the same command to start again"
    return (f"the checkpoint of step {last} in {ckpt.directory} is intact: free space there (or move the workdir to "
            f"a disk with room) and rerun the same command to resume from step {last}")


def train(cfg: TrainConfig, workdir: str | Path | None, init_params: Callable, loss_fn: LossFn,
          batch_fn: Callable[[int], dict], meta: dict | None = None, stop_at: int | None = None,
          progress: bool = True, mesh=None, eval_fn: Callable[[Any, int], dict] | None = None) -> TrainResult:
    """Runs (or resumes) training to `cfg.steps`. `stop_at` ends early after saving (used to test resumption).

    At most `MAX_STEPS_IN_FLIGHT` steps run ahead of the host, so SIGTERM or Ctrl-C (first press) stops within
    about that many steps: the state is saved, the final evaluation is skipped, and the result's `interrupted_by`
    holds the signal; a signal during an `eval_fn` call abandons that evaluation at once and stops the same way.
    The progress bar counts finished steps. `cfg` must satisfy `TrainConfig.config_rules`
    (checked here too, for configs built in Python rather than loaded). A checkpoint or metrics.jsonl write that
    fails (disk full, folder removed, ...) raises a one-line `CheckpointError` naming the file, the reason and the
    step a rerun resumes from; the previous checkpoint stays intact.
    """
    validate(cfg, "train.")
    mesh = mesh or shd.data_mesh()
    tx = make_optimizer(cfg.optim, cfg.steps)
    repl = shd.replicated(mesh)
    state = jax.jit(lambda: init_state(cfg, init_params, tx), out_shardings=repl)()
    meta = dict(meta or {}, train_steps=cfg.steps)

    ckpt = Checkpointer(Path(workdir) / "checkpoints", keep=cfg.keep_checkpoints) if workdir else None
    resumed_from, saved_meta = None, {}
    if ckpt is not None and ckpt.latest_step() is not None:
        _check_same_task(ckpt, meta)
        state, saved_meta, resumed_from = ckpt.restore(state)

    start = int(state.step)
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    next_batch = batch_fn(start) if start < end else None
    if next_batch is not None:
        shd.check_batch_size(len(next(iter(next_batch.values()))), mesh)
    step_fn = jax.jit(make_train_step(loss_fn, tx), in_shardings=(repl, shd.batch_sharding(mesh)),
                      out_shardings=(repl, repl), donate_argnums=0)

    log_path = None
    if workdir and jax.process_index() == 0:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        log_path = Path(workdir) / "metrics.jsonl"
    try:
        metrics_log = _MetricsLog(log_path, start, saved_meta.get("elapsed"))
    except SaveError as e:
        hint = _resume_hint(ckpt)
        if ckpt is not None:
            ckpt.close()
        raise CheckpointError(f"{e}; {hint}") from None

    history: list[dict] = []
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress or jax.process_index() != 0,
               desc="train", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
    t0 = time.perf_counter()
    data_wait_s = 0.0
    pending: collections.deque[_Pending] = collections.deque()

    def finish_oldest(eval_metrics: dict | None = None) -> None:
        """Waits for the oldest dispatched step, counts it, and writes its record if it logs."""
        p = pending.popleft()
        host = _to_host(p.metrics)  # blocks until the step has run
        bar.update(1)
        if p.log:
            record = dict(host, step=p.step, time_s=round(metrics_log.time_offset + time.perf_counter() - t0, 3),
                          data_wait_s=round(metrics_log.wait_offset + data_wait_s, 3))
            if eval_metrics:
                record.update({f"eval/{k}": float(v) for k, v in eval_metrics.items()})
            history.append(record)
            metrics_log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")

    def meta_now() -> dict:  # the seconds so far travel with the checkpoint: a resumed run's time_s continues
        return dict(meta, elapsed=dict(time_s=round(metrics_log.time_offset + time.perf_counter() - t0, 3),
                                       data_wait_s=round(metrics_log.wait_offset + data_wait_s, 3)))

    saved = start
    stop = _StopSignals()
    try:
        with stop:
            for step in range(start, end):
                if stop.signum is not None:
                    break
                state, metrics = step_fn(state, shd.shard_batch(next_batch, mesh))
                done = step + 1
                evaluate = eval_fn is not None and cfg.eval_every > 0 and (done % cfg.eval_every == 0 or done == end)
                pending.append(_Pending(done, metrics, done % cfg.log_every == 0 or done == end or evaluate))
                if done < end:  # generated on the host while the device runs the step just dispatched
                    t_data = time.perf_counter()
                    next_batch = batch_fn(done)
                    data_wait_s += time.perf_counter() - t_data
                while len(pending) > (0 if evaluate else MAX_STEPS_IN_FLIGHT):
                    finish_oldest(stop.evaluating(lambda: eval_fn(state.params, done))
                                  if evaluate and len(pending) == 1 else None)
                if ckpt is not None and (done % cfg.ckpt_every == 0 or done == end or stop.signum is not None):
                    while pending:
                        finish_oldest()
                    ckpt.save(done, state, meta_now())
                    saved = done
            while pending:
                finish_oldest()
            if ckpt is not None and stop.signum is not None and saved != int(state.step):
                ckpt.save(int(state.step), state, meta_now())
    except SaveError as e:  # disk full, folder removed, ...: say what survived and how to go on
        raise CheckpointError(f"{e}; {_resume_hint(ckpt)}") from None
    except KeyboardInterrupt:
        # after a first signal this is a second Ctrl-C: stop at once, the last complete checkpoint stays; without
        # one (signals could not be caught here), save what is there unless the interrupt hit a step
        if ckpt is not None and stop.signum is None:
            try:
                ckpt.save(int(state.step), state, meta_now())
            except RuntimeError:  # interrupted inside a step: its input buffers were donated; keep the last save
                pass
        raise
    finally:
        bar.close()
        metrics_log.close()
        if ckpt is not None:
            ckpt.close()
    return TrainResult(state=state, history=history, resumed_from=resumed_from, data_wait_s=data_wait_s,
                       interrupted_by=stop.signum)
