"""``SymbolicTransformerRegressor``: a scikit-learn-style symbolic regressor (``fit(X, y)`` -> a formula).

Pipeline of one ``fit`` (spec sections 6-7, with the original's bugs fixed):

1. Validation, before any work: every problem is a ``ValueError`` that names it.
2. Preprocessing per dataset: with more than 10 features (or more than the transformer reads, when it is used), the
   10 (its width) most |Pearson|-correlated with y are kept, ordered by decreasing |r| (model variable x_i is the
   i-th kept feature); X is standardised per column with the population
   std (a constant column gets scale 1); y is flattened to (N,) and left in its units. Rows are shuffled with
   ``random_state``; when there are at least 40 rows, ``validation_fraction`` of them are held out for selection.
   The other (training) rows are split into nearly equal bags of at most ``max_input_points`` rows for the
   transformer (so no bag is tiny), at most ``max_number_bags`` of them.
3. Candidate pool per dataset (``candidate_sources``): ``"bases"`` (``pool.basis_candidates``, least-squares
   initialised), ``"model"`` (the transformer's candidates for every bag, ``candidates.model_candidates``) and
   ``"prior"`` (``n_prior`` skeletons from the generator's prior: the best fits among a fixed library of
   ``prior_draws`` draws per number of features, each with its outer linear coefficients solved by least squares on
   the dataset, ``pool.screen_prior``), deduplicated by skeleton in that order.
4. All candidates of all datasets are refined in ONE ``sr_jax.refine`` call, on at most ``max_refine_points``
   training rows per dataset (inputs padded with unused zero columns to ``MAX_FEATURES``, so that datasets with
   different numbers of features share compiled programs). At refinement's checkpoints (after 1, 8, 16, 32 and 64
   evaluations) a candidate stops refining when one with no more nodes fits its dataset to a training loss of
   ``_SOLVED_LOSS`` (then it cannot be chosen in step 5), or -- from 8 evaluations on -- has a loss
   ``_BEATEN_RATIO`` times lower than its own (then it would need to improve that much to matter); and -- from 16
   evaluations on -- a candidate stops when its own loss fell by less than the fraction ``_STALL`` since the previous
   checkpoint (it has stalled, or creeps too slowly to change the choice): ``refine(beaten=...)``; in ``equations_``
   their losses are where they stopped.
5. Selection: every refined candidate is evaluated in float64 on all rows. Its ``loss`` is MSE / var(y) on the
   held-out rows (on the training rows when none are held out). Among the candidates with
   ``loss <= best * (1 + complexity_tolerance) + 1e-9``, or whose per-row squared errors exceed the best's by no
   more than one standard error of their paired difference (so noise alone does not pick a longer formula), the
   one with the fewest prefix nodes wins (then the lowest loss).
6. The winner is written in the user's units and names: every z_i becomes (x_k - mean_k) / scale_k with x_k the
   user's feature (a sympy Symbol named after the DataFrame column or ``feature_names``; ``x_k`` by default, k the
   user's column index). With ``tidy=True`` the formula and its expansion (products and integer powers of sums
   multiplied out) are tidied within one allowance for all changes together: MSE / var(y) on all rows may rise by
   the BIC's price of one constant (a factor N**(1/N): 2.7% at 200 rows; at least 0.1%; +1e-10). First terms are
   dropped: a constant goes to 0 while the others are refitted (so offsets that the noise spread over several
   constants go to 0 together), using at most half of that room, and exponents are rounded to integers or halves
   the same way, in what is left of that half; then the other constants are snapped, one at a time, to the
   fewest significant digits (1..6) that stay within it — trying short multiples of pi**e (e in -3..3, e.g.
   0.5/pi, 4*pi; not for exponents) after 3 digits and before 4 —, integral constants become integers, and the
   form with fewer nodes is kept (so a noise-free 2.5*sin(x) + x**2 reads as exactly that, and noisy
   x*y + 0.01*x - 0.08 as x*y).

The transformer's decoding is dispatched before the host builds the bases and screens the prior, and collected after
them (JAX runs it asynchronously), so the two overlap.

Batched fitting: ``fit([X_1, ..., X_B], [y_1, ..., y_B])`` runs steps 1-6 for every dataset with ONE decoding call
and ONE refinement call; steps 5-6 of a dataset run as soon as its refinement is final (``refine``'s ``on_final``),
while the device refines the datasets still running; every fitted attribute becomes a list with one entry per
dataset and ``predict``/``score`` take and return lists. Dataset b of a batched fit gets the same rows and
non-neural pool as a separate fit with the same ``random_state`` (those draws depend on ``random_state`` and the
dataset's own shape only); the transformer's greedy and beam candidates do not depend on the batch either, its
samples (``decoding="sample"``) may.

Compilation: refinement compiles one program per tape shape bucket; compiled programs are reused across fits in a
process. The estimator never changes JAX's global settings; to also skip XLA's compilation in later processes, turn
on JAX's persistent compilation cache yourself, e.g. with ``sr_jax.enable_compilation_cache()`` (``run.py`` does
this for its commands).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import sympy

from .candidates import Candidate
from .expressions import VARIABLES, Expression
from .interpreter import gc_paused
from .operators import OPERATORS, SYMPY_HEADS
from .pool import (PriorLibrary, basis_candidates, correlation_order, dedupe, prior_candidates, prior_library,
                   screen_prior)

MAX_FEATURES = 10  # the transformer's input width; more features are reduced by correlation
MAX_PRIOR_DRAWS = 16384  # prior library size: drawing it takes seconds per number of features, once per process
MIN_POINTS = 5
_MIN_VALIDATION_POINTS = 40
_ABS_TOLERANCE = 1e-9  # selection: losses this close to the best count as equal
_SOLVED_LOSS = 1e-10  # refinement: a candidate fitting this well stops every more complex one of its dataset
_BEATEN_RATIO = 100.0  # refinement: a candidate this many times worse than a no-more-complex one stops early
_STALL = 1e-3  # refinement: a candidate whose loss fell by less than this fraction since the last checkpoint stops
_SOURCES = ("model", "prior", "bases")
_SELECT_SHARE = 0.4  # with max_time, this share of it is left to selection and tidying (refinement gets the rest)
_PRIOR_LIBRARY_SEED = 0  # the screened prior draws one fixed library per dimension (data-independent, cached)
_SCREEN_ROWS = 256  # training rows the prior library is screened on


# ----- fitted equations --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Transform:
    """Maps model space (standardised kept features x_0..x_{K-1}) to the user's raw features and names."""

    columns: tuple[int, ...]  # user column of model variable x_i
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    names: tuple[str, ...]  # one per user column

    @functools.cached_property
    def symbols(self) -> tuple[sympy.Symbol, ...]:
        return tuple(sympy.Symbol(n) for n in self.names)

    def standardise(self, x_user: np.ndarray) -> np.ndarray:
        x = np.asarray(x_user, np.float64)[:, list(self.columns)]
        return (x - np.asarray(self.mean)) / np.asarray(self.scale)

    def to_user(self, expr: Expression) -> sympy.Expr:
        """The expression as a sympy expression of the user's raw features."""
        subs = {sympy.Symbol(VARIABLES[i], real=True):
                (self.symbols[c] - sympy.Float(m, 17)) / sympy.Float(s, 17)
                for i, (c, m, s) in enumerate(zip(self.columns, self.mean, self.scale))}
        return expr.to_sympy().xreplace(subs)


@dataclasses.dataclass(frozen=True)
class Equation:
    """One refined candidate of a fit.

    ``expression``: over the standardised kept features (model variables x_0..x_{K-1}); ``sympy()`` gives it in
    the user's raw features and names. ``complexity``: prefix node count of ``expression``. ``loss``: MSE / var(y)
    on the held-out rows (the training rows when none were held out); inf where it is not finite. ``r2``: R² on all
    rows of the fit (NaN where not finite). ``pareto``: no other equation has a lower loss at the same or a lower
    complexity (nor a lower complexity at the same loss).
    """

    expression: Expression
    source: str
    complexity: int
    loss: float
    r2: float
    pareto: bool
    transform: _Transform = dataclasses.field(repr=False, compare=False)

    def sympy(self) -> sympy.Expr:
        return self.transform.to_user(self.expression)


class _Scored(NamedTuple):
    """A refined candidate as selection sees it (``sq_S``: its squared error / var(y) per selection row)."""

    expression: Expression
    source: str
    complexity: int
    loss: float
    r2: float
    sq_S: np.ndarray


# ----- validation --------------------------------------------------------------------------------------------------
def _column_names(X) -> Optional[list[str]]:
    """Column names of a pandas-like DataFrame (anything with ``columns`` and ``to_numpy``), without pandas."""
    if hasattr(X, "columns") and hasattr(X, "to_numpy"):
        return [str(c) for c in X.columns]
    return None


def _numeric(a, name: str, names: Optional[list[str]] = None) -> np.ndarray:
    """a as a float64 array, or a ValueError naming the complex or non-numeric part (strings, even of digits,
    dates and other objects are non-numeric)."""
    raw = a.to_numpy() if hasattr(a, "to_numpy") else a
    try:
        arr = np.asarray(raw)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name} is not a rectangular numeric array ({e})") from None
    if arr.dtype.kind in "biuf":
        return arr.astype(np.float64)
    if arr.dtype.kind == "c":
        raise ValueError(f"{name} contains complex numbers; symbolic regression needs real-valued data")
    flat = arr.reshape(-1) if arr.dtype.kind == "O" else []
    if any(isinstance(v, (complex, np.complexfloating)) for v in flat):
        raise ValueError(f"{name} contains complex numbers; symbolic regression needs real-valued data")
    bad = [i for i, v in enumerate(flat) if not _is_real_number(v)][:1] if arr.dtype.kind == "O" else [0]
    if not bad:
        return arr.astype(np.float64)
    where = ""
    if arr.ndim == 2:
        col = int(np.unravel_index(bad[0], arr.shape)[1])
        where = f" in column {names[col]!r}" if names else f" in column {col}"
    value = arr.reshape(-1)[bad[0]] if arr.size else None
    raise ValueError(f"{name} has non-numeric data{where} (e.g. {value!r}, dtype {arr.dtype}); "
                     "encode it as numbers first")


def _is_real_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating, np.bool_)) and not isinstance(v, str)


def _check_dataset(X, y, feature_names, tag: str = "") -> tuple[np.ndarray, np.ndarray, list[str], bool]:
    """Validated (X float64 (N, D), y float64 (N,), names, names_given) of one dataset."""
    cols = _column_names(X)
    x = _numeric(X, "X" + tag, cols)
    if x.ndim == 1:
        raise ValueError(f"X{tag} must be 2-D (N samples, D features), got a 1-D array of shape {x.shape}; "
                         "for one feature use X.reshape(-1, 1)")
    if x.ndim != 2:
        raise ValueError(f"X{tag} must be 2-D (N samples, D features), got {x.ndim}-D shape {x.shape}; "
                         "for several datasets pass a list of 2-D arrays")
    yy = _numeric(y, "y" + tag)
    if yy.ndim == 2 and yy.shape[1] == 1:
        yy = yy[:, 0]
    if yy.ndim != 1:
        raise ValueError(f"y{tag} must have shape (N,) or (N, 1) (one target), got shape {yy.shape}")
    if x.shape[0] != yy.shape[0]:
        raise ValueError(f"X{tag} has {x.shape[0]} rows but y has {yy.shape[0]}; they must match")
    if x.shape[1] == 0:
        raise ValueError(f"X{tag} has no columns")
    if x.shape[0] < MIN_POINTS:
        raise ValueError(f"too few points in X{tag}: {x.shape[0]}; need at least {MIN_POINTS}")
    if not np.isfinite(x).all():
        r, c = np.argwhere(~np.isfinite(x))[0]
        col = repr(cols[c]) if cols else str(c)
        raise ValueError(f"X{tag} contains NaN or inf (first at row {r}, column {col}); drop or impute those rows")
    if not np.isfinite(yy).all():
        r = int(np.flatnonzero(~np.isfinite(yy))[0])
        raise ValueError(f"y{tag} contains NaN or inf (first at row {r}); drop those rows")
    if np.ptp(yy) == 0:
        raise ValueError(f"y{tag} is constant (every value is {float(yy[0])!r}): there is nothing to regress")
    names_given = feature_names is not None or cols is not None
    names = [str(n) for n in feature_names] if feature_names is not None else cols
    if names is None:
        names = [f"x_{k}" for k in range(x.shape[1])]
    if len(names) != x.shape[1]:
        raise ValueError(f"feature_names{tag} has {len(names)} names but X has {x.shape[1]} columns")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"feature names{tag} must be unique; {dup!r} appears more than once")
    return x, yy, names, names_given


def _is_batch(X) -> bool:
    """A list/tuple of 2-D arrays or DataFrames is a batch of datasets; nested lists of numbers are one X."""
    return isinstance(X, (list, tuple)) and len(X) > 0 and all(hasattr(a, "shape") for a in X)


# ----- preprocessing -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Prepared:
    """One dataset ready for the pool: standardised kept features of all rows and the row split."""

    transform: _Transform
    z_NxK: np.ndarray
    y_N: np.ndarray
    train: np.ndarray  # row indices used for refinement (at most max_refine_points)
    select: np.ndarray  # rows whose error decides the selection
    bags: list  # row-index arrays for the transformer


def _select_features(x: np.ndarray, y: np.ndarray, width: int = MAX_FEATURES) -> np.ndarray:
    """All columns in order when D <= width, else the ``width`` most |Pearson|-correlated with y by decreasing
    |r|."""
    if x.shape[1] <= width:
        return np.arange(x.shape[1])
    return correlation_order(x, y)[:width]


def _pad_columns(z_NxK: np.ndarray, width: int) -> np.ndarray:
    """z with zero columns appended up to ``width`` columns (unchanged if it has that many or more)."""
    return np.pad(z_NxK, ((0, 0), (0, max(width - z_NxK.shape[1], 0))))


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *[int(k) for k in key]])


# ----- the estimator -----------------------------------------------------------------------------------------------
class SymbolicTransformerRegressor:
    """Symbolic regression: ``fit(X, y)`` finds a formula y ~ f(X) (see the module docstring for the method).

    Parameters (stored as given; checked at ``fit``):
        model_path: directory of a trained transformer for ``sr_jax.train.load_trained``; None = the shipped one.
        candidate_sources: any of "model", "prior", "bases" (the pool's parts; the ablation switches them).
        max_input_points: rows per bag given to the transformer (at most 200, its training maximum).
        max_number_bags: bags decoded per dataset.
        decoding, beam_size, n_samples, temperature: the transformer's decoding ("greedy", "beam", "sample").
        n_prior: skeletons from the generator's prior refined per dataset.
        prior_draws: size of the prior library screened for them: when larger than ``n_prior``, a fixed library of
            this many draws per number of features has its outer linear coefficients fitted to each dataset by
            least squares and the ``n_prior`` best fits join the pool (``pool.screen_prior``); otherwise
            ``n_prior`` draws seeded by ``random_state`` join as drawn.
        max_refine_points: training rows used by refinement.
        refine_iterations: BFGS evaluations per candidate.
        validation_fraction: share of rows held out for selection (when there are at least 40 rows).
        complexity_tolerance: relative loss slack within which the simplest candidate wins (a candidate not worse
            than the best by more than one standard error of their paired per-row difference counts as well).
        tidy: snap the chosen formula's constants to short values when that does not hurt the fit.
        max_time: seconds (None: no limit), a soft limit on the whole fit (of all datasets, after a batched fit),
            compilation included: refinement stops at its next checkpoint once all but ``_SELECT_SHARE`` (0.4) of
            it is spent (candidates still running keep their best constants so far), and tidying starts no new step
            once all of it is spent, or that share of it after refinement when compiling (a process's first fits)
            spent more (the formula keeps the steps already taken, and is still shortened). The transformer's
            decoding runs to its end.
        random_state: int seed (None: a fresh one per fit) for row shuffling, the prior and sampling.

    Fitted attributes (lists, one entry per dataset, after a batched fit): ``expression_`` (sympy, user names),
    ``equations_`` (list of ``Equation``, sorted by complexity then loss), ``best_`` (the chosen ``Equation``,
    before tidying), ``complexity_`` (``sympy_nodes`` of ``expression_``), ``selected_features_`` (the user
    column of each model variable), ``n_features_in_``, ``feature_names_in_`` (when names were given),
    ``batched_``.
    """

    def __init__(self, model_path=None, candidate_sources=_SOURCES, max_input_points: int = 200,
                 max_number_bags: int = 4, decoding: str = "beam", beam_size: int = 4, n_samples: int = 32,
                 temperature: float = 1.0, n_prior: int = 16, prior_draws: int = 1024, max_refine_points: int = 1024,
                 refine_iterations: int = 100, validation_fraction: float = 0.25,
                 complexity_tolerance: float = 0.05, tidy: bool = True, max_time=None, random_state=None):
        self.model_path = model_path
        self.candidate_sources = candidate_sources
        self.max_input_points = max_input_points
        self.max_number_bags = max_number_bags
        self.decoding = decoding
        self.beam_size = beam_size
        self.n_samples = n_samples
        self.temperature = temperature
        self.n_prior = n_prior
        self.prior_draws = prior_draws
        self.max_refine_points = max_refine_points
        self.refine_iterations = refine_iterations
        self.validation_fraction = validation_fraction
        self.complexity_tolerance = complexity_tolerance
        self.tidy = tidy
        self.max_time = max_time
        self.random_state = random_state

    # ----- scikit-learn protocol -------------------------------------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict:
        return {p: getattr(self, p) for p in self._param_names()}

    def set_params(self, **params) -> "SymbolicTransformerRegressor":
        valid = self._param_names()
        for k, v in params.items():
            if k not in valid:
                raise ValueError(f"invalid parameter {k!r} for SymbolicTransformerRegressor; valid: {valid}")
            setattr(self, k, v)
        return self

    def __repr__(self) -> str:
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()}
        changed = [f"{k}={v!r}" for k, v in self.get_params().items() if not _same(v, defaults.get(k))]
        return f"SymbolicTransformerRegressor({', '.join(changed)})"

    def __sklearn_tags__(self):  # called by scikit-learn only, so it may import it
        from sklearn.utils import InputTags, RegressorTags, Tags, TargetTags

        return Tags(estimator_type="regressor", target_tags=TargetTags(required=True), transformer_tags=None,
                    regressor_tags=RegressorTags(), input_tags=InputTags())

    _estimator_type = "regressor"

    # ----- parameters --------------------------------------------------------------------------------------------
    def _check_params(self) -> tuple:
        src = self.candidate_sources
        if isinstance(src, str) or not all(s in _SOURCES for s in src) or not len(src):
            raise ValueError(f"candidate_sources must be a non-empty collection of {_SOURCES}, got {src!r}")
        if "model" in src and not 1 <= int(self.max_input_points) <= 200:
            raise ValueError(f"max_input_points must be in 1..200 (the transformer's training maximum), "
                             f"got {self.max_input_points}")
        for name in ("max_number_bags", "n_prior", "prior_draws", "max_refine_points", "refine_iterations",
                     "beam_size", "n_samples"):
            least = 0 if name in ("n_prior", "prior_draws", "refine_iterations") else 1
            if int(getattr(self, name)) < least:
                raise ValueError(f"{name} must be {'>= 0' if least == 0 else 'positive'}, got {getattr(self, name)}")
        if int(self.prior_draws) > MAX_PRIOR_DRAWS:
            raise ValueError(f"prior_draws must be at most {MAX_PRIOR_DRAWS} (the library is drawn and screened in "
                             f"every new process), got {self.prior_draws}")
        if not 0.0 <= float(self.validation_fraction) < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if float(self.complexity_tolerance) < 0:
            raise ValueError(f"complexity_tolerance must be >= 0, got {self.complexity_tolerance}")
        if self.max_time is not None and (isinstance(self.max_time, (bool, np.bool_)) or not (
                isinstance(self.max_time, (int, float, np.integer, np.floating)) and float(self.max_time) > 0)):
            raise ValueError(f"max_time must be a positive number of seconds or None, got {self.max_time!r}")
        if self.decoding not in ("greedy", "beam", "sample"):
            raise ValueError(f"decoding must be 'greedy', 'beam' or 'sample', got {self.decoding!r}")
        seed = self.random_state
        if seed is None:
            seed = int(np.random.default_rng().integers(2**31))
        elif isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"random_state must be a non-negative int or None, got {seed!r}")
        return tuple(src), int(seed)

    # ----- fit ---------------------------------------------------------------------------------------------------
    @gc_paused()
    def fit(self, X, y, feature_names=None) -> "SymbolicTransformerRegressor":
        """Fit one dataset (X: (N, D) array or DataFrame, y: (N,)), or a batch: lists of X and of y (and
        optionally a list of feature-name lists). Returns self."""
        t_start = time.perf_counter()
        sources, seed = self._check_params()
        if isinstance(X, (list, tuple)) and len(X) == 0:
            raise ValueError("X is empty: give an (N, D) array, or a non-empty list of them for a batched fit")
        batched = _is_batch(X)
        if batched:
            if not isinstance(y, (list, tuple)) or len(y) != len(X):
                raise ValueError(f"with a list of {len(X)} X datasets, y must be a list of as many targets")
            names_list = feature_names if feature_names is not None else [None] * len(X)
            if len(names_list) != len(X) or any(isinstance(n, str) for n in names_list):
                raise ValueError("with several datasets, feature_names must be a list with one list of names (or "
                                 "None) per dataset")
            data = [_check_dataset(xb, yb, nb, f" (dataset {b})") for b, (xb, yb, nb) in
                    enumerate(zip(X, y, names_list))]
        else:
            data = [_check_dataset(X, y, feature_names)]
        trained = _load_model(self.model_path) if "model" in sources else None
        width = min(MAX_FEATURES, trained.config.model.max_dim) if trained is not None else MAX_FEATURES
        prepared = [self._prepare(x, yy, names, seed, width) for x, yy, names, _ in data]
        pools = self._pools(prepared, sources, seed, trained)
        deadline = None if self.max_time is None else t_start + float(self.max_time)
        kept = None if deadline is None else _SELECT_SHARE * float(self.max_time)  # for selection and tidying
        fits: list = [None] * len(prepared)
        select_by = None  # selection's deadline, set when the first dataset is refined

        def select(b: int, refined: list[Expression]) -> None:
            nonlocal select_by
            if select_by is None and deadline is not None:  # tidying keeps at least its share even when
                select_by = max(deadline, time.perf_counter() + kept)  # compilation spent the rest
            fits[b] = self._select(prepared[b], pools[b], refined, select_by)

        # each dataset is selected as soon as its refinement is final, while the device refines the others
        self._refine(prepared, pools, None if deadline is None else deadline - kept, select)

        def out(values):
            return list(values) if batched else values[0]

        self.batched_ = batched
        self.n_features_in_ = out([x.shape[1] for x, *_ in data])
        if any(given for *_, given in data):
            self.feature_names_in_ = out([np.asarray(names, dtype=object) for _, _, names, _ in data])
        elif hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        self.equations_ = out([f[0] for f in fits])
        self.best_ = out([f[1] for f in fits])
        self.expression_ = out([f[2] for f in fits])
        self.complexity_ = out([sympy_nodes(f[2]) for f in fits])
        self.selected_features_ = out([np.asarray(p.transform.columns) for p in prepared])
        self._symbols_ = [p.transform.symbols for p in prepared]
        return self

    def _prepare(self, x: np.ndarray, y: np.ndarray, names: list[str], seed: int,
                 width: int = MAX_FEATURES) -> _Prepared:
        cols = _select_features(x, y, width)
        xs = x[:, cols]
        mean = xs.mean(axis=0)
        std = xs.std(axis=0)
        scale = np.where(std > 0, std, 1.0)
        z = (xs - mean) / scale
        n = len(y)
        order = _rng(seed, n, x.shape[1], 1).permutation(n)
        n_val = min(int(round(self.validation_fraction * n)), n - MIN_POINTS) if n >= _MIN_VALIDATION_POINTS else 0
        val, train = order[:n_val], order[n_val:]
        select = val if n_val else train
        n_bags = min(-(-len(train) // int(self.max_input_points)), int(self.max_number_bags))
        bags = np.array_split(train, -(-len(train) // int(self.max_input_points)))[:n_bags]
        transform = _Transform(tuple(int(c) for c in cols), tuple(float(m) for m in mean),
                               tuple(float(s) for s in scale), tuple(names))
        return _Prepared(transform, z, y, train[: int(self.max_refine_points)], select, bags)

    def _pools(self, prepared: list[_Prepared], sources: tuple, seed: int, trained) -> list[list[Candidate]]:
        bases: list[list[Candidate]] = [[] for _ in prepared]
        decoded: list[list[Candidate]] = [[] for _ in prepared]  # the transformer's
        finish_decoding = None
        if trained is not None:  # dispatched first: the device decodes while the host builds the other candidates
            from .candidates import start_model_candidates

            jobs = [(b, bag) for b, p in enumerate(prepared) for bag in p.bags]
            finish_decoding = start_model_candidates(
                trained, [(prepared[b].z_NxK[bag], prepared[b].y_N[bag]) for b, bag in jobs], decoding=self.decoding,
                beam_size=int(self.beam_size), n_samples=int(self.n_samples), temperature=float(self.temperature),
                seed=seed)
        if "bases" in sources:
            for pool, p in zip(bases, prepared):
                t = p.transform
                pool += basis_candidates(p.z_NxK[p.train], p.y_N[p.train], np.asarray(t.mean), np.asarray(t.scale))
        priors: list[list[Candidate]] = [[] for _ in prepared]
        n_prior, draws = int(self.n_prior), int(self.prior_draws)
        if "prior" in sources and n_prior > 0 and draws > n_prior:
            # one fixed library per dimension, screened on each dataset's rows (datasets of a dimension together)
            for d in sorted({p.z_NxK.shape[1] for p in prepared}):
                members = [b for b, p in enumerate(prepared) if p.z_NxK.shape[1] == d]
                rows = [prepared[b].train[:_SCREEN_ROWS] for b in members]
                screened = screen_prior(_library(d, draws), [(prepared[b].z_NxK[r], prepared[b].y_N[r])
                                                             for b, r in zip(members, rows)], n_prior)
                for b, cands in zip(members, screened):
                    priors[b] += cands
        elif "prior" in sources and n_prior > 0:
            for pool, p in zip(priors, prepared):
                pool += _prior(p.z_NxK.shape[1], n_prior, seed)
        if finish_decoding is not None:
            for (b, _), cands in zip(jobs, finish_decoding()):
                decoded[b] += cands
        return [dedupe(basis + model + prior) or [Candidate(Expression([float(p.y_N.mean())]), "basis")]
                for basis, model, prior, p in zip(bases, decoded, priors, prepared)]

    def _refine(self, prepared: list[_Prepared], pools: list[list[Candidate]], deadline: Optional[float],
                on_final: Callable[[int, list[Expression]], None]) -> None:
        """Every pool refined in one batched call, stopping at its next checkpoint past ``deadline`` (a
        ``time.perf_counter()`` value, None: no limit); ``on_final(b, refined expressions of pool b)`` as soon as
        dataset b's are final (``sr_jax.refine``'s ``on_final``)."""
        from .refinement import Beaten, refine

        left = None if deadline is None else max(deadline - time.perf_counter(), 0.0)
        # every dataset's inputs padded with zero columns to MAX_FEATURES (no candidate reads them): fits of datasets
        # with different numbers of features then share refinement's compiled programs
        refine([[c.expression for c in pool] for pool in pools],
               [_pad_columns(p.z_NxK[p.train], MAX_FEATURES) for p in prepared],
               [p.y_N[p.train] for p in prepared],
               maxiter=int(self.refine_iterations), max_time=left,
               beaten=Beaten(solved_loss=_SOLVED_LOSS, ratio=_BEATEN_RATIO, stall=_STALL),
               on_final=lambda b, result: on_final(b, result.expressions))

    def _select(self, p: _Prepared, pool: list[Candidate], refined: list[Expression],
                deadline: Optional[float] = None):
        """(equations sorted by complexity then loss, the chosen equation, its user-space sympy expression);
        tidying starts no new step after ``deadline`` (a ``time.perf_counter()`` value, None: no limit)."""
        y = p.y_N
        var_sel = max(float(np.var(y[p.select])), 1e-300)
        sst = float(np.sum((y - y.mean()) ** 2))
        rows = []
        for cand, expr in zip(pool, refined):
            pred = expr.evaluate_numpy(p.z_NxK)
            with np.errstate(all="ignore"):
                sq_S = (pred[p.select] - y[p.select]) ** 2 / var_sel
                loss = float(np.mean(sq_S))
                r2 = float(1.0 - np.sum((pred - y) ** 2) / sst)
            if not np.isfinite(loss):
                loss, r2 = float("inf"), float("nan")
            rows.append(_Scored(expr, cand.source, expr.n_nodes, loss, r2, sq_S))
        best = min(rows, key=lambda r: r.loss)
        rows.sort(key=lambda r: (r.complexity, r.loss))
        pareto, best_so_far = [], float("inf")
        for r in rows:  # sorted by complexity: on the front iff strictly better than everything simpler
            pareto.append(r.loss < best_so_far)
            best_so_far = min(best_so_far, r.loss)
        equations = [Equation(r.expression, r.source, r.complexity, r.loss, r.r2, f, p.transform)
                     for r, f in zip(rows, pareto)]

        def as_good(r: _Scored) -> bool:
            """Within the relative tolerance of the best loss, or not worse by more than one standard error of the
            paired per-row difference (how much better the best really is on these rows; noise alone does not make
            a longer formula win)."""
            if r.loss <= best.loss * (1.0 + float(self.complexity_tolerance)) + _ABS_TOLERANCE:
                return True
            with np.errstate(all="ignore"):
                d_S = r.sq_S - best.sq_S
                return bool(np.isfinite(r.loss) and np.mean(d_S) <= np.std(d_S) / np.sqrt(len(d_S)))

        chosen = (next(e for e, r in zip(equations, rows) if as_good(r)) if np.isfinite(best.loss)
                  else equations[0])
        expr = chosen.sympy()
        if self.tidy and np.isfinite(best.loss):
            expanded = sympy.expand(expr, power_exp=False, power_base=False, log=False)
            forms = [expr] + ([expanded] if expanded != expr else [])
            expr = min((_tidy(f, p.transform, p.z_NxK, y, deadline) for f in forms), key=sympy_nodes)
        return equations, chosen, expr

    # ----- use ---------------------------------------------------------------------------------------------------
    def _check_fitted(self):
        if not hasattr(self, "expression_"):
            raise ValueError("this SymbolicTransformerRegressor is not fitted yet; call fit(X, y) first")

    def _expressions(self) -> list:
        return self.expression_ if self.batched_ else [self.expression_]

    def _check_predict_x(self, X, b: int, tag: str) -> np.ndarray:
        n_in = self.n_features_in_[b] if self.batched_ else self.n_features_in_
        cols = _column_names(X)
        x = _numeric(X, "X" + tag, cols)
        if x.ndim != 2 or x.shape[1] != n_in:
            raise ValueError(f"X{tag} must have shape (N, {n_in}) like the fitted data, got {x.shape}")
        if cols is not None and hasattr(self, "feature_names_in_"):
            fitted = list(self.feature_names_in_[b] if self.batched_ else self.feature_names_in_)
            if cols != fitted:
                raise ValueError(f"X{tag} has columns {cols} but the model was fitted on {fitted}")
        if not np.isfinite(x).all():
            raise ValueError(f"X{tag} contains NaN or inf")
        return x

    def predict(self, X):
        """Predictions (float64) of the fitted formula; after a batched fit, X is a list and so is the result."""
        self._check_fitted()
        if self.batched_:
            if not isinstance(X, (list, tuple)) or len(X) != len(self.expression_):
                raise ValueError(f"after a batched fit of {len(self.expression_)} datasets, predict needs a list of "
                                 f"as many X")
            return [self._predict_one(x, b, f" (dataset {b})") for b, x in enumerate(X)]
        return self._predict_one(X, 0, "")

    def _predict_one(self, X, b: int, tag: str) -> np.ndarray:
        x = self._check_predict_x(X, b, tag)
        with np.errstate(all="ignore"):
            out = _column_fn(self._expressions()[b], self._symbols_[b], np)(x)
        return np.broadcast_to(np.asarray(out, np.float64), (x.shape[0],)).copy()

    def score(self, X, y):
        """R² of the predictions (a list of R² after a batched fit)."""
        from .metrics import r2

        pred = self.predict(X)
        if self.batched_:
            return [r2(np.asarray(yy, np.float64).reshape(-1), p) for yy, p in zip(y, pred)]
        return r2(np.asarray(y, np.float64).reshape(-1), pred)

    def sympy(self):
        """The fitted formula (sympy, user names); a list after a batched fit."""
        self._check_fitted()
        return self.expression_

    def latex(self):
        """The fitted formula as LaTeX; a list after a batched fit."""
        self._check_fitted()
        return [sympy.latex(e) for e in self.expression_] if self.batched_ else sympy.latex(self.expression_)

    def jax_fn(self, dataset: Optional[int] = None):
        """A jitted JAX function f(X) of the fitted formula: X of shape (..., n_features_in_) in the user's raw
        units, result of shape (...). Differentiable (``jax.grad`` on one row) and vmappable. After a batched fit,
        ``dataset`` picks one; None gives the list of all."""
        import jax

        self._check_fitted()
        if self.batched_ and dataset is None:
            return [self.jax_fn(b) for b in range(len(self.expression_))]
        b = 0 if dataset is None else int(dataset)
        return jax.jit(_column_fn(self._expressions()[b], self._symbols_[b], jax.numpy))


def _same(a, b) -> bool:
    try:
        return bool(a == b) if not isinstance(a, np.ndarray) else False
    except Exception:
        return False


# ----- evaluation of a user-space formula ------------------------------------------------------------------------


def evaluate_sympy(expr: sympy.Expr, env: dict, xp=np):
    """Value of a sympy formula built from the operators an ``Expression`` can hold, with ``env`` mapping each
    symbol to an array (or scalar) and ``xp`` the array module (numpy or jax.numpy). Broadcasts like ``xp``."""
    if expr.is_Symbol:
        return env[expr]
    if expr.is_number:
        return _number_value(expr, xp)
    return _node_fn(expr, xp)([evaluate_sympy(a, env, xp) for a in expr.args])


def _number_value(expr: sympy.Expr, xp):
    try:
        v = float(expr)
    except TypeError:  # complex infinity and other non-real numbers
        v = float("nan")
    return np.float64(v) if xp is np else v  # numpy scalars: IEEE results, never a ZeroDivisionError


def _node_fn(expr: sympy.Expr, xp) -> Callable[[list], Any]:
    """The operation of one inner node of a formula, as a function of its arguments' values."""
    if expr.is_Add:
        return lambda args: functools.reduce(lambda a, b: a + b, args)
    if expr.is_Mul:
        return lambda args: functools.reduce(lambda a, b: a * b, args)
    if expr.is_Pow:
        e = expr.args[1]
        if e == sympy.Rational(1, 2):
            return lambda args: xp.sqrt(args[0])
        if e.is_Integer:
            return lambda args, k=int(e): args[0] ** k
        return lambda args: args[0] ** args[1]
    name = SYMPY_HEADS.get(expr.func)  # sin, exp, Abs, ... (the operator table's sympy node classes)
    if name is None or OPERATORS[name].arity != 1:
        raise ValueError(f"cannot evaluate {expr.func.__name__} in {expr}")
    fn = OPERATORS[name].np_fn if xp is np else OPERATORS[name].jax_fn
    return lambda args: fn(args[0])


def sympy_evaluator(expr: sympy.Expr, fixed: dict, variables: Sequence[sympy.Basic]) -> Callable[[Sequence], Any]:
    """``values -> evaluate_sympy(expr, {**fixed, variables[k]: values[k]})`` (numpy). ``variables``: symbols, or
    number atoms of ``expr`` (every occurrence of an equal number reads the value given for it, as if it were a
    symbol). Every part of ``expr`` that reads none of them is computed once, here. The same operations run in the
    same order as ``evaluate_sympy`` runs them on ``expr``, so the values are the same; for formulas evaluated at
    many values of a few constants."""
    index = {v: k for k, v in enumerate(variables)}
    numbers = frozenset(v for v in variables if v.is_number)

    def build(e: sympy.Expr):  # (a function of the values, True) or (the value, False)
        if e in index:
            return (lambda values, k=index[e]: values[k]), True
        if e.is_Symbol:
            return fixed[e], False
        if e.is_number and (not numbers or numbers.isdisjoint(e.atoms(sympy.Number))):
            return _number_value(e, np), False
        op = _node_fn(e, np)
        parts = [build(a) for a in e.args]
        if not any(varies for _, varies in parts):
            return op([v for v, _ in parts]), False
        getters = [g if varies else (lambda values, v=g: v) for g, varies in parts]
        return (lambda values: op([g(values) for g in getters])), True

    with np.errstate(all="ignore"):
        fn, varies = build(expr)
    return fn if varies else (lambda values: fn)


def _column_fn(expr: sympy.Expr, symbols: Sequence[sympy.Symbol], xp) -> Callable:
    """f(X) for X of shape (..., D) in user columns, result of shape (...)."""
    used = [(s, k) for k, s in enumerate(symbols) if s in expr.free_symbols]

    def f(x):
        x = xp.asarray(x)
        if x.ndim == 0 or x.shape[-1] != len(symbols):  # checked when traced: JAX would clamp a missing column
            raise ValueError(f"X must have shape (..., {len(symbols)}): one column per feature the formula was fitted "
                             f"on, got shape {tuple(x.shape)}")
        out = evaluate_sympy(expr, {s: x[..., k] for s, k in used}, xp)
        return xp.broadcast_to(xp.asarray(out, dtype=x.dtype), x.shape[:-1])

    return f


def _tidy(expr: sympy.Expr, t: _Transform, z: np.ndarray, y: np.ndarray,
          deadline: Optional[float] = None) -> sympy.Expr:
    """Drop terms (constants to 0, the others refitted) and snap constants to few significant digits while the fit
    on (z, y) stays as good as the data can tell (``_tidy_once``):
    all snaps together may raise MSE / var(y) by ``_tidy_allowance`` (the BIC's price of one free constant: 2.7% at
    200 rows), plus 1e-10. On noise-free data the unsnapped loss is tiny and the 1e-10 is what counts; on noisy data
    a constant the noise moved (0.013 for an offset that is 0) can go back to its short value. One constant's price
    for all of them, not one each: on noisy data snapping many constants at one price each moved the formula
    measurably away from the truth.
    Repeated (at most 3 passes) while it changes something: snapping can let sympy merge constants into new ones
    (0.166*(1.74*x - 6e-17)**2 becomes 0.500001*x**2 once the -6e-17 is 0), which the next pass snaps in turn.
    Merging the snapped constants (at their few digits' precision) can also move the formula past the allowance:
    then the pass is run again in a quarter of the room left, and not kept if that too ends past it.
    Past ``deadline`` (a ``time.perf_counter()`` value; None: none) no new pass starts, and a pass drops no more
    terms and rounds no more exponents (it still shortens: one evaluation per trial value)."""

    def late() -> bool:
        return deadline is not None and time.perf_counter() >= deadline

    allowed = None  # from the unsnapped formula's loss, so that the passes together stay within the tolerance
    for n_pass in range(3):
        if n_pass and late():
            break
        tidied, allowed = _tidy_once(expr, t, z, y, allowed, late)
        if tidied != expr and not _tidy_loss(tidied, t, z, y) <= allowed:
            now = float(_tidy_loss(expr, t, z, y))
            tidied, _ = _tidy_once(expr, t, z, y, now + (allowed - now) / 4, late)
        if tidied == expr or not _tidy_loss(tidied, t, z, y) <= allowed:
            break
        expr = tidied
    return expr


def _tidy_predict(expr: sympy.Expr, t: _Transform, z: np.ndarray, env: Optional[dict] = None) -> np.ndarray:
    """Predictions of a user-space formula on the standardised rows ``z``. ``env`` gives values of other symbols of
    ``expr``: scalars, or (T, 1) columns of trial values for (T, N) predictions."""
    x_user = z * np.asarray(t.scale) + np.asarray(t.mean)
    columns = {t.symbols[c]: x_user[:, i] for i, c in enumerate(t.columns)}
    with np.errstate(all="ignore"):
        return np.asarray(evaluate_sympy(expr, {**columns, **(env or {})}), np.float64)


def _tidy_loss(expr: sympy.Expr, t: _Transform, z: np.ndarray, y: np.ndarray, env: Optional[dict] = None):
    """MSE / var(y) of a user-space formula on the standardised rows ``z`` (inf where not finite); with ``env`` as
    in ``_tidy_predict``, one loss per row of trial values."""
    with np.errstate(all="ignore"):
        v = np.mean((_tidy_predict(expr, t, z, env) - y) ** 2, axis=-1) / max(float(np.var(y)), 1e-300)
    return np.where(np.isfinite(v), v, np.inf)


def _tidy_once(expr: sympy.Expr, t: _Transform, z: np.ndarray, y: np.ndarray, allowed,
               late=lambda: False) -> tuple:
    """One pass of ``_tidy``: (the snapped formula, the loss allowed: given, or ``_tidy_allowance`` above this
    one's). Dropping and rounding stop (keeping the steps taken) once ``late()`` says the time is spent.

    First it drops terms: each constant not yet fixed is set to 0 while the other free constants are refitted
    (``_refit_constants``), all such trials at once; the smallest constant whose trial stays within half the room
    the allowance leaves (the other half is for shortening) goes to 0 with the refitted values, and this repeats
    until no trial does. Refitting is what lets offsets that
    compensate each other go to 0 together (noisy a*b fitted as 1.41*(0.83*a + 0.013)*(0.853*b + 0.012) - 0.08
    becomes a*b). Only constants whose plain removal raises the loss by at most ``_DROP_GATE`` times the room under
    the allowance are tried, the ``_DROP_ROWS`` cheapest at a time, and only in formulas of at most
    ``_DROP_MAX_CONSTANTS`` constants (a real term costs far more; this keeps formulas with many constants cheap).
    Next it rounds exponents the same way (each free exponent to its nearest integer and its nearest half, the
    other free constants refitted, integers first, then the one that moves least, in what is left of that half:
    noisy q1*q2/r**2 fitted as q1**1.01*q2**0.99/r**2.03 becomes q1*q2/r**2). Then it shortens the
    remaining constants one at a time, largest first, the others fixed: to 1-6 significant digits, or to a short
    multiple of a power of pi (not exponents), whichever shortest form keeps the loss within the allowance. When
    terms were dropped or exponents rounded, the formula shortened without either is kept instead if it is shorter
    to write (``_written_size``): the refit can use up the allowance and leave every other constant at full
    precision."""
    floats = sorted(expr.atoms(sympy.Float), key=lambda f: -abs(float(f)))
    if not floats:
        return expr, allowed
    # the constants are the formula's own Float atoms (equal floats are one constant), evaluated as variables: no
    # copy of the formula is built until a pass ends
    x_user = z * np.asarray(t.scale) + np.asarray(t.mean)
    evaluate = sympy_evaluator(expr, {t.symbols[c]: x_user[:, i] for i, c in enumerate(t.columns)}, floats)
    var_y = max(float(np.var(y)), 1e-300)

    def predict(values_TxP: np.ndarray) -> np.ndarray:
        """[T, N] predictions, one row per row of constants (as ``_tidy_predict`` of the formula with them)."""
        with np.errstate(all="ignore"):
            pred = np.asarray(evaluate([values_TxP[:, k:k + 1] for k in range(len(floats))]), np.float64)
        return np.broadcast_to(pred, (len(values_TxP), len(y)))

    def losses(values_TxP: np.ndarray) -> np.ndarray:
        """[T] MSE / var(y), inf where not finite (as ``_tidy_loss`` of the formula with them)."""
        with np.errstate(all="ignore"):
            v = np.mean((predict(values_TxP) - y) ** 2, axis=-1) / var_y
        return np.where(np.isfinite(v), v, np.inf)

    values_P = np.array([float(f) for f in floats])
    ref = float(losses(values_P[None])[0])
    if allowed is None:
        if not np.isfinite(ref):
            return expr, allowed
        allowed = ref * _tidy_allowance(len(y)) + 1e-10
    budget = max(allowed - ref, 1e-300)
    start_P, fixed_P = values_P.copy(), values_P == 0.0
    drop = len(values_P) <= _DROP_MAX_CONSTANTS
    exponents = {pw.exp for pw in expr.atoms(sympy.Pow)}
    exponent_P = np.array([f in exponents for f in floats])

    def refit_trials(tried_T: np.ndarray, target_T) -> tuple:
        """(trial rows: the current values with constant tried_T[r] set to target_T[r] and the other free ones
        refitted, the indices of the rows whose loss stays within half the room: the other half is for
        shortening)."""
        trial_TxP = np.repeat(values_P[None], len(tried_T), axis=0)
        trial_TxP[np.arange(len(tried_T)), tried_T] = target_T
        free_TxP = np.repeat((~fixed_P)[None], len(tried_T), axis=0)
        free_TxP[np.arange(len(tried_T)), tried_T] = False
        trial_TxP = _refit_constants(predict, y, trial_TxP, free_TxP)
        return trial_TxP, np.flatnonzero(losses(trial_TxP) <= ref + budget / 2)

    while drop and not fixed_P.all() and not late():  # drop terms
        now = float(losses(values_P[None])[0])
        tried_T = np.flatnonzero(~fixed_P)
        trial_TxP = np.repeat(values_P[None], len(tried_T), axis=0)
        trial_TxP[np.arange(len(tried_T)), tried_T] = 0.0
        cost_T = losses(trial_TxP) - now
        gate = _DROP_GATE * max(allowed - now, budget)  # the room under the allowance (refits can widen it)
        tried_T = tried_T[[k for k in np.argsort(cost_T, kind="stable")[:_DROP_ROWS] if cost_T[k] <= gate]]
        if not len(tried_T):
            break
        trial_TxP, ok = refit_trials(tried_T, 0.0)
        if not len(ok):
            break
        pick = ok[np.argmin(np.abs(values_P[tried_T[ok]]))]
        values_P, fixed_P[tried_T[pick]] = trial_TxP[pick].copy(), True
    while drop and (exponent_P & ~fixed_P).any() and not late():  # round exponents: to an integer, else to a half
        tried, targets = [], []
        for i in np.flatnonzero(exponent_P & ~fixed_P):
            for r in dict.fromkeys([float(np.round(values_P[i])), float(np.round(2 * values_P[i]) / 2)]):
                if r not in (0.0, values_P[i]):
                    tried.append(i)
                    targets.append(r)
        if not tried:
            break
        tried_T, target_T = np.array(tried), np.array(targets)
        trial_TxP, ok = refit_trials(tried_T, target_T)
        if not len(ok):
            break
        # integers before halves, then the exponent that moves least
        moved, half = np.abs(target_T[ok] - values_P[tried_T[ok]]), target_T[ok] != np.round(target_T[ok])
        pick = ok[np.lexsort((moved, half))[0]]
        values_P, fixed_P[tried_T[pick]] = trial_TxP[pick].copy(), True

    def shorten(values_P: np.ndarray, skip_P: np.ndarray, zero: bool) -> sympy.Expr:
        """The formula with each constant not in ``skip_P`` at its shortest form (0 first if ``zero``) that keeps
        the loss within the allowance, the others fixed, largest first (floats are sorted by magnitude)."""
        values_P = values_P.copy()
        pi_forms = {}  # parameter index -> (k, e) where the snapped value is written k * pi**e
        for i, v in enumerate(values_P):
            if skip_P[i]:
                continue
            shorter = ([0.0] if zero else []) + [float(f"{v:.{k - 1}e}") for k in range(1, 7)]
            trials = [(t, 0) for t in shorter]  # (k, e): k * pi**e
            own = next((k for k, (t, _) in enumerate(trials) if t == v), None)
            trials = trials[:own] if own is not None else trials  # stop at v's own length
            if len(trials) > len(shorter) - 3 and not exponent_P[i]:  # more than 3 digits: short multiples
                # of pi**e before longer ones (not for exponents)
                trials[len(shorter) - 3:len(shorter) - 3] = _pi_forms(v)
            if not trials:
                continue
            trial_TxP = np.repeat(values_P[None], len(trials), axis=0)
            trial_TxP[:, i] = [k * np.pi ** e for k, e in trials]
            ok = np.flatnonzero(losses(trial_TxP) <= allowed)
            if len(ok):
                values_P[i] = trial_TxP[ok[0], i]
                if trials[ok[0]][1]:
                    pi_forms[i] = trials[ok[0]]

        def written(i: int, v: float) -> sympy.Expr:
            k, e = pi_forms.get(i, (v, 0))
            return _sympy_number(k) * sympy.pi ** e if e else _sympy_number(v)

        return expr.xreplace({f: written(i, float(v)) for i, (f, v) in enumerate(zip(floats, values_P))})

    tidied = shorten(values_P, fixed_P, zero=not drop)
    if fixed_P.sum() > (start_P == 0.0).sum():  # dropped or rounded: kept only if not longer to write
        kept = shorten(start_P, start_P == 0.0, zero=True)  # (the refit can leave no room to shorten the rest)
        tidied = min([tidied, kept], key=_written_size)
    return tidied, allowed


def _written_size(expr: sympy.Expr) -> int:
    """Nodes plus the significant digits beyond the first of every decimal constant: what a reader has to read."""
    extra = sum(len(str(abs(f)).lower().split("e")[0].replace(".", "").strip("0")) - 1 for f in expr.atoms(sympy.Float))
    return sympy_nodes(expr) + max(extra, 0)


_DROP_GATE = 100.0  # a constant is tried at 0 (with a refit) if its plain removal costs <= this x the room left
_DROP_ROWS = 8  # ... and if it is among this many cheapest to remove
_DROP_MAX_CONSTANTS = 16  # formulas with more constants (expanded products) are only shortened, one at a time


def _refit_constants(predict: Callable, y: np.ndarray, values_TxP: np.ndarray, free_TxP: np.ndarray,
                     steps: int = 6) -> np.ndarray:
    """Least squares of ``predict(values) [T, N]`` against ``y`` over the constants where ``free_TxP`` is True, each
    row on its own, all rows at once: ``steps`` Levenberg-Marquardt steps from ``values_TxP`` with forward-difference
    Jacobians; a row keeps a step only if it lowers that row's loss (so no row ends worse than it started)."""
    values_TxP = values_TxP.copy()
    T, P = values_TxP.shape
    cols_F = np.flatnonzero(free_TxP.any(axis=0))
    F = len(cols_F)
    if F == 0:
        return values_TxP
    mask_TxF = free_TxP[:, cols_F].astype(np.float64)
    damping_T = np.full(T, 1e-3)

    def sq_loss(v_TxP):
        with np.errstate(all="ignore"):
            s = np.mean((predict(v_TxP) - y) ** 2, axis=-1)
        return np.where(np.isfinite(s), s, np.inf)

    loss_T = sq_loss(values_TxP)
    for _ in range(steps):
        h_TxF = 1e-6 * np.maximum(1.0, np.abs(values_TxP[:, cols_F]))
        probe_GxTxP = np.repeat(values_TxP[None], F + 1, axis=0)  # G = F + 1: the point, then one nudge per column
        for j, c in enumerate(cols_F):
            probe_GxTxP[j + 1, :, c] += h_TxF[:, j]
        with np.errstate(all="ignore"):
            pred_GxTxN = predict(probe_GxTxP.reshape(-1, P)).reshape(F + 1, T, len(y))
            jac_TxNxF = np.moveaxis((pred_GxTxN[1:] - pred_GxTxN[:1]) / h_TxF.T[:, :, None], 0, -1)
            jac_TxNxF = jac_TxNxF * mask_TxF[:, None, :]
            resid_TxN = y - pred_GxTxN[0]
        usable_T = np.isfinite(jac_TxNxF).all(axis=(1, 2)) & np.isfinite(resid_TxN).all(axis=1)
        if not usable_T.any():
            break
        jac_TxNxF = np.where(usable_T[:, None, None], jac_TxNxF, 0.0)
        resid_TxN = np.where(usable_T[:, None], resid_TxN, 0.0)
        normal_TxFxF = np.einsum("tnf,tng->tfg", jac_TxNxF, jac_TxNxF)
        rhs_TxF = np.einsum("tnf,tn->tf", jac_TxNxF, resid_TxN)
        diag_TxF = np.diagonal(normal_TxFxF, axis1=1, axis2=2)
        # Marquardt's scaled damping; a column a row does not fit gets 1 on the diagonal and so a zero step
        normal_TxFxF = normal_TxFxF + (damping_T[:, None] * (diag_TxF + 1e-12) + 1.0 - mask_TxF)[:, :, None] * np.eye(F)
        try:
            step_TxF = np.linalg.solve(normal_TxFxF, rhs_TxF[..., None])[..., 0]
        except np.linalg.LinAlgError:
            break
        trial_TxP = values_TxP.copy()
        trial_TxP[:, cols_F] += np.where(usable_T[:, None], step_TxF * mask_TxF, 0.0)
        trial_loss_T = sq_loss(trial_TxP)
        better_T = trial_loss_T < loss_T
        values_TxP[better_T] = trial_TxP[better_T]
        loss_T = np.where(better_T, trial_loss_T, loss_T)
        damping_T = np.where(better_T, damping_T * 0.3, damping_T * 10.0)
    return values_TxP


def _tidy_allowance(n_rows: int) -> float:
    """Factor by which tidying may raise MSE / var(y) on ``n_rows`` rows, all snaps together: the BIC's price of one
    free constant, N**(1/N) ~ 1 + ln(N)/N (2.7% at 200 rows), and at least 0.1%."""
    return max(1.001, n_rows ** (1.0 / n_rows))


def _pi_forms(v: float) -> list[tuple[float, int]]:
    """(k, e) for k * pi**e, e in -3..3 (not 0), k = v / pi**e rounded to 1 or 2 digits (1/(2*pi), 4*pi, ...)."""
    return [(k, e) for digits in (1, 2) for e in (1, -1, 2, -2, 3, -3)
            if (k := float(f"{v / np.pi ** e:.{digits - 1}e}"))]


def sympy_nodes(expr: sympy.Expr) -> int:
    """Prefix node count of a sympy formula as ``Expression`` counts it: a leaf is 1, an n-ary sum or product
    n - 1 binary nodes, x**2, x**3, 1/x and sqrt(x) one unary node, any other power one binary node."""
    if not expr.args:
        return 1
    kids = sum(sympy_nodes(a) for a in expr.args)
    if expr.is_Add or expr.is_Mul:
        return kids + len(expr.args) - 1
    if expr.is_Pow:
        e = expr.args[1]
        if e in (2, 3, -1, sympy.Rational(1, 2)):
            return 1 + sympy_nodes(expr.args[0])
        return 1 + kids
    return 1 + kids


def _sympy_number(v: float) -> sympy.Expr:
    """An integer-valued constant as a sympy Integer, any other as a Float that prints with repr's digits."""
    if v == int(v) and abs(v) < 1e15:
        return sympy.Integer(int(v))
    digits = len(repr(abs(v)).split("e")[0].replace(".", "").lstrip("0")) or 1
    return sympy.Float(repr(v), max(digits, 1))


# ----- caches ------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _prior_cached(d: int, n: int, seed: int) -> tuple:
    return tuple(prior_candidates(d, n, seed))


def _prior(d: int, n: int, seed: int) -> list[Candidate]:
    return list(_prior_cached(d, n, seed))


@functools.lru_cache(maxsize=16)
def _library(d: int, n: int) -> PriorLibrary:
    return prior_library(d, n, _PRIOR_LIBRARY_SEED)


def _load_model(path):
    from .train import load_trained  # caches loaded models per path

    return load_trained(path)


def enable_compilation_cache(path=None) -> Path:
    """Turn on JAX's persistent compilation cache (a global JAX setting, so only when you ask): compiled programs
    are kept on disk under ``path`` (default ``$XDG_CACHE_HOME/sr_jax/jax``, i.e. ``~/.cache/sr_jax/jax``) and a
    new process loads them instead of compiling again (tracing still runs once per shape and process). Returns the
    directory. An unwritable directory is a ValueError."""
    import jax

    if path is None:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sr_jax" / "jax"
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the compilation cache directory {path}: {e.strerror}") from None
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path
