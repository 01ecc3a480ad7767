"""`python run.py arith {train,eval,solve,export}`: the command line of the arithmetic package.

Every user error (bad config key, missing checkpoint, malformed problem) ends in one line on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core_jax.cli import Interrupted, add_train_parser, train_from_args


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py arith", description="Abacus-embedding arithmetic transformers")
    sub = p.add_subparsers(dest="command", required=True)

    t = add_train_parser(sub, "a model", "configs/arith_*.yaml", "model.recurrences=8")
    t.add_argument("--eval-max-len", type=int, default=None,
                   help="after training, evaluate the grid up to this length (default: eval.max_len; 0 = skip)")

    e = sub.add_parser("eval", help="accuracy grid (JSON + heatmap) of a checkpoint")
    e.add_argument("--checkpoint", help="training workdir or export (default: the shipped model)")
    e.add_argument("--max-len", type=int, help="grid up to this operand length (default: eval.max_len)")
    e.add_argument("--n", type=int, help="problems per cell (default: eval.n_per_cell)")
    e.add_argument("--sweep", help="comma-separated equal operand lengths beyond the grid, e.g. 30,40,50")
    e.add_argument("--recurrences", type=int, help="passes at test time (looped models)")
    e.add_argument("--json", help="write the report here")
    e.add_argument("--plot", help="write the heatmap PNG here")

    s = sub.add_parser("solve", help="answer problems such as 123+456")
    s.add_argument("problems", nargs="*", help='problems in ordinary digit order, e.g. "123+456"')
    s.add_argument("--file", help="a text file with one problem per line")
    s.add_argument("--checkpoint", help="training workdir or export (default: the shipped model)")
    s.add_argument("--recurrences", type=int, help="passes at test time (looped models)")

    x = sub.add_parser("export", help="write a parameters-only copy of a checkpoint")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True)
    return p


def _train(args) -> None:
    from arith_jax.config import ArithConfig
    from arith_jax.evaluate import run_evaluation
    from arith_jax.train import build_model, run_training

    cfg, workdir, result = train_from_args(args, ArithConfig, run_training)
    max_len = cfg.eval.max_len if args.eval_max_len is None else args.eval_max_len
    if max_len:
        report = run_evaluation(build_model(cfg), result.state.params, cfg.data.task, cfg.data.max_len, max_len,
                                cfg.eval.n_per_cell, cfg.eval.sweep, workdir / "eval.json",
                                workdir / "eval.png", batch_size=cfg.eval.batch_size,
                                recurrences=cfg.eval.recurrences, seed=cfg.eval.seed)
        print(json.dumps({k: report[k] for k in ("in_distribution_acc", "out_of_distribution_acc")}))


def _eval(args) -> None:
    from arith_jax.evaluate import run_evaluation
    from arith_jax.solver import DEFAULT_MODEL
    from arith_jax.train import load_trained

    cfg, model, params = load_trained(args.checkpoint or DEFAULT_MODEL)
    sweep = tuple(int(v) for v in args.sweep.split(",")) if args.sweep else cfg.eval.sweep
    max_len = args.max_len or cfg.eval.max_len
    if max_len < 1:
        raise ValueError("--max-len must be at least 1")
    report = run_evaluation(model, params, cfg.data.task, cfg.data.max_len, max_len,
                            args.n or cfg.eval.n_per_cell, sweep, args.json, args.plot,
                            batch_size=cfg.eval.batch_size, recurrences=args.recurrences or cfg.eval.recurrences,
                            seed=cfg.eval.seed)
    summary = {k: v for k, v in report.items() if k != "grid"}
    print(json.dumps(summary, indent=1))


def _solve(args) -> None:
    from arith_jax.solver import Solver

    problems = list(args.problems)
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise ValueError(f"problem file {args.file!r} not found")
        problems += [line for line in path.read_text().splitlines() if line.strip()]
    if not problems:
        raise ValueError('no problems given; pass them as arguments ("123+456") or with --file')
    solver = Solver.load(args.checkpoint, recurrences=args.recurrences)
    for answer in solver.solve(problems):
        print(answer)


def _export(args) -> None:
    from arith_jax.train import export_params, load_trained

    cfg, _, params = load_trained(args.checkpoint)
    print(export_params(cfg, params, args.out))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from core_jax.checkpoint import CheckpointError

    try:
        {"train": _train, "eval": _eval, "solve": _solve, "export": _export}[args.command](args)
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(e, file=sys.stderr)
        return e.exit_status
    return 0
