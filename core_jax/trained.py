"""Loading what training (or export) wrote, for any task whose config is a frozen dataclass with a `train` section.

Checkpoints store the whole config as metadata, so `load_trained(path, ConfigClass, build_model)` rebuilds the exact
model without the YAML file. `export_params` writes a parameters-only checkpoint (no optimizer state) for shipping;
it never overwrites a folder it did not write.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp

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


def averaged_steps(path: str | Path, average_last: int, step: int | None = None) -> list[int]:
    """The steps whose parameters `load_trained(..., average_last=N)` averages: the newest N checkpoints of the
    folder (those up to `step` when given), oldest first. Fewer than N there is a `CheckpointError` that says how
    to keep more (`train.keep_checkpoints`)."""
    if average_last < 1:
        raise ValueError(f"average_last must be >= 1, got {average_last}")
    directory = checkpoint_dir(path)
    ckpt = Checkpointer(directory)
    try:
        steps = sorted(s for s in ckpt.manager.all_steps() if step is None or s <= step)
    finally:
        ckpt.close()
    if len(steps) < average_last:
        raise CheckpointError(f"cannot average the last {average_last} checkpoints of {str(directory)!r}: it holds "
                              f"{len(steps)}{'' if step is None else f' up to step {step}'}; train with "
                              f"train.keep_checkpoints >= {average_last} (one is saved every train.ckpt_every steps)")
    return steps[-average_last:]


def load_trained(path: str | Path, config_cls: type[C], build_model: Callable[[C], Any], *, kind: str,
                 step: int | None = None, average_last: int = 1) -> tuple[C, Any, Any]:
    """(config, model, params) from a checkpoint written by `core_jax.train.train` or `export_params`.

    `kind` names the task ("arith", "sr") for the error raised when the checkpoint belongs to another one.
    `average_last` N > 1 returns the element-wise mean of the parameters of the newest N checkpoints (up to `step`;
    `averaged_steps`), a checkpoint average over the end of training; N = 1 is the one checkpoint, unchanged.
    """
    directory = checkpoint_dir(path)
    steps = averaged_steps(directory, average_last, step) if average_last > 1 else None
    meta, step = read_meta(directory, step if steps is None else steps[-1])
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
        states = [ckpt.restore(template, s)[0] for s in (steps or [step])]
    finally:
        ckpt.close()
    params = [state["params"] if isinstance(state, dict) else state.params for state in states]
    if len(params) == 1:
        return cfg, model, params[0]
    mean = jax.tree_util.tree_map(
        lambda *xs: (sum(jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32)) for x in xs) / len(xs)
                     ).astype(xs[0].dtype), *params)  # summed in at least float32 (bf16 parameters), never below
    return cfg, model, mean


def export_params(cfg, params, directory: str | Path, extra_meta: dict | None = None) -> Path:
    """A parameters-only checkpoint (what ships in <package>/pretrained).

    Refuses a non-empty folder that is not itself an export, so pointing `--out` at a training run never deletes
    its checkpoints. An earlier export there is replaced: the new one is written beside it, then takes its name,
    so a failed export leaves the earlier one as it was.
    """
    directory = Path(directory)
    replace = directory.exists() and any(directory.iterdir())
    if replace:
        try:
            meta, _ = read_meta(directory)
        except CheckpointError:
            meta = {}
        if meta.get("kind") != "params":
            raise CheckpointError(f"{str(directory)!r} is not empty and is not an exported model; refusing to "
                                  f"overwrite it — choose a new --out folder")
    target = directory.with_name(f".{directory.name}.export-{os.getpid()}") if replace else directory
    ckpt = Checkpointer(target, keep=1)
    try:
        ckpt.save(0, {"params": params}, dict(extra_meta or {}, kind="params", config=cfglib.to_dict(cfg)))
    except BaseException:
        if replace:
            shutil.rmtree(target, ignore_errors=True)
        raise
    finally:
        ckpt.close()
    if replace:
        old = directory.with_name(f".{directory.name}.replaced-{os.getpid()}")
        directory.rename(old)
        try:
            target.rename(directory)
        except OSError:  # the earlier export goes back where it was
            old.rename(directory)
            shutil.rmtree(target, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    return directory
