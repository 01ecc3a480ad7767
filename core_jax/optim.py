"""AdamW with warmup/decay schedules, gradient clipping and no weight decay on norms and biases."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    schedule: Literal["trapezoid", "cosine", "constant", "inverse_sqrt"] = "trapezoid"
    warmup_frac: float = 0.1      # linear warmup over this fraction of the steps
    warmup_steps: int = 0         # > 0: warmup over exactly this many steps instead (inverse_sqrt: the original's 10000)
    warmup_init: float = 0.0      # learning rate at step 0 (the E2E original's inverse_sqrt starts at 1e-7)
    decay_frac: float = 0.1       # trapezoid: linear decay to 0 over the last fraction (the original's budget-constant)
    min_lr_frac: float = 0.0      # cosine: floor as a fraction of lr
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-12
    weight_decay: float = 0.01
    clip_norm: float = 0.5


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


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = make_schedule(cfg, total_steps)
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    mask=decay_mask),
    )
