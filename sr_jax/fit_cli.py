"""`python run.py sr fit data.csv --target y`: fit a formula to a CSV file and print it with its Pareto front.

The CSV needs a header row; the target column is ``--target``, the features are every other column (or
``--features``). Every user error (missing file, missing column, non-numeric or missing value, bad option) is one
line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from core_jax.cli import (OneLineParser, check_plot_path, check_writable, decode_text, int_at_least, positive_float,
                          run_command)

_SOURCES = ("model", "prior", "bases")


def _parser() -> OneLineParser:
    p = OneLineParser(prog="run.py sr fit", description="fit a symbolic formula target = f(features) to a CSV file")
    p.add_argument("csv", help="CSV file with a header row")
    p.add_argument("--target", required=True, help="name of the target column")
    p.add_argument("--features", help="comma-separated feature columns (default: every other column)")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="write the result as JSON to FILE (no FILE: print JSON instead of text)")
    p.add_argument("--plot", metavar="PNG", help="draw the Pareto front (complexity vs loss) here")
    p.add_argument("--sources", default=",".join(_SOURCES),
                   help=f"comma-separated candidate sources, any of {','.join(_SOURCES)} (default: all)")
    p.add_argument("--model", help="trained transformer directory (default: the shipped model)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="random_state of the fit (default 0)")
    p.add_argument("--max-time", type=positive_float, metavar="S",
                   help="a soft limit in seconds on the whole fit, compilation included (default: none)")
    p.add_argument("--n-prior", type=int_at_least(0),
                   help="skeletons from the generator's prior refined per dataset (default: the estimator's n_prior)")
    p.add_argument("--prior-draws", type=int_at_least(0),
                   help="prior library screened by least squares for those skeletons (<= --n-prior: no screening; "
                        "default: the estimator's prior_draws)")
    return p


def read_csv(path: str, target: str, features: list[str] | None = None):
    """(X (N, D) float64, y (N,), feature names) from a CSV file with a header; ValueError naming any problem."""
    import numpy as np

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{path} is a folder, not a CSV file")
    if not p.is_file():
        raise ValueError(f"no such file: {path}")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    text = decode_text(data, path)  # a UTF-8 byte-order mark (Excel's) is not part of the first column's name
    try:
        rows = [r for r in csv.reader(io.StringIO(text, newline="")) if r and any(c.strip() for c in r)]
    except csv.Error as e:
        raise ValueError(f"cannot read {path} as CSV: {e}") from None
    if len(rows) < 2:
        raise ValueError(f"{path} needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    if target not in header:
        raise ValueError(f"target column {target!r} not in {path}; columns: {', '.join(header)}")
    if features is None:
        features = [h for h in header if h != target]
    missing = [f for f in features if f not in header]
    if missing:
        raise ValueError(f"feature column {missing[0]!r} not in {path}; columns: {', '.join(header)}")
    if not features:
        raise ValueError(f"{path} has no feature columns besides the target {target!r}")
    if target in features:
        raise ValueError(f"the target column {target!r} cannot also be a feature")
    cols = [header.index(c) for c in features + [target]]
    data = np.empty((len(rows) - 1, len(cols)))
    for i, row in enumerate(rows[1:]):
        if len(row) != len(header):
            raise ValueError(f"line {i + 2} of {path} has {len(row)} fields; the header has {len(header)}")
        for j, c in enumerate(cols):
            cell = row[c].strip()
            try:
                v = float(cell)
            except ValueError:
                raise ValueError(f"column {header[c]!r} is not numeric: {cell!r} on line {i + 2}") from None
            if not math.isfinite(v):
                raise ValueError(f"column {header[c]!r} has a missing, NaN or infinite value on line {i + 2}; "
                                 "drop or impute those rows")
            data[i, j] = v
    return data[:, :-1], data[:, -1], features


def _report(est, names, target, r2: float) -> dict:
    front = [e for e in est.equations_ if e.pareto]
    return {
        "target": target, "features": names, "expression": str(est.expression_), "latex": est.latex(),
        "r2": r2, "complexity": est.complexity_,
        "pareto_front": [{"complexity": e.complexity, "loss": _finite(e.loss), "r2": _finite(e.r2),
                          "source": e.source, "expression": _short(e.sympy())}
                         for e in front],
    }


def _short(expr) -> str:
    """A front formula for reading: products and integer powers of sums multiplied out, every number to 6 significant
    digits (also inside functions, where ``evalf(6)`` keeps a Float's own precision)."""
    import sympy

    expanded = sympy.expand(expr, power_exp=False, power_base=False, log=False)
    return str(expanded.xreplace({f: sympy.Float(f, 6) for f in expanded.atoms(sympy.Float)}))


def _finite(v: float):
    return v if math.isfinite(v) else None


def _text(rep: dict) -> str:
    lines = [f"{rep['target']} = {rep['expression']}",
             f"R2 (all rows): {rep['r2']:.6f}    complexity: {rep['complexity']} nodes", "",
             "Pareto front (complexity, loss = MSE/var(y) on held-out rows, R2, source, formula):"]
    for e in rep["pareto_front"]:
        loss = "inf" if e["loss"] is None else f"{e['loss']:.3e}"
        r2 = "nan" if e["r2"] is None else f"{e['r2']:.6f}"
        lines.append(f"  {e['complexity']:4d}  {loss:>10}  {r2:>10}  {e['source']:<7} {e['expression']}")
    return "\n".join(lines)


def plot_pareto(est, path: str) -> None:
    """Complexity vs loss of every candidate, the Pareto front joined, the chosen formula marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eqs = [e for e in est.equations_ if math.isfinite(e.loss)]
    floor = max(min([e.loss for e in eqs if e.loss > 0], default=1e-16), 1e-16)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sources = sorted({e.source for e in eqs})
    for s in sources:
        pts = [(e.complexity, max(e.loss, floor)) for e in eqs if e.source == s and not e.pareto]
        if pts:
            ax.scatter(*zip(*pts), s=12, alpha=0.5, label=s)
    front = [(e.complexity, max(e.loss, floor)) for e in eqs if e.pareto]
    if front:
        ax.step(*zip(*front), where="post", color="k", lw=1.2, label="Pareto front")
        ax.scatter(*zip(*front), color="k", s=18, zorder=3)
    best = est.best_
    ax.scatter([best.complexity], [max(best.loss, floor)], marker="*", s=200, color="red", zorder=4,
               label="chosen")
    ax.set_yscale("log")
    ax.set_xlabel("complexity (prefix nodes)")
    ax.set_ylabel("loss: MSE / var(y), held-out rows")
    ax.set_title(f"{len(eqs)} refined candidates")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    """Entry point of ``python run.py sr fit ...`` (argv without "sr fit"); returns the exit status (errors and
    interruptions end as in every command: core_jax.cli.run_command)."""
    return run_command(lambda: _fit(argv))


def _fit(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    bad = [s for s in sources if s not in _SOURCES]
    if bad or not sources:
        raise ValueError(f"--sources: unknown source {bad[0]!r}; choose from {','.join(_SOURCES)}" if bad
                         else "--sources is empty")
    features = [f.strip() for f in args.features.split(",")] if args.features else None
    x, y, names = read_csv(args.csv, args.target, features)
    if args.json not in (None, "-"):
        check_writable(args.json, "--json")
    if args.plot:
        check_plot_path(args.plot, "--plot")
    from .estimator import SymbolicTransformerRegressor

    given = {k: v for k, v in (("n_prior", args.n_prior), ("prior_draws", args.prior_draws),
                               ("max_time", args.max_time)) if v is not None}
    est = SymbolicTransformerRegressor(model_path=args.model, candidate_sources=sources, random_state=args.seed,
                                       **given)
    est.fit(x, y, feature_names=names)
    rep = _report(est, names, args.target, est.score(x, y))
    if args.json == "-":
        print(json.dumps(rep, indent=2))
    else:
        print(_text(rep))
        if args.json:
            Path(args.json).write_text(json.dumps(rep, indent=2) + "\n")
    if args.plot:
        plot_pareto(est, args.plot)
