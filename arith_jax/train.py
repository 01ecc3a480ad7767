"""Training an arithmetic model with the shared loop, and loading what training (or export) wrote.

Checkpoints store the whole config as metadata, so `load_trained(path)` rebuilds the exact model without the
YAML file. `export_params` writes a parameters-only checkpoint (no optimizer state) for shipping.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from arith_jax.config import ArithConfig
from arith_jax.data import make_batch
from arith_jax.model import ArithModel
from core_jax import config as cfglib
from core_jax import trained
from core_jax.train import TrainResult, train


def build_model(cfg: ArithConfig) -> ArithModel:
    return ArithModel(cfg.model, cfg.data.tokenizer.vocab_size)


def run_training(cfg: ArithConfig, workdir: str | Path | None, *, stop_at: int | None = None,
                 progress: bool = True, mesh=None) -> TrainResult:
    cfglib.validate(cfg)  # configs built in Python meet the same rules as loaded ones
    model = build_model(cfg)
    return train(cfg.train, workdir, model.init, model.loss, functools.partial(make_batch, cfg.data),
                 meta={"kind": "train_state", "task": "arith", "config": cfglib.to_dict(cfg)}, stop_at=stop_at,
                 progress=progress, mesh=mesh)


def load_trained(path: str | Path, step: int | None = None, average_last: int = 1,
                 abacus_offsets: tuple[int, ...] | None = None) -> tuple[ArithConfig, ArithModel, dict]:
    """(config, model, params) from a training workdir, its checkpoints/ folder, or an exported model;
    `average_last` N > 1: the mean parameters of its newest N checkpoints (`core_jax.trained.load_trained`).
    `abacus_offsets` (default: the checkpoint's own `eval.abacus_offsets`) sets the Abacus offsets evaluation
    decodes with and votes over (`arith_jax.evaluate.solve_prompts`); the returned config carries them (an export of
    it then keeps them)."""
    cfg, model, params = trained.load_trained(path, ArithConfig, build_model, kind="arith", step=step,
                                              average_last=average_last)
    if abacus_offsets is not None:
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, abacus_offsets=tuple(abacus_offsets)))
        cfglib.validate(cfg)   # distinct, >= 0, and leaving the evaluation lengths inside the position table
    return cfg, model, params


def export_params(cfg: ArithConfig, params, directory: str | Path, extra_meta: dict | None = None) -> Path:
    """A parameters-only checkpoint (what ships in arith_jax/pretrained)."""
    return trained.export_params(cfg, params, directory, dict(extra_meta or {}, task="arith"))
