"""`python run.py sr bench feynman ...`: the Feynman benchmark of sr_jax's regressor, optionally beside Operon.

Every user error (bad option, unknown equation, missing table, pyoperon not installed) ends in one line on stderr
and exit status 2, never a traceback. The results table goes to stdout, notes and progress bars to stderr.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

from core_jax.cli import (OneLineParser, check_writable, int_at_least, nonnegative_float, positive_float,
                          run_command)

from . import feynman


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="run.py sr bench", description="Symbolic-regression benchmarks of sr_jax's regressor")
    p.add_argument("benchmark", choices=["feynman"], help="the AI Feynman table (100 equations)")
    p.add_argument("--limit", type=int_at_least(1), help="only the first N equations (after the other filters)")
    p.add_argument("--problems", help="comma-separated equation names, e.g. I.6.2a,II.38.14")
    p.add_argument("--max-vars", type=int_at_least(1), help="only equations with at most K variables")
    p.add_argument("--seed", type=int_at_least(0), default=0,
                   help="benchmark seed; each problem's seed derives from it")
    p.add_argument("--n-train", type=int_at_least(1), default=200, help="training points per problem")
    p.add_argument("--n-test", type=int_at_least(1), default=200, help="test points per problem")
    p.add_argument("--noise", type=nonnegative_float, default=0.0,
                   help="add G*RMS(y)*N(0,1) to the training targets (SRBench: 0, 0.001, 0.01, 0.1)")
    p.add_argument("--compare", choices=["operon"], help="also run pyoperon's SymbolicRegressor on the same problems")
    p.add_argument("--time-per-problem", type=positive_float, metavar="T",
                   help="seconds per problem: Operon's limit, and ours where the regressor takes max_time "
                        "(default: Operon gets our median seconds)")
    p.add_argument("--operon-threads", type=int_at_least(1), default=_usable_cores(),
                   help="Operon's threads (default: the cores this process may use, as JAX does)")
    p.add_argument("--sources", help="candidate sources of our regressor, comma-separated (e.g. model,prior,bases)")
    p.add_argument("--model", help="our regressor's model_path (default: the shipped model)")
    p.add_argument("--recovery-timeout", type=positive_float, default=5.0,
                   help="cap in seconds of the sympy part of each symbolic-recovery check")
    p.add_argument("--table", help="the equation table (default: the copy shipped with sr_jax)")
    p.add_argument("--json", help="write settings, per-problem records and the summary here (rewritten after every "
                                  "problem, with \"complete\": false until the end)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _our_factory(args, time_limit_s: float | None) -> Callable[[int], Any]:
    """``seed -> SymbolicTransformerRegressor(...)`` with the options the command line gives."""
    from .estimator import SymbolicTransformerRegressor

    kwargs: dict = {}
    if args.sources:
        kwargs["candidate_sources"] = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    if args.model:
        kwargs["model_path"] = args.model
    if time_limit_s is not None:
        if "max_time" in inspect.signature(SymbolicTransformerRegressor).parameters:
            kwargs["max_time"] = time_limit_s
        else:
            print("note: SymbolicTransformerRegressor has no time limit (max_time); --time-per-problem sets "
                  "Operon's limit only, and our seconds are measured", file=sys.stderr)
    try:
        prototype = SymbolicTransformerRegressor(**kwargs)
    except TypeError as e:
        raise ValueError(f"SymbolicTransformerRegressor does not take these options: {e}") from None
    # checked now, so that a bad --sources or --model is one line instead of a failed fit on every problem
    prototype._check_params()
    if "model" in prototype.candidate_sources:
        from .train import load_trained  # caches the model for the fits

        load_trained(args.model)
    return lambda seed: SymbolicTransformerRegressor(random_state=seed, **kwargs)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _bench(args, make_regressor: Callable[[int], Any] | None, method: str) -> None:
    if args.compare == "operon":
        if feynman.operon_version() is None:
            raise ValueError('--compare operon needs pyoperon, which is not installed; install it with: '
                             'pip install -e ".[operon]"  (or: pip install pyoperon)')
        try:  # imported now, so that its import time (seconds) is not charged to Operon's first problem
            import pyoperon.sklearn  # noqa: F401
        except ImportError as e:
            raise ValueError(f"pyoperon {feynman.operon_version()} is installed but does not import: {e}") from None
    if args.json:
        check_writable(args.json, "--json")
    table = feynman.load_feynman(args.table)
    names = [n.strip() for n in args.problems.split(",") if n.strip()] if args.problems else None
    problems = feynman.select_problems(table.problems, max_vars=args.max_vars, limit=args.limit, names=names)
    if not problems:
        raise ValueError(f"no equation has at most {args.max_vars} variables" if args.max_vars
                         else "no equations selected")
    if make_regressor is None:
        from .estimator import MIN_POINTS

        if args.n_train < MIN_POINTS:
            raise ValueError(f"--n-train {args.n_train}: SymbolicTransformerRegressor needs at least {MIN_POINTS} "
                             f"training points")
        make_regressor = _our_factory(args, args.time_per_problem)
    for note in table.notes:
        print(f"note: {note.name} {note.action}: {note.reason}", file=sys.stderr)
    settings = {"benchmark": args.benchmark, "problems": [p.name for p in problems], "seed": args.seed,
                "n_train": args.n_train, "n_test": args.n_test, "noise": args.noise,
                "time_per_problem": args.time_per_problem, "sources": args.sources, "model": args.model}
    records: list[dict] = []

    def keep(record: dict) -> None:  # the JSON file is rewritten after every problem: a crash loses nothing done
        records.append(record)
        if args.json:
            _write_report(args.json, settings, table, records, complete=False)

    common = dict(n_train=args.n_train, n_test=args.n_test, seed=args.seed, noise=args.noise,
                  recovery_timeout_s=args.recovery_timeout, progress=not args.no_progress, on_result=keep)
    from .interpreter import COMPILE_COUNTER

    programs_before = COMPILE_COUNTER["refine"]
    feynman.run_benchmark(make_regressor, problems, method=method, **common)
    ours = feynman.summarize(records)[method]
    settings["refinement_programs_traced"] = COMPILE_COUNTER["refine"] - programs_before
    print(f"note: {method} traced {settings['refinement_programs_traced']} refinement program(s) for "
          f"{len(problems)} problem(s)", file=sys.stderr)
    settings["solved_by_source"] = feynman.solved_by_source(records, method)
    if settings["solved_by_source"]:
        print(f"note: {method}'s R2 > 0.99 by source of the chosen equation: "
              + ", ".join(f"{k} {v}" for k, v in settings["solved_by_source"].items()), file=sys.stderr)
    if args.compare == "operon":
        budget = args.time_per_problem if args.time_per_problem is not None else ours.median_seconds
        if not math.isfinite(budget):
            raise ValueError("no problem was timed, so there is no median time to give Operon; "
                             "pass --time-per-problem")
        operon_s = max(1, math.ceil(budget))
        print(f"Operon {feynman.operon_version()}: time limit {operon_s} s per problem "
              f"(pyoperon takes whole seconds; asked for {budget:.2f} s), {args.operon_threads} thread(s)",
              file=sys.stderr)
        settings.update(operon_version=feynman.operon_version(), operon_time_limit_s=operon_s,
                        operon_threads=args.operon_threads)
        feynman.run_benchmark(
            lambda seed: feynman.OperonRegressor(budget, random_state=seed, n_threads=args.operon_threads),
            problems, method="operon", **common)
    print(feynman.format_summary(feynman.summarize(records)))
    if args.json:
        _write_report(args.json, settings, table, records, complete=True)
        print(f"wrote {args.json}", file=sys.stderr)


def _write_report(path: str, settings: dict, table, records: list[dict], complete: bool) -> None:
    """Settings, table notes, summary and per-problem records as JSON, written atomically (a temporary file in the
    same folder, then renamed); ``complete`` is False while problems are still running."""
    summaries = feynman.summarize(records)
    report = {"settings": settings, "complete": complete, "table_notes": [n._asdict() for n in table.notes],
              "summary": {m: s._asdict() for m, s in summaries.items()}, "results": records}
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(_json_safe(report), indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None, make_regressor: Callable[[int], Any] | None = None,
         method: str = "sr_jax") -> int:
    """Run the command line ``argv`` (without "sr bench"); returns the exit status.

    ``make_regressor(seed)`` benchmarks another scikit-learn-style regressor under the name ``method`` instead of
    ``SymbolicTransformerRegressor`` (the options --sources and --model then do not apply, and --time-per-problem
    only sets Operon's limit). Errors and interruptions end as in every command (core_jax.cli.run_command).
    """
    return run_command(lambda: _bench(_parser().parse_args(argv), make_regressor, method))
