"""Symbolic expressions as prefix token sequences.

One representation serves the generator, the tokenizer, the JAX interpreter and refinement: a tuple of prefix
tokens where operators and variables are strings (``"add"``, ``"x_0"``) and constants are Python floats.
Conversions to/from sympy, infix text and LaTeX live here, plus a float64 numpy evaluator that is the reference
semantics for the JAX interpreter (IEEE behaviour: ``log`` of a negative is NaN, ``1/0`` is inf, never an error).
What each operator is (its functions, printed forms, names in text and sympy) comes from ``sr_jax.operators``.
Trees of any depth work everywhere, the text parsers included (they keep their pending work on an explicit
stack, not Python's); only sympy itself recurses, and ``to_sympy`` turns its depth limit into a one-line ValueError.
"""
from __future__ import annotations

import contextlib
import decimal
import math
import re
import sys
from typing import Callable, Generator, Iterable, Sequence, Union

import numpy as np
import sympy

# the operator table lives in sr_jax.operators; its names are re-exported here, where they were first defined
from .operators import BINARY_OPERATORS, OPERATORS, UNARY_OPERATORS, Operator  # noqa: F401
from .operators import FUNCTION_NAMES, LATEX_COMMANDS, SYMPY_EXPONENTS, SYMPY_HEADS

Token = Union[str, float]

MAX_VARIABLES = 10
VARIABLES = tuple(f"x_{i}" for i in range(MAX_VARIABLES))
_VAR_INDEX = {v: i for i, v in enumerate(VARIABLES)}


def variable_index(token: str) -> int | None:
    """Index of a variable token ``x_i`` (0 <= i < 10), else None."""
    return _VAR_INDEX.get(token) if isinstance(token, str) else None


def _check_token(tok, position: int) -> Token:
    if type(tok) is float:  # the common cases first (same results as below)
        return tok
    if type(tok) is str and (tok in OPERATORS or tok in _VAR_INDEX):
        return tok
    if isinstance(tok, (bool, np.bool_)):
        raise ValueError(f"token {tok!r} at position {position} is a bool, not an operator, variable or number")
    if isinstance(tok, (int, float, np.integer, np.floating)):
        return float(tok)
    if not isinstance(tok, str):
        raise ValueError(f"token {tok!r} at position {position} has unsupported type {type(tok).__name__}")
    if tok in OPERATORS or variable_index(tok) is not None:
        return tok
    try:
        return float(tok)
    except ValueError:
        raise ValueError(
            f"unknown symbol {tok!r} at position {position}; expected one of the operators "
            f"{sorted(OPERATORS)}, a variable x_0..x_{MAX_VARIABLES - 1}, or a number"
        ) from None


class Expression:
    """An expression as a validated prefix sequence; floats are constants.

    ``Expression(["add", 1.5, "mul", 2.0, "x_0"])`` is 1.5 + 2*x_0. Numeric strings are accepted as constants.
    Construction checks that the sequence is exactly one complete tree and names the offending token otherwise.
    """

    __slots__ = ("tokens", "_hash", "_n_variables")

    def __init__(self, tokens: Iterable):
        toks = tuple(_check_token(t, i) for i, t in enumerate(tokens))
        if not toks:
            raise ValueError("empty token sequence: an expression needs at least one token")
        need = 1
        for i, t in enumerate(toks):
            if need == 0:
                raise ValueError(
                    f"malformed prefix sequence: token {t!r} at position {i} follows an already complete expression "
                    f"(the tree ended at position {i - 1})"
                )
            need += (OPERATORS[t].arity if isinstance(t, str) and t in OPERATORS else 0) - 1
        if need > 0:
            raise ValueError(
                f"malformed prefix sequence: incomplete expression, {need} operand(s) missing after the last token "
                f"{toks[-1]!r}"
            )
        self.tokens: tuple[Token, ...] = toks
        self._hash = None
        self._n_variables = None

    # ----- basic structure -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other) -> bool:
        return isinstance(other, Expression) and self.tokens == other.tokens

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(self.tokens)
        return self._hash

    def __repr__(self) -> str:
        return f"Expression({self.infix()!r})"

    @property
    def n_nodes(self) -> int:
        """Complexity as in the original: prefix node count, a float constant counts as one node."""
        return len(self.tokens)

    @property
    def depth(self) -> int:
        """Height of the tree: 1 for a single leaf, 1 + the deepest argument's for an operator."""
        return self._fold(lambda t: 1, lambda op, a: 1 + max(a))

    @property
    def constants(self) -> np.ndarray:
        return np.array([t for t in self.tokens if isinstance(t, float)], dtype=np.float64)

    @property
    def variables(self) -> tuple[int, ...]:
        return tuple(sorted({_VAR_INDEX[t] for t in set(self.tokens) if t in _VAR_INDEX}))

    @property
    def n_variables_needed(self) -> int:
        """Smallest input width D that can evaluate this expression (max variable index + 1)."""
        if self._n_variables is None:
            v = self.variables
            self._n_variables = v[-1] + 1 if v else 0
        return self._n_variables

    def with_constants(self, values: Sequence[float]) -> "Expression":
        """Same structure with the constants replaced, in prefix order."""
        values = [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]
        n = sum(isinstance(t, float) for t in self.tokens)
        if len(values) != n:
            raise ValueError(f"expression has {n} constants, got {len(values)} values")
        it = iter(values)
        out = Expression.__new__(Expression)  # the same valid structure: no need to check it again
        out.tokens = tuple(next(it) if type(t) is float else t for t in self.tokens)
        out._hash, out._n_variables = None, self._n_variables
        return out

    def skeleton(self) -> tuple:
        """Prefix tokens with every constant replaced by ``"CONSTANT"`` (used for deduplication)."""
        return tuple("CONSTANT" if isinstance(t, float) else t for t in self.tokens)

    # ----- tree walking ----------------------------------------------------------------------------------------
    def _fold(self, leaf: Callable[[Token], object], node: Callable[[str, list], object]):
        """Bottom-up fold over the prefix sequence using an explicit stack (no recursion limit)."""
        stack: list = []
        for t in reversed(self.tokens):
            if isinstance(t, str) and t in OPERATORS:
                ar = OPERATORS[t].arity
                args = [stack.pop() for _ in range(ar)]
                stack.append(node(t, args))
            else:
                stack.append(leaf(t))
        return stack[0]

    # ----- numpy evaluation ------------------------------------------------------------------------------------
    def evaluate_numpy(self, x_NxD: np.ndarray) -> np.ndarray:
        """float64 reference evaluation on (N, D) points; out-of-domain gives NaN/inf (IEEE), never raises."""
        x = np.asarray(x_NxD, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"x must have shape (N, D), got shape {x.shape}")
        need = self.n_variables_needed
        if need > x.shape[1]:
            raise ValueError(f"expression uses x_{need - 1} but x has only {x.shape[1]} column"
                             f"{'' if x.shape[1] == 1 else 's'}")
        n = x.shape[0]

        def leaf(t):
            if isinstance(t, float):
                return np.full(n, t)
            return x[:, variable_index(t)]

        with np.errstate(all="ignore"):
            return self._fold(leaf, lambda op, a: OPERATORS[op].np_fn(*a))

    # ----- sympy -----------------------------------------------------------------------------------------------
    def to_sympy(self) -> sympy.Expr:
        """sympy expression (constants as sympy.Float with full float64 precision; sympy may simplify)."""
        syms = {v: sympy.Symbol(v, real=True) for v in VARIABLES}

        def leaf(t):
            return sympy.Float(t, 17) if isinstance(t, float) else syms[t]

        with sympy_depth_errors(self):
            return self._fold(leaf, lambda op, a: OPERATORS[op].sympy_fn(*a))

    @classmethod
    def from_sympy(cls, expr) -> "Expression":
        """Convert a sympy expression over symbols x_0..x_9 (n-ary Add/Mul become nested binary nodes)."""
        with sympy_depth_errors(None):
            try:
                expr = sympy.sympify(expr)
            except sympy.SympifyError as err:
                text = str(expr)
                shown = text if len(text) <= 60 else text[:40] + "..." + text[-10:]
                cause = str(err.base_exc).splitlines()[0] if getattr(err, "base_exc", None) else "not an expression"
                raise ValueError(f"sympy cannot read {shown!r}: {cause}") from None
        return cls(_sympy_to_prefix(expr))

    # ----- text ------------------------------------------------------------------------------------------------
    def infix(self) -> str:
        """Fully parenthesised infix text that ``Expression.from_infix`` parses back to the same tokens."""

        def leaf(t):
            if isinstance(t, float):
                r = repr(t)
                return f"({r})" if r.startswith("-") else r
            return t

        return self._fold(leaf, lambda op, a: OPERATORS[op].infix.format(*a))

    def latex(self) -> str:
        """LaTeX that ``Expression.from_latex`` parses back to the same tokens (constants bit-for-bit)."""

        def leaf(t):
            if isinstance(t, float):
                return _latex_float(t)
            return f"x_{{{variable_index(t)}}}"

        return self._fold(leaf, lambda op, a: OPERATORS[op].latex.format(*a))

    @classmethod
    def from_infix(cls, text: str) -> "Expression":
        """Parse infix text (+ - * / **, functions abs sqrt log exp sin cos tan arcsin arccos arctan, also spelled
        ln asin acos atan, and inv pow2 pow3 by name; x_i, numbers). Any nesting depth parses.

        ``1 / e`` with the integer literal 1 is ``inv``; ``e ** 2`` / ``e ** 3`` with integer literals are
        pow2/pow3; any other power is ``pow``. Unary minus on a number gives a negative constant, on anything
        else ``mul(-1.0, e)``.
        """
        _check_text(text, "from_infix")
        return cls(_InfixParser(text).parse())

    @classmethod
    def from_latex(cls, text: str) -> "Expression":
        """Parse LaTeX: the output of ``latex()`` exactly, plus common hand-written forms of the same operators.

        Accepted: ``+ -``, ``\\cdot \\times * / \\div``, ``\\frac{a}{b}``, ``\\sqrt{a}``, ``a^{b}`` / ``a^2``,
        ``e^{a}``, ``\\exp \\log \\ln \\sin \\cos \\tan \\arcsin \\arccos \\arctan`` (also ``\\operatorname{asin}``
        etc.) with ``(a)``, ``{a}`` or a bare argument, ``|a|`` / ``\\left| a \\right|`` / ``\\lvert a \\rvert``,
        grouping by ``( ) [ ] { }`` and ``\\left( \\right)``, ``x_0`` / ``x_{0}``, numbers such as ``3.5`` and
        ``1.2 \\cdot 10^{-3}`` (one constant), ``\\pi``, ``e``, ``\\infty``, spacing commands. Integer literals
        behave as in ``from_infix``: ``\\frac{1}{a}`` is ``inv``, ``a^{2}`` / ``a^{3}`` are pow2/pow3. Implicit
        multiplication (``2x_0``) is rejected rather than guessed. Any nesting depth parses.
        """
        _check_text(text, "from_latex")
        return cls(_LatexParser(text).parse())


@contextlib.contextmanager
def sympy_depth_errors(expr: "Expression | None"):
    """Turn sympy's RecursionError on very deep trees into a one-line ValueError that names the limit."""
    try:
        yield
    except RecursionError:
        what = "the expression" if expr is None else f"an expression {expr.depth} levels deep"
        raise ValueError(f"sympy cannot handle {what}: its recursion exceeds Python's recursion limit "
                         f"({sys.getrecursionlimit()} frames, sys.getrecursionlimit()); a few hundred levels is "
                         "sympy's practical depth limit") from None


def _latex_float(v: float) -> str:
    """A constant in LaTeX with the shortest digits that read back as the same float (``repr``'s digits).

    Magnitudes outside [1e-3, 1e4) use ``m \\cdot 10^{k}`` with repr's mantissa, so no digit is invented or lost;
    negatives (``-0.0`` included) are parenthesised so that they can follow a binary operator.
    """
    if math.isnan(v):
        return "\\mathrm{NaN}"
    a = abs(v)
    if math.isinf(a):
        s = "\\infty"
    elif a == 0 or 1e-3 <= a < 1e4:
        s = repr(a)
    else:
        m, e = format(decimal.Decimal(repr(a)).normalize(), "e").split("e")
        s = f"{m} \\cdot 10^{{{int(e)}}}"
    return f"\\left(-{s}\\right)" if math.copysign(1.0, v) < 0 else s


def _sympy_to_prefix(root) -> list:
    """Prefix tokens of a sympy tree, walked with an explicit stack (any depth)."""
    out: list = []
    todo = [root]  # sympy nodes still to emit, next on top
    while todo:
        e = todo.pop()
        if isinstance(e, sympy.Symbol):
            if variable_index(e.name) is None:
                raise ValueError(f"unknown symbol {e.name!r} in sympy expression; only x_0..x_9 are supported")
            out.append(e.name)
            continue
        if e.is_Number or e.is_NumberSymbol:
            v = complex(e)
            if v.imag != 0:
                raise ValueError(f"complex constant {e} cannot be represented")
            out.append(float(v.real))
            continue
        if isinstance(e, sympy.Pow):
            base, ex = e.args
            name = next((n for k, n in SYMPY_EXPONENTS.items() if ex == k), None)
            out.append(name or "pow")
            todo.extend([base] if name else [ex, base])
            continue
        name = next((n for head, n in SYMPY_HEADS.items() if isinstance(e, head)), None)
        if name is None:
            raise ValueError(f"sympy node {type(e).__name__} ({e}) has no equivalent operator in this library")
        arity = OPERATORS[name].arity
        if arity == 1 and len(e.args) != 1:
            raise ValueError(f"{name} with {len(e.args)} arguments is not supported")
        out.extend([name] * (len(e.args) - 1) if arity == 2 else [name])  # n-ary Add/Mul: nested, left first
        todo.extend(reversed(e.args))
    return out


# What a grammar rule returns: a leaf as a token list (``["x_0"]``, ``[2.5]``, or the integer-literal marker
# ``["__int__", 2.0]`` that ``_num`` turns into a constant), or an operator node ``(op, arg, ...)`` whose arguments
# are such trees. Nodes share their arguments instead of copying them (no token is copied once per level);
# ``_prefix`` flattens the tree once at the end.
_Tree = Union[list, tuple]
# A grammar rule is a generator: it yields the sub-parse it needs (a generator of the same kind) and receives that
# sub-parse's tree; its own tree is its return value. ``_drive`` runs them on a list, so nesting costs list
# entries, not Python frames, and no depth can raise RecursionError.
_Parse = Generator["_Parse", _Tree, _Tree]


def _drive(step: _Parse) -> _Tree:
    """Run a grammar rule and every sub-parse it yields with an explicit stack; return the rule's tree."""
    stack = [step]
    value = None  # what the step on top receives next: None to start it, else its sub-parse's result
    while True:
        try:
            sub = stack[-1].send(value)
        except StopIteration as done:
            stack.pop()
            if not stack:
                return done.value
            value = done.value
        else:
            stack.append(sub)
            value = None


def _prefix(tree: _Tree) -> list:
    """Prefix tokens of a parse tree (explicit stack, any depth)."""
    out: list = []
    todo = [tree]
    while todo:
        t = todo.pop()
        if isinstance(t, tuple):
            out.append(t[0])
            todo.extend(reversed(t[1:]))
        else:
            out.extend(_num(t))
    return out


def _check_text(text, what: str) -> None:
    if not isinstance(text, str):
        raise ValueError(f"Expression.{what} takes a string, got {type(text).__name__}: {text!r}")


class _InfixParser:
    """Small recursive-descent grammar, run without recursion; precedence: + - < * / < unary - < ** (right
    associative).

    Tokens are ``(kind, text, character)``; the grammar looks only at ``text``, so ``_LatexParser`` reuses the
    precedence levels by changing the token tables below and the ``_atom`` / ``_exponent`` leaves.
    Each grammar rule is a generator (``_Parse``) that yields the rules it descends into; ``parse`` runs them with
    ``_drive``, so the depth of the text is bounded by memory, not by Python's recursion limit.
    """

    _PRODUCT_OPS = {"*": "mul", "/": "div"}
    _POWER_OP = "**"

    _TOKEN_RE = re.compile(r"\s*(?:(\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)|(\d+)|(inf|nan)"
                           r"|([A-Za-z_][A-Za-z_0-9]*)|(\*\*|[-+*/(),]))", re.ASCII)

    def __init__(self, text: str):
        self.text = text
        self.toks: list[tuple[str, str, int]] = []
        pos = 0
        text = text.rstrip()
        while pos < len(text):
            m = self._TOKEN_RE.match(text, pos)
            if m is None or m.end() == pos:
                at = text[pos:].lstrip()[:1]
                hint = ("; powers are written ** (x_0**2), not ^" if at == "^" else
                        "; write numbers with the ASCII digits 0-9" if at.isdigit() else "")
                raise ValueError(f"cannot parse infix text at character {pos}: {text[pos:pos + 20]!r}{hint}")
            kind = ("float", "int", "float", "name", "punct")[next(i for i, g in enumerate(m.groups()) if g)]
            self.toks.append((kind, m.group(m.lastindex), m.start(m.lastindex)))
            pos = m.end()
        self.i = 0

    def _peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else ("end", "", len(self.text))

    def _next(self):
        t = self._peek()
        self.i += 1
        return t

    def _expect(self, value):
        t = self._next()
        if t[1] != value:
            raise ValueError(f"expected {value!r} at character {t[2]} of {self.text!r}, found {t[1] or 'end'!r}")

    def parse(self) -> list:
        tree = _drive(self._sum())
        t = self._peek()
        if t[0] != "end":
            raise ValueError(f"unexpected {t[1]!r} at character {t[2]} of {self.text!r}")
        return _prefix(tree)

    def _sum(self) -> _Parse:
        left = yield self._product()
        while self._peek()[1] in ("+", "-"):
            op = "add" if self._next()[1] == "+" else "sub"
            left = (op, left, (yield self._product()))
        return left

    def _product(self) -> _Parse:
        left = yield self._unary()
        while self._peek()[1] in self._PRODUCT_OPS:
            op = self._PRODUCT_OPS[self._next()[1]]
            right = _num((yield self._unary()))
            if op == "div" and left == ["__int__", 1.0]:
                left = ("inv", right)
            else:
                left = (op, _num(left), right)
        return _num(left)

    def _unary(self) -> _Parse:
        if self._peek()[1] in ("-", "+"):
            negate = self._next()[1] == "-"
            operand = yield self._unary()
            return _negated(_num(operand)) if negate else operand
        return (yield self._power())

    def _power(self) -> _Parse:
        base = yield self._atom()
        if self._peek()[1] == self._POWER_OP:
            self._next()
            ex = yield self._exponent()
            if ex == ["__int__", 2.0]:
                return ("pow2", _num(base))
            if ex == ["__int__", 3.0]:
                return ("pow3", _num(base))
            return ("pow", _num(base), _num(ex))
        return base

    def _exponent(self) -> _Parse:
        return (yield self._unary_power())

    def _unary_power(self) -> _Parse:
        if self._peek()[1] == "-":
            self._next()
            return _negated(_num((yield self._unary_power())))
        return (yield self._power())

    def _atom(self) -> _Parse:
        kind, val, pos = self._next()
        if kind == "int":
            return ["__int__", float(val)]
        if kind == "float":
            return [float(val)]
        if val == "(":
            inner = yield self._sum()
            self._expect(")")
            return inner
        if kind == "name":
            if variable_index(val) is not None:
                return [val]
            if val in FUNCTION_NAMES or val in UNARY_OPERATORS:  # sin(a), ln(a), inv(a), ...
                self._expect("(")
                arg = _num((yield self._sum()))
                self._expect(")")
                return (FUNCTION_NAMES.get(val, val), arg)
            if val in ("pi", "e"):
                return [math.pi if val == "pi" else math.e]
            raise ValueError(f"unknown symbol {val!r} at character {pos} of {self.text!r}")
        raise ValueError(f"unexpected {val or 'end of text'!r} at character {pos} of {self.text!r}")


def _negated(operand: _Tree) -> _Tree:
    """Unary minus: a literal is negated in place, anything else becomes mul(-1, operand)."""
    if isinstance(operand, list) and len(operand) == 1 and isinstance(operand[0], float):
        return [-operand[0]]
    return ("mul", [-1.0], operand)


def _num(tree: _Tree) -> _Tree:
    """Turn a pending integer literal marker into an ordinary float constant."""
    if isinstance(tree, list) and tree[0] == "__int__":
        return [tree[1]]
    return tree


# ----- LaTeX input ---------------------------------------------------------------------------------------------
_LATEX_FUNCTIONS = LATEX_COMMANDS  # \sin ... as commands
# ``\operatorname{...}`` / ``\mathrm{...}`` names: the operator table's function names and aliases.
_LATEX_NAMES = FUNCTION_NAMES
_LATEX_CONSTANTS = {"\\pi": math.pi, "\\infty": math.inf, "e": math.e, "NaN": math.nan, "nan": math.nan}
_LATEX_FRACS = ("\\frac", "\\dfrac", "\\tfrac")
_LATEX_COMMANDS = frozenset({"\\" + f for f in _LATEX_FUNCTIONS} | set(_LATEX_FRACS)
                            | {"\\sqrt", "\\cdot", "\\times", "\\div", "\\pi", "\\infty", "\\lvert", "\\rvert"})
_LATEX_GROUPS = {"{": "}", "(": ")", "[": "]", "\\left(": "\\right)", "\\left[": "\\right]"}  # opener -> closer
_LATEX_BARS = {"|": "|", "\\left|": "\\right|", "\\lvert": "\\rvert"}  # absolute value


class _LatexParser(_InfixParser):
    """LaTeX on the infix grammar: same precedence levels and integer-literal rules, TeX's tokens and arguments.

    TeX-specific rules: ``{...}`` only groups (so ``{1}`` is still the integer 1); a command or superscript takes a
    braced group or one token (``x^2``, ``\\sqrt x``; ``x^23`` is refused instead of read as TeX's ``x^2 3``);
    ``m \\cdot 10^{k}`` after a number literal is one constant, parsed from its decimal text so that it is exact.
    """

    _PRODUCT_OPS = {"\\cdot": "mul", "\\times": "mul", "*": "mul", "/": "div", "\\div": "div"}
    _POWER_OP = "^"
    _TOKEN_RE = re.compile(
        r"(?P<skip>\s+|\\[,;:! ]|~|\$|\\q?quad(?![A-Za-z]))"
        r"|(?P<float>\d+\.\d*|\.\d+)|(?P<int>\d+)"
        r"|x_(?:\{\s*(?P<var_braced>\d+)\s*\}|(?P<var>\d))"
        r"|(?P<delim>\\(?:left|right)\s*[()\[\]|])"
        r"|\\(?:operatorname|mathrm)\s*\{\s*(?P<name>[A-Za-z]+)\s*\}"
        r"|(?P<cmd>\\[A-Za-z]+)"
        r"|(?P<letter>[A-Za-z])"
        r"|(?P<punct>[-+*/()\[\]{}|^])", re.ASCII
    )

    def __init__(self, text: str):
        self.text = text
        self.toks: list[tuple[str, str, int]] = []
        self.i = 0
        braces: list[int] = []  # positions of open '{', checked here so the error names the unclosed one
        pos = 0
        while pos < len(text):
            m = self._TOKEN_RE.match(text, pos)
            if m is None:
                raise ValueError(f"cannot parse LaTeX at character {pos} of {text!r}: unexpected {text[pos]!r}")
            pos = m.end()
            kind = m.lastgroup
            if kind == "skip":
                continue
            start, val = m.start(), m.group(kind)
            if kind in ("var", "var_braced"):
                kind, index = "var", int(val)
                if index >= MAX_VARIABLES:
                    raise ValueError(f"unknown variable 'x_{index}' at character {start} of {text!r}; "
                                     f"only x_0..x_{MAX_VARIABLES - 1} exist")
                val = f"x_{index}"
            elif kind == "delim":
                kind, val = "punct", re.sub(r"\s+", "", val)
            elif kind == "letter":
                kind = "name"
            elif kind == "cmd" and val not in _LATEX_COMMANDS:
                if val in ("\\left", "\\right"):
                    raise ValueError(f"{val!r} at character {start} of {text!r} must be followed by ( ) [ ] or |")
                raise ValueError(f"unknown command {val!r} at character {start} of {text!r}; supported: "
                                 f"{', '.join(sorted(_LATEX_COMMANDS))}, \\left, \\right, "
                                 f"\\operatorname{{...}}, \\mathrm{{...}}")
            elif val == "{":
                braces.append(start)
            elif val == "}":
                if not braces:
                    raise ValueError(f"unbalanced braces: '}}' at character {start} of {text!r} has no matching '{{'")
                braces.pop()
            self.toks.append((kind, val, start))
        if braces:
            raise ValueError(f"unbalanced braces: '{{' at character {braces[-1]} of {text!r} is never closed")
        if not self.toks:
            raise ValueError(f"empty LaTeX input {text!r}: expected an expression")

    def _peek_at(self, k: int):
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else ("end", "", len(self.text))

    def _starts_atom(self, tok) -> bool:
        kind, val, _ = tok
        return (kind in ("int", "float", "var", "name") or val in _LATEX_GROUPS or val in ("\\left|", "\\lvert")
                or (kind == "cmd" and val not in self._PRODUCT_OPS and val != "\\rvert"))

    def _hint(self, tok) -> str:
        return "; implicit multiplication is not supported, write \\cdot" if self._starts_atom(tok) else ""

    def parse(self) -> list:
        tree = _drive(self._sum())
        t = self._peek()
        if t[0] != "end":
            raise ValueError(f"unexpected {t[1]!r} at character {t[2]} of {self.text!r}{self._hint(t)}")
        return _prefix(tree)

    def _expect(self, value):
        t = self._peek()
        if t[1] != value:
            raise ValueError(f"expected {value!r} at character {t[2]} of {self.text!r}, found {t[1] or 'end'!r}"
                             f"{self._hint(t)}")
        self._next()

    def _power(self) -> _Parse:
        if self._peek()[:2] == ("name", "e") and self._peek_at(1)[1] == "^":  # e^{a} is exp(a)
            self.i += 2
            return ("exp", _num((yield self._exponent())))
        return (yield super()._power())

    def _exponent(self) -> _Parse:
        return (yield self._argument("^"))

    def _argument(self, after: str) -> _Parse:
        """Argument of a command or superscript: a braced group or, as in TeX, a single token."""
        if self._peek()[1] == "{":
            return (yield self._group())
        kind, val, pos = self._peek()
        if kind == "end":
            raise ValueError(f"missing argument of {after!r} at character {pos} of {self.text!r}")
        if kind in ("int", "float") and len(val) > 1:
            raise ValueError(f"ambiguous {val!r} at character {pos} of {self.text!r}: TeX gives only its first "
                             f"character to {after}; write {{{val}}}")
        return (yield self._atom(scientific=False))

    def _group(self) -> _Parse:
        """``{...}``; braces are invisible in TeX, so ``{2}`` stays the integer literal (``a^{2}`` is pow2)."""
        self._expect("{")
        start = self.i
        out = yield self._sum()
        self._expect("}")
        return ["__int__", out[0]] if self._lone_int(start, self.i - 1) else out

    def _lone_int(self, start: int, stop: int) -> bool:
        """Whether tokens ``start:stop`` are one integer literal, in braces or not (stops at the second token)."""
        inner = (self.toks[j] for j in range(start, stop) if self.toks[j][1] not in ("{", "}"))
        first, second = next(inner, None), next(inner, None)
        return first is not None and second is None and first[0] == "int"

    def _function_argument(self) -> _Parse:
        """``\\sin(a)``, sympy's ``\\sin{\\left(a\\right)}``, or bare ``\\sin a`` (which takes ``a^{2}`` whole)."""
        if self._peek()[1] in _LATEX_GROUPS:
            return (yield self._atom())
        return (yield self._power())

    def _number(self, kind: str, val: str, scientific: bool):
        """A literal; when ``scientific``, a following ``\\cdot 10^{k}`` joins it into the constant ``float('mek')``."""
        if scientific:
            t = [v for _, v, _ in self.toks[self.i:self.i + 7]] + [""] * 7
            if t[0] in ("\\cdot", "\\times") and t[1:3] == ["10", "^"]:
                if t[3] == "{":
                    sign = t[4] if t[4] in ("-", "+") else ""
                    j = 4 + len(sign)
                    if t[j].isdigit() and t[j + 1] == "}":
                        self.i += j + 2
                        return [float(f"{val}e{sign}{t[j]}")]
                elif len(t[3]) == 1 and t[3].isdigit():
                    self.i += 4
                    return [float(f"{val}e{t[3]}")]
        return ["__int__", float(val)] if kind == "int" else [float(val)]

    def _atom(self, scientific: bool = True) -> _Parse:
        if self._peek()[1] == "{":
            return (yield self._group())
        kind, val, pos = self._next()
        if kind in ("int", "float"):
            return self._number(kind, val, scientific)
        if kind == "var":
            return [val]
        if val in _LATEX_GROUPS:
            inner = yield self._sum()
            self._expect(_LATEX_GROUPS[val])
            return inner
        if val in _LATEX_BARS:
            inner = yield self._sum()
            self._expect(_LATEX_BARS[val])
            return ("abs", inner)
        if val in _LATEX_FRACS:
            num = yield self._argument(val)
            den = yield self._argument(val)
            return ("inv", _num(den)) if num == ["__int__", 1.0] else ("div", _num(num), _num(den))
        if val == "\\sqrt":
            if self._peek()[1] == "[":
                raise ValueError(f"'\\sqrt[...]' at character {pos} of {self.text!r}: n-th roots are not supported, "
                                 f"write a power")
            return ("sqrt", _num((yield self._argument(val))))
        fn = _LATEX_FUNCTIONS.get(val[1:]) if kind == "cmd" else _LATEX_NAMES.get(val) if kind == "name" else None
        if fn is not None:
            return (fn, _num((yield self._function_argument())))
        if val in _LATEX_CONSTANTS:
            return [_LATEX_CONSTANTS[val]]
        if kind == "name":
            raise ValueError(f"unknown symbol {val!r} at character {pos} of {self.text!r}; variables are written "
                             f"x_0..x_{MAX_VARIABLES - 1} or x_{{0}}")
        raise ValueError(f"unexpected {val or 'end of text'!r} at character {pos} of {self.text!r}")
