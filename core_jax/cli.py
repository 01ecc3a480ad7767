"""What every package's command line shares: the `train` subcommand (config, --set overrides, resumable workdir),
one-line usage errors, range-checked flag types, and writability checks that run before the work starts."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable


class UsageError(ValueError):
    """A bad command line; printed as one `error: ...` line with exit status 2, like every other user error."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise `UsageError` (one line) instead of printing the usage and exiting;
    its subcommand parsers are of the same class."""

    def error(self, message):
        raise UsageError(message)


def int_at_least(lo: int) -> Callable[[str], int]:
    """argparse type: an integer >= lo (the message names the allowed range)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {value}")
        return value
    parse.__name__ = f"integer >= {lo}"
    return parse


def _finite_float(text: str, above_zero: bool) -> float:
    bound = "> 0" if above_zero else ">= 0"
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}") from None
    if not (math.isfinite(v) and (v > 0 if above_zero else v >= 0)):
        raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text}")
    return v


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _finite_float(text, above_zero=False)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _finite_float(text, above_zero=True)


def int_list_at_least(lo: int) -> Callable[[str], tuple[int, ...]]:
    """argparse type: comma-separated integers, each >= lo, e.g. 30,40,50."""
    item = int_at_least(lo)

    def parse(text: str) -> tuple[int, ...]:
        parts = [p.strip() for p in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"expected comma-separated integers >= {lo}, got {text!r}")
        try:
            return tuple(item(p) for p in parts)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers >= {lo}, got {text!r}") from None
    parse.__name__ = f"list of integers >= {lo}"
    return parse


_BYTE_ORDER_MARKS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
                     (b"\xfe\xff", "UTF-16"))


def decode_text(data: bytes, what: str) -> str:
    """``data`` as UTF-8 text (a UTF-8 byte-order mark, as Excel writes, is dropped); a ValueError naming ``what``
    and, where a byte-order mark tells it, the encoding the file is in instead."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        other = next((name for mark, name in _BYTE_ORDER_MARKS if data.startswith(mark)), None)
        where = f"it is {other}" if other else f"byte {data[e.start]:#04x} at offset {e.start}"
        raise ValueError(f"{what} is not UTF-8 text ({where}); save it as UTF-8") from None


def check_writable(path: str | Path, what: str) -> None:
    """Raises ValueError (one line) unless a file can be written at `path`, whose folder must exist: writes and
    deletes a probe file there, so read-only, missing or full locations fail before any work starts."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot write {what} {str(path)!r}: it is a folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"cannot write {what} {str(path)!r}: permission denied")
    folder = path.absolute().parent
    if not folder.is_dir():
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        raise ValueError(f"cannot write {what} {str(path)!r}: " + (
            f"folder {str(folder)!r} does not exist" if existing.is_dir()
            else f"{str(existing)!r} is a file, not a folder"))
    _probe(folder, f"{what} {str(path)!r}")


def check_plot_path(path: str | Path, what: str) -> None:
    """`check_writable`, and the file name's extension (if any) must be a format matplotlib writes (png, pdf, svg,
    ...), so that a figure drawn after the work cannot fail on its name."""
    check_writable(path, what)
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix:
        from matplotlib.figure import Figure

        formats = Figure().canvas.get_supported_filetypes()
        if suffix not in formats:
            raise ValueError(f"cannot write {what} {str(path)!r}: '.{suffix}' is not an image format matplotlib "
                             f"writes; use one of {', '.join('.' + f for f in sorted(formats))}")


def check_writable_dir(path: str | Path, what: str) -> None:
    """Like `check_writable` for a folder that will receive files (a training workdir, an export), which need not
    exist yet (it is created for the check and removed again)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"cannot write {what} {str(path)!r}: it is a file, not a folder")
    _probe(path.absolute(), f"{what} {str(path)!r}")


def _probe(folder: Path, what: str) -> None:
    """Writes and deletes a file in `folder`; folders created for the probe are removed again (the command creates
    them when it writes, so a command that fails later leaves nothing behind)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"cannot write {what}: {str(existing)!r} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise ValueError(f"cannot write {what}: {e.strerror or e}") from None
    finally:
        for p in missing:
            with contextlib.suppress(OSError):
                p.rmdir()


def add_train_parser(sub, what: str, config_hint: str, example: str) -> argparse.ArgumentParser:
    """`train --config FILE [--set KEY=VALUE ...] [--workdir DIR]`; returns the parser for extra flags."""
    t = sub.add_parser("train", help=f"train (or resume) {what} from a config")
    t.add_argument("--config", required=True, help=config_hint)
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config field, e.g. --set {example} (repeatable)")
    t.add_argument("--workdir", help="checkpoints and metrics (default: runs/<config name>); rerun to resume")
    t.set_defaults(config_hint=config_hint)
    return t


class Interrupted(Exception):
    """A command stopped by SIGINT/SIGTERM after keeping what it had (e.g. training saved a checkpoint): print the
    message, exit with `exit_status` (128 + signal)."""

    def __init__(self, signum: int, message: str):
        self.exit_status = 128 + signum
        super().__init__(message)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGINT while a command runs (outside the training loop, which catches them itself to save first):
    unwinds the command like Ctrl-C does; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_name(e: KeyboardInterrupt) -> str:
    """SIGTERM for a `Stopped` by SIGTERM, else SIGINT (Ctrl-C)."""
    return signal.Signals(getattr(e, "signum", signal.SIGINT)).name


@contextlib.contextmanager
def _signals_stop_the_command():
    """SIGTERM and SIGINT raise `Stopped` in the main thread while the block runs (SIGTERM would otherwise end the
    process at once, without a word); a signal the process was told to ignore stays ignored; the previous handlers
    come back afterwards."""
    def stop(signum, frame):
        raise Stopped(signum)

    old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(sig) is signal.SIG_IGN:  # e.g. SIGINT of a background job: keep ignoring it
            continue
        try:
            old[sig] = signal.signal(sig, stop)
        except ValueError:  # not the main thread: signals stay as they are
            break
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _check_config_keys(config_cls: type, path: str, hint: str) -> None:
    """A config file with keys ``config_cls`` does not know (not an override's) may be another package's config
    (`run.py arith train --config configs/sr_tiny.yaml`): say which configs the command trains from."""
    from core_jax.config import UnknownConfigKey, load_config

    try:
        load_config(config_cls, path)
    except UnknownConfigKey as e:
        raise UnknownConfigKey(f"{path}: {e}; if it is another command's config: this one trains from {hint}") \
            from None


def train_from_args(args, config_cls: type, run_training: Callable[[Any, Path], Any]) -> tuple[Any, Path, Any]:
    """Loads the config, trains (or resumes) into the workdir, reports; returns (config, workdir, result).

    Raises `Interrupted` when a signal stopped training (the caller skips any evaluation and exits with its status).
    """
    from core_jax.config import UnknownConfigKey, load_config
    from core_jax.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()
    try:
        cfg = load_config(config_cls, args.config, args.set)
    except UnknownConfigKey:
        if getattr(args, "config_hint", None):  # the file's own key, not an override's: say which configs fit
            _check_config_keys(config_cls, args.config, args.config_hint)
        raise
    workdir = Path(args.workdir or Path("runs") / cfg.name)
    check_writable_dir(workdir, "--workdir")
    print(f"training {cfg.name} into {workdir}", file=sys.stderr)
    result = run_training(cfg, workdir)
    if result.resumed_from is not None:
        print(f"resumed from step {result.resumed_from}", file=sys.stderr)
    if result.history:
        print(json.dumps(result.history[-1]))
    if result.interrupted_by is not None:
        raise Interrupted(result.interrupted_by, f"interrupted by {signal.Signals(result.interrupted_by).name} at step "
                          f"{int(result.state.step)}; the checkpoint is saved in {workdir}; rerun the same command to "
                          f"resume")
    return cfg, workdir, result


@contextlib.contextmanager
def _one_line_warnings():
    """While a command runs, a Python warning prints as one ``warning: ...`` line on stderr (not file:line and the
    source line: a command-line user did not write that code)."""
    show = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {' '.join(str(message).split())}", file=sys.stderr if file is None else file)

    warnings.showwarning = one_line
    try:
        yield
    finally:
        warnings.showwarning = show


def run_command(command) -> int:
    """Run a CLI command (a function of no arguments returning an exit status or None) the way every command of
    this project ends: a bad input, file or checkpoint is one ``error: ...`` line on stderr and status 2, an
    interrupted training run (or the evaluation after it) its ``Interrupted`` line and 128+signal, Ctrl-C anywhere
    else ``interrupted`` and 130, SIGTERM ``interrupted by SIGTERM`` and 143; never a traceback."""
    from core_jax.checkpoint import CheckpointError

    with _signals_stop_the_command(), _one_line_warnings():
        try:
            return command() or 0
        except (ValueError, CheckpointError, OSError) as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        except Interrupted as e:
            print(e, file=sys.stderr)
            return e.exit_status
        except KeyboardInterrupt as e:  # outside training (or a second Ctrl-C): stop without a traceback
            name = signal_name(e)
            print("interrupted" if name == "SIGINT" else f"interrupted by {name}", file=sys.stderr)
            return 128 + signal.Signals[name]
