"""Random training expressions and input points, faithful to the E2E reference generator (spec sections 1-2).

Bugs of the original that are fixed here: every random draw (including the SO(d) rotations and output noise) comes
from one ``numpy.random.Generator``, so a sample is a pure function of (config, seed); the 1 s SIGALRM timeout is
replaced by a bounded number of attempts (``max_attempts``); ``use_sympy``-style infinite loops cannot happen.
Knobs live in the frozen ``GeneratorConfig``; the defaults are the reference's argparse defaults.
"""
from __future__ import annotations

import dataclasses
import functools
import multiprocessing
from typing import Iterator, Optional

import numpy as np

from .expressions import BINARY_OPERATORS, OPERATORS, UNARY_OPERATORS, Expression, variable_index

_DEFAULT_DOWNSAMPLE = "div_0,arcsin_0,arccos_0,tan_0.2,arctan_0.2,sqrt_5,pow2_3,inv_3"


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """Every knob of the generator; defaults reproduce the reference training distribution."""

    min_input_dimension: int = 1
    max_input_dimension: int = 10
    min_unary_ops: int = 0
    max_unary_ops: int = 4
    min_binary_ops_per_dim: int = 0
    max_binary_ops_per_dim: int = 1
    max_binary_ops_offset: int = 4  # b ~ U{min*d .. max*d + offset - 1} (exclusive upper bound as in the original)
    max_unary_depth: int = 6  # a unary is inserted above a child whose subtree has fewer nodes than this
    binary_operators: tuple[str, ...] = ("add", "sub", "mul", "div")
    unary_operators: tuple[str, ...] = ("abs", "inv", "sqrt", "log", "exp", "sin", "arcsin", "cos", "arccos", "tan",
                                        "arctan", "pow2", "pow3")
    operators_to_downsample: str = _DEFAULT_DOWNSAMPLE
    enforce_dim: bool = True
    float_precision: int = 3
    max_exponent_prefactor: int = 1
    max_exponent: int = 100
    # points
    max_centroids: int = 9  # K ~ U{1..max_centroids}; the reference's randint(1, 10) gives 1..9
    min_len_per_dim: int = 5
    max_len: int = 200
    n_points: Optional[int] = None  # fixed N (validation uses 200); None: N ~ U{min(5d, max_len)..max_len}
    prediction_sigmas: tuple[float, ...] = ()  # extra extrapolation sets (validation: (1, 2, 4, 8, 16))
    n_prediction_points: int = 200
    train_noise_gamma: float = 0.0
    reject_fp_errors: bool = True  # the reference runs with np.seterr(all="raise"): any FP error rejects
    max_attempts: int = 10_000  # replaces the reference's SIGALRM timeout

    def __post_init__(self):
        if not 1 <= self.min_input_dimension <= self.max_input_dimension <= 10:
            raise ValueError("need 1 <= min_input_dimension <= max_input_dimension <= 10")
        if self.max_unary_ops < self.min_unary_ops or self.min_unary_ops < 0:
            raise ValueError("need 0 <= min_unary_ops <= max_unary_ops")
        bad = set(self.unary_operators) - set(UNARY_OPERATORS)
        bad |= set(self.binary_operators) - set(BINARY_OPERATORS)
        if bad:
            raise ValueError(f"unknown operators in config: {sorted(bad)}")
        if self.max_centroids < 1 or self.max_len < 1:
            raise ValueError("max_centroids and max_len must be positive")

    @property
    def max_output_abs(self) -> float:
        """|y| >= 10**(max_exponent + float_precision) rejects a point (1e103 by default)."""
        return 10.0 ** (self.max_exponent + self.float_precision)

    def operator_weights(self, arity: int) -> tuple[tuple[str, ...], np.ndarray]:
        """Operators of the given arity with their normalised sampling probabilities."""
        factors = {}
        for item in filter(None, self.operators_to_downsample.split(",")):
            name, w = item.rsplit("_", 1)
            factors[name] = float(w)
        ops = self.unary_operators if arity == 1 else self.binary_operators
        w = np.array([factors.get(o, 1.0) for o in ops], dtype=np.float64)
        keep = w > 0
        ops = tuple(o for o, k in zip(ops, keep) if k)
        w = w[keep]
        return ops, w / w.sum()


@dataclasses.dataclass
class Sample:
    """One training example: the target expression, its fit points, optional extrapolation sets, metadata."""

    expression: Expression
    x_NxD: np.ndarray
    y_N: np.ndarray
    info: dict
    prediction_sets: dict = dataclasses.field(default_factory=dict)  # sigma -> (x, y)


class _Node:
    __slots__ = ("value", "children")

    def __init__(self, value, children=None):
        self.value = value
        self.children = children or []

    def size(self) -> int:
        return 1 + sum(c.size() for c in self.children)

    def prefix(self) -> list:
        out = [self.value]
        for c in self.children:
            out.extend(c.prefix())
        return out


@functools.lru_cache(maxsize=None)
def _tree_count(n_ops: int, n_empty: int) -> int:
    """D[n][e]: number of binary trees completing e empty slots with n operators (Lample & Charton 2019)."""
    if n_ops == 0:
        return 1 if n_empty > 0 else 0
    if n_empty == 0:
        return 0
    return _tree_count(n_ops, n_empty - 1) + _tree_count(n_ops - 1, n_empty + 1)


class ExpressionGenerator:
    """Samples (expression, points) pairs; ``sample(rng)`` is deterministic given the Generator state."""

    def __init__(self, config: GeneratorConfig = GeneratorConfig()):
        self.config = config
        self.unaries, self.unary_p = config.operator_weights(1)
        self.binaries, self.binary_p = config.operator_weights(2)
        self._unary_set = set(self.unaries)

    # ----- constants -------------------------------------------------------------------------------------------
    def generate_float(self, rng: np.random.Generator) -> float:
        """sign * U{1..10**p - 1} * 10**U{-m-p+1 .. m-p+1}: magnitudes in [0.001, 99.9] by default."""
        c = self.config
        sign = 1.0 if rng.random() < 0.5 else -1.0
        mantissa = int(rng.integers(1, 10**c.float_precision))
        lo = -c.max_exponent_prefactor - (c.float_precision - 1)
        hi = c.max_exponent_prefactor - (c.float_precision - 1)
        exponent = int(rng.integers(lo, hi + 1))
        return float(sign * mantissa * 10.0**exponent) if exponent >= 0 else float(sign * mantissa / 10.0**-exponent)

    # ----- tree sampling ---------------------------------------------------------------------------------------
    def _binary_tree(self, rng, n_ops: int) -> list:
        """Uniform random binary tree as a prefix list with None for leaves."""
        stack: list = [None]
        n_empty, l_leaves = 1, 0
        for n in range(n_ops, 0, -1):
            probs = np.array([_tree_count(n - 1, n_empty - k + 1) for k in range(n_empty)], dtype=np.float64)
            probs /= _tree_count(n, n_empty)
            k = int(rng.choice(n_empty, p=probs / probs.sum()))
            op = self.binaries[int(rng.choice(len(self.binaries), p=self.binary_p))]
            n_empty += 1 - k
            l_leaves += k
            pos = [i for i, v in enumerate(stack) if v is None][l_leaves]
            stack = stack[:pos] + [op, None, None] + stack[pos + 1 :]
        return stack

    @staticmethod
    def _to_tree(prefix: list) -> _Node:
        it = iter(prefix)

        def build():
            v = next(it)
            if v is None or v.startswith("x_"):
                return _Node(v)
            return _Node(v, [build(), build()])

        return build()

    def _add_unaries(self, rng, node: _Node):
        for i, c in enumerate(node.children):
            if c.size() < self.config.max_unary_depth:
                u = self.unaries[int(rng.choice(len(self.unaries), p=self.unary_p))]
                node.children[i] = _Node(u, [c])
            self._add_unaries(rng, c)

    def _remove_unaries(self, rng, root: _Node, keep: int):
        parents = []

        def walk(n):
            for i, c in enumerate(n.children):
                if c.value in self._unary_set:
                    parents.append((n, c))
                walk(c)

        walk(root)
        order = rng.permutation(len(parents))
        for j in order[: max(0, len(parents) - keep)]:
            parent, u = parents[j]
            idx = next(i for i, c in enumerate(parent.children) if c is u)
            parent.children[idx] = u.children[0]

    def _add_prefactors(self, rng, node: _Node, changed: list) -> _Node:
        a, b = self.generate_float(rng), self.generate_float(rng)  # two draws at every node, as the reference
        v = node.value
        if v in ("add", "sub"):
            new = []
            for c, f in zip(node.children, (a, b)):
                cc = self._add_prefactors(rng, c, changed)
                if c.value in ("add", "sub"):
                    new.append(cc)
                else:
                    changed[0] = True
                    new.append(_Node("mul", [_Node(f), cc]))
            return _Node(v, new)
        if v in self._unary_set and node.children[0].value not in ("add", "sub"):
            changed[0] = True
            inner = self._add_prefactors(rng, node.children[0], changed)
            return _Node(v, [_Node("add", [_Node(a), _Node("mul", [_Node(b), inner])])])
        return _Node(v, [self._add_prefactors(rng, c, changed) for c in node.children])

    def sample_expression(self, rng, d: int, n_unary: int) -> Optional[Expression]:
        """One attempt at an expression with input dimension d; None if rejected (too few leaves)."""
        c = self.config
        b = int(rng.integers(c.min_binary_ops_per_dim * d, c.max_binary_ops_per_dim * d + c.max_binary_ops_offset))
        if c.enforce_dim and b + 1 < d:
            return None
        root = self._to_tree(self._binary_tree(rng, b))
        leaves: list[_Node] = []

        def collect(n):
            if n.value is None:
                leaves.append(n)
            for ch in n.children:
                collect(ch)

        collect(root)
        rng.shuffle(leaves)
        for i, leaf in enumerate(leaves):
            leaf.value = f"x_{i}" if i < d else f"x_{int(rng.integers(0, d))}"
        self._add_unaries(rng, root)
        self._remove_unaries(rng, root, n_unary)
        changed = [False]
        root = self._add_prefactors(rng, root, changed)
        if not changed[0]:
            root = _Node("mul", [_Node(self.generate_float(rng)), root])
        root = _Node("add", [_Node(self.generate_float(rng)), root])
        prefix = root.prefix()
        used = sorted({int(t[2:]) for t in prefix if isinstance(t, str) and t.startswith("x_")})
        if not used or (c.enforce_dim and len(used) < d):
            return None
        relabel = {f"x_{u}": f"x_{i}" for i, u in enumerate(used)}
        return Expression([relabel.get(t, t) if isinstance(t, str) else t for t in prefix])

    # ----- points ----------------------------------------------------------------------------------------------
    @staticmethod
    def _rotation(rng, d: int) -> np.ndarray:
        """Haar-distributed rotation in SO(d) (QR of a Gaussian matrix with sign fix), identity for d = 1."""
        if d == 1:
            return np.ones((1, 1))
        q, r = np.linalg.qr(rng.standard_normal((d, d)))
        q = q * np.sign(np.diag(r))
        if np.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        return q

    def sample_points(self, rng, d: int, n: int, n_centroids: Optional[int] = None,
                      kind: Optional[str] = None) -> tuple[np.ndarray, dict]:
        """Mixture of K rotated Gaussian or uniform clusters, then each column standardised.

        K and the distribution type are drawn unless given: the extrapolation sets reuse the fit set's and draw
        only new centres, variances, rotations and weights, as the reference does.
        """
        c = self.config
        k = int(rng.integers(1, c.max_centroids + 1)) if n_centroids is None else int(n_centroids)
        if kind is None:
            kind = "gaussian" if rng.random() < 0.5 else "uniform"
        elif kind not in ("gaussian", "uniform"):
            raise ValueError(f"kind must be 'gaussian' or 'uniform', got {kind!r}")
        means = rng.standard_normal((k, d))
        variances = rng.random((k, d))
        rotations = [self._rotation(rng, d) for _ in range(k)]
        weights = rng.random(k)
        counts = rng.multinomial(n, weights / weights.sum())
        parts = []
        for j in range(k):
            std = np.sqrt(variances[j])
            if kind == "gaussian":
                pts = means[j] + std * rng.standard_normal((counts[j], d))
            else:
                pts = means[j] + std * rng.uniform(-1.0, 1.0, (counts[j], d))
            parts.append(pts @ rotations[j])
        x = np.concatenate(parts, axis=0)
        mu, sd = x.mean(axis=0), x.std(axis=0)
        with np.errstate(all="ignore"):
            x = (x - mu) / sd
        return x, {"input_distribution_type": kind, "n_centroids": k}

    def _valid_output(self, expr: Expression, x: np.ndarray) -> Optional[np.ndarray]:
        if not np.isfinite(x).all():
            return None
        try:
            if self.config.reject_fp_errors:
                with np.errstate(all="raise"):
                    y = _eval_raise(expr, x)
            else:
                y = expr.evaluate_numpy(x)
        except (FloatingPointError, ZeroDivisionError, OverflowError, ValueError):
            return None
        if not np.isfinite(y).all() or (np.abs(y) >= self.config.max_output_abs).any():
            return None
        return y

    # ----- full sample -----------------------------------------------------------------------------------------
    def sample(self, rng: np.random.Generator) -> Sample:
        """One accepted example; d and the unary budget are drawn once, before the retry loop (use_controller)."""
        c = self.config
        d = int(rng.integers(c.min_input_dimension, c.max_input_dimension + 1))
        n_unary = int(rng.integers(c.min_unary_ops, c.max_unary_ops + 1))
        rejections = {"dimension": 0, "points": 0}
        for _ in range(c.max_attempts):
            expr = self.sample_expression(rng, d, n_unary)
            if expr is None:
                rejections["dimension"] += 1
                continue
            n = c.n_points if c.n_points is not None else int(rng.integers(min(c.min_len_per_dim * d, c.max_len),
                                                                           c.max_len + 1))
            x, pinfo = self.sample_points(rng, d, n)
            y = self._valid_output(expr, x)
            if y is None:
                rejections["points"] += 1
                continue
            pred_sets, ok = {}, True
            for sigma in c.prediction_sigmas:
                xs, _ = self.sample_points(rng, d, c.n_prediction_points, pinfo["n_centroids"],
                                           pinfo["input_distribution_type"])
                xs = xs * sigma
                ys = self._valid_output(expr, xs)
                if ys is None:
                    ok = False
                    break
                pred_sets[sigma] = (xs, ys)
            if not ok:
                rejections["points"] += 1
                continue
            if c.train_noise_gamma > 0:
                gamma = rng.uniform(0.0, c.train_noise_gamma)
                all_y = np.concatenate([y] + [v[1] for v in pred_sets.values()])
                y = y + gamma * np.sqrt(np.mean(all_y**2)) * rng.standard_normal(y.shape)
            n_un = sum(1 for t in expr.tokens if t in self._unary_set)
            n_bin = sum(1 for t in expr.tokens if t in BINARY_OPERATORS)
            info = dict(pinfo, d_in=d, n_input_points=len(y), n_unary_ops=n_un, n_binary_ops=n_bin,
                        unary_budget=n_unary, rejections=rejections)
            return Sample(expr, x, y, info, pred_sets)
        raise RuntimeError(
            f"no valid expression after {c.max_attempts} attempts (d={d}); the config rejects almost everything, "
            "e.g. reject_fp_errors with very wide prediction_sigmas"
        )


def _eval_raise(expr: Expression, x: np.ndarray) -> np.ndarray:
    """Evaluation where any floating-point error raises (the reference's seterr(all='raise')): an operator's
    ``domain_error`` in the operator table says where it fails."""
    n = x.shape[0]

    def leaf(t):
        return np.full(n, t) if isinstance(t, float) else x[:, variable_index(t)]

    def node(op, args):
        fails = OPERATORS[op].domain_error
        if fails is not None and fails(*args):
            raise FloatingPointError(op)
        return OPERATORS[op].np_fn(*args)

    return expr._fold(leaf, node)


def sample(seed, config: GeneratorConfig = GeneratorConfig()) -> Sample:
    """The example for ``seed`` (an int or a sequence of ints, fed to numpy's SeedSequence)."""
    return _generator(config).sample(np.random.default_rng(seed))


@functools.lru_cache(maxsize=8)
def _generator(config: GeneratorConfig) -> ExpressionGenerator:
    return ExpressionGenerator(config)


def _sample_job(args):
    config, seed, index = args
    return sample([seed, index], config)


def sample_stream(config: GeneratorConfig = GeneratorConfig(), seed: int = 0, n_workers: int = 1,
                  start: int = 0, stop: Optional[int] = None, chunksize: int = 16) -> Iterator[Sample]:
    """Samples for indices start, start+1, ... (infinite if stop is None) from ``n_workers`` processes.

    Sample i is ``sample([seed, i], config)`` whatever the number of workers, so the stream is reproducible and
    ordered; ``multiprocessing.Pool.imap`` spreads the work over processes.
    """
    import itertools

    indices = itertools.count(start) if stop is None else range(start, stop)
    jobs = ((config, seed, i) for i in indices)
    if n_workers <= 1:
        yield from map(_sample_job, jobs)
        return
    ctx = multiprocessing.get_context("spawn")  # fork is unsafe once JAX threads exist
    with ctx.Pool(n_workers) as pool:
        yield from pool.imap(_sample_job, jobs, chunksize=chunksize)
