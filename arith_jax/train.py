"""Training an arithmetic model with the shared loop, and loading what training (or export) wrote.

Checkpoints store the whole config as metadata, so `load_trained(path)` rebuilds the exact model without the
YAML file. `export_params` writes a parameters-only checkpoint (no optimizer state) for shipping.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax

from arith_jax.config import ArithConfig
from arith_jax.data import make_batch
from arith_jax.model import ArithModel
from core_jax import config as cfglib
from core_jax.checkpoint import Checkpointer, CheckpointError, read_meta
from core_jax.optim import make_optimizer
from core_jax.train import TrainResult, init_state, train


def build_model(cfg: ArithConfig) -> ArithModel:
    return ArithModel(cfg.model, cfg.data.tokenizer.vocab_size)


def run_training(cfg: ArithConfig, workdir: str | Path | None, *, stop_at: int | None = None,
                 progress: bool = True, mesh=None) -> TrainResult:
    model = build_model(cfg)
    return train(cfg.train, workdir, model.init, model.loss, functools.partial(make_batch, cfg.data),
                 meta={"kind": "train_state", "config": cfglib.to_dict(cfg)}, stop_at=stop_at,
                 progress=progress, mesh=mesh)


def _checkpoint_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} not found; pass a training --workdir or its "
                              f"checkpoints/ folder")
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def load_trained(path: str | Path, step: int | None = None) -> tuple[ArithConfig, ArithModel, dict]:
    """(config, model, params) from a training workdir, its checkpoints/ folder, or an exported model."""
    directory = _checkpoint_dir(path)
    meta, step = read_meta(directory, step)
    if "config" not in meta:
        raise CheckpointError(f"checkpoint {str(directory)!r} has no config metadata; it was not written by "
                              f"arith_jax")
    try:
        cfg = cfglib.from_dict(ArithConfig, meta["config"])
    except ValueError as e:
        raise CheckpointError(f"checkpoint {str(directory)!r} holds a config this version cannot read: {e}") \
            from None
    model = build_model(cfg)
    if meta.get("kind") == "params":
        template = {"params": jax.eval_shape(model.init, jax.random.PRNGKey(0))}
    else:
        tx = make_optimizer(cfg.train.optim, cfg.train.steps)
        template = jax.eval_shape(lambda: init_state(cfg.train, model.init, tx))
    ckpt = Checkpointer(directory)
    try:
        state, _, _ = ckpt.restore(template, step)
    finally:
        ckpt.close()
    params = state["params"] if isinstance(state, dict) else state.params
    return cfg, model, params


def export_params(cfg: ArithConfig, params, directory: str | Path, extra_meta: dict | None = None) -> Path:
    """A parameters-only checkpoint (what ships in arith_jax/pretrained)."""
    directory = Path(directory)
    ckpt = Checkpointer(directory, keep=1)
    try:
        ckpt.save(0, {"params": params}, dict(extra_meta or {}, kind="params", config=cfglib.to_dict(cfg)))
    finally:
        ckpt.close()
    return directory
