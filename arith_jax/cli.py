"""`python run.py arith {train,eval,solve,export}`: the command line of the arithmetic package.

Every user error (bad flag or config key, missing checkpoint, malformed problem, unwritable output) ends in one
line on stderr and exit status 2, never a traceback; outputs are checked for writability before the work starts.
`solve --file` reports each bad line as `FILE:LINE: error: ...`, answers the others, and exits 2 if any failed.
An interrupted `train` exits with 128 + the signal (130 for Ctrl-C, 143 for SIGTERM) after saving; so does one
interrupted during the evaluation after training (the checkpoint was saved before it).
"""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path

from core_jax.cli import (Interrupted, OneLineParser, UsageError, add_train_parser, check_plot_path, check_writable,
                          check_writable_dir, decode_text, int_at_least, int_list_at_least, run_command, signal_name,
                          train_from_args)


def _parser() -> OneLineParser:
    p = OneLineParser(prog="run.py arith", description="Abacus-embedding arithmetic transformers")
    sub = p.add_subparsers(dest="command", required=True)

    t = add_train_parser(sub, "a model", "configs/arith_*.yaml", "model.recurrences=8")
    t.add_argument("--eval-max-len", type=int_at_least(0), default=None,
                   help="after training, evaluate the grid up to this length (default: eval.max_len; 0 = skip)")

    e = sub.add_parser("eval", help="accuracy grid (JSON + heatmap) of a checkpoint")
    e.add_argument("--checkpoint", help="training workdir or export (default: the shipped addition model)")
    e.add_argument("--max-len", type=int_at_least(1), help="grid up to this operand length (default: eval.max_len)")
    e.add_argument("--n", type=int_at_least(1), help="problems per cell (default: eval.n_per_cell)")
    e.add_argument("--sweep", type=int_list_at_least(1),
                   help="comma-separated equal operand lengths beyond the grid, e.g. 30,40,50")
    e.add_argument("--recurrences", type=int_at_least(1), help="passes at test time (looped models)")
    e.add_argument("--seed", type=int_at_least(0),
                   help="seed of the problems drawn per cell (default: eval.seed, 1234); another seed is a held-out "
                        "set for choosing among runs")
    e.add_argument("--average-last", type=int_at_least(1), default=1, metavar="N",
                   help="evaluate the mean parameters of the workdir's newest N checkpoints (default 1: the newest)")
    e.add_argument("--errors", type=int_at_least(0), metavar="N",
                   help="add a breakdown of the wrong answers of the grid and of the sweep (wrong tokens per answer, "
                        "answer positions, cells) with N example problems each")
    e.add_argument("--abacus-offsets", type=int_list_at_least(0), metavar="K,...", help=_OFFSET_HELP)
    e.add_argument("--json", help="write the report here")
    e.add_argument("--plot", help="write the heatmap PNG here")

    s = sub.add_parser("solve", help="answer problems such as 123+456, 12x34 or sort 31,4,159",
                       description="Answer addition (123+456), multiplication (12x34 or 12*34) and sorting problems "
                                   "(sort 31,4,159 -> 4,31,159: the word sort, then whole numbers separated by "
                                   "commas). Without --checkpoint each problem goes to the shipped model of its "
                                   "operation, so one file may mix them.")
    s.add_argument("problems", nargs="*",
                   help='problems in ordinary digit order, e.g. "123+456" "12x34" "sort 31,4,159"')
    s.add_argument("--file", help="a UTF-8 text file with one problem per line (blank lines are skipped)")
    s.add_argument("--checkpoint", help="training workdir or export; it answers problems of its own operation only "
                                        "(default: the shipped model of each problem's operation)")
    s.add_argument("--recurrences", type=int_at_least(1),
                   help="passes at test time (looped models; without --checkpoint, for every shipped model used)")
    s.add_argument("--abacus-offsets", type=int_list_at_least(0), metavar="K,...",
                   help=_OFFSET_HELP + "; needs --checkpoint")

    x = sub.add_parser("export", help="write a parameters-only copy of a checkpoint")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--average-last", type=int_at_least(1), default=1, metavar="N",
                   help="export the mean parameters of the workdir's newest N checkpoints (a checkpoint average; "
                        "train with train.keep_checkpoints >= N; default 1: the newest checkpoint)")
    x.add_argument("--abacus-offsets", type=int_list_at_least(0), metavar="K,...",
                   help=_OFFSET_HELP + "; the export keeps them as its eval.abacus_offsets")
    return p


_OFFSET_HELP = ("decode once per offset K, digit i of every number getting Abacus id K + i, and answer what most "
                "decodes agree on, e.g. 0,5,11 (default: the checkpoint's eval.abacus_offsets, usually 0)")


def _check_lengths(cfg, flag: str, lengths) -> None:
    """One-line error when an evaluation length is beyond what the model's position table holds."""
    from arith_jax.config import fits_positions
    from core_jax.config import to_dict

    model, offset = to_dict(cfg.model), max(cfg.eval.abacus_offsets)
    for n in lengths:
        if not fits_positions(model, cfg.data.task, n, n, train=False, eval_offset=offset):
            limit = max((k for k in range(1, n) if fits_positions(model, cfg.data.task, k, k, train=False,
                                                                   eval_offset=offset)), default=0)
            raise UsageError(f"{flag} {n} is beyond this model's position table (model.table_size "
                             f"{cfg.model.table_size}{f', Abacus offsets up to {offset}' if offset else ''}): "
                             f"at most {limit}")


def _check_recurrences(cfg, recurrences: int | None) -> None:
    if recurrences is not None and not cfg.model.shared and recurrences != cfg.model.recurrences:
        raise UsageError(f"--recurrences {recurrences}: this model has separate weights per pass and runs exactly "
                         f"{cfg.model.recurrences}; only looped (shared) models take other values")


def _train(args) -> None:
    from arith_jax.config import ArithConfig
    from arith_jax.evaluate import run_evaluation
    from arith_jax.train import build_model, run_training

    if args.eval_max_len:
        from core_jax.config import load_config

        _check_lengths(load_config(ArithConfig, args.config, args.set), "--eval-max-len", [args.eval_max_len])
    cfg, workdir, result = train_from_args(args, ArithConfig, run_training)
    max_len = cfg.eval.max_len if args.eval_max_len is None else args.eval_max_len
    if max_len:
        try:
            report = run_evaluation(build_model(cfg), result.state.params, cfg.data.task, cfg.data.max_len, max_len,
                                    cfg.eval.n_per_cell, cfg.eval.sweep, workdir / "eval.json",
                                    workdir / "eval.png", batch_size=cfg.eval.batch_size,
                                    recurrences=cfg.eval.recurrences, seed=cfg.eval.seed,
                                    abacus_offsets=cfg.eval.abacus_offsets)
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (core_jax.cli.Stopped): the trained state is saved
            name = signal_name(e)
            raise Interrupted(signal.Signals[name], f"interrupted by {name} during the evaluation after training; "
                              f"the checkpoint of step {int(result.state.step)} is saved in {workdir}; evaluate it "
                              f"with `run.py arith eval --checkpoint {workdir}`") from None
        keys = ["in_distribution_acc", "out_of_distribution_acc", "in_distribution_top1", "out_of_distribution_top1"]
        print(json.dumps({k: report[k] for k in keys if k in report}))


def _eval(args) -> None:
    from arith_jax.evaluate import run_evaluation
    from arith_jax.solver import DEFAULT_MODEL
    from arith_jax.train import load_trained

    if args.json:
        check_writable(args.json, "--json")
    if args.plot:
        check_plot_path(args.plot, "--plot")
    cfg, model, params = load_trained(DEFAULT_MODEL if args.checkpoint is None else args.checkpoint,
                                      average_last=args.average_last, abacus_offsets=args.abacus_offsets)
    sweep = cfg.eval.sweep if args.sweep is None else args.sweep
    max_len = cfg.eval.max_len if args.max_len is None else args.max_len
    n = cfg.eval.n_per_cell if args.n is None else args.n
    recurrences = cfg.eval.recurrences if args.recurrences is None else args.recurrences
    _check_lengths(cfg, "--max-len", [max_len])
    _check_lengths(cfg, "--sweep", sweep)
    _check_recurrences(cfg, recurrences)
    if args.plot and sweep:
        plot = Path(args.plot)
        check_writable(plot.with_name(plot.stem + "_sweep.png"), "--plot (its sweep figure)")
    report = run_evaluation(model, params, cfg.data.task, cfg.data.max_len, max_len, n, sweep, args.json, args.plot,
                            batch_size=cfg.eval.batch_size, recurrences=recurrences,
                            seed=cfg.eval.seed if args.seed is None else args.seed, errors=args.errors,
                            abacus_offsets=cfg.eval.abacus_offsets)
    summary = {k: v for k, v in report.items() if k not in ("grid", "top1_grid")}
    print(json.dumps(summary, indent=1))


def _read_problem_file(name: str) -> list[tuple[int, str]]:
    """(line number, text) of each non-blank line of a UTF-8 file (a byte-order mark is allowed)."""
    path = Path(name)
    if path.is_dir():
        raise ValueError(f"problem file {name!r} is a folder, not a file")
    if not path.is_file():
        raise ValueError(f"problem file {name!r} not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read problem file {name!r}: {e.strerror}") from None
    text = decode_text(data, f"problem file {name!r}")
    return [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def _answer_each(solver, problems: list[str]) -> list[str | ValueError]:
    """Solver.solve's answer to each problem, or the ValueError it raises for that problem alone: one call when
    every problem is good, halving the list to find the bad ones otherwise."""
    try:
        return list(solver.solve(problems))
    except ValueError as e:
        if len(problems) == 1:
            return [e]
        mid = len(problems) // 2
        return _answer_each(solver, problems[:mid]) + _answer_each(solver, problems[mid:])


def _solve(args) -> int:
    from arith_jax.data import parse_problem
    from arith_jax.solver import Solver

    # (where to report an error, problem text): command-line problems first, then the file's lines
    items = [("error", p) for p in args.problems]
    if args.file:
        items += [(f"{args.file}:{i}: error", line) for i, line in _read_problem_file(args.file)]
    if not items:
        raise ValueError(f"problem file {args.file!r} holds no problems (only blank lines, or empty)" if args.file
                         else 'no problems given; pass them as arguments ("123+456") or with --file')
    if args.checkpoint is None:  # each problem to the shipped model of its operation, loaded when first needed
        if args.abacus_offsets is not None:
            raise UsageError("--abacus-offsets needs --checkpoint (the shipped models keep their own offsets)")
        solver = Solver.shipped(recurrences=args.recurrences)
    else:
        solver = Solver.load(args.checkpoint, recurrences=args.recurrences, abacus_offsets=args.abacus_offsets)
        _check_recurrences(solver.cfg, args.recurrences)
    results: list[str | ValueError] = []
    for _, text in items:  # syntax errors without the model
        try:
            if _NEGATIVE.fullmatch(text):
                raise _negative_problem(text)
            parse_problem(text)
            results.append("")
        except ValueError as e:
            results.append(e)
    good = [i for i, r in enumerate(results) if not isinstance(r, ValueError)]
    for i, answer in zip(good, _answer_each(solver, [items[i][1] for i in good]) if good else []):
        results[i] = answer
    for (where, _), result in zip(items, results):
        if isinstance(result, ValueError):
            print(f"{where}: {' '.join(str(result).split())}", file=sys.stderr)
        else:
            print(result)
    return 2 if any(isinstance(r, ValueError) for r in results) else 0


def _export(args) -> None:
    from arith_jax.train import export_params, load_trained

    check_writable_dir(args.out, "--out")
    cfg, _, params = load_trained(args.checkpoint, average_last=args.average_last, abacus_offsets=args.abacus_offsets)
    from core_jax.checkpoint import read_meta
    from core_jax.trained import averaged_steps, checkpoint_dir

    extra = {}
    if args.average_last > 1:
        extra["averaged_steps"] = averaged_steps(args.checkpoint, args.average_last)
    elif "averaged_steps" in (source := read_meta(checkpoint_dir(args.checkpoint), None)[0]):
        extra["averaged_steps"] = source["averaged_steps"]   # re-exporting an average: it stays one
    print(export_params(cfg, params, args.out, extra))


_NEGATIVE = re.compile(r"\s*-\s*\d.*|.*[+*x]\s*-\s*\d.*")  # -5+3, 5+-3, 5 * -3


def _negative_problem(text: str) -> UsageError:
    return UsageError(f"problem {text.strip()!r}: negative numbers are not supported; operands are whole "
                      f"numbers >= 0")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def command():
        try:
            args = _parser().parse_args(argv)
        except UsageError:
            negative = [a for a in argv[1:] if _NEGATIVE.fullmatch(a)] if argv[:1] == ["solve"] else []
            if negative:
                raise _negative_problem(negative[0]) from None
            raise
        return {"train": _train, "eval": _eval, "solve": _solve, "export": _export}[args.command](args)

    return run_command(command)
