"""The one training loop of the library: jitted, donated, data-parallel, checkpointed, resumable.

A task supplies three pure pieces — `init_params(rng)`, `loss_fn(params, batch, rng) -> (loss, metrics)` and
`batch_fn(step) -> dict of numpy arrays` (deterministic in the step, so the step *is* the data-stream position;
batches may come in a few different shapes, each compiled once) — and optionally `eval_fn(params, step) -> dict`
(validation, logged with an `eval/` prefix every `eval_every` steps); `train` does the rest: AdamW, sharding over all devices, Orbax checkpoints every `ckpt_every` steps and on
SIGTERM/Ctrl-C, metrics as JSON lines, and a progress bar. Restarting with the same workdir resumes exactly.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from tqdm.auto import tqdm

from core_jax import sharding as shd
from core_jax.checkpoint import Checkpointer
from core_jax.config import Rule, at_least, between, positive
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
                ("optim.eps", positive()), ("optim.weight_decay", at_least(0)), ("optim.clip_norm", at_least(0))]


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


def train(cfg: TrainConfig, workdir: str | Path | None, init_params: Callable, loss_fn: LossFn,
          batch_fn: Callable[[int], dict], meta: dict | None = None, stop_at: int | None = None,
          progress: bool = True, mesh=None, eval_fn: Callable[[Any, int], dict] | None = None) -> TrainResult:
    """Runs (or resumes) training to `cfg.steps`. `stop_at` ends early after saving (used to test resumption)."""
    mesh = mesh or shd.data_mesh()
    tx = make_optimizer(cfg.optim, cfg.steps)
    repl = shd.replicated(mesh)
    state = jax.jit(lambda: init_state(cfg, init_params, tx), out_shardings=repl)()
    meta = dict(meta or {}, train_steps=cfg.steps)

    ckpt = Checkpointer(Path(workdir) / "checkpoints", keep=cfg.keep_checkpoints) if workdir else None
    resumed_from = None
    if ckpt is not None and ckpt.latest_step() is not None:
        state, _, resumed_from = ckpt.restore(state)

    start = int(state.step)
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    next_batch = batch_fn(start) if start < end else None
    if next_batch is not None:
        shd.check_batch_size(len(next(iter(next_batch.values()))), mesh)
    step_fn = jax.jit(make_train_step(loss_fn, tx), in_shardings=(repl, shd.batch_sharding(mesh)),
                      out_shardings=(repl, repl), donate_argnums=0)

    metrics_file = None
    if workdir and jax.process_index() == 0:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        metrics_file = open(Path(workdir) / "metrics.jsonl", "a")

    interrupted = {"flag": False}
    old_handler = None
    try:
        old_handler = signal.signal(signal.SIGTERM, lambda *_: interrupted.__setitem__("flag", True))
    except ValueError:  # not the main thread
        pass

    history: list[dict] = []
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress or jax.process_index() != 0,
               desc="train", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
    t0 = time.perf_counter()
    data_wait_s = 0.0
    try:
        for step in range(start, end):
            state, metrics = step_fn(state, shd.shard_batch(next_batch, mesh))
            done = step + 1
            if done < end:  # generated on the host while the device runs the step just dispatched
                t_data = time.perf_counter()
                next_batch = batch_fn(done)
                data_wait_s += time.perf_counter() - t_data
            evaluate = eval_fn is not None and cfg.eval_every > 0 and (done % cfg.eval_every == 0 or done == end)
            if done % cfg.log_every == 0 or done == end or evaluate:
                record = dict(_to_host(metrics), step=done, time_s=round(time.perf_counter() - t0, 3),
                              data_wait_s=round(data_wait_s, 3))
                if evaluate:
                    record.update({f"eval/{k}": float(v) for k, v in eval_fn(state.params, done).items()})
                history.append(record)
                if metrics_file:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            bar.update(1)
            if ckpt is not None and (done % cfg.ckpt_every == 0 or done == end or interrupted["flag"]):
                ckpt.save(done, state, meta)
            if interrupted["flag"]:
                break
    except KeyboardInterrupt:
        if ckpt is not None:
            try:
                ckpt.save(int(state.step), state, meta)
            except RuntimeError:  # interrupted inside a step: its input buffers were donated; keep the last save
                pass
        raise
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
        if ckpt is not None:
            ckpt.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    return TrainResult(state=state, history=history, resumed_from=resumed_from, data_wait_s=data_wait_s)
