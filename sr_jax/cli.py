"""`python run.py sr {train,describe,export,fit,bench}`: the command line of the symbolic-regression package.

`fit` and `bench` have their own argument parsers (sr_jax.fit_cli, sr_jax.bench_cli). Every user error ends in one
line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DELEGATED = {"fit": "sr_jax.fit_cli", "bench": "sr_jax.bench_cli"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py sr", description="End-to-end symbolic regression with transformers",
                                epilog="also: `run.py sr fit -h` (fit a formula to a CSV), `run.py sr bench -h`")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) an E2E model from a config")
    t.add_argument("--config", required=True, help="configs/sr_*.yaml")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=2000 (repeatable)")
    t.add_argument("--workdir", help="checkpoints and metrics (default: runs/<config name>); rerun to resume")

    d = sub.add_parser("describe", help="print a config's model size without training")
    d.add_argument("--config", required=True)
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    x = sub.add_parser("export", help="write a parameters-only copy of a checkpoint")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True)
    return p


def _train(args) -> None:
    from core_jax.config import load_config
    from core_jax.sharding import maybe_initialize_distributed
    from sr_jax.config import SRConfig
    from sr_jax.train import run_training

    maybe_initialize_distributed()
    cfg = load_config(SRConfig, args.config, args.set)
    workdir = Path(args.workdir or Path("runs") / cfg.name)
    print(f"training {cfg.name} into {workdir}", file=sys.stderr)
    result = run_training(cfg, workdir)
    if result.resumed_from is not None:
        print(f"resumed from step {result.resumed_from}", file=sys.stderr)
    if result.history:
        print(json.dumps(result.history[-1]))


def _describe(args) -> None:
    import jax

    from core_jax.config import load_config
    from sr_jax.config import SRConfig
    from sr_jax.train import build_model

    cfg = load_config(SRConfig, args.config, args.set)
    model = build_model(cfg)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    parts = {k: sum(int(x.size) for x in jax.tree_util.tree_leaves(v)) for k, v in shapes.items()}
    embedder = sum(int(x.size) for x in jax.tree_util.tree_leaves(shapes["encoder"]["embedder"]))
    print(json.dumps({"name": cfg.name, "params": sum(parts.values()), "embedder": embedder,
                      "encoder_without_embedder": parts["encoder"] - embedder, "decoder": parts["decoder"],
                      "decoder_vocab": len(cfg.vocab)}))


def _export(args) -> None:
    from sr_jax.train import export_params, load_trained

    print(export_params(load_trained(args.checkpoint), args.out))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[2:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        return importlib.import_module(DELEGATED[argv[0]]).main(argv[1:])
    args = _parser().parse_args(argv)
    from core_jax.checkpoint import CheckpointError
    from core_jax.config import ConfigError

    try:
        {"train": _train, "describe": _describe, "export": _export}[args.command](args)
    except (ValueError, ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
