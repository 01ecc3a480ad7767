"""Batched JAX interpreter: many different expressions on the same points in one jitted call.

Why this design (see issue 3's measured trap): a stack machine vmapped over candidates evaluates every operator at
every node. Here the whole batch is compiled on the host into one *tape*:

* a value buffer ``V`` of shape (rows, N): row 0 holds a safe value (0.5) that padding reads, then one row per
  input column, then one per internal node (``TapeSignature.node_base`` onwards). Constants are not in ``V``: they
  are gathered from the ``consts`` input array where an argument is a constant, so refinement can differentiate
  w.r.t. them;
* internal nodes grouped by (height, group): at each height one "cheap" group holds the operators the table
  (``sr_jax.operators``) marks ``cheap`` (add, mul, div, pow2, ...: a per-node select among a few flops, cheaper
  than more gathers), and every other operator (sqrt, log, exp, sin, ..., pow) present at that height gets its own
  group, so a transcendental is computed only for nodes that use it -- except where it has none or only a few nodes
  at a height: those share the height's "mixed" group (every transcendental of the batch computed, one kept per
  node), so that the compiled program holds one group there instead of one per operator. Each level: gather its
  arguments, apply each group, write each group's outputs into ``V`` in place (its rows are contiguous).
* runs of levels: consecutive levels are given identical groups and capacities where that pads little
  (``_tiered``), and each run of identical levels is one ``lax.scan`` over its levels. XLA:CPU's compile time grows
  with the number of operations in a program, so a tape's programs compile in time that follows its number of runs
  (a handful) rather than its depth (up to ~50 levels for the estimator's pools).
* reverse mode is a hand-written reverse tape (custom_vjp) with one in-place buffer ``K`` (see ``_fill``); seeded
  with a constant instead of the output cotangents it leaves every candidate's Jacobian at its constant leaves
  (Gauss-Newton refinement).
* precision: ``evaluate`` computes in float64 by default, inside a scoped ``jax.enable_x64`` (``precision``), so
  values beyond float32's range are exact and the user's global ``jax_enable_x64`` is never changed.

Every size is rounded up to a bucket (powers of two and 1.5x powers of two), and the static structure is
``TapeSignature`` (bucketed sizes + the (height, group, capacity) list). A second batch with the same signature reuses
the compiled program; ``COMPILE_COUNTER`` counts traces. Local derivatives are computed from the arguments alone
(never from the node's output) and zeroed where non-finite; each candidate is its own tree, so a NaN/inf reaches
only that candidate's leaves, where the cotangents are zeroed per point: it never leaks into anyone's gradient.

Glossary (shapes: E_b expressions, P_b constants per expression, N points, D input columns, all bucketed):

* ``V`` value buffer, ``K`` reverse (cotangent) buffer; a *level* is a node height, a *group* one operator
  family at one level (``TapeSignature.levels``, ``.layout``), a *run* consecutive identical levels
  (``TapeSignature.runs``); a node's *row* is its place in the padded node
  layout, its *binary row* its place among the nodes of binary groups;
* the tape's index arrays (``_fill``; one leading dataset axis in ``Tape.arrays``): ``a1``/``a2`` V row of each
  node's first / second argument (per node row / binary row), ``a1c``/``a2c`` the argument's constant slot or -1,
  ``code`` cheap-operator code per node row, ``roots`` V row of each expression's output and ``root_c`` its flat
  (E_b * P_b) constant index where the whole expression is one constant; ``c_idx`` flat constant index per
  constant slot; ``kpos``/``c_kpos``/``f_kpos`` K row holding the cotangent of each node / constant leaf /
  variable leaf, ``cj_kpos`` the same per (expression, constant); ``f_id`` input column per variable leaf.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .expressions import _VAR_INDEX, Expression
from .operators import BINARY_OPERATORS, CHEAP_OPERATORS, OPERATORS

COMPILE_COUNTER = {"evaluate": 0, "refine": 0}
try:  # the scoped x64 switch: jax.enable_x64 in current JAX, jax.experimental.enable_x64 before
    _X64_SCOPE = jax.enable_x64
except AttributeError:  # pragma: no cover - older JAX
    from jax.experimental import enable_x64 as _X64_SCOPE


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest size >= n of the form 2**k or 3 * 2**(k-1) (1, 2, 3, 4, 6, 8, 12, 16, 24, ...)."""
    n = max(int(n), minimum)
    p = 1
    while p < n:
        if p >= 2 and p + p // 2 >= n:
            return p + p // 2
        p *= 2
    return p


def point_bucket(n: int) -> int:
    """Padded number of points: ``bucket(n, 8)`` up to 64, then 8 steps per octave (200 -> 208, 1000 -> 1024)."""
    if n <= 64:
        return bucket(n, 8)
    step = 1 << (int(n - 1).bit_length() - 4)
    return -(-n // step) * step


def default_float_dtype():
    """The float dtype JAX gives arrays here and now: float64 under ``jax_enable_x64`` (global or scoped)."""
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def resolve_dtype(dtype) -> np.dtype:
    """The dtype ``evaluate`` and ``refine`` compute in: float64 for None, else float32 or float64 as given."""
    d = np.dtype(np.float64 if dtype is None else dtype)
    if d not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64 (or None: float64), got {dtype!r}")
    return d


@contextlib.contextmanager
def precision(dtype: np.dtype):
    """Scope in which arrays of ``dtype`` are created and programs for it compile and run.

    float64 needs x64 mode: it is switched on for this thread only, inside the scope (``jax.enable_x64``), so
    the user's global ``jax_enable_x64`` setting is never changed. Results must be moved to the host (or used
    as float64 arrays only) inside the scope: outside it, new JAX operations on them compute in float32.
    """
    if np.dtype(dtype) == np.float64:
        with _X64_SCOPE(True):
            yield
    else:
        yield


@contextlib.contextmanager
def x64_as(enabled: bool):
    """Scope with ``jax_enable_x64`` set to ``enabled`` for this thread only: inside a ``precision`` scope, code of
    the caller's (a callback) runs with the setting the caller had (``enabled``) rather than refinement's."""
    with _X64_SCOPE(bool(enabled)):
        yield


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector paused inside the scope, then restored to what it was.

    Host-side work here (tape compilation, candidate pools, selection) allocates hundreds of thousands of small
    objects without reference cycles; each allocation burst triggers collections that scan the whole heap, whose
    cost grows with everything else the process holds (JAX, sympy caches). Nothing is lost: cycles made inside are
    collected by the next collection after the scope. Nested scopes restore the outer state. Also a decorator
    (``@gc_paused()``).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def check_range(a, name: str, dtype: np.dtype) -> None:
    """ValueError when a finite host array does not fit ``dtype`` (only float32 can be too narrow)."""
    if np.dtype(dtype) == np.float32:
        big = float(np.max(np.abs(a), initial=0.0))
        if big > float(np.finfo(np.float32).max):
            raise ValueError(f"{name} has values up to {big:.3g}, beyond float32's range (3.4e38); use "
                             "dtype=float64 (the default)")


# ----- cheap arithmetic merged into one group per level ----------------------------------------------------------
# The operator table's ``cheap`` operators; a node's code is its operator's index here. Which operators are cheap
# and every function below come from ``sr_jax.operators``: the loops run at trace time only.
CHEAP_OPS = CHEAP_OPERATORS
_CHEAP_CODE = {op: i for i, op in enumerate(CHEAP_OPS)}


def _apply(op: str, a, b):
    """``op``'s JAX function on a (and b for a binary operator)."""
    return OPERATORS[op].jax_fn(a, b) if OPERATORS[op].arity == 2 else OPERATORS[op].jax_fn(a)


def _cheap_fwd(a, b, code):
    """Every cheap operator on (a, b), each element keeping the one its code names (one select)."""
    return jax.lax.select_n(code, *[_apply(op, a, b) for op in CHEAP_OPS])


# ----- rare unary operators merged into one "mixed" group per level ------------------------------------------------
# A transcendental (sqrt, log, exp, sin, ...) gets a group of its own at a level where the batch has many of it;
# where it has none, or so few that computing them len(mixed_ops) times costs no more than a padded group of their
# own, they share the level's "mixed" group, which computes every transcendental of the batch
# (``TapeSignature.mixed_ops``, in table order) and keeps the one each node's code names (its index there). Each group
# is code in every compiled pass (forward, reverse, Gauss-Newton), so the levels where an operator may occur but
# does not (every level keeps room for every operator of the batch) compile one group, not one per operator.
MIXED = "mixed"
MIXED_OPS = tuple(o for o in OPERATORS if o not in CHEAP_OPS and o not in BINARY_OPERATORS)


# ----- host-side compilation ---------------------------------------------------------------------------------------
# Group order inside a level: the binary groups first (their second arguments are gathered, nobody else's).
_BINARY_GROUPS = ("cheap",) + tuple(o for o in BINARY_OPERATORS if o not in CHEAP_OPS)
_UNARY_GROUPS = (MIXED,) + MIXED_OPS
_GROUP_ORDER = {g: i for i, g in enumerate(_BINARY_GROUPS + _UNARY_GROUPS)}


@dataclasses.dataclass(frozen=True)
class TapeSignature:
    """Static structure of a compiled batch: everything that, if changed, needs a new XLA program.

    ``levels`` is one entry per level (node height 1, 2, ...): a tuple of (group, capacity), binary groups first.
    At each level one "cheap" group holds the nodes of the table's cheap operators, a "mixed" group the few nodes of
    unary transcendentals that have no group of their own there, and every other operator present gets its own
    group, padded to a bucketed capacity. ``n_const_slots``: constant leaves of the whole batch
    (bucketed); ``n_feature_uses``: variable leaves (bucketed, only used for d/dX).
    """

    n_datasets: int
    n_features: int
    n_expressions: int  # bucketed
    n_consts: int  # constants per expression, bucketed
    n_const_slots: int
    n_feature_uses: int
    levels: tuple
    mixed_ops: tuple = ()  # the transcendentals the mixed groups compute, in table order (a node's code: its index)

    @functools.cached_property
    def layout(self):
        """Per level: (node_lo, node_hi, binary_lo, binary_hi, ((group, lo, hi), ...)) in node/binary row numbers."""
        out, node, binr = [], 0, 0
        for groups in self.levels:
            lo, blo, gl = node, binr, []
            for g, cap in groups:
                gl.append((g, node, node + cap))
                node += cap
                if g in _BINARY_GROUPS:
                    binr += cap
            out.append((lo, node, blo, binr, tuple(gl)))
        return tuple(out)

    @functools.cached_property
    def runs(self):
        """The layout as runs of consecutive identical levels (same groups, same capacities), each a
        ``(count, level layout of its first level)``: a run of several levels is evaluated by one ``lax.scan``, its
        i-th level at node rows ``lo + i * (hi - lo)`` and binary rows ``blo + i * (bhi - blo)``."""
        out = []
        for li, entry in enumerate(self.layout):
            if li and self.levels[li] == self.levels[li - 1]:
                out[-1] = (out[-1][0] + 1, out[-1][1])
            else:
                out.append((1, entry))
        return tuple(out)

    @property
    def n_nodes_padded(self) -> int:
        return sum(c for groups in self.levels for _, c in groups)

    @property
    def n_binary(self) -> int:
        return sum(c for groups in self.levels for g, c in groups if g in _BINARY_GROUPS)

    @property
    def node_base(self) -> int:
        """First node row of the value buffer V (rows: 0 safe value, 1..D features, then nodes; constants are
        gathered from their own array, see ``_forward``)."""
        return 1 + self.n_features

    @property
    def n_slots(self) -> int:
        return self.node_base + self.n_nodes_padded


@dataclasses.dataclass(frozen=True)
class Tape:
    """Host-compiled batch (numpy arrays with a leading dataset axis) plus its static signature."""

    signature: TapeSignature
    arrays: dict  # int32 index arrays, leading dataset axis (see _fill)
    consts: np.ndarray  # (B, E_b, P_b) initial constants
    n_consts: np.ndarray  # (B, E_b) real constants per expression
    n_expressions: tuple  # real expressions per dataset
    expressions: tuple  # tuple of tuples of Expression


def _check_expressions(expressions, n_features: int, where: str = "") -> list[Expression]:
    out = []
    for i, e in enumerate(expressions):
        if not isinstance(e, Expression):
            try:
                e = Expression(e)
            except ValueError as err:
                raise ValueError(f"expression {i}{where}: {err}") from None
        if e.n_variables_needed > n_features:
            raise ValueError(
                f"expression {i}{where} uses x_{e.n_variables_needed - 1} but X has only {n_features} "
                f"column{'' if n_features == 1 else 's'}; "
                "pass X with more columns or drop the expression"
            )
        out.append(e)
    if not out:
        raise ValueError(f"no expressions given{where}")
    return out


class _Ref(NamedTuple):
    """One value of a parsed forest: ``kind`` "n" (internal node), "c" (constant leaf) or "x" (variable leaf), and
    its index in ``_Parsed.nodes``, ``.consts`` or ``.features``."""

    kind: str
    index: int


class _Node(NamedTuple):
    op: str
    group: str  # "cheap" or the operator's own group ("pow", "sin", ...); a transcendental may instead be placed in
    # its level's "mixed" group (``_place``)
    level: int  # height: 1 + the highest argument's (leaves have height 0)
    args: tuple  # a _Ref per argument


class _Const(NamedTuple):
    expr: int  # which expression of the dataset
    index: int  # which of its constants (prefix order)
    value: float


@dataclasses.dataclass
class _Parsed:
    """One dataset's expressions as a forest: nodes, leaves and parent links (every value has exactly one user)."""

    nodes: list  # _Node, children before parents
    consts: list  # _Const per constant leaf
    features: list  # input column per variable leaf
    roots: list  # _Ref per expression
    n_consts: list  # constants per expression

    def counts(self):
        """Nodes per (level, group)."""
        c: dict = {}
        for node in self.nodes:
            c[(node.level, node.group)] = c.get((node.level, node.group), 0) + 1
        return c


_ARITY = {op: o.arity for op, o in OPERATORS.items()}


def _parse(exprs: list[Expression], feature_offsets=None) -> _Parsed:
    p = _Parsed([], [], [], [], [])
    nodes, consts, features = p.nodes, p.consts, p.features
    arity, cheap, var_index = _ARITY, _CHEAP_CODE, _VAR_INDEX
    for i, e in enumerate(exprs):
        off = 0 if feature_offsets is None else int(feature_offsets[i])
        n_c = sum(type(t) is float for t in e.tokens)  # Expression tokens: str or float
        j = n_c  # constants are numbered in prefix order; the walk below is reversed
        stack = []  # (_Ref, height)
        for t in reversed(e.tokens):
            if type(t) is float:
                j -= 1
                consts.append(_Const(i, j, t))
                stack.append((_Ref("c", len(consts) - 1), 0))
            elif t in arity:
                if arity[t] == 1:
                    ref, h = stack.pop()
                    level, args = 1 + h, (ref,)
                else:
                    (r1, h1), (r2, h2) = stack.pop(), stack.pop()
                    level, args = 1 + (h1 if h1 > h2 else h2), (r1, r2)
                nodes.append(_Node(t, "cheap" if t in cheap else t, level, args))
                stack.append((_Ref("n", len(nodes) - 1), level))
            else:
                features.append(var_index[t] + off)
                stack.append((_Ref("x", len(features) - 1), 0))
        p.roots.append(stack[0][0])
        p.n_consts.append(n_c)
    return p


def _place(sig: TapeSignature, p: _Parsed):
    """(level, group) of every node within ``sig`` (None if it does not fit).

    Greedy, bottom-up: a node goes to the lowest level above its children's that still has room in its group (for
    a transcendental: its own group, else the level's mixed group), so a batch whose counts differ a little from
    the signature's can still be placed by delaying a few nodes.
    """
    if len(p.consts) > sig.n_const_slots or len(p.features) > sig.n_feature_uses:
        return None
    free = [dict(groups) for groups in sig.levels]
    n_levels, mixed_ops, nodes = len(free), sig.mixed_ops, p.nodes
    placed = [(0, "")] * len(nodes)
    # nodes are stored in post-order per expression, so children come before their parent
    order = sorted(range(len(nodes)), key=lambda k: nodes[k].level)
    for k in order:
        node = nodes[k]
        own, other = node.group, (MIXED if node.op in mixed_ops else None)
        lv = 1
        for a in node.args:
            if a.kind == "n" and placed[a.index][0] >= lv:
                lv = placed[a.index][0] + 1
        while True:
            if lv > n_levels:
                return None
            room = free[lv - 1]
            if room.get(own, 0) > 0:
                g = own
                break
            if other is not None and room.get(other, 0) > 0:
                g = other
                break
            lv += 1
        free[lv - 1][g] -= 1
        placed[k] = (lv, g)
    return placed


_SIGNATURES: list = []  # recently used signatures, newest first (see compile_tape)
_CAP_SLACK = 0.15
_SPARE_LEVELS = 4


def _capacity(c: int) -> int:
    c = max(int(np.ceil(c * (1 + _CAP_SLACK))) + 2, int(np.ceil(c + 2 * np.sqrt(c))) + 4)  # room for noise
    step = 4 if c <= 64 else 16
    return -(-c // step) * step


def _near(s: TapeSignature, fresh: TapeSignature) -> bool:
    """Whether a batch whose own signature is ``fresh`` may run in ``s``: same datasets and input columns, at least
    its expressions and constants per expression, and at most about twice its padded work."""
    return (s.n_datasets == fresh.n_datasets and s.n_features == fresh.n_features
            and fresh.n_expressions <= s.n_expressions <= 2 * fresh.n_expressions
            and fresh.n_consts <= s.n_consts <= 2 * fresh.n_consts
            and s.n_nodes_padded <= 2 * fresh.n_nodes_padded + 64)


def _merge(a: TapeSignature, b: TapeSignature) -> TapeSignature:
    """The smallest signature that everything placed in ``a`` or ``b`` fits in: every size the larger of the two,
    every level the union of their groups at the larger capacity."""
    levels = []
    for lv in range(max(len(a.levels), len(b.levels))):
        ga = dict(a.levels[lv]) if lv < len(a.levels) else {}
        gb = dict(b.levels[lv]) if lv < len(b.levels) else {}
        levels.append(tuple((g, max(ga.get(g, 0), gb.get(g, 0))) for g in sorted({*ga, *gb}, key=_GROUP_ORDER.get)))
    return TapeSignature(a.n_datasets, a.n_features, max(a.n_expressions, b.n_expressions),
                         max(a.n_consts, b.n_consts), max(a.n_const_slots, b.n_const_slots),
                         max(a.n_feature_uses, b.n_feature_uses), _tiered(levels),
                         tuple(o for o in MIXED_OPS if o in a.mixed_ops or o in b.mixed_ops))


_RUN_SLACK = 1.25  # a run of levels may pad up to this factor of its own work (plus _RUN_SLACK_NODES cheap nodes)
_RUN_SLACK_NODES = 64
_GROUP_WORK = {"cheap": 1.0}  # relative cost of a node per group (default 3: a transcendental, pow or mixed)


def _tiered(levels) -> tuple:
    """``levels`` with runs of consecutive levels made identical (the union of their groups, each at its largest
    capacity in the run).

    Identical consecutive levels are evaluated by one ``lax.scan`` (``TapeSignature.runs``), so a program's size,
    and with it XLA's compile time, follows the number of runs instead of the depth. Greedy, bottom-up: a level
    joins the current run while the run's padded work stays within ``_RUN_SLACK`` times its levels' own work plus
    ``_RUN_SLACK_NODES`` (so the deep, thin top of a tape becomes one or two runs; the wide bottom levels mostly
    stay apart, since padding them costs time in every evaluation)."""
    def total(caps):  # work of one level
        return sum(_GROUP_WORK.get(g, 3.0) * c for g, c in (caps.items() if isinstance(caps, dict) else caps))

    out, i = [], 0
    while i < len(levels):
        caps, own, j = dict(levels[i]), total(levels[i]), i + 1
        while j < len(levels):
            trial = {g: max(caps.get(g, 0), dict(levels[j]).get(g, 0)) for g in {*caps, *dict(levels[j])}}
            if (j + 1 - i) * total(trial) > _RUN_SLACK * (own + total(levels[j])) + _RUN_SLACK_NODES:
                break
            caps, own, j = trial, own + total(levels[j]), j + 1
        out += [tuple((g, caps[g]) for g in sorted(caps, key=_GROUP_ORDER.get))] * (j - i)
        i = j
    return tuple(out)


@gc_paused()
def compile_tape(expressions_per_dataset: Sequence[Sequence], n_features: int, min_expressions: int = 1,
                 feature_offsets: Sequence[Sequence[int]] | None = None) -> Tape:
    """Compile B lists of expressions (one per dataset) into one padded tape with a common signature.

    ``feature_offsets`` (per dataset, per expression): added to every variable index of that expression, so that
    expressions from different datasets can share one tape over column-concatenated inputs (see refine).

    Shapes come from a small set: sizes are rounded up with some slack, and a batch that can be placed in a
    recently used signature (same datasets and features, at least its expression and constant buckets and at most
    twice them; nodes may be delayed to a later level; at most 2x the padded work of a fresh one) reuses it, so a
    second batch of the same bucket reuses the compiled program. When none fits, the most recent such signature is
    grown to the union of its levels and the batch's own (if that stays within the same bounds), so a stream of
    similar batches settles on a few programs. The signature a batch gets depends on the batches before it; its
    results do not, up to rounding (padding changes the order of some sums).
    """
    multi = len(expressions_per_dataset) > 1
    dsets = [_check_expressions(list(ex), n_features, f" of dataset {b}" if multi else "")
             for b, ex in enumerate(expressions_per_dataset)]
    e_b = bucket(max(len(d) for d in dsets), max(min_expressions, 1))
    # constants per expression: coarse for big batches, so another batch of the same size shares the bucket
    p_b = bucket(max(len(e.constants) for d in dsets for e in d), 1 if e_b < 64 else 16)
    parsed = [_parse(d, None if feature_offsets is None else feature_offsets[b]) for b, d in enumerate(dsets)]
    counts: dict = {}
    for p in parsed:
        for k, c in p.counts().items():
            counts[k] = max(counts.get(k, 0), c)
    key = (len(dsets), n_features, e_b, p_b)
    n_lv = max([k[0] for k in counts], default=0)
    # the mixed groups compute every transcendental of the batch (so any of them fits there at any level); a
    # transcendental's nodes at a level go to the level's mixed group instead of a group of their own where that
    # costs no more (c nodes computed len(mixed_ops) times each vs its own group's padded capacity)
    mixed_ops = tuple(o for o in MIXED_OPS if any(g == o for _, g in counts))
    for (lv, g), c in list(counts.items()):
        if g in MIXED_OPS and c * len(mixed_ops) <= _capacity(c):
            del counts[(lv, g)]
            counts[(lv, MIXED)] = counts.get((lv, MIXED), 0) + c
    # every group seen in the batch gets a small capacity at every level (2 where absent), except the
    # transcendentals' own groups, whose nodes fit in the mixed group there: another batch of the same bucket with
    # an operator at a new level still fits
    seen = {k[1] for k in counts}
    if seen & set(MIXED_OPS):
        seen.add(MIXED)
    everywhere = sorted((g for g in seen if g not in MIXED_OPS), key=_GROUP_ORDER.get)
    levels = [tuple((g, _capacity(counts[(lv, g)]) if (lv, g) in counts else 2)
                    for g in sorted({*everywhere, *(g for g in seen if (lv, g) in counts)}, key=_GROUP_ORDER.get))
              for lv in range(1, n_lv + 1)]
    # a few spare levels on top (every group seen in the top levels, small capacity, a transcendental's in the mixed
    # group): another batch of the same bucket with slightly deeper expressions still fits by delaying nodes
    top = {MIXED if k[1] in MIXED_OPS else k[1] for k in counts if k[0] > n_lv - _SPARE_LEVELS}
    levels += [tuple((g, 8 if g == "cheap" else 4) for g in sorted(top, key=_GROUP_ORDER.get))] * (
        _SPARE_LEVELS if n_lv >= 4 else 0)
    fresh = TapeSignature(*key, _capacity(max(len(p.consts) for p in parsed)),
                          _capacity(max(len(p.features) for p in parsed)), _tiered(levels), mixed_ops)
    sig, levels = fresh, None
    near = [s for s in _SIGNATURES if _near(s, fresh)]
    for s in near:
        levels = [_place(s, p) for p in parsed]
        if all(lv is not None for lv in levels):
            sig = s
            break
    else:
        # nothing recent fits: grow the most recent near signature to hold this batch too (the union of both), so
        # that a stream of similar but not identical batches (one estimator fit after another) settles on one
        # program instead of compiling one per batch
        merged = _merge(near[0], fresh) if near else fresh
        sig = merged if _near(merged, fresh) else fresh
        levels = [_place(sig, p) for p in parsed]
        assert all(lv is not None for lv in levels)
        if sig is merged and near:
            _SIGNATURES.remove(near[0])
    if sig in _SIGNATURES:
        _SIGNATURES.remove(sig)
    _SIGNATURES.insert(0, sig)
    del _SIGNATURES[32:]
    filled = [_fill(sig, p, lv) for p, lv in zip(parsed, levels)]
    arrays = {k: np.stack([f[k] for f in filled]) for k in filled[0]}
    consts = np.zeros((len(dsets), sig.n_expressions, sig.n_consts))
    for b, p in enumerate(parsed):
        for c in p.consts:
            consts[b, c.expr, c.index] = c.value
    n_consts = np.zeros((len(dsets), sig.n_expressions), np.int32)
    for b, p in enumerate(parsed):
        n_consts[b, : len(p.n_consts)] = p.n_consts
    return Tape(sig, arrays, consts, n_consts, tuple(len(d) for d in dsets), tuple(tuple(d) for d in dsets))


# Node-capacity slack of a scaled signature: (the cheap group, every other group), tight first. The other groups
# get more: the candidates still running late are the harder ones, rich in transcendentals, and these groups are
# small (their padding costs little).
SCALE_SLACKS = ((1.2, 2.0), (1.5, 3.0))


def scaled_signature(sig: TapeSignature, fraction: float, n_features: int, slack: tuple = SCALE_SLACKS[-1]
                     ) -> TapeSignature:
    """``sig`` shrunk to ``fraction`` of its expressions (and, with ``slack`` = (cheap, other groups' factor), of
    its node and constant capacities), over ``n_features`` input columns: the shape a subset of a batch can continue
    in (refinement's lane compaction).

    A pure function of its arguments, so every subset of every batch placed in ``sig`` continues in the same few
    programs (one per fraction and slack). The slack is there because a subset need not be a fair sample of the batch
    (the candidates refinement keeps are often the deeper ones); ``compile_tape_into`` says whether a subset fits."""
    cheap_slack, other_slack = slack

    def shrink(c: int, step: int = 2, slack: float = cheap_slack) -> int:
        return min(c, max(step, -(-int(np.ceil(slack * fraction * c)) // step) * step))

    levels = tuple(tuple((g, shrink(c, slack=cheap_slack if g == "cheap" else other_slack)) for g, c in groups)
                   for groups in sig.levels)
    return TapeSignature(sig.n_datasets, n_features, max(1, int(sig.n_expressions * fraction)), sig.n_consts,
                         shrink(sig.n_const_slots, 4), shrink(sig.n_feature_uses, 4), levels, sig.mixed_ops)


@gc_paused()
def compile_tape_into(signatures: TapeSignature | Sequence[TapeSignature], expressions: Sequence,
                      feature_offsets: Sequence[int] | None = None):
    """One dataset's expressions compiled into the given signature, or into the first of the given signatures that
    holds them (parsed once for all); None when none does (too many expressions, constants per expression,
    constant or variable leaves, or nodes for its levels)."""
    if isinstance(signatures, TapeSignature):
        signatures = (signatures,)
    exprs, p = None, None
    for sig in signatures:
        if exprs is None:
            exprs = _check_expressions(list(expressions), sig.n_features)
        if len(exprs) > sig.n_expressions or max((len(e.constants) for e in exprs), default=0) > sig.n_consts:
            continue
        if p is None:
            p = _parse(exprs, feature_offsets)
        if max(p.features, default=-1) >= sig.n_features:
            continue
        levels = _place(sig, p)
        if levels is not None:
            break
    else:
        return None
    filled = _fill(sig, p, levels)
    consts = np.zeros((1, sig.n_expressions, sig.n_consts))
    for c in p.consts:
        consts[0, c.expr, c.index] = c.value
    n_consts = np.zeros((1, sig.n_expressions), np.int32)
    n_consts[0, : len(p.n_consts)] = p.n_consts
    return Tape(sig, {k: v[None] for k, v in filled.items()}, consts, n_consts, (len(exprs),), (tuple(exprs),))


def _fill(sig: TapeSignature, p: _Parsed, levels: list):
    """Index arrays for one dataset.

    Value buffer V rows: 0 safe value 0.5, 1..D features, node slots (padded layout order); constants are gathered
    from their own array. Reverse buffer K rows: 0 zero, 1..E_b the output cotangents, then per node row
    "cotangent(node) * d node / d arg0", then per binary row "cotangent(node) * d node / d arg1". Every value has
    exactly one user (the expressions are trees), so its cotangent is ONE row of K: ``kpos`` (nodes), ``c_kpos``
    (constant leaves), ``f_kpos`` (variable leaves) say which.
    """
    lay = sig.layout
    n_nodes, e_b = sig.n_nodes_padded, sig.n_expressions
    # place nodes: slot (node row) and binary row per node
    cursor = {}
    for li, (lo, hi, blo, bhi, groups) in enumerate(lay):
        b = blo
        for g, glo, ghi in groups:
            cursor[(li + 1, g)] = [glo, b if g in _BINARY_GROUPS else -1]
            if g in _BINARY_GROUPS:
                b += ghi - glo
    nodes, features, node_base = p.nodes, p.features, sig.node_base
    row, brow = [0] * len(nodes), [-1] * len(nodes)
    for k in range(len(nodes)):
        cur = cursor[levels[k]]
        row[k], brow[k] = cur[0], cur[1]
        cur[0] += 1
        if cur[1] >= 0:
            cur[1] += 1

    def vrow(ref: _Ref):
        if ref.kind == "n":
            return node_base + row[ref.index]
        return 0 if ref.kind == "c" else 1 + features[ref.index]

    a1 = np.zeros(n_nodes, np.int32)
    a2 = np.zeros(sig.n_binary, np.int32)
    a1c = np.full(n_nodes, -1, np.int32)  # constant-slot argument, -1 if the argument is not a constant
    a2c = np.full(sig.n_binary, -1, np.int32)
    code = np.zeros(n_nodes, np.int32)
    kpos = np.zeros(n_nodes, np.int32)  # padding reads K row 0 (zero)
    c_kpos = np.zeros(sig.n_const_slots, np.int32)
    c_idx = np.zeros(sig.n_const_slots, np.int32)
    f_kpos = np.zeros(sig.n_feature_uses, np.int32)
    f_id = np.zeros(sig.n_feature_uses, np.int32)
    roots = np.zeros(e_b, np.int32)
    root_c = np.full(e_b, -1, np.int32)  # flat (E_b * P_b) index of a root that is a constant

    # the entries are gathered in Python lists and written at once (every value has one user: no index repeats)
    links = {"n": ([], []), "c": ([], []), "x": ([], [])}  # per kind of value: (its index, its K row)

    def link(ref: _Ref, k_row):
        idx, rows = links[ref.kind]
        idx.append(row[ref.index] if ref.kind == "n" else ref.index)
        rows.append(k_row)

    one = ([], [], [], [])  # node row, arg0's V row, arg0's constant slot, code
    two = ([], [], [])  # binary row, arg1's V row, arg1's constant slot
    mixed_ops = sig.mixed_ops
    for k, node in enumerate(nodes):
        r, (arg0, *rest) = row[k], node.args
        one[0].append(r)
        one[1].append(vrow(arg0))
        one[2].append(arg0.index if arg0.kind == "c" else -1)
        one[3].append(_CHEAP_CODE.get(node.op, 0) if levels[k][1] != MIXED else mixed_ops.index(node.op))
        link(arg0, 1 + e_b + r)
        if rest:
            arg1 = rest[0]
            two[0].append(brow[k])
            two[1].append(vrow(arg1))
            two[2].append(arg1.index if arg1.kind == "c" else -1)
            link(arg1, 1 + e_b + n_nodes + brow[k])
    if nodes:
        a1[one[0]], a1c[one[0]], code[one[0]] = one[1], one[2], one[3]
    if two[0]:
        a2[two[0]], a2c[two[0]] = two[1], two[2]
    for i, ref in enumerate(p.roots):
        roots[i] = vrow(ref)
        if ref.kind == "c":
            const = p.consts[ref.index]
            root_c[i] = const.expr * sig.n_consts + const.index
        link(ref, 1 + i)
    for kind, target in (("n", kpos), ("c", c_kpos), ("x", f_kpos)):
        if links[kind][0]:
            target[links[kind][0]] = links[kind][1]
    cj_kpos = np.zeros(e_b * sig.n_consts, np.int32)  # per (expression, constant): its K row (0: none)
    if p.consts:
        flat = [const.expr * sig.n_consts + const.index for const in p.consts]
        c_idx[: len(flat)] = flat
        cj_kpos[flat] = c_kpos[: len(flat)]
    f_id[: len(p.features)] = p.features
    return dict(a1=a1, a2=a2, code=code, roots=roots, kpos=kpos, c_kpos=c_kpos, c_idx=c_idx, cj_kpos=cj_kpos,
                f_kpos=f_kpos, f_id=f_id, a1c=a1c, a2c=a2c, root_c=root_c)


# ----- device-side evaluation --------------------------------------------------------------------------------------
def _group_apply(g, a, b, code, mixed_ops):
    """Outputs of one group: its operator's JAX function, or the cheap or mixed group's per-node select."""
    if g == "cheap":
        return _cheap_fwd(a, b, jnp.broadcast_to(code[:, None], a.shape))
    if g == MIXED:
        code = jnp.broadcast_to(code[:, None], a.shape)
        return jax.lax.select_n(code, *[_apply(op, x, None)
                                        for op, x in zip(mixed_ops, _mixed_inputs(a, code, mixed_ops))])
    return _apply(g, a, b)


def _mixed_inputs(a, code, mixed_ops):
    """The mixed group's argument as each of its operators sees it: ``a`` where the node's code names the operator,
    0.5 (inside every operator's domain) elsewhere, so that no operator a node does not use makes a NaN or inf that
    a derivative of this code (second-order differentiation: ``make_refine_fn``) would multiply by zero."""
    return [jnp.where(code == i, a, 0.5) for i in range(len(mixed_ops))]


def _group_derivs(g, a, b, code, mixed_ops):
    """Local derivatives (d out/d a, d out/d b) from the arguments alone, zeroed where they are not finite."""
    if g == "cheap":
        code = jnp.broadcast_to(code[:, None], a.shape)
        zero = jnp.zeros_like(a)
        ds = [OPERATORS[op].derivative(jnp, a, b) for op in CHEAP_OPS]
        da = jax.lax.select_n(code, *[d[0] for d in ds])
        db = jax.lax.select_n(code, *[d[1] if len(d) > 1 else zero for d in ds])
    elif g == MIXED:
        code = jnp.broadcast_to(code[:, None], a.shape)
        da = jax.lax.select_n(code, *[OPERATORS[op].derivative(jnp, x, None)[0]
                                      for op, x in zip(mixed_ops, _mixed_inputs(a, code, mixed_ops))])
        db = None
    else:
        ds = OPERATORS[g].derivative(jnp, a, b)
        da, db = ds[0], (ds[1] if len(ds) > 1 else None)
    da = jnp.where(jnp.isfinite(da), da, 0.0)
    db = None if db is None else jnp.where(jnp.isfinite(db), db, 0.0)
    return da, db


class _LevelIndex(NamedTuple):
    """The index arrays of one level (or, stacked, of every level of a run: a leading level axis)."""

    a1: jax.Array  # (L,) V row of each node's first argument
    a1c: jax.Array  # (L,) its constant slot, -1 if not a constant
    code: jax.Array  # (L,) cheap-operator code
    kpos: jax.Array  # (L,) K row of each node's cotangent
    a2: jax.Array  # (BL,) V row of each binary node's second argument
    a2c: jax.Array  # (BL,)


def _run_index(arrays, count: int, lo, hi, blo, bhi) -> _LevelIndex:
    """A run's index arrays with a leading level axis (count, L) / (count, BL)."""
    size, bsize = hi - lo, bhi - blo

    def rows(name, start, width):
        return arrays[name][start:start + count * width].reshape(count, width)

    return _LevelIndex(rows("a1", lo, size), rows("a1c", lo, size), rows("code", lo, size), rows("kpos", lo, size),
                       rows("a2", blo, bsize), rows("a2c", blo, bsize))


def _level_args(idx: _LevelIndex, v, cvals):
    """A level's first arguments (one gather of value rows) and binary second arguments; constants broadcast in."""
    def args(rows, cidx):
        return jnp.where((cidx >= 0)[:, None], cvals[cidx][:, None], v[rows])

    return args(idx.a1, idx.a1c), (args(idx.a2, idx.a2c) if idx.a2.shape[0] else None)


def _level_out(groups, lo, idx: _LevelIndex, a, b, mixed_ops):
    """A level's outputs per group ((rows, N) each, in row order), its groups applied to their slices of the
    arguments."""
    outs = []
    for g, glo, ghi in groups:
        s = slice(glo - lo, ghi - lo)
        outs.append(_group_apply(g, a[s], b[s] if g in _BINARY_GROUPS else None, idx.code[s], mixed_ops))
    return outs


def _level_cotangents(groups, lo, idx: _LevelIndex, a, b, ct, mixed_ops):
    """A level's contributions to its first arguments and binary second arguments, per group (in row order; the
    second list only for binary groups)."""
    to_a, to_b = [], []
    for g, glo, ghi in groups:
        s = slice(glo - lo, ghi - lo)
        da, db = _group_derivs(g, a[s], b[s] if g in _BINARY_GROUPS else None, idx.code[s], mixed_ops)
        to_a.append(ct[s] * da)
        if g in _BINARY_GROUPS:
            to_b.append(ct[s] * db)
    return to_a, to_b


def _stacked_rows(parts, rows: int):
    """A (rows, N) buffer starting with ``parts`` (row blocks), zeros below: written into a zeroed buffer rather than
    concatenated with a block of zeros (XLA:CPU writes a concatenation element by element)."""
    return _write_rows(jnp.zeros((rows,) + parts[0].shape[1:], parts[0].dtype), parts, 0)


def _write_rows(buf, parts, start):
    """``parts`` (row blocks) written into ``buf`` one after another from row ``start``: one in-place write per block,
    not one write of their concatenation (XLA:CPU fuses a concatenation into the write as a slower per-element loop:
    BENCHMARKS.md, "one write per group")."""
    for part in parts:
        buf = jax.lax.dynamic_update_slice_in_dim(buf, part, start, axis=0)
        start = start + part.shape[0]
    return buf


def _over_run(level, carry, count: int, index: _LevelIndex, reverse: bool = False):
    """``level(carry, (i, index of level i)) -> (carry, None)`` over the ``count`` levels of a run: one ``lax.scan``
    (the level's code once in the program), or for a lone level a plain call (static offsets: in-place writes)."""
    if count == 1:
        return level(carry, (0, jax.tree_util.tree_map(lambda a: a[0], index)))[0]
    return jax.lax.scan(level, carry, (jnp.arange(count), index), reverse=reverse)[0]


def _forward(sig: TapeSignature, arrays, consts_ExP, x_NxD):
    """Value buffer V (every node's output) and the constants per slot: all the reverse pass needs.

    The gathered arguments are not kept: the reverse pass gathers them again from V, which is cheaper on CPU than
    writing and re-reading them (the gathers fuse into the operators). A run of identical levels is one
    ``lax.scan`` (the level's code once in the program), a lone level is written out.
    """
    dtype = x_NxD.dtype
    n = x_NxD.shape[0]
    cvals = consts_ExP.reshape(-1).astype(dtype)[arrays["c_idx"]]
    v = _stacked_rows([jnp.full((1, n), 0.5, dtype), x_NxD.T], 1 + x_NxD.shape[1] + sig.n_nodes_padded)
    cvals = jnp.concatenate([cvals, jnp.zeros((1,), dtype)])  # index -1: not a constant (value unused)
    for count, (lo, hi, blo, bhi, groups) in sig.runs:
        index = _run_index(arrays, count, lo, hi, blo, bhi)

        def level(v, i_idx, lo=lo, hi=hi, groups=groups):
            i, idx = i_idx
            outs = _level_out(groups, lo, idx, *_level_args(idx, v, cvals), sig.mixed_ops)
            return _write_rows(v, outs, sig.node_base + lo + i * (hi - lo)), None

        v = _over_run(level, v, count, index)
    return v, cvals


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def run_tape(sig: TapeSignature, arrays, consts_ExP, x_NxD):
    """Traced evaluation for ONE dataset (arrays without the dataset axis): returns (E_b, N) predictions.

    Reverse mode is hand-written (``_reverse``): every value has exactly one user, so each level's cotangents are
    one gather from the K buffer, and its contributions to its arguments in-place writes (no scatter).
    """
    return _roots(sig, arrays, consts_ExP, _forward(sig, arrays, consts_ExP, x_NxD)[0])


def _roots(sig, arrays, consts_ExP, v):
    """Predictions: the root rows of V; an expression that is a single constant reads its constant."""
    rc = arrays["root_c"]
    cv = consts_ExP.reshape(-1).astype(v.dtype)[jnp.maximum(rc, 0)]
    return jnp.where((rc >= 0)[:, None], cv[:, None], v[arrays["roots"]])


def _run_tape_fwd(sig, arrays, consts_ExP, x_NxD):
    v, cvals = _forward(sig, arrays, consts_ExP, x_NxD)
    return _roots(sig, arrays, consts_ExP, v), ((v, cvals), arrays, consts_ExP.shape)


def _reverse(sig, arrays, saved, ct_ExN):
    """Reverse sweep, top level first: the K buffer of ``_fill`` (per level one gather, and one in-place write per
    group; a run of identical levels is one reversed ``lax.scan``)."""
    v, cvals = saved
    dtype = v.dtype
    n = ct_ExN.shape[1]
    e_b, n_nodes = sig.n_expressions, sig.n_nodes_padded
    k_buf = _stacked_rows([jnp.zeros((1, n), dtype), ct_ExN.astype(dtype)], 1 + e_b + n_nodes + sig.n_binary)
    for count, (lo, hi, blo, bhi, groups) in reversed(sig.runs):
        index = _run_index(arrays, count, lo, hi, blo, bhi)

        def level(k_buf, i_idx, lo=lo, hi=hi, blo=blo, bhi=bhi, groups=groups):
            i, idx = i_idx
            a, b = _level_args(idx, v, cvals)  # the level's outputs are not read: see _group_derivs
            to_a, to_b = _level_cotangents(groups, lo, idx, a, b, k_buf[idx.kpos], sig.mixed_ops)
            k_buf = _write_rows(k_buf, to_a, 1 + e_b + lo + i * (hi - lo))
            if to_b:
                k_buf = _write_rows(k_buf, to_b, 1 + e_b + n_nodes + blo + i * (bhi - blo))
            return k_buf, None

        k_buf = _over_run(level, k_buf, count, index, reverse=True)
    return k_buf


def _finite_or_zero(k):
    """Leaf cotangents per point, zero where a non-finite value (of this candidate's own tree) reached them."""
    return jnp.where(jnp.isfinite(k), k, 0.0)


def _run_tape_bwd(sig, res, ct_ExN):
    saved, arrays, cshape = res
    k_buf = _reverse(sig, arrays, saved, ct_ExN)
    dtype = k_buf.dtype
    ct_cs = jnp.sum(_finite_or_zero(k_buf[arrays["c_kpos"]]), axis=1)
    ct_c = jnp.zeros(cshape[0] * cshape[1], dtype).at[arrays["c_idx"]].add(ct_cs).reshape(cshape)
    ct_x = jax.ops.segment_sum(_finite_or_zero(k_buf[arrays["f_kpos"]]), arrays["f_id"],
                               num_segments=sig.n_features).T
    int_ct = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, jax.dtypes.float0), arrays)
    return int_ct, ct_c, ct_x


run_tape.defvjp(_run_tape_fwd, _run_tape_bwd)


@functools.lru_cache(maxsize=64)
def _evaluate_program(sig: TapeSignature, dtype: np.dtype):
    """Jitted evaluation for one tape signature and dtype (call it under ``precision(dtype)``)."""
    def f(arrays, consts, x):
        COMPILE_COUNTER["evaluate"] += 1  # runs at trace time only
        return jax.vmap(functools.partial(run_tape, sig))(arrays, consts, x)

    return jax.jit(f)


def validate_x(X, name: str = "X") -> np.ndarray:
    x = np.asarray(X)
    if np.iscomplexobj(x):
        raise ValueError(f"{name} is complex ({x.dtype}); expressions are evaluated on real inputs: pass "
                         f"{name}.real if the imaginary part is meant to be dropped")
    if x.dtype == object or not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{name} must be a numeric array, got dtype {x.dtype}")
    if x.ndim == 1:
        raise ValueError(f"{name} must have shape (N, D) (use X[:, None] for one feature), got shape {x.shape}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {x.shape}")
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"{name} contains NaN or inf (first at row {bad[0]}, column {bad[1]}); drop or impute "
                         "those rows first")
    return x


def pad_points(x_NxD: np.ndarray, n_b: int) -> np.ndarray:
    """Pad rows to n_b by repeating row 0 (finite wherever real rows are), so padding never creates NaNs."""
    n = x_NxD.shape[0]
    if n == n_b:
        return x_NxD
    return np.concatenate([x_NxD, np.repeat(x_NxD[:1], n_b - n, axis=0)])


def device_arrays(tape: Tape, dtype):
    return {k: jnp.asarray(v) for k, v in tape.arrays.items()}, jnp.asarray(tape.consts, dtype)


def evaluate(expressions: Sequence, X, dtype=None) -> jax.Array:
    """Values of every expression on every row of X: an (n_expressions, N) array, one jitted call.

    ``expressions``: Expression objects or prefix token lists (floats are constants). ``X``: (N, D) real, finite
    array. ``dtype``: None (default) or float64 computes in float64 inside a scoped ``jax.enable_x64`` (the global
    ``jax_enable_x64`` setting is left unchanged) and returns a float64 array; float32 on request (X must then fit
    float32). Out-of-domain points are NaN/inf, never errors.
    """
    x = validate_x(X)
    if isinstance(expressions, Expression):
        raise ValueError("evaluate expects a list of expressions; wrap a single one as [expr]")
    dtype = resolve_dtype(dtype)
    check_range(x, "X", dtype)
    tape = compile_tape([list(expressions)], x.shape[1])
    n = x.shape[0]
    xb = pad_points(x, point_bucket(n))
    with precision(dtype):
        arrays, consts = device_arrays(tape, dtype)
        out = _evaluate_program(tape.signature, dtype)(arrays, consts, jnp.asarray(xb, dtype)[None])
        return out[0, : tape.n_expressions[0], :n]
