"""The Feynman symbolic-regression benchmark: the AI Feynman table, problem sampling, metrics and a runner.

The table (``sr_jax/data/feynman_equations.csv``, a copy of the AI Feynman table of Udrescu & Tegmark 2020 as used
by SRBench's Feynman track) lists for each equation its formula in sympy syntax, with ``~`` as unary minus, a
stated number of variables, and each variable's name and uniform sampling range.

Row fixes, made by :func:`load_feynman` and reported in :attr:`FeynmanTable.notes`:

* The stated variable count of I.18.12, I.18.14, I.38.12, II.37.1, III.10.19 and III.19.51 differs from the
  variables listed in the row (a known inconsistency of the public table). The listed names are trusted: they are
  exactly the symbols their formulas use; the stated count is ignored.
* A row whose formula does not parse, uses a name that is not among its listed variables, or has an unusable
  range is skipped with its reason (none of the shipped table's rows is).

Sampling follows SRBench: every variable uniform in its range, noise-free targets by default, and with
``noise = γ`` the training targets (only) get ``γ · RMS(y_train) · N(0, 1)`` added. The seed of a problem is derived
from the benchmark seed and the problem name, so a problem's data does not depend on which other problems run.

Aggregates count every problem: a fit that raises or predicts NaN/inf scores as a miss on every rate. (The E2E
reference averages with ``nanmean`` and so silently drops failed datasets; spec section 8.)

Symbolic recovery (SRBench's definition: the difference or the ratio of truth and model is a constant), made
safe against sympy's unbounded ``simplify``:

1. Both expressions are normalised: numeric constants are evaluated (``evalf``), every float is rounded to
   ``decimals`` (3) decimal places and made an exact rational, so ``0.50000012`` becomes ``1/2`` and a spurious
   ``1e-7 * x`` term vanishes. The truth goes through the same step (``1/(2π)`` becomes ``159/1000``), so a model
   that writes the constant as a float can match it.
2. Numeric screen: both normalised expressions are evaluated at the test points; unless their difference or their
   ratio is constant there (spread at most ``rtol`` relative), the answer is "not recovered" and sympy never runs.
3. Only then ``sympy.simplify`` of the difference and of the ratio; a model is recovered when either simplifies
   to a number. Steps 1-3 run under a wall-clock cap (``SIGALRM`` on the main thread of a POSIX process,
   otherwise a daemon thread that is abandoned when it overruns). A timeout counts as not recovered, and is
   recorded as such.
"""
from __future__ import annotations

import csv
import hashlib
import math
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import sympy
from sympy.parsing.sympy_parser import parse_expr

from .metrics import r2 as r2_score

TABLE_PATH = Path(__file__).resolve().parent / "data" / "feynman_equations.csv"
MISCOUNTED_ROWS = ("I.18.12", "I.18.14", "I.38.12", "II.37.1", "III.10.19", "III.19.51")
"""Rows whose stated variable count is wrong in the public table (see the module docstring)."""

_TABLE_FUNCTIONS = {"exp": sympy.exp, "sqrt": sympy.sqrt, "ln": sympy.log, "log": sympy.log, "sin": sympy.sin,
                    "cos": sympy.cos, "tan": sympy.tan, "tanh": sympy.tanh, "arcsin": sympy.asin,
                    "arccos": sympy.acos, "arctan": sympy.atan, "pi": sympy.pi}
# parse_expr evaluates the text with these globals only, so every other name (gamma, I, E, beta, ...) becomes a
# plain Symbol that the loader can report, instead of silently meaning sympy's gamma function or imaginary unit.
_PARSE_GLOBALS = {"Integer": sympy.Integer, "Float": sympy.Float, "Rational": sympy.Rational,
                  "Symbol": sympy.Symbol, "Function": sympy.Function}
MAX_TABLE_VARIABLES = 10


@dataclass(frozen=True)
class FeynmanProblem:
    """One equation: ``formula`` (sympy) in the symbols ``variables``, each sampled uniformly in ``ranges[i]``.

    The symbols carry the sign the ranges imply (positive when low > 0, nonnegative when low = 0), which lets sympy
    simplify e.g. ``sqrt(x**2)`` to ``x`` during the recovery check.
    """

    name: str
    number: int
    output: str
    formula: sympy.Expr
    variables: tuple[str, ...]
    ranges: tuple[tuple[float, float], ...]

    @property
    def n_vars(self) -> int:
        return len(self.variables)

    @cached_property
    def symbols(self) -> tuple[sympy.Symbol, ...]:
        return tuple(_variable_symbol(n, lo) for n, (lo, _) in zip(self.variables, self.ranges))

    @cached_property
    def _numpy_fn(self) -> Callable:
        return sympy.lambdify(self.symbols, self.formula, modules="numpy")

    def evaluate(self, X_NxD: np.ndarray) -> np.ndarray:
        """The formula at each row of ``X_NxD`` (columns in the order of ``variables``), float64 of shape (N,)."""
        X_NxD = np.asarray(X_NxD, dtype=np.float64)
        if X_NxD.ndim != 2 or X_NxD.shape[1] != self.n_vars:
            raise ValueError(f"{self.name}: expected X of shape (N, {self.n_vars}), got {X_NxD.shape}")
        with np.errstate(all="ignore"):
            y_N = self._numpy_fn(*X_NxD.T)
        return np.broadcast_to(np.asarray(y_N, dtype=np.float64), (X_NxD.shape[0],)).copy()


class RowNote(NamedTuple):
    """What the loader did with a row that is not used as written: ``action`` is "fixed" or "skipped"."""

    name: str
    action: str
    reason: str


class FeynmanTable(NamedTuple):
    problems: tuple[FeynmanProblem, ...]
    notes: tuple[RowNote, ...]


def _variable_symbol(name: str, low: float) -> sympy.Symbol:
    if low > 0:
        return sympy.Symbol(name, positive=True)
    if low == 0:
        return sympy.Symbol(name, nonnegative=True)
    return sympy.Symbol(name, real=True)


def parse_formula(text: str, variables: Sequence[str], lows: Sequence[float] | None = None) -> sympy.Expr:
    """Parse a table formula: sympy syntax, ``~`` as unary minus, ``arcsin``/``ln`` etc. as in the table.

    ``~`` has the precedence of unary minus in Python's grammar (``~x**2`` is ``~(x**2)``), so replacing it by
    ``-`` keeps the meaning. Raises ValueError when the text does not parse, names a function the table does not
    use, or uses a name that is not in ``variables``.
    """
    lows = [1.0] * len(variables) if lows is None else lows
    local = dict(_TABLE_FUNCTIONS)
    local.update({n: _variable_symbol(n, lo) for n, lo in zip(variables, lows)})
    try:
        expr = parse_expr(text.replace("~", "-"), local_dict=local, global_dict=dict(_PARSE_GLOBALS))
    except Exception as e:  # sympy raises SyntaxError, TokenError, TypeError... for malformed text
        raise ValueError(f"formula {text!r} does not parse: {type(e).__name__}: {e}") from None
    unknown_fns = sorted(str(f.func) for f in expr.atoms(sympy.core.function.AppliedUndef))
    if unknown_fns:
        raise ValueError(f"formula {text!r} uses unknown functions {unknown_fns}")
    extra = sorted(str(s) for s in expr.free_symbols if str(s) not in set(variables))
    if extra:
        raise ValueError(f"formula {text!r} uses names {extra} that are not among its variables {list(variables)}")
    return expr


def load_feynman(path: str | Path | None = None) -> FeynmanTable:
    """Read the Feynman table (default: the copy shipped in ``sr_jax/data``), fixing or skipping bad rows.

    See the module docstring for the rules; every row not used as written gets a :class:`RowNote`.
    """
    path = TABLE_PATH if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Feynman table {path} not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        required = ["Filename", "Number", "Output", "Formula", "# variables", "v1_name", "v1_low", "v1_high"]
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; expected the AI Feynman table layout")
        rows = list(reader)
    problems, notes = [], []
    for row in rows:
        name = (row.get("Filename") or "").strip()
        try:
            problem, fix = _parse_row(row)
        except ValueError as e:
            notes.append(RowNote(name or f"row {len(problems) + len(notes) + 1}", "skipped", str(e)))
            continue
        if fix:
            notes.append(RowNote(name, "fixed", fix))
        problems.append(problem)
    names = [p.name for p in problems]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{path}: duplicate equation names {dupes}")
    return FeynmanTable(tuple(problems), tuple(notes))


def _parse_row(row: dict) -> tuple[FeynmanProblem, str | None]:
    name = (row["Filename"] or "").strip()
    if not name:
        raise ValueError("empty Filename")
    variables, ranges = [], []
    for i in range(1, MAX_TABLE_VARIABLES + 1):
        var = (row.get(f"v{i}_name") or "").strip()
        if not var:
            continue
        try:
            lo, hi = float(row[f"v{i}_low"]), float(row[f"v{i}_high"])
        except (TypeError, ValueError, KeyError):
            raise ValueError(f"variable {var!r} has a non-numeric range "
                             f"[{row.get(f'v{i}_low')!r}, {row.get(f'v{i}_high')!r}]") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"variable {var!r} has an empty or infinite range [{lo}, {hi}]")
        if var in variables:
            raise ValueError(f"variable {var!r} is listed twice")
        variables.append(var)
        ranges.append((lo, hi))
    if not variables:
        raise ValueError("no variables listed")
    formula = parse_formula(row["Formula"], variables, [lo for lo, _ in ranges])
    used = {str(s) for s in formula.free_symbols}
    unused = [v for v in variables if v not in used]
    if unused:
        raise ValueError(f"listed variables {unused} do not appear in the formula")
    fix = None
    stated = (row.get("# variables") or "").strip()
    if stated != str(len(variables)):
        fix = (f"stated variable count {stated!r} but {len(variables)} variables listed "
               f"({', '.join(variables)}); trusting the listed names")
    try:
        number = int(row["Number"])
    except (TypeError, ValueError):
        raise ValueError(f"equation number {row.get('Number')!r} is not an integer") from None
    return FeynmanProblem(name, number, (row.get("Output") or "").strip(), formula, tuple(variables),
                          tuple(ranges)), fix


def select_problems(problems: Sequence[FeynmanProblem], *, max_vars: int | None = None, limit: int | None = None,
                    names: Sequence[str] | None = None) -> list[FeynmanProblem]:
    """Problems in table order, keeping those named in ``names`` (all if None), with at most ``max_vars``
    variables, and then the first ``limit``."""
    out = list(problems)
    if names is not None:
        known = {p.name for p in out}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown Feynman equations {unknown}; names look like {sorted(known)[:3]}")
        out = [p for p in out if p.name in set(names)]
    if max_vars is not None:
        out = [p for p in out if p.n_vars <= max_vars]
    if limit is not None:
        out = out[:limit]
    return out


# ---------------------------------------------------------------------------------------------------- sampling


class ProblemData(NamedTuple):
    X_train_NxD: np.ndarray
    y_train_N: np.ndarray
    X_test_MxD: np.ndarray
    y_test_M: np.ndarray


def problem_seed(seed: int, name: str) -> int:
    """A seed in [0, 2**31) that depends only on the benchmark seed and the problem name."""
    digest = hashlib.sha256(f"{int(seed)}/{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def sample_problem(problem: FeynmanProblem, n_train: int = 200, n_test: int = 200, seed: int = 0,
                   noise: float = 0.0) -> ProblemData:
    """Uniform points in the problem's ranges, noise-free test targets, training targets with
    ``noise · RMS(y_train) · N(0, 1)`` added. The points do not depend on ``noise``."""
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be at least 1, got {n_train} and {n_test}")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise}")
    rng = np.random.default_rng(problem_seed(seed, problem.name))
    lo_D = np.array([lo for lo, _ in problem.ranges])
    hi_D = np.array([hi for _, hi in problem.ranges])
    X_NxD = rng.uniform(lo_D, hi_D, size=(n_train + n_test, problem.n_vars))
    y_N = problem.evaluate(X_NxD)
    if not np.isfinite(y_N).all():
        bad = X_NxD[~np.isfinite(y_N)][0]
        raise ValueError(f"{problem.name}: formula {problem.formula} is not finite at "
                         f"{dict(zip(problem.variables, bad.tolist()))}")
    y_train = y_N[:n_train].copy()
    if noise > 0:
        y_train += noise * np.sqrt(np.mean(y_train**2)) * rng.normal(size=n_train)
    return ProblemData(X_NxD[:n_train], y_train, X_NxD[n_train:], y_N[n_train:])


# ---------------------------------------------------------------------------------------------------- metrics


class PredictionScores(NamedTuple):
    r2: float  # NaN when the prediction is missing or not finite everywhere
    r2_above_099: bool
    r2_above_0999: bool
    acc_01: bool  # at least 95% of points within 10% relative error; NaN/inf points are misses


def score_predictions(y_true_M: np.ndarray, y_pred_M: np.ndarray | None) -> PredictionScores:
    """R² and the accuracy flags of one prediction; a missing prediction misses everything."""
    if y_pred_M is None:
        return PredictionScores(float("nan"), False, False, False)
    y = np.asarray(y_true_M, dtype=np.float64).reshape(-1)
    p = np.asarray(y_pred_M, dtype=np.float64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"the prediction has {p.size} values for {y.size} test points")
    r2 = r2_score(y, p)
    with np.errstate(all="ignore"):
        within = np.abs(p - y) <= 0.1 * np.abs(y)  # False for NaN and inf predictions
    ok = not math.isnan(r2)
    return PredictionScores(r2, ok and r2 > 0.99, ok and r2 > 0.999, bool(np.mean(within) >= 0.95))


class Recovery(NamedTuple):
    """``check`` says how the verdict was reached: "difference" / "ratio" (sympy proved it constant),
    "numeric-mismatch" (the screen rejected it), "sympy-unproven", "timeout", "no-expression",
    "bad-expression: ..." (unknown names, unparsable text) or "error: ..."."""

    recovered: bool
    check: str


def to_problem_expression(expression: Any, problem: FeynmanProblem) -> sympy.Expr:
    """A model's expression in the problem's symbols.

    Accepts a sympy expression, a string, or an object with ``to_sympy()`` (``sr_jax.Expression``). Symbols named
    like the problem's variables map to them; ``x_i`` maps to the i-th variable (0-based, sr_jax's convention).
    Raises ValueError for any other name.
    """
    by_name = {n: s for n, s in zip(problem.variables, problem.symbols)}
    by_name.update({f"x_{i}": s for i, s in enumerate(problem.symbols) if f"x_{i}" not in by_name})
    if hasattr(expression, "to_sympy"):
        expression = expression.to_sympy()
    if isinstance(expression, str):
        try:
            expression = parse_expr(expression, local_dict=dict(by_name))
        except Exception as e:  # sympy raises SyntaxError, TokenError, TypeError... for malformed text
            raise ValueError(f"expression {expression!r} does not parse: {type(e).__name__}: {e}") from None
    if not isinstance(expression, sympy.Basic):
        raise ValueError(f"expression of type {type(expression).__name__} is neither sympy nor a string")
    unknown = sorted(str(s) for s in expression.free_symbols if str(s) not in by_name)
    if unknown:
        raise ValueError(f"names {unknown} are neither variables of {problem.name} {list(problem.variables)} nor "
                         f"x_0..x_{problem.n_vars - 1}")
    return expression.xreplace({s: by_name[str(s)] for s in expression.free_symbols})


def normalise_constants(expr: sympy.Expr, decimals: int = 3) -> sympy.Expr:
    """Evaluate numeric constants and round every float to ``decimals`` places as an exact rational."""
    expr = sympy.sympify(expr).evalf()
    return expr.xreplace({f: sympy.Rational(repr(round(float(f), decimals))) for f in expr.atoms(sympy.Float)})


class _Timeout(Exception):
    pass


def _call_with_timeout(fn: Callable[[], Any], seconds: float) -> Any:
    """``fn()``, or raise _Timeout after ``seconds`` (SIGALRM on the main thread; else a daemon thread)."""
    if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
        def on_alarm(signum, frame):
            raise _Timeout

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise _Timeout
    if "error" in box:
        raise box["error"]
    return box["value"]


def _evaluate_real(expr: sympy.Expr, symbols, X_MxD: np.ndarray) -> np.ndarray | None:
    """``expr`` at the rows of ``X_MxD`` as float64 (M,), or None where it is complex or not finite."""
    with np.errstate(all="ignore"):
        v_M = np.asarray(sympy.lambdify(symbols, expr, "numpy")(*X_MxD.T))
    if np.iscomplexobj(v_M):
        if not np.all(np.abs(v_M.imag) <= 1e-12 * np.abs(v_M.real)):
            return None
        v_M = v_M.real
    v_M = np.broadcast_to(v_M.astype(np.float64), (len(X_MxD),))
    return v_M if np.isfinite(v_M).all() else None


def _is_constant(v_M: np.ndarray, scale: float, rtol: float) -> bool:
    return bool(np.isfinite(v_M).all() and np.ptp(v_M) <= rtol * max(scale, 1e-300))


def symbolic_recovery(problem: FeynmanProblem, expression: Any, X_MxD: np.ndarray, *, decimals: int = 3,
                      rtol: float = 1e-6, timeout_s: float = 5.0) -> Recovery:
    """Whether ``expression`` is the problem's formula up to an additive or multiplicative constant (module
    docstring: normalisation, numeric screen at ``X_MxD``, then sympy; all of it under ``timeout_s``)."""
    if expression is None:
        return Recovery(False, "no-expression")
    try:
        model = to_problem_expression(expression, problem)
    except ValueError as e:
        return Recovery(False, f"bad-expression: {e}")
    try:
        return _call_with_timeout(lambda: _recovery(problem, model, X_MxD, decimals, rtol), timeout_s)
    except _Timeout:
        return Recovery(False, "timeout")
    except Exception as e:  # numpy cannot evaluate it, or sympy raises on odd input (e.g. PolynomialError)
        return Recovery(False, f"error: {type(e).__name__}: {e}")


def _recovery(problem: FeynmanProblem, model: sympy.Expr, X_MxD: np.ndarray, decimals: int,
              rtol: float) -> Recovery:
    truth_n = normalise_constants(problem.formula, decimals)
    model_n = normalise_constants(model, decimals)
    f_M = _evaluate_real(truth_n, problem.symbols, X_MxD)
    g_M = _evaluate_real(model_n, problem.symbols, X_MxD)
    if f_M is None:
        return Recovery(False, "error: the normalised formula is not finite at the test points")
    if g_M is None:
        return Recovery(False, "numeric-mismatch")
    with np.errstate(all="ignore"):
        diff_const = _is_constant(f_M - g_M, float(np.sqrt(np.mean(f_M**2))), rtol)
        ratio_M = f_M / g_M
        ratio_const = model_n != 0 and _is_constant(ratio_M, float(np.median(np.abs(ratio_M))), rtol)
    if diff_const and not sympy.simplify(truth_n - model_n).free_symbols:
        return Recovery(True, "difference")
    if ratio_const and not sympy.simplify(truth_n / model_n).free_symbols:
        return Recovery(True, "ratio")
    if diff_const or ratio_const:
        return Recovery(False, "sympy-unproven")
    return Recovery(False, "numeric-mismatch")


# ---------------------------------------------------------------------------------------------------- runner


def run_benchmark(make_regressor: Callable[[int], Any], problems: Sequence[FeynmanProblem], *,
                  method: str = "sr_jax", n_train: int = 200, n_test: int = 200, seed: int = 0,
                  noise: float = 0.0, recovery_timeout_s: float = 5.0, progress: bool = True,
                  on_result: Callable[[dict], None] | None = None) -> list[dict]:
    """Fit one fresh regressor per problem and score it; returns one record per problem, in order.

    ``make_regressor(seed)`` returns an object with ``fit(X, y)`` and ``predict(X)`` (scikit-learn style); ``seed``
    is the problem's seed, for the regressor's ``random_state``. If the fitted regressor has ``expression_`` (sympy,
    a string or an ``sr_jax.Expression``, in the problem's variable names or ``x_0, x_1, ...``), symbolic recovery
    is checked. ``seconds`` is the wall time of ``fit``. A regressor that raises gets a record with ``error`` set
    and misses on every metric; KeyboardInterrupt propagates.
    """
    from tqdm.auto import tqdm

    records: list[dict] = []
    hits = 0
    bar = tqdm(problems, desc=method, disable=not progress, dynamic_ncols=True, file=sys.stderr)
    for problem in bar:
        record = _run_one(make_regressor, problem, method, n_train, n_test, seed, noise, recovery_timeout_s)
        records.append(record)
        hits += record["r2_above_0.99"]
        bar.set_postfix_str(f"R2>0.99 {hits}/{len(records)}")
        if on_result is not None:
            on_result(record)
    return records


def _run_one(make_regressor, problem: FeynmanProblem, method: str, n_train: int, n_test: int, seed: int,
             noise: float, recovery_timeout_s: float) -> dict:
    pseed = problem_seed(seed, problem.name)
    record = {"method": method, "problem": problem.name, "n_vars": problem.n_vars, "seed": pseed,
              "formula": str(problem.formula), "r2": float("nan"), "r2_above_0.99": False,
              "r2_above_0.999": False, "acc_0.1": False, "recovered": False, "recovery_check": "no-expression",
              "seconds": float("nan"), "expression": None, "source": None, "error": None}
    try:
        data = sample_problem(problem, n_train, n_test, seed, noise)
    except ValueError as e:  # a formula that is not finite on its ranges: a miss for every method, with the reason
        record["error"] = f"data: {e}"
        return record
    start = time.perf_counter()
    try:
        regressor = make_regressor(pseed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            regressor.fit(data.X_train_NxD, data.y_train_N)
        record["seconds"] = time.perf_counter() - start
        scores = score_predictions(data.y_test_M, regressor.predict(data.X_test_MxD))
    except Exception as e:  # a crashed fit is a miss, recorded with its reason
        if math.isnan(record["seconds"]):
            record["seconds"] = time.perf_counter() - start
        record["error"] = f"{type(e).__name__}: {e}"
        return record
    record.update({"r2": scores.r2, "r2_above_0.99": scores.r2_above_099, "r2_above_0.999": scores.r2_above_0999,
                   "acc_0.1": scores.acc_01})
    expression = getattr(regressor, "expression_", None)
    if expression is not None:
        record["expression"] = str(expression)
    record["source"] = getattr(getattr(regressor, "best_", None), "source", None)
    recovery = symbolic_recovery(problem, expression, data.X_test_MxD, timeout_s=recovery_timeout_s)
    record.update({"recovered": recovery.recovered, "recovery_check": recovery.check})
    return record


class Summary(NamedTuple):
    n_problems: int
    n_failed: int
    r2_above_099: float
    r2_above_0999: float
    acc_01: float
    recovery: float
    recovery_timeouts: int
    median_seconds: float


def summarize(records: Sequence[dict]) -> dict[str, Summary]:
    """Rates over all problems of each method (failures count as misses) and the median seconds per problem."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in records):
        rs = [r for r in records if r["method"] == method]
        n = len(rs)
        out[method] = Summary(
            n_problems=n, n_failed=sum(r["error"] is not None for r in rs),
            r2_above_099=sum(r["r2_above_0.99"] for r in rs) / n,
            r2_above_0999=sum(r["r2_above_0.999"] for r in rs) / n,
            acc_01=sum(r["acc_0.1"] for r in rs) / n, recovery=sum(r["recovered"] for r in rs) / n,
            recovery_timeouts=sum(r["recovery_check"] == "timeout" for r in rs),
            median_seconds=_median_finite([r["seconds"] for r in rs]))
    return out


def _median_finite(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]  # a problem whose data could not be sampled has no time
    return float(np.median(finite)) if finite else float("nan")


def solved_by_source(records: Sequence[dict], method: str) -> dict[str, int]:
    """How many of ``method``'s problems reached R² > 0.99 with a chosen equation from each candidate source
    (``source`` of the regressor's ``best_``: "basis", "prior", "greedy", "beam", "sample"), most first."""
    counts: dict[str, int] = {}
    for r in records:
        if r["method"] == method and r["r2_above_0.99"]:
            key = r.get("source") or "unknown"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def format_summary(summaries: dict[str, Summary]) -> str:
    """A plain-text table: one row per metric, one column per method."""
    rows = [("problems", lambda s: f"{s.n_problems}"), ("failed fits", lambda s: f"{s.n_failed}"),
            ("R2 > 0.99", lambda s: f"{100 * s.r2_above_099:.1f}%"),
            ("R2 > 0.999", lambda s: f"{100 * s.r2_above_0999:.1f}%"),
            ("acc@0.1", lambda s: f"{100 * s.acc_01:.1f}%"),
            ("symbolic recovery", lambda s: f"{100 * s.recovery:.1f}%"),
            ("recovery timeouts", lambda s: f"{s.recovery_timeouts}"),
            ("median s/problem", lambda s: f"{s.median_seconds:.2f}")]
    methods = list(summaries)
    cells = [["metric", *methods]] + [[label, *(fmt(summaries[m]) for m in methods)] for label, fmt in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- Operon

OPERON_SYMBOLS = "add,sub,mul,div,constant,variable,abs,sqrt,log,exp,sin,cos,tan,asin,acos,atan,square"
"""pyoperon's primitives closest to sr_jax's operator set (pow3 and inv have no Operon primitive)."""


def operon_version() -> str | None:
    """The installed pyoperon's version, or None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pyoperon")
    except PackageNotFoundError:
        return None


class OperonRegressor:
    """pyoperon's ``SymbolicRegressor`` under a wall-clock limit, with ``expression_`` as sympy in ``x_0, x_1...``.

    pyoperon takes its time limit in whole seconds, so ``time_limit_s`` is rounded up (at least 1 s): Operon gets at
    least the time asked for. Other keyword arguments go to ``SymbolicRegressor`` unchanged.
    """

    def __init__(self, time_limit_s: float, random_state: int = 0, n_threads: int = 1,
                 allowed_symbols: str = OPERON_SYMBOLS, **params):
        self.time_limit_s = time_limit_s
        self.random_state = random_state
        self.n_threads = n_threads
        self.allowed_symbols = allowed_symbols
        self.params = params

    def fit(self, X, y) -> "OperonRegressor":
        try:
            import pyoperon
            from pyoperon.sklearn import SymbolicRegressor
        except ImportError:
            raise ImportError("pyoperon is not installed; install it with: pip install -e \".[operon]\"") from None
        if not (math.isfinite(self.time_limit_s) and self.time_limit_s > 0):
            raise ValueError(f"time_limit_s must be a positive number of seconds, got {self.time_limit_s}")
        self.regressor_ = SymbolicRegressor(max_time=max(1, math.ceil(self.time_limit_s)),
                                            random_state=self.random_state, n_threads=self.n_threads,
                                            allowed_symbols=self.allowed_symbols, **self.params)
        self.regressor_.fit(np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64).reshape(-1))
        text = pyoperon.InfixFormatter.Format(self.regressor_.model_, self.regressor_.variables_, 17)
        # Operon names the inputs X1, X2, ... and writes powers with ^
        names = {f"X{i + 1}": sympy.Symbol(f"x_{i}", real=True) for i in range(np.shape(X)[1])}
        self.expression_ = parse_expr(text.replace("^", "**"), local_dict={**names, "abs": sympy.Abs})
        return self

    def predict(self, X) -> np.ndarray:
        return self.regressor_.predict(np.asarray(X, dtype=np.float64))
