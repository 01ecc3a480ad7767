"""Cheap non-neural candidates for the estimator's pool: skeletons from the generator's prior and simple bases.

Every candidate is an ``Expression`` over the *standardised* inputs z_j = (x_j - offset_j) / scale_j (variables
``x_0..x_{D-1}`` of the expression are the z_j); its numbers are the initial constants for ``sr_jax.refine``.

Sources (``Candidate.source``):

* ``"prior"`` (``prior_candidates``): expressions drawn from the training generator's prior
  (``ExpressionGenerator.sample_expression``), a fixed number per dataset dimension, seeded, independent of the data.
  Half of the draws use all D variables (as the generator does); the other half a random subset of them, so
  formulas of fewer variables than the dataset has are covered too. Their constants are the generator's draws.
  ``screen_prior`` ranks a larger library of such draws (``prior_library``) on a dataset: each draw's outer linear
  coefficients (its top-level sum c0 + sum_i c_i g_i, ``outer_terms``) are solved by least squares and the best fits
  are kept with those coefficients (the estimator's ``n_prior`` of ``prior_draws``).
* ``"basis"`` (``basis_candidates``): fixed families whose outer coefficients are solved by linear least squares on
  the data before refinement (so refinement starts at the best linear fit):

  - constant; linear (intercept + every feature); quadratic (full, with cross terms, for D <= 3; intercept, linear
    and square terms for D > 3); cubic per feature without cross terms (D <= 3);
  - unary terms: a + b * u(c * z_j + d) + poly(z) for u in sin, cos, exp, log, sqrt, inv, where poly is linear in
    every feature plus their squares, plus cross products when D <= 2. The inner (c, d) starts at
    (scale_j, offset_j), i.e. u of the *raw* feature x_j, the unit a user's formula is written in; where that is not
    finite (or constant) on the data the standardised feature (c, d) = (1, 0) is tried. For D <= 3 and u in sin,
    cos, exp, also a + (b + e * z_j) * u(...) + poly(z) (a unary times a linear term). All features for D <= 3, the
    4 most |Pearson|-correlated with y otherwise.
  - monomial (power law) c0 + c * prod_j x_j ** p_j in the raw features, when every raw feature is positive and y
    has one sign: the exponents come from least squares on log |y|.
  - sparse sums of products: c0 + sum of 1, 2 or 3 products of powers of the raw features (x_j^a for a in 1, 2, 3,
    -1, -2, 1/2, -1/2; x_i^a x_j^b and, up to 6 features, x_i^a x_j^b x_k^c for a, b, c in 1, 2, -1; up to 5
    features, also sin or cos of one feature, alone or times such a product), chosen by forward selection and
    backward elimination.
  - unary of a monomial: a + b * M1 * u(c * M2) for u in exp, log, sin, cos, sin**2, arcsin, (1 + t) ** p (p = 1,
    -1, 1/2, -1/2), exp(t) - 1 and its inverse, M2 a product of powers of up to five raw features, c from a small
    set, M1 a monomial fitted on log|y / u(c * M2)|, when every raw feature is positive (Boltzmann factors,
    logarithms of ratios, p * sin(2 theta) / r**3, Lorentz factors m_0 / sqrt(1 - v**2/c**2), Planck's law).
  - transformed sums: s * sqrt(c0 + S) and s * exp(c0 + S), S a sparse sum fitted to y**2 or log|y| when y keeps
    one sign s, over the products above plus differences of two raw features (x_i - x_j, its square, inverse and
    cosine, alone or times a third feature's power or two other features' product) and log x_j, up to five
    features: distances, the law of cosines, Gaussians in (theta - theta1) / sigma.

``dedupe`` keeps the first candidate of every skeleton (``Expression.skeleton``), so list better-initialised
sources first.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from .candidates import Candidate
from .expressions import OPERATORS, Expression
from .generator import ExpressionGenerator, GeneratorConfig

UNARY_BASES = ("sin", "cos", "exp", "log", "sqrt", "inv")
_PRODUCT_UNARIES = ("sin", "cos", "exp")
_MAX_UNARY_FEATURES = 4  # unary bases on at most this many features when D > 3
_SMALL_D = 3  # full quadratic, cubic and unary-times-linear bases up to this many features


# ----- prior skeletons ---------------------------------------------------------------------------------------------
def prior_candidates(n_features: int, n: int, seed: int = 0,
                     config: GeneratorConfig = GeneratorConfig()) -> list[Candidate]:
    """``n`` distinct expressions over x_0..x_{n_features-1} drawn from the generator's prior (deterministic in
    (n_features, n, seed, config)). Fewer come back only if the prior cannot produce that many distinct skeletons
    within a bounded number of draws."""
    if not 1 <= n_features <= 10:
        raise ValueError(f"n_features must be in 1..10, got {n_features}")
    gen = ExpressionGenerator(config)
    rng = np.random.default_rng([int(seed), int(n_features), 7919])
    out: list[Candidate] = []
    seen: set = set()
    for _ in range(50 * max(n, 1)):
        if len(out) >= n:
            break
        d = n_features if (n_features == 1 or rng.random() < 0.5) else int(rng.integers(1, n_features + 1))
        n_unary = int(rng.integers(config.min_unary_ops, config.max_unary_ops + 1))
        expr = gen.sample_expression(rng, d, n_unary)
        if expr is None:
            continue
        if d < n_features:  # relabel x_0..x_{d-1} onto a random subset of the dataset's features
            cols = np.sort(rng.choice(n_features, size=d, replace=False))
            expr = Expression([f"x_{cols[int(t[2:])]}" if isinstance(t, str) and t.startswith("x_") else t
                               for t in expr.tokens])
        if expr.skeleton() in seen:
            continue
        seen.add(expr.skeleton())
        out.append(Candidate(expr, "prior"))
    return out


def outer_terms(expression: Expression) -> list[list]:
    """The summands of an expression's top-level sum (``add``/``sub`` nodes split recursively), each without a
    leading constant factor (``mul c g`` and ``mul g c`` give g) and with lone constants dropped (the intercept):
    the columns of the expression's outer linear least-squares problem. ``c0 + a*sin(x_0) - b*x_1`` gives
    ``[sin(x_0)], [x_1]``; an expression that is not a sum is its own single term."""

    def leaf(t):  # (the subtree's prefix, its summands)
        return [t], ([] if isinstance(t, float) else [[t]])

    def node(op, args):
        prefix = [op, *[t for a, _ in args for t in a]]
        if op in ("add", "sub"):
            return prefix, [term for _, terms in args for term in terms]
        if op == "mul" and isinstance(args[0][0][0], float) and len(args[0][0]) == 1:
            return prefix, [args[1][0]]
        if op == "mul" and isinstance(args[1][0][0], float) and len(args[1][0]) == 1:
            return prefix, [args[0][0]]
        return prefix, [prefix]

    return expression._fold(leaf, node)[1]


@dataclass(frozen=True)
class PriorLibrary:
    """Prior draws prepared for screening: ``candidates`` (M), the distinct ``outer_terms`` of all of them
    (``terms``, U prefix tuples) and, per candidate, the indices of its terms (``term_index_MxK``, -1 = none)."""

    candidates: tuple
    terms: tuple
    term_index_MxK: np.ndarray

    @classmethod
    def of(cls, candidates: Sequence[Candidate]) -> "PriorLibrary":
        terms: dict[tuple, int] = {}
        rows = []
        for cand in candidates:
            keys = dict.fromkeys(tuple(t) for t in outer_terms(cand.expression))  # a repeated term is one column
            rows.append([terms.setdefault(k, len(terms)) for k in keys])
        index = np.full((len(rows), max((len(r) for r in rows), default=0)), -1, np.int64)
        for m, r in enumerate(rows):
            index[m, :len(r)] = r
        return cls(tuple(candidates), tuple(terms), index)


def prior_library(n_features: int, n: int, seed: int = 0,
                  config: GeneratorConfig = GeneratorConfig()) -> PriorLibrary:
    """``prior_candidates(n_features, n, seed, config)`` with their outer terms indexed for ``screen_prior``."""
    return PriorLibrary.of(prior_candidates(n_features, n, seed, config))


_SCREEN_VALUES = 1 << 22  # float64 values (32 MiB) an array of the screening holds at most
_SCREEN_OVERFLOW = 1e100  # a term larger than this on the data is treated as not finite (its squares overflow)


def screen_prior(library: PriorLibrary, datasets: Sequence[tuple[np.ndarray, np.ndarray]],
                 n: int) -> list[list[Candidate]]:
    """Per dataset (z_NxD, y_N), the ``n`` library candidates whose outer linear coefficients fit it best, with
    those coefficients set.

    Each candidate becomes c0 + sum_i c_i * g_i over its ``outer_terms`` g_i with (c0, c_i) from least squares on
    the dataset (variable projection: the inner constants stay the prior's draws), scored by the residual sum of
    squares; candidates with a term that is not finite on the data are dropped, and of equal skeletons only the
    best is kept. The library's distinct terms are evaluated once on the rows of several datasets stacked, and the
    small least-squares problems of many candidates are solved together (normal equations of the column-scaled
    design with a tiny ridge, which gives a repeated or constant column a zero coefficient); both in pieces of at
    most ``_SCREEN_VALUES`` values, so memory stays bounded whatever the library and datasets. Its cost grows with
    the rows: a few hundred per dataset rank as well as all of them.
    """
    out: list[list[Candidate]] = []
    if not library.candidates:
        return [[] for _ in datasets]
    group: list[tuple[np.ndarray, np.ndarray]] = []
    for z, y in datasets:
        group.append((np.asarray(z, np.float64), np.asarray(y, np.float64).reshape(-1)))
        if sum(len(g[1]) for g in group) * (len(library.terms) + 1) >= _SCREEN_VALUES:
            out += _screen_group(library, group, n)
            group = []
    if group:
        out += _screen_group(library, group, n)
    return out


def _screen_group(library: PriorLibrary, group, n: int) -> list[list[Candidate]]:
    z_all = np.concatenate([z for z, _ in group])
    with np.errstate(all="ignore"):
        v_UxN = np.stack([Expression(list(t)).evaluate_numpy(z_all) for t in library.terms])
    v_UxN = np.concatenate([v_UxN, np.zeros((1, v_UxN.shape[1]))])  # row U: the padding term (zeros)
    index_MxK = np.where(library.term_index_MxK < 0, len(library.terms), library.term_index_MxK)
    out, start = [], 0
    for z, y in group:
        v = v_UxN[:, start:start + len(y)]
        start += len(y)
        usable_U = (np.isfinite(v) & (np.abs(v) < _SCREEN_OVERFLOW)).all(axis=1)
        v = np.where(usable_U[:, None], v, 0.0)
        rss_M = np.full(len(index_MxK), np.inf)
        coef_MxK = np.zeros((len(index_MxK), index_MxK.shape[1] + 1))
        block = max(1, _SCREEN_VALUES // (coef_MxK.shape[1] * len(y)))
        for lo in range(0, len(index_MxK), block):
            rows = slice(lo, lo + block)
            rss_M[rows], coef_MxK[rows] = _outer_least_squares(v[index_MxK[rows]], y)
        ok_M = usable_U[index_MxK].all(axis=1) & np.isfinite(rss_M) & np.isfinite(coef_MxK).all(axis=1)
        picked: list[Candidate] = []
        seen: set = set()
        ok = np.flatnonzero(ok_M)
        for m in ok[np.argsort(rss_M[ok], kind="stable")].tolist():  # by rss, ties by m
            k = library.term_index_MxK[m]
            expr = Expression(_linear_expression(coef_MxK[m], [list(library.terms[u]) for u in k[k >= 0]]))
            if expr.skeleton() not in seen:
                seen.add(expr.skeleton())
                picked.append(Candidate(expr, library.candidates[m].source))
                if len(picked) >= n:
                    break
        out.append(picked)
    return out


def _outer_least_squares(terms_MxKxN: np.ndarray, y_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Residual sums of squares (M) and coefficients (M x (K + 1), intercept first) of y on [1, terms] per row m."""
    with np.errstate(all="ignore"):
        a_MxKxN = np.concatenate([np.ones((len(terms_MxKxN), 1, len(y_N))), terms_MxKxN], axis=1)
        scale_MxK = np.sqrt(np.mean(a_MxKxN * a_MxKxN, axis=2))
        scale_MxK = np.where(scale_MxK > 0, scale_MxK, 1.0)
        a_MxKxN /= scale_MxK[:, :, None]
        gram_MxKxK = a_MxKxN @ a_MxKxN.transpose(0, 2, 1) + 1e-10 * len(y_N) * np.eye(a_MxKxN.shape[1])
        c_MxK = np.linalg.solve(gram_MxKxK, (a_MxKxN @ y_N)[:, :, None])[:, :, 0]
        rss_M = np.sum((np.einsum("mk,mkn->mn", c_MxK, a_MxKxN) - y_N) ** 2, axis=1)
    return rss_M, c_MxK / scale_MxK


# ----- bases -------------------------------------------------------------------------------------------------------
def _sum(terms: Sequence[list]) -> list:
    """Prefix list of the sum of the given prefix terms (nested ``add``, left to right)."""
    return _nest("add", terms)


def _product(factors: Sequence[list]) -> list:
    """Prefix list of the product of the given prefix factors (nested ``mul``, left to right)."""
    return _nest("mul", factors)


def _nest(op: str, args: Sequence[list]) -> list:
    out = list(args[-1])
    for a in reversed(args[:-1]):
        out = [op, *a, *out]
    return out


def _var(j: int) -> list:
    return [f"x_{j}"]


def _affine(c: float, d: float, j: int) -> list:
    return ["add", "mul", float(c), f"x_{j}", float(d)]


class _Term:
    """One column of a least-squares design: its values on the data and its prefix (multiplied by a coefficient)."""

    def __init__(self, values: np.ndarray, prefix: list):
        self.values = values
        self.prefix = prefix


def _fit_linear(terms: list[_Term], y: np.ndarray) -> Optional[np.ndarray]:
    """Least-squares coefficients (intercept first) of y on the terms; None if a column is not finite."""
    cols = [np.ones_like(y)] + [t.values for t in terms]
    a = np.stack(cols, axis=1)
    if not np.isfinite(a).all():
        return None
    scale = np.maximum(np.sqrt(np.mean(a * a, axis=0)), 1e-300)  # column scaling for conditioning
    coef, *_ = np.linalg.lstsq(a / scale, y, rcond=None)
    coef = coef / scale
    return coef if np.isfinite(coef).all() else None


def _linear_expression(coef: np.ndarray, prefixes: Sequence[list]) -> list:
    """c0 + c1 * t1 + ... for the coefficients ``coef`` (intercept first) of the prefix terms t_i."""
    return _sum([[float(coef[0])]] + [["mul", float(c), *t] for c, t in zip(coef[1:], prefixes)])


def _poly_terms(z: np.ndarray, squares: bool, cross: bool, cubes: bool = False) -> list[_Term]:
    d = z.shape[1]
    terms = [_Term(z[:, j], _var(j)) for j in range(d)]
    if cross:
        terms += [_Term(z[:, j] * z[:, k], ["mul", f"x_{j}", f"x_{k}"] if j != k else ["pow2", f"x_{j}"])
                  for j in range(d) for k in range(j, d)]
    elif squares:
        terms += [_Term(z[:, j] ** 2, ["pow2", f"x_{j}"]) for j in range(d)]
    if cubes:
        terms += [_Term(z[:, j] ** 3, ["pow3", f"x_{j}"]) for j in range(d)]
    return terms


def _unary_values(u: str, a: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return OPERATORS[u].np_fn(a)


def correlation_order(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Feature indices by decreasing |Pearson r| with y (0 for constant columns), ties by index."""
    zc = z - z.mean(axis=0)
    yc = y - y.mean()
    den = np.sqrt((zc * zc).sum(axis=0) * (yc * yc).sum())
    with np.errstate(all="ignore"):
        r = np.where(den > 0, (zc * yc[:, None]).sum(axis=0) / den, 0.0)
    return np.argsort(-np.abs(r), kind="stable")


def basis_candidates(z_NxD: np.ndarray, y_N: np.ndarray, offset_D: Optional[np.ndarray] = None,
                     scale_D: Optional[np.ndarray] = None, unaries: Iterable[str] = UNARY_BASES) -> list[Candidate]:
    """The basis families (module docstring) with least-squares outer coefficients on (z, y).

    ``z_NxD``: standardised inputs; ``offset_D``/``scale_D``: raw x = scale * z + offset (default: z is raw).
    """
    z = np.asarray(z_NxD, np.float64)
    y = np.asarray(y_N, np.float64).reshape(-1)
    n, d = z.shape
    offset = np.zeros(d) if offset_D is None else np.asarray(offset_D, np.float64)
    scale = np.ones(d) if scale_D is None else np.asarray(scale_D, np.float64)
    small = d <= _SMALL_D
    out: list[Candidate] = [Candidate(Expression([float(y.mean())]), "basis")]

    def add(terms: list[_Term]):
        coef = _fit_linear(terms, y)
        if coef is not None:
            out.append(Candidate(Expression(_linear_expression(coef, [t.prefix for t in terms])), "basis"))

    linear = _poly_terms(z, squares=False, cross=False)
    add(linear)
    add(_poly_terms(z, squares=True, cross=small))
    if small:
        add(_poly_terms(z, squares=True, cross=False, cubes=True))
    poly = _poly_terms(z, squares=True, cross=d <= 2)
    features = range(d) if small else correlation_order(z, y)[:_MAX_UNARY_FEATURES]
    for j in features:
        for u in unaries:
            for c, dd in ((scale[j], offset[j]), (1.0, 0.0)):
                vals = _unary_values(u, c * z[:, j] + dd)
                if np.isfinite(vals).all() and np.ptp(vals) > 0:
                    break
            else:
                continue
            unary = [u, *_affine(c, dd, j)]
            add([_Term(vals, unary)] + poly)
            if small and u in _PRODUCT_UNARIES:
                terms = [_Term(vals, unary), _Term(vals * z[:, j], None)] + poly
                coef = _fit_linear(terms, y)
                if coef is not None:  # a + (b + e z_j) u(...) + poly
                    prod = ["mul", "add", float(coef[1]), "mul", float(coef[2]), f"x_{j}", *unary]
                    rest = [["mul", float(cf), *t.prefix] for cf, t in zip(coef[3:], poly)]
                    out.append(Candidate(Expression(_sum([[float(coef[0])], prod] + rest)), "basis"))
    mono = _monomial(z, y, offset, scale)
    if mono is not None:
        out.append(Candidate(mono, "basis"))
    products = _product_library(z * scale + offset, offset, scale)
    out += [Candidate(e, "basis") for e in _sparse_products(products, y)]
    out += [Candidate(e, "basis") for e in _unary_monomials(z, y, offset, scale)]
    out += [Candidate(e, "basis") for e in _transformed_sums(products, z, y, offset, scale)]
    return out


# powers of one raw feature in the product library, and of each factor in products of two
_POWERS = {1.0: lambda a: a, 2.0: lambda a: ["pow2", *a], 3.0: lambda a: ["pow3", *a], -1.0: lambda a: ["inv", *a],
           -2.0: lambda a: ["inv", "pow2", *a], 0.5: lambda a: ["sqrt", *a], -0.5: lambda a: ["inv", "sqrt", *a]}
_PAIR_POWERS = (1.0, 2.0, -1.0)
_MAX_SPARSE_TERMS = 3
_FORWARD_STEPS = 20
_MAX_TRIPLE_FEATURES = 6
_MAX_TRIG_FEATURES = 5
_TRIG_FACTORS = ("sin", "cos")


def _product_library(x: np.ndarray, offset, scale) -> list[_Term]:
    """Products of powers of the raw features: x_j^a (a in _POWERS), x_i^a x_j^b (a, b in _PAIR_POWERS) and
    x_i^a x_j^b x_k^c (the same powers, up to _MAX_TRIPLE_FEATURES features); up to _MAX_TRIG_FEATURES features
    also sin(x_j) and cos(x_j), alone and times every product above that does not read x_j (F*r*sin(theta),
    p*cos(theta)/r**2); only finite, non-constant columns."""
    n, d = x.shape
    factor = {}
    uses: list[set] = []  # the features each term reads (for the trigonometric products below)
    with np.errstate(all="ignore"):
        for j in range(d):
            # x_j / scale_j = z_j + offset_j / scale_j: the raw feature up to a factor, which the term's coefficient
            # absorbs; one constant per factor (a slope too would make every product's constants redundant)
            shift = float(offset[j] / scale[j])
            for a, build in _POWERS.items():
                v = (x[:, j] / scale[j]) ** a
                if np.isfinite(v).all():
                    factor[j, a] = (v, build(["add", f"x_{j}", shift]))
    terms = [_Term(v, t) for (j, a), (v, t) in factor.items()]
    uses += [{j} for (j, a) in factor]
    for i in range(d):
        for j in range(i + 1, d):
            for a in _PAIR_POWERS:
                for b in _PAIR_POWERS:
                    if (i, a) in factor and (j, b) in factor:
                        (vi, ti), (vj, tj) = factor[i, a], factor[j, b]
                        terms.append(_Term(vi * vj, ["mul", *ti, *tj]))
                        uses.append({i, j})
    if d <= _MAX_TRIPLE_FEATURES:
        for i in range(d):
            for j in range(i + 1, d):
                for k in range(j + 1, d):
                    for a, b, c in itertools.product(_PAIR_POWERS, repeat=3):
                        if (i, a) in factor and (j, b) in factor and (k, c) in factor:
                            (vi, ti), (vj, tj), (vk, tk) = factor[i, a], factor[j, b], factor[k, c]
                            terms.append(_Term(vi * vj * vk, ["mul", *ti, "mul", *tj, *tk]))
                            uses.append({i, j, k})
    if d <= _MAX_TRIG_FEATURES:  # sin or cos of one raw feature (an angle) alone or times one of the products above
        power_terms = list(zip(terms, uses))
        with np.errstate(all="ignore"):
            for j in range(d):
                for u in _TRIG_FACTORS:
                    tv = OPERATORS[u].np_fn(x[:, j])
                    if not (np.isfinite(tv).all() and np.ptp(tv) > 0):
                        continue
                    tp = [u, *_affine(scale[j], offset[j], j)]
                    terms.append(_Term(tv, tp))
                    terms += [_Term(t.values * tv, ["mul", *t.prefix, *tp]) for t, f in power_terms if j not in f]
    return [t for t in terms if np.isfinite(t.values).all() and np.ptp(t.values) > 0]


def _sparse_products(terms: list[_Term], y) -> list[Expression]:
    """c0 + a sum of at most ``_MAX_SPARSE_TERMS`` products of powers of the raw features, with least-squares
    coefficients. Formulas such as x1*y1 + x2*y2 + x3*y3 or m*(v**2 + u**2)/2 are sums of a few such products.

    ``terms``: the data's ``_product_library``; the subsets come from ``_sparse_subsets``.
    """
    return [Expression(_linear_expression(coef, [terms[i].prefix for i in subset]))
            for subset, coef in _sparse_subsets(terms, y)]


def _sparse_subsets(terms: list[_Term], y: np.ndarray) -> list[tuple[tuple, np.ndarray]]:
    """(subset of term indices, least-squares coefficients with the intercept first) for sparse sums of at most
    ``_MAX_SPARSE_TERMS`` of the ``terms`` fitted to y.

    Forward selection (orthogonal least squares: each step adds the term that lowers the residual sum of squares
    most, given those chosen) runs ``_FORWARD_STEPS`` steps, then backward elimination drops, one at a time, the
    term whose removal raises it least. Greedy forward steps often start with a term correlated with the whole sum
    (x1*y1*x2 for x1*y1 + x2*y2 + x3*y3); the longer forward set usually contains the true terms, which backward
    elimination keeps. One subset of 1..``_MAX_SPARSE_TERMS`` terms per size met on either path.
    """
    if not terms:
        return []
    cols = np.stack([t.values for t in terms], axis=1)
    cols = cols - cols.mean(axis=0)  # the intercept is always in the model
    yc = y - y.mean()
    total = float(yc @ yc)
    rest = cols.copy()  # every term's part that the chosen terms do not explain (Gram-Schmidt, one step per pick)
    floor = 1e-12 * np.sum(cols * cols, axis=0)
    residual = yc
    forward: list[int] = []
    for _ in range(min(_FORWARD_STEPS, len(terms))):
        norm2 = np.sum(rest * rest, axis=0)
        with np.errstate(all="ignore"):
            gain = np.where(norm2 > floor, (rest.T @ residual) ** 2 / norm2, -1.0)
        gain[forward] = -1.0
        best = int(np.argmax(gain))
        if not gain[best] > 0:
            break
        forward.append(best)
        q = rest[:, best] / np.sqrt(norm2[best])
        rest -= np.outer(q, q @ rest)
        residual = residual - q * (q @ residual)
        if residual @ residual <= 1e-24 * total:
            break  # exact already

    def rss(subset) -> float:
        a = cols[:, list(subset)]
        coef, *_ = np.linalg.lstsq(a, yc, rcond=None)
        r = yc - a @ coef
        return float(r @ r)

    def cheapest_drop(subset) -> int:
        """The term whose removal raises the residual sum of squares least: coef_i**2 / [(A'A)^-1]_ii from one QR
        of the subset's columns (A = QR: (A'A)^-1 = R^-1 R^-T); one least-squares fit per candidate removal where
        R is singular."""
        q, r = np.linalg.qr(cols[:, list(subset)])
        with np.errstate(all="ignore"):
            r_inv = np.linalg.inv(r) if np.all(np.abs(np.diag(r)) > 0) else None
        if r_inv is not None and np.isfinite(r_inv).all():
            coef = r_inv @ (q.T @ yc)
            rise = coef ** 2 / np.sum(r_inv * r_inv, axis=1)
            if np.isfinite(rise).all():
                return int(np.argmin(rise))
        return min(range(len(subset)), key=lambda i: rss(subset[:i] + subset[i + 1:]))

    subsets = [tuple(forward[:k]) for k in range(1, min(len(forward), _MAX_SPARSE_TERMS) + 1)]
    current = list(forward)
    while len(current) > 1:
        drop = cheapest_drop(current)
        current = current[:drop] + current[drop + 1:]
        if len(current) <= _MAX_SPARSE_TERMS:
            subsets.append(tuple(current))
    out = []
    for subset in dict.fromkeys(tuple(sorted(t)) for t in subsets):
        coef = _fit_linear([terms[i] for i in subset], y)
        if coef is not None:
            out.append((subset, coef))
    return out


# sums fitted to a transform of |y|, written back through its inverse: (transform, the inverse's unary chain)
_TARGET_TRANSFORMS = ((np.square, ("sqrt",)), (np.log, ("exp",)))
_MAX_DIFFERENCE_FEATURES = 5  # differences of pairs of raw features up to this many features
_DIFFERENCE_UNARIES = ("pow2", "inv", "cos")  # of (x_i - x_j); with the difference itself
_TRANSFORMED_PER_TARGET = 2  # candidates per transform that join the pool (best R² in y's own units)


def _difference_library(x: np.ndarray, offset, scale) -> list[_Term]:
    """Differences of two raw features (x_i - x_j) and u(x_i - x_j) for u in ``_DIFFERENCE_UNARIES``, alone and
    times one raw feature's power (+-1, +-2) or the product of two other features: (x2 - x1)**2 + (y2 - y1)**2,
    x1*x2*cos(theta1 - theta2), (theta - theta1)**2 / sigma**2. Also log x_j for positive features (the log of a
    product's prefactor, as in log(exp(-(theta - theta1)**2 / (2 sigma**2)) / sigma)). Up to
    ``_MAX_DIFFERENCE_FEATURES`` features."""
    n, d = x.shape
    if d < 2 or d > _MAX_DIFFERENCE_FEATURES:
        return []
    raw = [_affine(scale[j], offset[j], j) for j in range(d)]  # x_j itself, from the standardised variable
    terms: list[_Term] = []
    with np.errstate(all="ignore"):
        single = {(j, a): ((x[:, j] / scale[j]) ** a, _POWERS[a](["add", f"x_{j}", float(offset[j] / scale[j])]))
                  for j in range(d) for a in (1.0, -1.0, 2.0, -2.0)}
        factors = [(v, p, {j}) for (j, a), (v, p) in single.items()]
        factors += [(single[i, 1.0][0] * single[j, 1.0][0], ["mul", *single[i, 1.0][1], *single[j, 1.0][1]], {i, j})
                    for i, j in itertools.combinations(range(d), 2)]
        for i, j in itertools.combinations(range(d), 2):
            diff = x[:, i] - x[:, j]
            base = ["sub", *raw[i], *raw[j]]
            own = [(diff, base)] + [(OPERATORS[u].np_fn(diff), [u, *base]) for u in _DIFFERENCE_UNARIES]
            for v, p in own:
                terms.append(_Term(v, p))
                terms += [_Term(v * fv, ["mul", *p, *fp]) for fv, fp, used in factors if not used & {i, j}]
        terms += [_Term(np.log(x[:, j]), ["log", *raw[j]]) for j in range(d) if (x[:, j] > 0).all()]
    return [t for t in terms if np.isfinite(t.values).all() and np.ptp(t.values) > 0]


def _transformed_sums(products: list[_Term], z, y, offset, scale) -> list[Expression]:
    """s * u(c0 + a sparse sum): sparse sums (``_sparse_subsets``) fitted to a transform of |y| -- its square or
    its log -- written back through the inverse u (sqrt, exp), with s the sign of y; only where y keeps one sign
    (and is nonzero). Their terms: ``products`` (the data's ``_product_library``) and ``_difference_library``, so
    distances sqrt((x2 - x1)**2 + (y2 - y1)**2), the law of cosines sqrt(x1**2 + x2**2 - 2*x1*x2*cos(theta1 -
    theta2)) and Gaussians exp(-(theta - theta1)**2 / (2 sigma**2)) / sigma are sums of a few terms there. The
    ``_TRANSFORMED_PER_TARGET`` best per transform (R² on y itself) join the pool."""
    if not ((y > 0).all() or (y < 0).all()):
        return []
    sign = 1.0 if y[0] > 0 else -1.0
    x = z * scale + offset
    terms = products + _difference_library(x, offset, scale)
    out: list[Expression] = []
    sst = float(np.sum((y - y.mean()) ** 2))
    for forward, inverse in _TARGET_TRANSFORMS:
        with np.errstate(all="ignore"):
            target = forward(np.abs(y))
        if not np.isfinite(target).all() or np.ptp(target) <= 0:
            continue
        scored = []
        for subset, coef in _sparse_subsets(terms, target):
            inner = np.full_like(y, coef[0])
            for c, i in zip(coef[1:], subset):
                inner = inner + c * terms[i].values
            with np.errstate(all="ignore"):
                pred = sign * _apply_unaries(inverse, inner)
                r2 = 1.0 - float(np.sum((pred - y) ** 2)) / sst if sst > 0 else -np.inf
            if np.isfinite(r2):
                body = [*_unary_prefix(inverse), *_linear_expression(coef, [terms[i].prefix for i in subset])]
                scored.append((-r2, len(scored), Expression(body if sign > 0 else ["mul", -1.0, *body])))
        out += [e for _, _, e in sorted(scored)[:_TRANSFORMED_PER_TARGET]]
    return out


def _monomial(z, y, offset, scale) -> Optional[Expression]:
    """0 + c * prod_j x_j ** p_j over the raw features, from least squares on log|y| weighted by |y| (so that, to
    first order, it is least squares on y itself: rows near 0, where noise dominates log|y|, count little), on the
    rows of y's dominant sign; None where it does not apply: a feature not positive, or the other sign's rows
    holding more than ``_MONOMIAL_OTHER_SIGN`` of sum(y**2) (noise around small values, not a sign change)."""
    x = z * scale + offset
    if not (x > 0).all():
        return None
    sign = 1.0 if np.sum(y[y > 0] ** 2) >= np.sum(y[y < 0] ** 2) else -1.0
    rows = sign * y > 0
    energy = float(np.sum(y * y))
    if rows.sum() <= x.shape[1] + 1 or not np.sum(y[~rows] ** 2) <= _MONOMIAL_OTHER_SIGN * energy:
        return None
    w = np.abs(y[rows])[:, None]
    a = np.concatenate([np.ones((int(rows.sum()), 1)), np.log(x[rows])], axis=1)
    with np.errstate(all="ignore"):
        coef, *_ = np.linalg.lstsq(a * w, np.log(np.abs(y[rows])) * w[:, 0], rcond=None)
    if not np.isfinite(coef).all():
        return None
    prod = _product([["pow", *_affine(scale[j], offset[j], j), float(p)] for j, p in enumerate(coef[1:])])
    return Expression(["add", 0.0, "mul", float(sign * np.exp(coef[0])), *prod])


_MONOMIAL_OTHER_SIGN = 0.05


# unary-of-monomial bases: u(c * M2) times a monomial M1, M2 a product of powers of at most five raw features
# the exponents of M2's factors, for M2 of 1, 2, 3, 4 and 5 factors
_ARGUMENT_POWERS = ((1.0, -1.0, 2.0, -2.0), (1.0, -1.0, 2.0, -2.0), (1.0, -1.0), (1.0, -1.0), (1.0, -1.0))
_TRIG_SCALES = (1.0, 0.5, 2.0, np.pi, 2 * np.pi)  # sin, cos: the sign of c goes into the outer coefficient
_SHIFT_SCALES = (1.0, -1.0)
# unaries applied right to left; "1+" / "-1+" add 1 / -1: ("inv", "sqrt", "1+") is (1 + c * M2) ** -1/2, the
# Lorentz factor's shape (m_0 / sqrt(1 - v**2/c**2), q / (1 - v/c), G*m1*m2/r2 * (1 - r2/r1)); ("inv", "-1+", "exp")
# Planck's 1 / (exp(c * M2) - 1)
_ARGUMENT_SCALES = {("exp",): (1.0, -1.0, 0.5, -0.5, 2.0, -2.0), ("log",): (1.0,), ("sin",): _TRIG_SCALES,
                    ("cos",): _TRIG_SCALES, ("pow2", "sin"): _TRIG_SCALES, ("arcsin",): (1.0,),
                    ("1+",): _SHIFT_SCALES, ("inv", "1+"): _SHIFT_SCALES, ("sqrt", "1+"): _SHIFT_SCALES,
                    ("inv", "sqrt", "1+"): _SHIFT_SCALES,
                    ("-1+", "exp"): (1.0,), ("inv", "-1+", "exp"): (1.0, 1 / (2 * np.pi))}  # h*omega/(2 pi k_b T)
_SHIFTS = {"1+": 1.0, "-1+": -1.0}
_UNARY_MONOMIALS = 4  # how many of them join the pool


def _apply_unaries(chain: tuple, a: np.ndarray) -> np.ndarray:
    for u in reversed(chain):
        a = _SHIFTS[u] + a if u in _SHIFTS else OPERATORS[u].np_fn(a)
    return a


def _unary_prefix(chain: tuple) -> list:
    return [t for u in chain for t in (("add", _SHIFTS[u]) if u in _SHIFTS else (u,))]


def _argument_exponents(d: int, many_features: Sequence[int]) -> np.ndarray:
    """Exponent vectors (A x d) of the arguments M2: one feature, or two to five distinct features among
    ``many_features``."""
    rows = []
    for size, powers in enumerate(_ARGUMENT_POWERS, start=1):
        for cols in itertools.combinations(range(d) if size < 2 else sorted(many_features), size):
            for pw in itertools.product(powers, repeat=size):
                q = np.zeros(d)
                q[list(cols)] = pw
                rows.append(q)
    return np.array(rows).reshape(-1, d)


def _power_product(exponents: np.ndarray, offset, scale) -> list:
    """Prefix of prod_j (x_j / scale_j) ** e_j over the non-zero exponents (x_j / scale_j = z_j + offset_j/scale_j)."""
    factors = []
    for j in np.flatnonzero(exponents):
        base = ["add", f"x_{j}", float(offset[j] / scale[j])]
        e = float(exponents[j])
        factors.append(_POWERS[e](base) if e in _POWERS else ["pow", *base, e])
    return _product(factors)


def _unary_monomials(z, y, offset, scale) -> list[Expression]:
    """a + b * M1 * u(c * M2), the ``_UNARY_MONOMIALS`` best by the R² of the outer fit: M2 a product of powers of at
    most five raw features (``_argument_exponents``; two or more among the ``_MAX_TRIPLE_FEATURES`` most correlated
    with y), u in exp, log, sin, cos, sin**2, arcsin, (1 + t) ** p for p in 1, -1, 1/2, -1/2, exp(t) - 1 and
    1 / (exp(t) - 1), with c from ``_ARGUMENT_SCALES`` (in the raw features' units: n_0 * exp(-m*g*x/(k_b*T)),
    n*k_b*T*log(V2/V1), p*sin(2*theta)/r**3, m_0 / sqrt(1 - v**2/c**2), 1 / (exp(h*omega/(2*pi*k_b*T)) - 1)), and
    M1 = prod_j x_j ** p_j with p from least squares on log|y / u(c * M2)| rounded to halves (so y / u(...) must
    keep one sign); (a, b) by least squares. Only when every raw feature is positive (else []).
    """
    x = z * scale + offset
    n, d = x.shape
    if not (x > 0).all():
        return []
    log_x = np.log(x)
    q_AxD = _argument_exponents(d, correlation_order(z, y)[:_MAX_TRIPLE_FEATURES])
    with np.errstate(all="ignore"):
        arg_AxN = np.exp(q_AxD @ log_x.T)
        combos = [(u, c) for u, cs in _ARGUMENT_SCALES.items() for c in cs]
        v_RxN = np.concatenate([_apply_unaries(u, c * arg_AxN) for u, c in combos])  # R = len(combos) * A
        ratio = y / v_RxN
        ok = (np.isfinite(v_RxN).all(axis=1) & np.isfinite(ratio).all(axis=1)
              & ((ratio > 0).all(axis=1) | (ratio < 0).all(axis=1)))
        rows = np.flatnonzero(ok)
        if not len(rows):
            return []
        design = np.concatenate([np.ones((n, 1)), log_x], axis=1)
        p_RxD = np.round(2 * (np.log(np.abs(ratio[rows])) @ np.linalg.pinv(design).T)[:, 1:]) / 2
        log_m1 = p_RxD @ (log_x - np.log(scale)).T  # M1 in the units of x_j / scale_j, as written
        term = np.exp(log_m1) * v_RxN[rows]
        tc = term - term.mean(axis=1, keepdims=True)
        yc = y - y.mean()
        var_t = np.sum(tc * tc, axis=1)
        cov = tc @ yc
        gain = np.where(np.isfinite(var_t) & np.isfinite(cov) & (var_t > 0), cov ** 2 / var_t, -1.0)
    out: list[Expression] = []
    seen: set = set()
    for i in np.argsort(-gain, kind="stable"):
        if gain[i] <= 0 or len(out) >= _UNARY_MONOMIALS:
            break
        r = rows[i]
        (u, c), q = combos[r // len(q_AxD)], q_AxD[r % len(q_AxD)]
        key = (u, c, tuple(q), tuple(p_RxD[i]))
        if key in seen:
            continue
        seen.add(key)
        b = float(cov[i] / var_t[i])
        a = float(y.mean() - b * term[i].mean())
        c_written = float(c * np.prod(scale ** q))  # c * M2 = c_written * prod (x_j / scale_j) ** q_j
        unary = [*_unary_prefix(u), "mul", c_written, *_power_product(q, offset, scale)]
        body = ["mul", *_power_product(p_RxD[i], offset, scale), *unary] if p_RxD[i].any() else unary
        out.append(Expression(["add", a, "mul", b, *body]))
    return out


# ----- pooling -----------------------------------------------------------------------------------------------------
def dedupe(candidates: Iterable[Candidate]) -> list[Candidate]:
    """The first candidate of every skeleton, in order."""
    seen: set = set()
    out = []
    for c in candidates:
        key = c.expression.skeleton()
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out
