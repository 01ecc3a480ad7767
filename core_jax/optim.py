"""AdamW with warmup/decay schedules, gradient clipping and no weight decay on norms and biases, optionally over
gradients accumulated across micro-batches with a batch-size ramp (the Abacus original's recipe).

Accumulation (`accumulate` > 1) wraps the optimizer in `optax.MultiSteps`: every training step
is one micro-batch, and the optimizer applies the mean gradient of each group of k micro-batches (clipped as a
whole), returning zero updates in between. `train.steps` and every schedule keep counting micro-batches: update g
uses the learning rate of its last micro-batch. With `batch_ramp` r > 0, k grows with the fraction f of training
done when the update starts, k(f) = min(floor(f * K / r) + 1, K) for K = `accumulate`: the original's
`batch_size_ramp` (its effective batch (floor(f * 8192 / (r * mbs)) + 1) * mbs, capped at 8192, is K = 8192 / mbs
micro-batches of mbs rows). Micro-batches after the last complete update are not applied.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    schedule: Literal["trapezoid", "cosine", "constant", "inverse_sqrt"] = "trapezoid"
    warmup_frac: float = 0.1      # linear warmup over this fraction of the steps
    warmup_steps: int = 0         # > 0: warmup over exactly this many steps instead (inverse_sqrt: the original's
    #                               10000)
    warmup_init: float = 0.0      # learning rate at step 0 (the E2E original's inverse_sqrt starts at 1e-7)
    decay_frac: float = 0.1       # trapezoid: linear decay to 0 over the last fraction (the original's budget-constant)
    min_lr_frac: float = 0.0      # cosine: floor as a fraction of lr
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-12
    weight_decay: float = 0.01
    clip_norm: float = 0.5
    accumulate: int = 1           # micro-batches averaged per update (the most, with batch_ramp)
    batch_ramp: float = 0.0       # > 0: micro-batches per update grow from 1 to `accumulate` over this fraction


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Step-based versions of the Abacus original's wall-clock trapezoid, cosine, constant, and the E2E original's
    inverse square root: linear warmup from `warmup_init` to lr over W steps, then lr * sqrt(W / step)."""
    total = max(int(total_steps), 1)
    warm = cfg.warmup_steps if cfg.warmup_steps > 0 else int(round(cfg.warmup_frac * total))
    if cfg.schedule == "inverse_sqrt":
        w = max(warm, 1)
        return lambda step: jnp.where(
            step < w, cfg.warmup_init + step * (cfg.lr - cfg.warmup_init) / w,
            cfg.lr * jnp.sqrt(w / jnp.maximum(step, w).astype(jnp.float32)))
    if cfg.schedule == "constant":
        rest = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        rest = optax.cosine_decay_schedule(cfg.lr, max(total - warm, 1), alpha=cfg.min_lr_frac)
    elif cfg.schedule == "trapezoid":
        decay = max(int(round(cfg.decay_frac * total)), 1)
        flat = max(total - warm - decay, 0)
        rest = optax.join_schedules(
            [optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, 0.0, decay)], [flat])
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; use trapezoid, cosine, constant or inverse_sqrt")
    if warm == 0:
        return rest
    return optax.join_schedules([optax.linear_schedule(cfg.warmup_init, cfg.lr, warm), rest], [warm])


def decay_mask(params):
    """True where weight decay applies: not on biases or any parameter under a *norm* module."""
    def keep(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", k))).lower() for k in path]
        return not (names[-1] == "bias" or any("norm" in n for n in names))
    return jax.tree_util.tree_map_with_path(keep, params)


class AccumulationPlan(NamedTuple):
    """Optimizer updates over a run of micro-batches: update g averages the micro-batches
    first_B[g] .. first_B[g] + size_B[g] - 1 (B = the number of complete updates)."""

    first_B: np.ndarray   # int32: the training step (micro-batch) each update starts at
    size_B: np.ndarray    # int32: micro-batches in each update


def accumulation_plan(cfg: OptimConfig, total_steps: int) -> AccumulationPlan:
    """The updates that `total_steps` micro-batches make (module docstring), complete updates only."""
    if cfg.accumulate < 1:
        raise ValueError(f"optim.accumulate must be >= 1, got {cfg.accumulate}")
    if not 0 <= cfg.batch_ramp <= 1:
        raise ValueError(f"optim.batch_ramp must be in [0, 1], got {cfg.batch_ramp}")
    total, most = max(int(total_steps), 1), cfg.accumulate
    first, size, step = [], [], 0
    while True:
        k = most if cfg.batch_ramp == 0 else min(int(step / total * most / cfg.batch_ramp) + 1, most)
        if step + k > total:
            break
        first.append(step)
        size.append(k)
        step += k
    return AccumulationPlan(np.asarray(first, np.int32), np.asarray(size, np.int32))


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (with clipping) stepping once per training step, or, with accumulation, an `optax.MultiSteps` that
    updates once per group of micro-batches of `accumulation_plan` (module docstring)."""
    schedule = make_schedule(cfg, total_steps)
    accumulating = cfg.accumulate > 1
    if accumulating:
        plan = accumulation_plan(cfg, total_steps)
        if len(plan.size_B) == 0:
            raise ValueError(f"{total_steps} training steps make no complete update of {cfg.accumulate} "
                             f"micro-batches (optim.accumulate): train longer or accumulate fewer")
        last_B = jnp.asarray(plan.first_B + plan.size_B - 1)
        size_B = jnp.asarray(plan.size_B)
        micro_schedule = schedule
        schedule = lambda g: micro_schedule(last_B[jnp.minimum(g, len(plan.size_B) - 1)])
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    mask=decay_mask),
    )
    if not accumulating:
        return tx
    every_k = lambda g: size_B[jnp.minimum(g, len(plan.size_B) - 1)]
    return optax.MultiSteps(tx, every_k_schedule=every_k).gradient_transformation()
