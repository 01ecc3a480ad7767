"""`python run.py sr {train,describe,eval,export,fit,bench}`: the command line of the symbolic-regression package.

`fit` and `bench` have their own argument parsers (sr_jax.fit_cli, sr_jax.bench_cli). Every user error ends in one
line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from core_jax.cli import (OneLineParser, add_train_parser, check_writable, check_writable_dir, int_at_least,
                          run_command, train_from_args)

DELEGATED = {"fit": "sr_jax.fit_cli", "bench": "sr_jax.bench_cli"}


def _parser() -> OneLineParser:
    p = OneLineParser(prog="run.py sr", description="End-to-end symbolic regression with transformers",
                      epilog="each command's options: run.py sr COMMAND -h")
    sub = p.add_subparsers(dest="command", required=True)
    # listed here, parsed by their own modules (``main`` hands them over before this parser runs)
    sub.add_parser("fit", help="fit a formula to a CSV file (sr_jax.SymbolicTransformerRegressor)", add_help=False)
    sub.add_parser("bench", help="the Feynman benchmark, optionally side by side with Operon", add_help=False)
    add_train_parser(sub, "an E2E model", "configs/sr_*.yaml", "train.steps=2000")

    d = sub.add_parser("describe", help="print a config's model size without training")
    d.add_argument("--config", required=True)
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    e = sub.add_parser("eval", help="in-domain scores of a model on fresh generated problems")
    e.add_argument("--checkpoint", help="training workdir or export (default: the shipped model)")
    e.add_argument("--n", type=int_at_least(1), default=100, help="problems (default 100)")
    e.add_argument("--seed", type=int_at_least(0), default=1, help="generator seed of the problems (default 1)")
    e.add_argument("--points", type=int_at_least(2), default=200,
                   help="points per problem (default 200; at least 2: the generator normalises the inputs)")
    e.add_argument("--decoding", choices=["greedy", "beam", "sample"], default="beam")
    e.add_argument("--beam-size", type=int_at_least(1), default=10,
                   help="beam width or number of samples (default 10)")
    e.add_argument("--json", help="also write the scores here")

    x = sub.add_parser("export", help="write a parameters-only copy of a checkpoint")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True)
    return p


def _train(args) -> None:
    from sr_jax.config import SRConfig
    from sr_jax.train import run_training

    train_from_args(args, SRConfig, run_training)


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


def _eval(args) -> None:
    import dataclasses

    from sr_jax.train import load_trained, validate, validation_problems

    if args.json:
        check_writable(args.json, "--json")
    tm = load_trained(args.checkpoint)
    cfg = dataclasses.replace(tm.config, eval=dataclasses.replace(tm.config.eval, n_problems=args.n, seed=args.seed,
                                                                   n_points=args.points))
    scores = validate(tm, validation_problems(cfg), cfg.eval.refine_maxiter, decoding=args.decoding,
                      beam_size=args.beam_size)
    report = dict(scores, problems=args.n, seed=args.seed, points=args.points, decoding=args.decoding,
                  beam_size=args.beam_size, checkpoint=args.checkpoint or "shipped")
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


def _export(args) -> None:
    from sr_jax.train import export_params, load_trained

    check_writable_dir(args.out, "--out")
    print(export_params(load_trained(args.checkpoint), args.out))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[2:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        return importlib.import_module(DELEGATED[argv[0]]).main(argv[1:])
    def command():
        args = _parser().parse_args(argv)
        {"train": _train, "describe": _describe, "eval": _eval, "export": _export}[args.command](args)

    return run_command(command)
