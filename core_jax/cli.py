"""What every package's command line shares: the `train` subcommand (config, --set overrides, resumable workdir)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any, Callable


def add_train_parser(sub, what: str, config_hint: str, example: str) -> argparse.ArgumentParser:
    """`train --config FILE [--set KEY=VALUE ...] [--workdir DIR]`; returns the parser for extra flags."""
    t = sub.add_parser("train", help=f"train (or resume) {what} from a config")
    t.add_argument("--config", required=True, help=config_hint)
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config field, e.g. --set {example} (repeatable)")
    t.add_argument("--workdir", help="checkpoints and metrics (default: runs/<config name>); rerun to resume")
    return t


class Interrupted(Exception):
    """Training stopped early by SIGINT/SIGTERM after saving a checkpoint; exit with `exit_status` (128 + signal)."""

    def __init__(self, signum: int, step: int, workdir: Path):
        self.exit_status = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; the checkpoint is saved in "
                         f"{workdir}; rerun the same command to resume")


def train_from_args(args, config_cls: type, run_training: Callable[[Any, Path], Any]) -> tuple[Any, Path, Any]:
    """Loads the config, trains (or resumes) into the workdir, reports; returns (config, workdir, result).

    Raises `Interrupted` when a signal stopped training (the caller skips any evaluation and exits with its status).
    """
    from core_jax.config import load_config
    from core_jax.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()
    cfg = load_config(config_cls, args.config, args.set)
    workdir = Path(args.workdir or Path("runs") / cfg.name)
    print(f"training {cfg.name} into {workdir}", file=sys.stderr)
    result = run_training(cfg, workdir)
    if result.resumed_from is not None:
        print(f"resumed from step {result.resumed_from}", file=sys.stderr)
    if result.history:
        print(json.dumps(result.history[-1]))
    if result.interrupted_by is not None:
        raise Interrupted(result.interrupted_by, int(result.state.step), workdir)
    return cfg, workdir, result
