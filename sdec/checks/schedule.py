"""The time change: beta(t) > 0 on [0, T], and B(t) = ∫₀ᵗ beta in closed form.

Positivity is decided, not sampled: a float64 grid looks for a bad value first (cheap;
every value it reports is confirmed by interval arithmetic before it becomes an error),
then bisection with interval enclosures (sdec.checks.intervals) proves beta > 0 on
[0, T] or finds a point where beta <= 0. Where bisection gets stuck (beta touches 0,
or has a pole) the point is identified in closed form and beta is evaluated there
exactly. Only when none of this decides, within fixed budgets, is the verdict a warning
that says what was not proved.
"""
from __future__ import annotations

import mpmath as mp
import numpy as np
import sympy as sp

from ..language.format import expr_text, number_text
from ..language.ir import T_SYMBOL
from . import intervals
from ..language.budget import SYMBOLIC_SECONDS, limited
from .proofs import Proof

_s = sp.Symbol("s", nonnegative=True)
GRID = 2001       # points of the float64 look for bad values of beta on [0, T]
SIMPLIFY_SECONDS = 0.5  # of the integration budget, for tidying a closed form B(t)
LARGEST = 1e30    # beyond this beta is out of the kernels' range
TITLE = "beta(t) > 0 on [0, T]"


def integrated_beta(beta, seconds: float | None = None):
    """B(t) in closed form, or None when sympy finds none within `seconds` (the lowering
    then uses quadrature). Use integral_outcome for the reason."""
    return integral_outcome(beta, seconds)[0]


def integral_outcome(beta, seconds: float | None = None):
    """(B or None, why-not text or None); `seconds` defaults to SYMBOLIC_SECONDS."""
    seconds = SYMBOLIC_SECONDS if seconds is None else seconds
    step = limited(seconds, _integrate, beta)
    if not step.finished:
        return None, f"sympy's integrator ran out of its {seconds:g} s budget"
    if step.value is None:
        return None, "sympy finds none"
    return step.value, None


def _integrate(beta):
    if beta.is_polynomial(T_SYMBOL):
        return sp.expand(sp.integrate(beta, (T_SYMBOL, 0, T_SYMBOL)))
    try:
        B = sp.integrate(beta.subs(T_SYMBOL, _s), (_s, 0, T_SYMBOL), manual=True)
    except Exception:  # sympy's integrator raises many types on hard input; fall back to quadrature
        return None
    if B.has(sp.Integral) or B.has(sp.Piecewise) or B.has(sp.zoo, sp.nan):
        return None
    # simplify only tidies the form (the lowering checks whatever form against mpmath) and can
    # be slow where integrating was not (1.5 s for 3*t/2 + sin(100000*t)/100000): past its
    # own share of the budget the integral is kept as integrated, not lost to quadrature.
    tidy = limited(SIMPLIFY_SECONDS, sp.simplify, B)
    return tidy.value if tidy.finished else B


def check_beta(spec):
    span = spec.span_of("beta")
    beta, T = spec.beta, spec.T
    T_text = number_text(T)
    grid = np.linspace(0.0, float(T), GRID)
    values = _grid_values(beta, grid)
    bad = _grid_error(beta, T, grid, values)
    if bad is not None:
        return [Proof(TITLE, "failed", bad, span)]
    if not beta.has(T_SYMBOL) and beta.is_positive:  # a constant: its value is the proof
        return [Proof(TITLE, "proved", f"exact: beta(t) = {number_text(beta) if beta.is_Rational else expr_text(beta)} > 0 (constant)", span)]
    try:
        found = intervals.bisect_positive(beta, T)
    except intervals.Unsupported as exc:
        return [Proof(TITLE, "warning", f"not proved ({exc}): positive on a {GRID}-point grid only "
                      f"(minimum {number_text(float(values.min()))})", span)]
    if found.outcome == "positive":
        return [Proof(TITLE, "proved", f"interval arithmetic on {found.pieces} piece(s) of [0, {T_text}]: "
                      f"beta(t) ≥ {number_text(_floor6(found.lowest))}", span)]
    if found.outcome == "undefined":
        return [Proof(TITLE, "failed", f"beta(t) has no real value at t = {number_text(found.point)} "
                      "(log or fractional power of a negative number)", span)]
    if found.outcome == "nonpositive":
        return [Proof(TITLE, "failed", _smallest(beta, T, found.point, float(T) / (GRID - 1)), span)]
    return [_decide_stuck(beta, T, found, values, span)]


def _grid_values(beta, grid):
    # beta is an IR expression, never spec text.  The numpy module object, not the name
    # "numpy": the name makes lambdify run `from numpy import *`, which imports numpy.f2py,
    # numpy.testing, numpy.ma, ... (about 0.1 s of every `sdec check`) for the same functions.
    f = sp.lambdify(T_SYMBOL, beta, [np])
    with np.errstate(all="ignore"):
        try:
            values = np.broadcast_to(np.asarray(f(grid), dtype=complex), grid.shape)
        except (ArithmeticError, ValueError, TypeError):  # e.g. an integer power too large for numpy
            return np.full(grid.shape, np.nan)
    return np.where(np.abs(values.imag) > 0, np.nan, values.real)


def _grid_error(beta, T, grid, values):
    """An error message for a bad value on the grid, confirmed by interval arithmetic; else None."""
    try:
        f = intervals.enclosure(beta)
    except intervals.Unsupported:
        f = None
    for i in np.flatnonzero(~np.isfinite(values) | (values > LARGEST))[:1]:
        t = grid[i]
        exact = _point(f, t)
        if exact is None:
            return f"beta(t) is not a finite real number at t = {number_text(t)}"
        low, high = exact
        if high < mp.inf and low > LARGEST:
            where = "overflows float64 (more than 1.8e308)" if not np.isfinite(values[i]) else "is out of range"
            return f"beta({number_text(t)}) = {number_text(low)} {where}; beta must stay at most 1e30 on [0, T]"
        if high == mp.inf:
            return f"beta(t) is not a finite real number at t = {number_text(t)}"
    if (values <= 0).any():
        i = int(np.nanargmin(np.where(np.isfinite(values), values, np.inf)))
        exact = _point(f, grid[i])
        if exact is None or exact[1] <= 0:  # confirmed (or no interval rule: trust the exact value below)
            step = float(T) / (GRID - 1)
            return _smallest(beta, T, grid[i], step, at_end=i in (0, GRID - 1))
    return None


def _point(f, t):
    """(lower, upper) of the enclosure of beta at the float t, or None without a real value."""
    if f is None:
        return None
    try:
        v = f(intervals.iv.mpf(float(t)))
    except (intervals.Undefined, ZeroDivisionError, ValueError):
        return None
    return mp.mpf(v.a), mp.mpf(v.b)


def _smallest(beta, T, t0, step, at_end=False):
    """Where beta is smallest near t0 (within one grid step), and its value there."""
    if at_end:
        t_exact = sp.Integer(0) if t0 == 0 else T
        value = sp.N(beta.subs(T_SYMBOL, t_exact), 15)
        where = number_text(t_exact)
    else:
        f = sp.lambdify(T_SYMBOL, beta, "mpmath")
        lo, hi = max(0.0, t0 - step), min(float(T), t0 + step)
        with mp.workdps(30):
            t_min = _golden_min(f, mp.mpf(lo), mp.mpf(hi))
            value, where = f(t_min), number_text(t_min)
    return (f"beta(t) is smallest at t = {where}, where beta({where}) = {number_text(value)}; "
            f"the time change must stay positive on [0, {number_text(T)}]")


def _golden_min(f, a, b, steps=120):
    g = (mp.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(steps):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2


def _decide_stuck(beta, T, found, values, span):
    """Bisection stopped at found.point: beta touches 0 there, has a pole, or is too flat for
    the interval bounds. Identify the point in closed form and evaluate beta there exactly;
    for a polynomial, find the exact minimum. Otherwise a warning saying what is unproved."""
    where = number_text(found.point) if found.point is not None else "?"
    step = limited(SYMBOLIC_SECONDS, _exact_at_candidates, beta, T, found.point)
    if step.finished and step.value is not None:
        c, value = step.value
        at = sp.sstr(c) + ("" if c.is_Rational else f" ≈ {number_text(c)}")
        if value.has(sp.zoo, sp.oo, sp.nan, -sp.oo):
            return Proof(TITLE, "failed", f"beta(t) is not finite at t = {at} (a pole on [0, {number_text(T)}])", span)
        return Proof(TITLE, "failed", f"beta(t) = {sp.sstr(value)} exactly at t = {at}; the time change must "
                     f"stay positive on [0, {number_text(T)}]", span)
    if beta.is_polynomial(T_SYMBOL):
        step = limited(SYMBOLIC_SECONDS, sp.minimum, beta, T_SYMBOL, sp.Interval(0, T))
        if step.finished and step.value.is_number:
            if step.value.is_positive:
                return Proof(TITLE, "proved", f"exact minimum {number_text(step.value)} on [0, {number_text(T)}]", span)
            return Proof(TITLE, "failed", f"beta(t) reaches {number_text(step.value)} on [0, {number_text(T)}]; "
                         "the time change must stay positive", span)
    return Proof(TITLE, "warning", f"not proved: interval arithmetic ({found.pieces} pieces) could not separate "
                 f"beta(t) from 0 near t = {where}, and no exact value decides it there; beta is positive on a "
                 f"{GRID}-point grid (minimum {number_text(float(np.nanmin(values)))})", span)


def _exact_at_candidates(beta, T, point):
    """(c, beta(c)) for a closed-form c near `point` in [0, T] where beta(c) <= 0 or is not
    finite, exactly; None if no such c is found. c comes from the float point refined to a
    root of beta' (or beta) and recognized (sympy's nsimplify, with pi as a constant), or the
    float point itself recognized as p/q, p pi/q or p/(q pi) with small q."""
    if point is None:
        return None
    candidates = []
    with mp.workdps(50):
        guess = mp.mpf(point)
        for g in (sp.diff(beta, T_SYMBOL), beta):
            try:
                root = mp.findroot(sp.lambdify(T_SYMBOL, g, "mpmath"), guess)
            except (ValueError, ZeroDivisionError, TypeError):
                continue
            if mp.im(root) == 0 and abs(root - guess) < 1e-6 * max(1, abs(guess)):
                candidates.append(sp.nsimplify(sp.Float(mp.nstr(mp.re(root), 45), 45), [sp.pi]))
    x = float(point)
    candidates += [sp.Rational(x).limit_denominator(10 ** 6),            # p/q
                   sp.Rational(x / np.pi).limit_denominator(10 ** 4) * sp.pi,  # p pi / q
                   sp.Rational(x * np.pi).limit_denominator(10 ** 4) / sp.pi]  # p / (q pi)
    for c in candidates:
        if not c.is_number or c.is_negative or (c - T).is_positive or abs(float(c) - x) > 1e-8 * max(1, abs(x)):
            continue
        value = beta.subs(T_SYMBOL, c)
        if value.has(sp.zoo, sp.oo, sp.nan, -sp.oo):
            return c, value
        value = sp.simplify(value)
        if value.is_nonpositive:
            return c, value
    return None


def _floor6(x):
    """x rounded DOWN to 6 significant digits (a lower bound shown stays a lower bound); an
    mpf, so a bound below the float64 range (exp(-1000)) is shown as it is, not as 0."""
    x = mp.mpf(x)
    if not mp.isfinite(x) or x <= 0:
        return x
    scale = mp.mpf(10) ** (mp.floor(mp.log10(x)) - 5)
    return mp.floor(x / scale) * scale


def check_integral(spec):
    title = "B(t) = ∫₀ᵗ beta"
    B, why = integral_outcome(spec.beta)
    if B is None:
        return [Proof(title, "info", f"no closed form found ({why}); lowered by Gauss–Legendre quadrature",
                      spec.span_of("beta"))], None
    return [Proof(title, "info", f"closed form B(t) = {B}", spec.span_of("beta"))], B
