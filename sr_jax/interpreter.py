"""Batched JAX interpreter: many different expressions on the same points in one jitted call.

Why this design (see issue 3's measured trap): a stack machine vmapped over candidates evaluates every operator at
every node. Here the whole batch is compiled on the host into one *tape*:

* a value buffer ``V`` of shape (slots, N): slot 0 holds a safe value (0.5) used by padding, slot 1 is a trash
  slot padding writes to, then one slot per input column, one per constant (``consts`` is an input array, so
  refinement can differentiate w.r.t. it), and one per internal node;
* internal nodes grouped by (height, group): at each height one "cheap" group holds add/sub/mul/div/inv/abs/
  pow2/pow3 nodes (a per-node select among a few flops, cheaper than more gathers), and every transcendental
  operator (sqrt, log, exp, sin, cos, tan, arcsin, arccos, arctan, pow) present at that height gets its own group,
  so a transcendental is computed only for nodes that use it. Each group: gather arguments -> apply -> scatter.
* reverse mode is a hand-written reverse tape (custom_vjp) with one in-place cotangent buffer.

Every size is rounded up to a bucket (powers of two and 1.5x powers of two), and the static structure is
``TapeSignature`` (bucketed sizes + the (height, group, capacity) list). A second batch with the same signature reuses
the compiled program; ``COMPILE_COUNTER`` counts traces. Operator derivatives are where-guarded (zero where the
value or the derivative is non-finite), so NaN/inf of one candidate never leaks into anyone's gradient.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .expressions import OPERATORS, Expression, variable_index

COMPILE_COUNTER = {"evaluate": 0, "refine": 0}
_SAFE, _TRASH, _FIRST_FEATURE = 0, 1, 2
_OP_ORDER = tuple(OPERATORS)  # fixed operator order for signatures


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest size >= n of the form 2**k or 3 * 2**(k-1) (1, 2, 3, 4, 6, 8, 12, 16, 24, ...)."""
    n = max(int(n), minimum)
    p = 1
    while p < n:
        if p >= 2 and p + p // 2 >= n:
            return p + p // 2
        p *= 2
    return p


def default_float_dtype():
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


# ----- cheap arithmetic merged into one group per level ----------------------------------------------------------
CHEAP_OPS = ("add", "sub", "mul", "div", "inv", "abs", "pow2", "pow3")
_CHEAP_CODE = {op: i for i, op in enumerate(CHEAP_OPS)}


def _cheap_fwd(a, b, code):
    cases = [a + b, a - b, a * b, a / b, 1.0 / a, jnp.abs(a), a * a, a * a * a]
    return jax.lax.select_n(code, *cases)


# ----- host-side compilation ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TapeSignature:
    """Static structure of a compiled batch: everything that, if changed, needs a new XLA program.

    ``groups`` is ((level, group, offset, capacity), ...): at each level, one group holds the cheap arithmetic
    nodes ("cheap") and every transcendental operator present at that level gets its own group, padded to a
    bucketed capacity; offset/capacity index the flat node arrays.
    """

    n_datasets: int
    n_features: int
    n_expressions: int  # bucketed
    n_consts: int  # constants per expression, bucketed
    n_internal: int  # internal-node slots, bucketed
    groups: tuple

    @property
    def n_slots(self) -> int:
        return _FIRST_FEATURE + self.n_features + self.n_expressions * self.n_consts + self.n_internal

    @property
    def n_nodes_padded(self) -> int:
        return sum(g[3] for g in self.groups)


@dataclasses.dataclass(frozen=True)
class Tape:
    """Host-compiled batch (numpy arrays with a leading dataset axis) plus its static signature."""

    signature: TapeSignature
    arrays: dict  # out, a1, a2, code: (B, n_nodes_padded); roots: (B, E_b)
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
                f"expression {i}{where} uses x_{e.n_variables_needed - 1} but X has only {n_features} columns; "
                "pass X with more columns or drop the expression"
            )
        out.append(e)
    if not out:
        raise ValueError(f"no expressions given{where}")
    return out


def _layout(exprs: list[Expression], n_features: int, e_b: int, p_b: int):
    """Per-dataset internal nodes grouped by (level, group) as (out, a1, a2, code), roots and constants."""
    const_base = _FIRST_FEATURE + n_features
    int_base = const_base + e_b * p_b
    groups: dict = {}
    roots = np.zeros(e_b, np.int32)
    consts = np.zeros((e_b, p_b))
    n_consts = np.zeros(e_b, np.int32)
    n_int = 0
    for i, e in enumerate(exprs):
        n_c = sum(isinstance(t, float) for t in e.tokens)
        j = n_c  # constants are numbered in prefix order; the walk below is reversed
        stack = []  # (slot, level)
        for t in reversed(e.tokens):
            if isinstance(t, float):
                j -= 1
                consts[i, j] = t
                stack.append((const_base + i * p_b + j, 0))
            elif t in OPERATORS:
                args = [stack.pop() for _ in range(OPERATORS[t].arity)]
                level = 1 + max(a[1] for a in args)
                slot = int_base + n_int
                n_int += 1
                a2 = args[1][0] if len(args) > 1 else _SAFE
                key = (level, "cheap" if t in _CHEAP_CODE else t)
                groups.setdefault(key, []).append((slot, args[0][0], a2, _CHEAP_CODE.get(t, 0)))
                stack.append((slot, level))
            else:
                stack.append((_FIRST_FEATURE + variable_index(t), 0))
        roots[i] = stack[0][0]
        n_consts[i] = n_c
    return groups, roots, consts, n_consts, n_int


_GROUP_ORDER = {g: i for i, g in enumerate(("cheap",) + tuple(o for o in OPERATORS if o not in CHEAP_OPS))}


def compile_tape(expressions_per_dataset: Sequence[Sequence], n_features: int, min_expressions: int = 1) -> Tape:
    """Compile B lists of expressions (one per dataset) into one padded tape with a common signature."""
    multi = len(expressions_per_dataset) > 1
    dsets = [_check_expressions(list(ex), n_features, f" of dataset {b}" if multi else "")
             for b, ex in enumerate(expressions_per_dataset)]
    e_b = bucket(max(len(d) for d in dsets), max(min_expressions, 1))
    p_b = bucket(max(len(e.constants) for d in dsets for e in d), 1)
    layouts = [_layout(d, n_features, e_b, p_b) for d in dsets]
    n_int_b = bucket(max(l[4] for l in layouts) + 1)
    keys = sorted({k for l in layouts for k in l[0]}, key=lambda k: (k[0], _GROUP_ORDER[k[1]]))
    groups, offset = [], 0
    for level, g in keys:
        cap = bucket(max(len(l[0].get((level, g), ())) for l in layouts), 4)
        groups.append((level, g, offset, cap))
        offset += cap
    sig = TapeSignature(len(dsets), n_features, e_b, p_b, n_int_b, tuple(groups))
    b_n = len(dsets)
    out = np.full((b_n, offset), _TRASH, np.int32)
    a1 = np.full((b_n, offset), _SAFE, np.int32)
    a2 = np.full((b_n, offset), _SAFE, np.int32)
    code = np.zeros((b_n, offset), np.int32)
    for b, lay in enumerate(layouts):
        for level, g, off, cap in groups:
            lst = lay[0].get((level, g), [])
            if lst:
                arr = np.array(lst, np.int32).T
                out[b, off:off + len(lst)], a1[b, off:off + len(lst)] = arr[0], arr[1]
                a2[b, off:off + len(lst)], code[b, off:off + len(lst)] = arr[2], arr[3]
    arrays = {"out": out, "a1": a1, "a2": a2, "code": code, "roots": np.stack([l[1] for l in layouts])}
    consts = np.stack([l[2] for l in layouts])
    n_consts = np.stack([l[3] for l in layouts])
    return Tape(sig, arrays, consts, n_consts, tuple(len(d) for d in dsets), tuple(tuple(d) for d in dsets))


# ----- device-side evaluation --------------------------------------------------------------------------------------
def _group_apply(g, a, b, code):
    if g == "cheap":
        return _cheap_fwd(a, b, jnp.broadcast_to(code[:, None], a.shape))
    fn = _RAW_OPS[g]
    return fn(a, b) if OPERATORS[g].arity == 2 else fn(a)


def _group_derivs(g, a, b, out, code):
    """Local derivatives (d out/d a, d out/d b), zeroed where the output or the derivative is not finite."""
    if g == "cheap":
        code = jnp.broadcast_to(code[:, None], a.shape)
        one, zero = jnp.ones_like(a), jnp.zeros_like(a)
        da = jax.lax.select_n(code, one, one, b, 1.0 / b, -out * out, jnp.sign(a), 2.0 * a, 3.0 * a * a)
        db = jax.lax.select_n(code, one, -one, a, -out / b, zero, zero, zero, zero)
    else:
        ds = _RAW_DERIVS[g](a, b, out)
        da, db = ds[0], (ds[1] if len(ds) > 1 else None)
    ok = jnp.isfinite(out)
    da = jnp.where(ok & jnp.isfinite(da), da, 0.0)
    db = None if db is None else jnp.where(ok & jnp.isfinite(db), db, 0.0)
    return da, db


_RAW_OPS = {"pow": jnp.power, "sqrt": jnp.sqrt, "log": jnp.log, "exp": jnp.exp, "sin": jnp.sin, "cos": jnp.cos,
            "tan": jnp.tan, "arcsin": jnp.arcsin, "arccos": jnp.arccos, "arctan": jnp.arctan}
_RAW_DERIVS = {
    "pow": lambda a, b, o: (b * jnp.power(a, b - 1.0), o * jnp.log(a)),
    "sqrt": lambda a, b, o: (0.5 / o,),
    "log": lambda a, b, o: (1.0 / a,),
    "exp": lambda a, b, o: (o,),
    "sin": lambda a, b, o: (jnp.cos(a),),
    "cos": lambda a, b, o: (-jnp.sin(a),),
    "tan": lambda a, b, o: (1.0 + o * o,),
    "arcsin": lambda a, b, o: (1.0 / jnp.sqrt(1.0 - a * a),),
    "arccos": lambda a, b, o: (-1.0 / jnp.sqrt(1.0 - a * a),),
    "arctan": lambda a, b, o: (1.0 / (1.0 + a * a),),
}


def _forward_buffer(sig: TapeSignature, arrays, consts_ExP, x_NxD):
    dtype = x_NxD.dtype
    n = x_NxD.shape[0]
    v = jnp.concatenate([
        jnp.full((1, n), 0.5, dtype),
        jnp.zeros((1, n), dtype),
        x_NxD.T,
        jnp.broadcast_to(consts_ExP.reshape(-1, 1).astype(dtype), (sig.n_expressions * sig.n_consts, n)),
        jnp.full((sig.n_internal, n), 0.5, dtype),
    ])
    for level, g, off, cap in sig.groups:
        sl = slice(off, off + cap)
        vals = _group_apply(g, v[arrays["a1"][sl]], v[arrays["a2"][sl]], arrays["code"][sl])
        v = v.at[arrays["out"][sl]].set(vals, mode="promise_in_bounds")
    return v


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def run_tape(sig: TapeSignature, arrays, consts_ExP, x_NxD):
    """Traced evaluation for ONE dataset (arrays without the dataset axis): returns (E_b, N) predictions.

    Reverse mode uses a hand-written reverse tape (one cotangent buffer updated in place, group by group in
    reverse order); autodiff of the forward scatters would materialise a full-size cotangent per gather.
    """
    return _forward_buffer(sig, arrays, consts_ExP, x_NxD)[arrays["roots"]]


def _run_tape_fwd(sig, arrays, consts_ExP, x_NxD):
    v = _forward_buffer(sig, arrays, consts_ExP, x_NxD)
    return v[arrays["roots"]], (v, arrays)


def _run_tape_bwd(sig, res, ct_ExN):
    v, arrays = res
    ct = jnp.zeros_like(v).at[arrays["roots"]].add(ct_ExN.astype(v.dtype))
    for level, g, off, cap in reversed(sig.groups):
        sl = slice(off, off + cap)
        o, i1, i2 = arrays["out"][sl], arrays["a1"][sl], arrays["a2"][sl]
        ct_o = ct[o]
        da, db = _group_derivs(g, v[i1], v[i2], v[o], arrays["code"][sl])
        ct = ct.at[i1].add(ct_o * da)
        if db is not None:
            ct = ct.at[i2].add(ct_o * db)
    f0 = _FIRST_FEATURE
    ct_x = ct[f0:f0 + sig.n_features].T
    c0 = f0 + sig.n_features
    ct_c = ct[c0:c0 + sig.n_expressions * sig.n_consts].sum(axis=1).reshape(sig.n_expressions, sig.n_consts)
    int_ct = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, jax.dtypes.float0), arrays)
    return int_ct, ct_c, ct_x


run_tape.defvjp(_run_tape_fwd, _run_tape_bwd)


@functools.lru_cache(maxsize=64)
def _evaluate_program(sig: TapeSignature, x64: bool):
    def f(arrays, consts, x):
        COMPILE_COUNTER["evaluate"] += 1  # runs at trace time only
        return jax.vmap(functools.partial(run_tape, sig))(arrays, consts, x)

    return jax.jit(f)


def validate_x(X, name: str = "X") -> np.ndarray:
    x = np.asarray(X)
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

    ``expressions``: Expression objects or prefix token lists (floats are constants). ``X``: (N, D) finite array.
    float32 by default, float64 when ``jax_enable_x64`` is on. Out-of-domain points are NaN/inf, never errors.
    """
    x = validate_x(X)
    if isinstance(expressions, Expression):
        raise ValueError("evaluate expects a list of expressions; wrap a single one as [expr]")
    dtype = dtype or default_float_dtype()
    tape = compile_tape([list(expressions)], x.shape[1])
    n = x.shape[0]
    xb = pad_points(x, bucket(n, 8))
    arrays, consts = device_arrays(tape, dtype)
    out = _evaluate_program(tape.signature, bool(jax.config.jax_enable_x64))(
        arrays, consts, jnp.asarray(xb, dtype)[None])
    return out[0, : tape.n_expressions[0], :n]
