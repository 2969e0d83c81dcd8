"""Syntax expressions → exact sympy values (scalars or immutable matrices).

Numbers become exact rationals from their text; names and functions are looked up in
explicit tables. Nothing here calls sympify, parse_expr, eval or exec: spec text only
ever becomes sympy objects through the constructors below.
"""
from __future__ import annotations

import re

import sympy as sp

from . import syntax as S
from .linalg import field_matrices
from .diagnostics import Span
from .ir import T_SYMBOL

MAX_SIG_DIGITS = 60
MAX_EXPONENT = 400
MAX_RATIONAL_BITS = 4000
MAX_MATRIX_SIZE = 16

_NUMBER = re.compile(r"^(?P<int>\d*)(?:\.(?P<frac>\d*))?(?:[eE](?P<exp>[+-]?\d+))?$")


class EvalError(Exception):
    """A user error inside an expression; the builder turns it into a Diagnostic.

    ``message`` is None for a use of a name whose definition already failed (FAILED):
    that error is reported once, at the definition.
    """

    def __init__(self, span: Span | None, message: str | None, hint: str | None = None):
        super().__init__(message)
        self.span, self.message, self.hint = span, message, hint


def number_value(node: S.Number) -> sp.Rational:
    """The exact value of a number token, built from its digits (never through float or int(text))."""
    text = node.text.replace("_", "")
    m = _NUMBER.match(text)
    if not m:
        raise EvalError(node.span, f"malformed number {node.text!r}")
    whole, frac, exp_text = m.group("int") or "", m.group("frac") or "", m.group("exp") or "0"
    digits = (whole + frac).lstrip("0")
    significant = digits.rstrip("0")
    if not significant:
        return sp.Integer(0)
    if len(significant) > MAX_SIG_DIGITS:
        raise EvalError(node.span, f"number {_short(node.text)} has more than {MAX_SIG_DIGITS} significant digits")
    out_of_range = EvalError(node.span, f"number {_short(node.text)} is out of range (|exponent| > {MAX_EXPONENT})")
    if len(exp_text.lstrip("+-").lstrip("0")) > len(str(MAX_EXPONENT)) + 1:
        raise out_of_range
    last = int(exp_text) - len(frac) + (len(digits) - len(significant))  # power of ten of the last digit
    if abs(last + len(significant) - 1) > MAX_EXPONENT:
        raise out_of_range
    return sp.Integer(int(significant)) * sp.Rational(10) ** last


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:20] + "..." + text[-10:])


def is_matrix(value) -> bool:
    return isinstance(value, sp.MatrixBase)


def float_rows(matrix) -> tuple:
    """An exact matrix as nested tuples of float64, each entry rounded once from 30 digits."""
    return tuple(tuple(float(sp.N(matrix[i, j], 30)) for j in range(matrix.cols)) for i in range(matrix.rows))


def shape_text(value) -> str:
    return f"{value.rows}x{value.cols} matrix" if is_matrix(value) else "scalar"


class Scope:
    """What names mean in one expression context."""

    def __init__(self, *, constants=None, params=None, state=None, time=False, beta=None, size=None):
        self.constants = constants or {}   # name -> value
        self.params = params or {}         # name -> Symbol
        self.state = state or {}           # name -> Symbol (only inside equations)
        self.time = time                   # is `t` available
        self.beta = beta                   # beta(t) expression, callable as beta(...)
        self.size = size                   # K, for `I`


def evaluate(node, scope: Scope):
    """Evaluate a syntax expression to a sympy scalar or ImmutableMatrix."""
    kind = type(node)
    if kind is S.Number:
        return number_value(node)
    if kind is S.Name:
        return _name(node, scope)
    if kind is S.Unary:
        value = evaluate(node.operand, scope)
        return _checked(-value if node.op == "-" else value, node.span)
    if kind is S.Binary:
        return _binary(node, evaluate(node.left, scope), evaluate(node.right, scope))
    if kind is S.Call:
        return _call(node, scope)
    if kind is S.Bracket:
        return _matrix(node, scope)
    raise AssertionError(f"no evaluation for {kind.__name__}")


FAILED = object()  # the value of a constant or parameter whose definition was rejected


def _name(node: S.Name, scope: Scope):
    name = node.name
    for table in (scope.constants, scope.params):
        if name in table:
            if table[name] is FAILED:
                raise EvalError(node.span, None)
            return table[name]
    if name in scope.state:
        return scope.state[name]
    if name == "t":
        if scope.time:
            return T_SYMBOL
        raise EvalError(node.span, "'t' is only available in time-dependent expressions (beta(t), drift, diffusion, equations)")
    if name == "pi":
        return sp.pi
    if name == "I":
        if scope.size is None:
            raise EvalError(node.span, "'I' (the identity) needs the state to be declared first")
        return sp.ImmutableMatrix(sp.eye(scope.size))
    if name in FUNCTIONS or name in ("beta", "random"):
        raise EvalError(node.span, f"'{name}' is a function; call it as {name}(...)")
    raise EvalError(node.span, f"unknown name '{name}'")


def _checked(value, span):
    """Reject values that are not finite reals or that grow beyond reason."""
    items = value if is_matrix(value) else (value,)
    for item in items:
        if item.has(sp.zoo, sp.oo, -sp.oo, sp.nan):
            raise EvalError(span, "value is undefined or infinite (division by zero or log(0)?)")
        if item.has(sp.I):
            raise EvalError(span, "value is not real (square root or log of a negative number?)")
        if isinstance(item, sp.Rational):
            if max(item.p.bit_length(), item.q.bit_length()) > MAX_RATIONAL_BITS:
                raise EvalError(span, "number is too large to handle exactly")
        elif item.is_number:
            _check_magnitude(item, span)
    return value


def _check_magnitude(item, span):
    """An irrational number: real, and no larger than the largest rational allowed.

    Every value passes here as it is built, so the operands of the next operation are
    bounded too and evaluating them numerically stays cheap (no e^(e^(e^10)) ever forms).
    """
    approx = sp.N(item, 15)
    if not approx.is_real:
        raise EvalError(span, "value is not real (a negative number raised to a fractional power?)")
    if not approx.is_finite or abs(approx) > _LARGEST:
        raise EvalError(span, "number is too large to handle exactly")


_LARGEST = sp.Float(2) ** MAX_RATIONAL_BITS


def _binary(node: S.Binary, left, right):
    op, span = node.op, node.span
    lm, rm = is_matrix(left), is_matrix(right)
    if op in "+-":
        if lm != rm or (lm and left.shape != right.shape):
            hint = "write c*I for a multiple of the identity" if lm != rm else None
            raise EvalError(span, f"cannot {'add' if op == '+' else 'subtract'} a {shape_text(left)} and a {shape_text(right)}", hint)
        return _checked(left + right if op == "+" else left - right, span)
    if op == "*":
        if lm and rm:
            raise EvalError(span, "'*' between two matrices is ambiguous", "use '@' for the matrix product")
        return _checked(sp.ImmutableMatrix(left * right) if lm or rm else left * right, span)
    if op == "/":
        if rm:
            raise EvalError(span, "cannot divide by a matrix", "use inv(M)")
        if right == 0:
            raise EvalError(span, "division by zero")
        return _checked(sp.ImmutableMatrix(left / right) if lm else left / right, span)
    if op == "@":
        if not (lm and rm):
            raise EvalError(span, f"'@' needs two matrices, got a {shape_text(left)} and a {shape_text(right)}")
        if left.cols != right.rows:
            raise EvalError(span, f"cannot multiply a {shape_text(left)} by a {shape_text(right)}")
        return _checked(sp.ImmutableMatrix(left @ right), span)
    if op == "^":
        if lm or rm:
            raise EvalError(span, "'^' applies to scalars only")
        _guard_power(left, right, span)
        return _checked(left ** right, span)
    raise AssertionError(op)


def _guard_power(base, exponent, span):
    if exponent.is_Rational and abs(exponent.p) > 1000:
        raise EvalError(span, "exponent is too large to evaluate exactly")
    if exponent.is_Rational and base.is_Rational:
        if base == 0 and exponent < 0:
            raise EvalError(span, "division by zero (0 raised to a negative power)")
        bits = max(base.p.bit_length(), base.q.bit_length())
        if bits * abs(exponent.p) > MAX_RATIONAL_BITS:
            raise EvalError(span, "power is too large to handle exactly")
    elif base.is_number and exponent.is_number and base != 0:
        if sp.N(exponent * sp.log(abs(base)), 15) > MAX_RATIONAL_BITS * sp.log(2):
            raise EvalError(span, "power is too large to handle exactly")


def _matrix(node: S.Bracket, scope: Scope):
    rows = []
    for item in node.items:
        if not isinstance(item, S.Bracket):
            raise EvalError(node.span, "a matrix literal is a list of rows, e.g. [[a, b], [c, d]]")
        row = [evaluate(x, scope) for x in item.items]
        for x, value in zip(item.items, row):
            if is_matrix(value):
                raise EvalError(x.span, "matrix entries must be scalars")
        rows.append(row)
    width = len(rows[0])
    for item, row in zip(node.items, rows):
        if len(row) != width:
            raise EvalError(item.span, f"row has {len(row)} entries; the first row has {width}")
    if len(rows) > MAX_MATRIX_SIZE or width > MAX_MATRIX_SIZE:
        raise EvalError(node.span, f"matrices are limited to {MAX_MATRIX_SIZE}x{MAX_MATRIX_SIZE}")
    return sp.ImmutableMatrix(rows)


# ---- functions ---------------------------------------------------------------------

def _scalar_fn(fn, name):
    def apply(node, args):
        _arity(node, args, 1)
        value = args[0]
        if is_matrix(value):
            raise EvalError(node.span, f"{name}() applies to scalars; use it entry by entry")
        if name == "log" and value.is_number and value.is_nonpositive:
            raise EvalError(node.span, "log of a number that is not positive")
        if name == "sqrt" and value.is_number and value.is_negative:
            raise EvalError(node.span, "sqrt of a negative number")
        if name == "exp" and value.is_number and abs(sp.N(value, 15)) > 700:
            raise EvalError(node.span, "exp() argument is out of range (|x| > 700)")
        return fn(value)
    return apply


def _arity(node, args, *counts):
    if len(args) not in counts:
        want = " or ".join(str(c) for c in counts)
        raise EvalError(node.span, f"{node.func.name}() takes {want} argument(s), got {len(args)}")


def _size_arg(node, value):
    if is_matrix(value) or not value.is_Integer or not 1 <= int(value) <= MAX_MATRIX_SIZE:
        raise EvalError(node.span, f"{node.func.name}() sizes must be whole numbers from 1 to {MAX_MATRIX_SIZE}")
    return int(value)


def _diag(node, args):
    if not args:
        raise EvalError(node.span, "diag() needs at least one entry")
    if any(is_matrix(a) for a in args):
        raise EvalError(node.span, "diag() takes scalar entries")
    if len(args) > MAX_MATRIX_SIZE:
        raise EvalError(node.span, f"matrices are limited to {MAX_MATRIX_SIZE}x{MAX_MATRIX_SIZE}")
    return sp.ImmutableMatrix(sp.diag(*args))


def _filled(fill):
    def apply(node, args):
        _arity(node, args, 1, 2)
        n = _size_arg(node, args[0])
        m = _size_arg(node, args[1]) if len(args) == 2 else n
        return sp.ImmutableMatrix(sp.Matrix(n, m, lambda i, j: fill(i, j)))
    return apply


def _inv(node, args):
    _arity(node, args, 1)
    value = args[0]
    if not is_matrix(value) or value.rows != value.cols:
        raise EvalError(node.span, "inv() needs a square matrix")
    try:
        (field,) = field_matrices(value)
        singular = field.det() == field.domain.zero
    except (ValueError, TypeError, NotImplementedError, sp.PolynomialError):  # no common field: sympy's generic route
        field, singular = None, sp.simplify(value.det()) == 0
    if singular:
        raise EvalError(node.span, "inv() of a singular matrix")
    return sp.ImmutableMatrix(field.inv().to_Matrix() if field is not None else value.inv())


def _transpose(node, args):
    _arity(node, args, 1)
    if not is_matrix(args[0]):
        raise EvalError(node.span, "transpose() needs a matrix")
    return sp.ImmutableMatrix(args[0].T)


FUNCTIONS = {
    "sqrt": _scalar_fn(sp.sqrt, "sqrt"),
    "exp": _scalar_fn(sp.exp, "exp"),
    "log": _scalar_fn(sp.log, "log"),
    "sin": _scalar_fn(sp.sin, "sin"),
    "cos": _scalar_fn(sp.cos, "cos"),
    "tanh": _scalar_fn(sp.tanh, "tanh"),
    "diag": _diag,
    "eye": _filled(lambda i, j: 1 if i == j else 0),
    "zeros": _filled(lambda i, j: 0),
    "ones": _filled(lambda i, j: 1),
    "inv": _inv,
    "transpose": _transpose,
}


def _call(node: S.Call, scope: Scope):
    name = node.func.name
    args = [evaluate(a, scope) for a in node.args]
    if name == "beta":
        if scope.beta is None:
            raise EvalError(node.span, "beta(...) is only available in time-dependent expressions after beta(t) is defined")
        _arity(node, args, 1)
        if is_matrix(args[0]):
            raise EvalError(node.span, "beta() takes a scalar")
        return _checked(scope.beta.subs(T_SYMBOL, args[0]), node.span)
    if name == "random":
        raise EvalError(node.span, "random(std, seed) is only allowed as the init of a learn statement")
    fn = FUNCTIONS.get(name)
    if fn is None:
        known = ", ".join(sorted(FUNCTIONS) + ["beta"])
        raise EvalError(node.func.span, f"unknown function '{name}'", f"known functions: {known}")
    return _checked(fn(node, args), node.span)
