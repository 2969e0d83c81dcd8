"""Rigorous enclosures of an IR expression in t, with mpmath's interval arithmetic (``iv``).

``enclosure(expr)`` turns an exact expression of the IR (built by sdec.language.exact from
the syntax tree, never from spec text) into a function of an interval [a, b] of t that
returns an interval certain to contain every value of the expression on [a, b]. Every
operation rounds outward, so "the lower end is > 0" is a proof that the expression is
positive on the whole piece. Where the expression is undefined somewhere on the piece
(log or sqrt of a negative part, division by an interval holding 0) the enclosure is
unbounded or raises Undefined.
"""
from __future__ import annotations

import attrs
import mpmath as mp
import sympy as sp

from ..language.ir import T_SYMBOL

iv = mp.iv


class Unsupported(Exception):
    """The expression uses a construct with no interval rule here."""


class Undefined(ArithmeticError):
    """The expression has no real value somewhere on the interval (log or sqrt of a negative)."""


def interval(a, b=None):
    """The interval [a, b] (or the point a) from exact sympy numbers or mpmath/python numbers."""
    lo = _number(a)
    hi = lo if b is None else _number(b)
    return iv.mpf([lo.a, hi.b])


def _number(x):
    if isinstance(x, iv.mpf):
        return x
    if isinstance(x, sp.Basic):
        if x.is_Rational:
            return iv.mpf(int(x.p)) / iv.mpf(int(x.q))
        return _build(x)(iv.mpf(0))  # a constant expression of the IR (pi/100, sqrt(2), ...)
    return iv.mpf(x)  # a binary float: exact


def enclosure(expr):
    """A function interval -> interval enclosing ``expr`` (a sympy expression in T_SYMBOL)."""
    return _build(expr)


def _build(e):
    if e == T_SYMBOL:
        return lambda x: x
    if e.is_Rational:
        c = _number(e)
        return lambda x: c
    if e is sp.pi:
        return lambda x: iv.pi
    if e is sp.E:
        return lambda x: iv.e
    if e.is_Add:
        parts = [_build(a) for a in e.args]
        return lambda x: _sum(p(x) for p in parts)
    if e.is_Mul:
        parts = [_build(a) for a in e.args]
        return lambda x: _product(p(x) for p in parts)
    if e.is_Pow:
        return _power(e)
    unary = {sp.exp: iv.exp, sp.log: _log, sp.sin: iv.sin, sp.cos: iv.cos, sp.tanh: _tanh}
    if e.func in unary and len(e.args) == 1:
        f, inner = unary[e.func], _build(e.args[0])
        return lambda x: f(inner(x))
    raise Unsupported(f"no interval rule for {e.func.__name__}")


def _sum(values):
    total = iv.mpf(0)
    for v in values:
        total = total + v
    return total


def _product(values):
    total = iv.mpf(1)
    for v in values:
        total = total * v
    return total


def _power(e):
    base, exponent = e.args
    b = _build(base)
    if exponent.is_Integer:
        n = int(exponent)
        if n >= 0:
            return lambda x: _int_power(b(x), n)
        return lambda x: 1 / _int_power(b(x), -n)
    if exponent == sp.Rational(1, 2):
        return lambda x: _sqrt(b(x))
    if exponent == -sp.Rational(1, 2):
        return lambda x: 1 / _sqrt(b(x))
    if exponent.is_Rational:  # x^(p/q) is monotone on x >= 0: enclose it by its ends
        if exponent > 0:
            return lambda x: _root_power(b(x), exponent)
        return lambda x: 1 / _root_power(b(x), -exponent)
    p = _build(exponent)
    return lambda x: iv.exp(p(x) * _log(b(x)))  # b^p = exp(p log b), b > 0


def _root_power(v, r):
    """v^r for a rational r > 0 (not an integer), v >= 0: increasing, 0 at 0."""
    if v.a < 0:
        raise Undefined("fractional power of a number that may be negative")
    c = _number(r)

    def at(x):
        return iv.mpf(0) if x == 0 else iv.exp(c * iv.log(iv.mpf(x)))
    return iv.mpf([at(v.a).a, at(v.b).b])


def _int_power(v, n):
    """v^n with the even-power rule (tight around 0, where v * v * ... is not)."""
    if n == 0:
        return iv.mpf(1)
    return v ** n


def _sqrt(v):
    if v.b < 0:
        raise Undefined("square root of a negative number")
    if v.a < 0:
        raise Undefined("square root of a number that may be negative")
    return iv.sqrt(v)


def _log(v):
    if v.a <= 0:
        raise Undefined("logarithm of a number that may be 0 or negative")
    return iv.log(v)


def _tanh(v):
    """tanh is increasing: enclose it by its values at the two ends, 1 - 2 / (exp(2x) + 1)."""
    lo = 1 - 2 / (iv.exp(2 * iv.mpf(v.a)) + 1)
    hi = 1 - 2 / (iv.exp(2 * iv.mpf(v.b)) + 1)
    return iv.mpf([max(lo.a, -1), min(hi.b, 1)])


PIECES = 4000      # interval evaluations the bisection may spend (a fixed budget: same verdict every run)
NARROWEST = 1e-12  # relative width below which a piece is no longer split


@attrs.frozen
class Bisection:
    """What bisection of [0, T] found.

    outcome: "positive" (every piece has a positive lower bound: proved), "nonpositive"
    (``point`` is a t where the enclosure of the value is <= 0: disproved), "undefined"
    (no real value at ``point``), or "open" (neither, within the budget: ``point`` is
    where it got stuck, ``lowest`` the smallest lower bound seen there).
    """

    outcome: str
    pieces: int
    lowest: object = float("nan")  # smallest lower bound over the proved pieces (an mpf, > 0)
    point: float | None = None


def bisect_positive(expr, T, budget: int = PIECES) -> Bisection:
    """Prove expr > 0 on [0, T] by bisection with interval enclosures, or find t with expr(t) <= 0.

    A piece is proved when its enclosure is positive and bounded (a pole is not a proof).
    Otherwise its midpoint is tried as a witness of expr <= 0 and the piece is split,
    leftmost first, down to a width of NARROWEST * T, where the search stops ("open": the
    caller decides that point by other means). Raises Unsupported for an expression with
    no interval rule.
    """
    f = enclosure(expr)
    top = float(_number(T).b)
    stack = [(0.0, top)]
    spent, lowest = 0, float("inf")
    while stack:
        if spent >= budget:
            a, b = stack[-1]
            return Bisection("open", spent, point=(a + b) / 2)
        a, b = stack.pop()
        spent += 1
        low = _lower(f, iv.mpf([a, b]))
        if low > 0:
            lowest = min(lowest, low)
            continue
        m = (a + b) / 2
        spent += 1
        try:
            at = f(iv.mpf(m))
        except Undefined:
            return Bisection("undefined", spent, point=m)
        if at.b <= 0:  # compared as mpf: a float would turn exp(-750) into 0
            return Bisection("nonpositive", spent, point=m)
        if b - a <= NARROWEST * top:
            return Bisection("open", spent, point=m)
        stack.append((m, b))
        stack.append((a, m))
    return Bisection("positive", spent, lowest)


def _lower(f, x):
    """The lower end of the enclosure on x (an mpf: no float underflow to 0); nan unless the
    enclosure is bounded."""
    try:
        v = f(x)
    except (Undefined, ZeroDivisionError, ValueError):
        return mp.nan
    return mp.mpf(v.a) if v.b < mp.inf else mp.nan
