"""The operator table: everything the package knows about each operator, in one place.

Every module reads this table instead of keeping its own list: ``Expression`` (numpy evaluation, sympy, infix and
LaTeX printing and parsing), the JAX tape interpreter (forward functions, local derivatives for its reverse pass,
membership and code of its "cheap" select group), the generator (arity, validation, floating-point domain checks),
the decoder vocabulary (one id per operator, in table order) and the numpy reference objective of
``benchmarks/refine.py``. Adding an operator is one ``Operator(...)`` entry below.

Order matters and is part of the interface: decoder vocabulary ids, the interpreter's group order and cheap codes
follow the table order, so new operators go at the end.

Fields that hold functions take arrays: ``np_fn(*args)`` (float64 numpy, IEEE semantics: NaN/inf, never an
error), ``jax_fn(*args)`` (jax.numpy), ``derivative(xp, a, b)`` -> one local derivative per argument
(``d out / d a`` and for binary operators ``d out / d b``) written against the array namespace ``xp`` (``numpy`` or
``jax.numpy``), where ``b`` is None for unary operators. Derivatives are functions of the arguments only, never of
the operator's output (``exp`` recomputes ``exp(a)``): the interpreter's reverse pass then reads only the
arguments, which XLA compiles to a much cheaper program (BENCHMARKS.md, "one evaluation").
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np
import sympy


@dataclasses.dataclass(frozen=True)
class Operator:
    """One operator and every form it takes in the package.

    ``infix`` / ``latex``: format strings with ``{0}`` (and ``{1}``) for the printed arguments; the parsers read
    them back. ``function_syntax``: written ``name(a)`` in infix text (and accepted as ``\\operatorname{name}`` in
    LaTeX); ``aliases``: other names read by the parsers as this operator (``ln`` for log); ``latex_commands``: TeX
    commands (without the backslash) that apply this operator to the following argument (``\\sin a``).
    ``sympy_head``: the sympy node class read back as this operator (n-ary Add/Mul become nested binary nodes);
    ``sympy_exponent``: for unary powers, the fixed exponent of the ``Pow`` node sympy makes of it (inv: -1,
    sqrt: 1/2, pow2: 2, pow3: 3). ``cheap``: evaluated by the interpreter in its per-level select group (a few
    flops, cheaper than a group of its own); its code there is its index among the cheap operators in table order.
    ``domain_error(*args)``: True where the reference generator's ``seterr(all="raise")`` evaluation fails for
    this operator (log of x <= 0, division by zero, ...); None if it never does.
    """

    name: str
    arity: int
    np_fn: Callable
    jax_fn: Callable
    derivative: Callable
    sympy_fn: Callable
    infix: str
    latex: str
    sympy_head: Optional[type] = None
    sympy_exponent: Optional[sympy.Rational] = None
    function_syntax: bool = False
    aliases: tuple = ()
    latex_commands: tuple = ()
    cheap: bool = False
    domain_error: Optional[Callable] = None


def _np_inv(a):
    return np.divide(1.0, a)


def _np_pow3(a):
    return a * a * a


def _div_derivative(xp, a, b):
    r = 1.0 / b
    return r, -(a * r) * r


def _inv_derivative(xp, a, b):
    r = 1.0 / a
    return (-r * r,)


def _outside_unit_interval(a):
    return bool((np.abs(a) > 1).any())


OPERATORS: dict[str, Operator] = {
    op.name: op
    for op in [
        Operator("add", 2, np.add, lambda a, b: a + b,
                 lambda xp, a, b: (xp.ones_like(a), xp.ones_like(a)),
                 lambda a, b: a + b, "({0} + {1})", "\\left({0} + {1}\\right)", sympy_head=sympy.Add, cheap=True),
        Operator("sub", 2, np.subtract, lambda a, b: a - b,
                 lambda xp, a, b: (xp.ones_like(a), -xp.ones_like(a)),
                 lambda a, b: a - b, "({0} - {1})", "\\left({0} - {1}\\right)", cheap=True),
        Operator("mul", 2, np.multiply, lambda a, b: a * b,
                 lambda xp, a, b: (b, a),
                 lambda a, b: a * b, "({0} * {1})", "\\left({0} \\cdot {1}\\right)", sympy_head=sympy.Mul,
                 cheap=True),
        Operator("div", 2, np.divide, lambda a, b: a / b,
                 _div_derivative,
                 lambda a, b: a / b, "({0} / {1})", "\\frac{{{0}}}{{{1}}}", cheap=True,
                 domain_error=lambda a, b: bool((b == 0).any())),
        Operator("pow", 2, np.power, jnp.power,
                 lambda xp, a, b: (b * xp.power(a, b - 1.0), xp.power(a, b) * xp.log(a)),
                 lambda a, b: a**b, "({0} ** {1})", "\\left({0}\\right)^{{{1}}}", sympy_head=sympy.Pow),
        Operator("inv", 1, _np_inv, lambda a: 1.0 / a,
                 _inv_derivative,
                 lambda a: 1 / a, "(1 / {0})", "\\frac{{1}}{{{0}}}", sympy_exponent=sympy.Integer(-1), cheap=True,
                 domain_error=lambda a: bool((a == 0).any())),
        Operator("abs", 1, np.abs, jnp.abs,
                 lambda xp, a, b: (xp.sign(a),),
                 sympy.Abs, "abs({0})", "\\left|{0}\\right|", sympy_head=sympy.Abs, function_syntax=True,
                 cheap=True),
        Operator("sqrt", 1, np.sqrt, jnp.sqrt,
                 lambda xp, a, b: (0.5 / xp.sqrt(a),),
                 sympy.sqrt, "sqrt({0})", "\\sqrt{{{0}}}", sympy_exponent=sympy.Rational(1, 2),
                 function_syntax=True, domain_error=lambda a: bool((a < 0).any())),
        Operator("log", 1, np.log, jnp.log,
                 lambda xp, a, b: (1.0 / a,),
                 sympy.log, "log({0})", "\\log{{\\left({0}\\right)}}", sympy_head=sympy.log, function_syntax=True,
                 aliases=("ln",), latex_commands=("log", "ln"), domain_error=lambda a: bool((a <= 0).any())),
        Operator("exp", 1, np.exp, jnp.exp,
                 lambda xp, a, b: (xp.exp(a),),
                 sympy.exp, "exp({0})", "e^{{{0}}}", sympy_head=sympy.exp, function_syntax=True,
                 latex_commands=("exp",)),
        Operator("sin", 1, np.sin, jnp.sin,
                 lambda xp, a, b: (xp.cos(a),),
                 sympy.sin, "sin({0})", "\\sin{{\\left({0}\\right)}}", sympy_head=sympy.sin, function_syntax=True,
                 latex_commands=("sin",)),
        Operator("cos", 1, np.cos, jnp.cos,
                 lambda xp, a, b: (-xp.sin(a),),
                 sympy.cos, "cos({0})", "\\cos{{\\left({0}\\right)}}", sympy_head=sympy.cos, function_syntax=True,
                 latex_commands=("cos",)),
        Operator("tan", 1, np.tan, jnp.tan,
                 lambda xp, a, b: (1.0 + xp.tan(a) ** 2,),
                 sympy.tan, "tan({0})", "\\tan{{\\left({0}\\right)}}", sympy_head=sympy.tan, function_syntax=True,
                 latex_commands=("tan",)),
        Operator("arcsin", 1, np.arcsin, jnp.arcsin,
                 lambda xp, a, b: (1.0 / xp.sqrt(1.0 - a * a),),
                 sympy.asin, "arcsin({0})", "\\arcsin{{\\left({0}\\right)}}", sympy_head=sympy.asin,
                 function_syntax=True, aliases=("asin",), latex_commands=("arcsin",),
                 domain_error=_outside_unit_interval),
        Operator("arccos", 1, np.arccos, jnp.arccos,
                 lambda xp, a, b: (-1.0 / xp.sqrt(1.0 - a * a),),
                 sympy.acos, "arccos({0})", "\\arccos{{\\left({0}\\right)}}", sympy_head=sympy.acos,
                 function_syntax=True, aliases=("acos",), latex_commands=("arccos",),
                 domain_error=_outside_unit_interval),
        Operator("arctan", 1, np.arctan, jnp.arctan,
                 lambda xp, a, b: (1.0 / (1.0 + a * a),),
                 sympy.atan, "arctan({0})", "\\arctan{{\\left({0}\\right)}}", sympy_head=sympy.atan,
                 function_syntax=True, aliases=("atan",), latex_commands=("arctan",)),
        Operator("pow2", 1, np.square, lambda a: a * a,
                 lambda xp, a, b: (2.0 * a,),
                 lambda a: a**2, "({0} ** 2)", "\\left({0}\\right)^{{2}}", sympy_exponent=sympy.Integer(2),
                 cheap=True),
        Operator("pow3", 1, _np_pow3, lambda a: a * a * a,
                 lambda xp, a, b: (3.0 * a * a,),
                 lambda a: a**3, "({0} ** 3)", "\\left({0}\\right)^{{3}}", sympy_exponent=sympy.Integer(3),
                 cheap=True),
    ]
}
BINARY_OPERATORS = tuple(n for n, o in OPERATORS.items() if o.arity == 2)
UNARY_OPERATORS = tuple(n for n, o in OPERATORS.items() if o.arity == 1)
CHEAP_OPERATORS = tuple(n for n, o in OPERATORS.items() if o.cheap)  # the interpreter's select group, code order

# names the text parsers read as a unary function application ``name(a)`` (infix) / ``\operatorname{name}``
FUNCTION_NAMES: dict[str, str] = {
    **{n: n for n, o in OPERATORS.items() if o.function_syntax},
    **{alias: n for n, o in OPERATORS.items() for alias in o.aliases},
}
# TeX commands ``\cmd a`` that apply an operator (``\sqrt`` and ``\frac`` have their own syntax in the parser)
LATEX_COMMANDS: dict[str, str] = {cmd: n for n, o in OPERATORS.items() for cmd in o.latex_commands}
# sympy node classes read back as an operator, and the fixed exponents of unary powers
SYMPY_HEADS: dict[type, str] = {o.sympy_head: n for n, o in OPERATORS.items() if o.sympy_head is not None}
SYMPY_EXPONENTS: dict = {o.sympy_exponent: n for n, o in OPERATORS.items() if o.sympy_exponent is not None}
