"""Orbax checkpoints of the whole training state (model, optimizer, step = data-stream position) plus metadata.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save leaves
the previous checkpoint intact. A checkpoint that cannot be read is reported with the path and what to do, and
restoring falls back to the newest readable one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint directory that is missing, empty or unreadable."""


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """Restores into the structure/shardings of `target`; tries older steps if the newest is unreadable."""
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        abstract = jax.tree_util.tree_map(_with_sharding, target)
        errors = []
        for s in steps:
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                      meta=ocp.args.JsonRestore()))
                if errors:
                    log.warning("skipped unreadable checkpoint(s): %s", "; ".join(errors))
                return out["state"], dict(out["meta"]), s
            except Exception as e:  # noqa: BLE001 - any read failure means "corrupt", reported below
                errors.append(f"step {s}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise CheckpointError(
            f"checkpoint(s) in {self.directory} are unreadable or do not match this model "
            f"({'; '.join(errors)}); delete the broken step directories or train into a new --workdir")

    def close(self) -> None:
        self.manager.close()


def _with_sharding(x):
    """Abstract leaf with a sharding: leaves without one land on the local default device, so a checkpoint
    written on a GPU loads on a CPU-only machine."""
    sds = ocp.utils.to_shape_dtype_struct(x)
    if getattr(sds, "sharding", None) is None:
        sds = jax.ShapeDtypeStruct(sds.shape, sds.dtype,
                                   sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    return sds


def read_meta(directory: str | Path, step: int | None = None) -> tuple[dict, int]:
    """Reads only the JSON metadata (e.g. the config) of a checkpoint, to rebuild the model before restoring."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} not found")
    mngr = ocp.CheckpointManager(directory.absolute(), options=ocp.CheckpointManagerOptions(create=False))
    try:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{str(directory)!r} holds no checkpoint (expected step directories "
                                  f"written by `train`)")
        try:
            meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {str(directory)!r} step {step} has no readable metadata "
                                  f"({type(e).__name__}); it is corrupt or not from this library") from None
        return dict(meta), step
    finally:
        mngr.close()
