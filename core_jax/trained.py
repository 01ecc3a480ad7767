"""Loading what training (or export) wrote, for any task whose config is a frozen dataclass with a `train` section.

Checkpoints store the whole config as metadata, so `load_trained(path, ConfigClass, build_model)` rebuilds the exact
model without the YAML file. `export_params` writes a parameters-only checkpoint (no optimizer state) for shipping;
it never overwrites a folder it did not write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

import jax

from core_jax import config as cfglib
from core_jax.checkpoint import Checkpointer, CheckpointError, read_meta
from core_jax.optim import make_optimizer
from core_jax.train import init_state

C = TypeVar("C")


def checkpoint_dir(path: str | Path) -> Path:
    """A training workdir, its checkpoints/ folder, or an export -> the folder holding step directories."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} not found; pass a training --workdir or its "
                              f"checkpoints/ folder")
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def load_trained(path: str | Path, config_cls: type[C], build_model: Callable[[C], Any], *, kind: str,
                 step: int | None = None) -> tuple[C, Any, Any]:
    """(config, model, params) from a checkpoint written by `core_jax.train.train` or `export_params`.

    `kind` names the task ("arith", "sr") for the error raised when the checkpoint belongs to another one.
    """
    directory = checkpoint_dir(path)
    meta, step = read_meta(directory, step)
    if "config" not in meta:
        raise CheckpointError(f"checkpoint {str(directory)!r} has no config metadata; it was not written by "
                              f"this library")
    if meta.get("task", kind) != kind:
        raise CheckpointError(f"checkpoint {str(directory)!r} is a {meta['task']!r} model, not {kind!r}")
    try:
        cfg = cfglib.from_dict(config_cls, meta["config"])
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


def export_params(cfg, params, directory: str | Path, extra_meta: dict | None = None) -> Path:
    """A parameters-only checkpoint (what ships in <package>/pretrained).

    Refuses a non-empty folder that is not itself an export, so pointing `--out` at a training run never deletes
    its checkpoints.
    """
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        try:
            meta, _ = read_meta(directory)
        except CheckpointError:
            meta = {}
        if meta.get("kind") != "params":
            raise CheckpointError(f"{str(directory)!r} is not empty and is not an exported model; refusing to "
                                  f"overwrite it — choose a new --out folder")
    ckpt = Checkpointer(directory, keep=1)
    try:
        ckpt.save(0, {"params": params}, dict(extra_meta or {}, kind="params", config=cfglib.to_dict(cfg)))
    finally:
        ckpt.close()
    return directory
