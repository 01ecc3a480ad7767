"""Orbax checkpoints of the whole training state (model, optimizer, step = data-stream position) plus metadata.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save leaves
the previous checkpoint intact. A save that fails (disk full, folder removed, no permission) removes its partial
directory and raises `SaveError` naming the folder and the reason; the previous checkpoint stays intact. A checkpoint
that cannot be read is reported with the path and what to do, and restoring falls back to the newest readable one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint directory that is missing, empty or unreadable."""


class SaveError(CheckpointError):
    """A checkpoint (or another file of a run) that could not be written; `reason` is the system's reason, e.g.
    'No space left on device'."""

    def __init__(self, what: str, reason: str):
        self.what, self.reason = what, reason
        super().__init__(f"cannot write {what}: {reason}")


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
        """Writes `step` atomically; on failure removes the partial write and raises `SaveError` (one line, instead
        of the tracebacks Orbax's writer threads log)."""
        try:
            with _quiet_orbax_errors():
                self.manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                     meta=ocp.args.JsonSave(meta)), force=True)
                self.manager.wait_until_finished()
        except (OSError, ValueError, RuntimeError) as e:  # tensorstore reports failed writes as ValueError
            for partial in self.directory.glob(f"{int(step)}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
            raise SaveError(f"the checkpoint of step {int(step)} in {self.directory}", write_reason(e)) from None

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """Restores into the structure/shardings of `target`; tries older steps if the newest is unreadable."""
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        abstract = jax.tree_util.tree_map(_with_sharding, target)
        errors = []
        for s in steps:
            previous_hook = _quiet_closed_loop_reports()
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                      meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - any read failure means "corrupt", reported below
                errors.append(f"{self.directory / str(s)}: {_reason(e)}")  # the quiet hook stays: reads are late
                continue
            sys.unraisablehook = previous_hook  # a clean read leaves nothing outstanding
            if errors:
                log.warning("skipped unreadable checkpoint(s): %s", "; ".join(errors))
            return out["state"], dict(out["meta"]), s
        raise CheckpointError(
            f"checkpoint(s) unreadable or not of this model: {'; '.join(errors)}; delete the broken step "
            f"directories (or restore them from a copy) or train into a new --workdir")

    def close(self) -> None:
        self.manager.close()


def write_reason(e: BaseException) -> str:
    """The system's reason for a failed write: an OSError's text, or the error code tensorstore appends to its
    messages (``[os_error_code='28']`` is 'No space left on device'); else a short form of the error."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    code = re.search(r"os_error_code='(\d+)'", str(e))
    return os.strerror(int(code.group(1))) if code else _reason(e)


class _DropOrbaxErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


@contextlib.contextmanager
def _quiet_orbax_errors():
    """Drops the error reports (with tracebacks) Orbax's threads log through absl while a save runs: a failed save
    is reported once, by `Checkpointer.save`'s exception."""
    absl_logger, drop = logging.getLogger("absl"), _DropOrbaxErrors()
    absl_logger.addFilter(drop)
    try:
        yield
    finally:
        absl_logger.removeFilter(drop)


def _reason(e: Exception) -> str:
    """A short reason for a failed read: tensorstore's first line is a 2,000-character spec; keep its status code
    and the array it was reading."""
    text = str(e).splitlines()[0] if str(e) else ""
    if len(text) <= 200:
        return f"{type(e).__name__}: {text}" if text else type(e).__name__
    status = re.match(r"([A-Z_]{4,}):", text)
    arrays = [a for a in re.findall(r'\\?"path\\?":\\?"([^"\\]+?)/?\\?"', text) if not a.endswith("state")
              and "/" not in a]
    return (f"{type(e).__name__}{' ' + status.group(1) if status else ''}"
            f"{' reading ' + arrays[-1] if arrays else ': ' + text[:160] + '...'}")


def _quiet_closed_loop_reports():
    """Installs (once) a sys.unraisablehook that drops exactly the 'Event loop is closed' reports and passes every
    other one to the previous hook; returns the hook that was installed before.

    When a restore fails, tensorstore's outstanding reads finish on Orbax's already closed event loop, and Python
    would print a traceback for each, some while the restore is still unwinding and some seconds later. The hook
    is installed before each read, taken back after a clean one, and kept after a failed one.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loop", False):
        return previous

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._drops_closed_loop = True
    sys.unraisablehook = hook
    return previous


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
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"checkpoint {str(directory)!r} is a file; pass the folder a training run or an export "
                              f"wrote")
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
