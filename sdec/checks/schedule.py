"""The time change: beta(t) > 0 on [0, T], and B(t) = ∫₀ᵗ beta in closed form."""
from __future__ import annotations

import numpy as np
import sympy as sp
from sympy.calculus.util import continuous_domain

from ..language.ir import T_SYMBOL
from .proofs import Proof

_s = sp.Symbol("s", nonnegative=True)
GRID = 2001       # points of the float64 check of beta on [0, T]
LARGEST = 1e30    # beyond this beta is out of the kernels' range
_SINGULAR = object()  # beta has a pole (or a gap) on [0, T]


def integrated_beta(beta) -> sp.Expr | None:
    """B(t) in closed form, or None when sympy finds none (the lowering then uses quadrature)."""
    if beta.is_polynomial(T_SYMBOL):
        return sp.expand(sp.integrate(beta, (T_SYMBOL, 0, T_SYMBOL)))
    try:
        B = sp.integrate(beta.subs(T_SYMBOL, _s), (_s, 0, T_SYMBOL), manual=True)
    except Exception:  # sympy's integrator raises many types on hard input; fall back to quadrature
        return None
    if B.has(sp.Integral) or B.has(sp.Piecewise) or B.has(sp.zoo, sp.nan):
        return None
    return sp.simplify(B)


def check_beta(spec):
    """A float64 grid first (cheap, never raises), then an exact minimum where sympy can give one."""
    span = spec.span_of("beta")
    title = "beta(t) > 0 on [0, T]"
    beta, T = spec.beta, spec.T
    grid = np.linspace(0.0, float(T), GRID)
    values = _grid_values(beta, grid)
    bad = ~np.isfinite(values) | (values <= 0) | (values > LARGEST)
    if bad.any():
        i = int(np.argmax(bad))
        return [Proof(title, "failed", _bad_value(values[i], grid[i], T), span)]
    exact = _exact_minimum(beta, T)
    if exact is _SINGULAR:
        return [Proof(title, "failed", f"beta(t) is not finite everywhere on [0, {T}] "
                      "(a pole or a gap between grid points)", span)]
    if exact is not None:
        if exact.is_positive:
            return [Proof(title, "proved", f"exact minimum {exact} on [0, {T}]", span)]
        return [Proof(title, "failed", f"beta(t) reaches {exact} on [0, {T}]; the time change must stay positive", span)]
    return [Proof(title, "checked", f"numerically on a {GRID}-point grid (minimum {values.min():.6g}); not proved", span)]


def _grid_values(beta, grid):
    f = sp.lambdify(T_SYMBOL, beta, "numpy")
    with np.errstate(all="ignore"):
        try:
            values = np.broadcast_to(np.asarray(f(grid), dtype=complex), grid.shape)
        except (ArithmeticError, ValueError, TypeError):  # e.g. an integer power too large for numpy
            return np.full(grid.shape, np.nan)
    return np.where(np.abs(values.imag) > 0, np.nan, values.real)


def _bad_value(value, t, T):
    if not np.isfinite(value):
        return f"beta(t) is not a finite real number at t = {t:.6g}"
    if value > LARGEST:
        return f"beta({t:.6g}) = {value:.3g} is out of range (more than 1e30)"
    return f"beta({t:.6g}) = {value:.6g}; the time change must stay positive on [0, {T}]"


def _exact_minimum(beta, T):
    """The exact minimum of beta on [0, T], _SINGULAR if beta is not continuous there, or None.

    Periodic functions are left to the grid: sympy's solver lists every critical point,
    and cos(100000 t) has tens of thousands of them.
    """
    if beta.has(sp.sin, sp.cos, sp.tan):
        return None
    interval = sp.Interval(0, T)
    try:
        if not beta.is_polynomial(T_SYMBOL) and not interval.is_subset(
                continuous_domain(beta, T_SYMBOL, interval)):
            return _SINGULAR
        low = sp.minimum(beta, T_SYMBOL, interval)
    except Exception:  # minimum() and continuous_domain() are not total; the grid verdict stands
        return None
    return low if low.is_number else None


def check_integral(spec):
    B = integrated_beta(spec.beta)
    if B is None:
        return [Proof("B(t) = ∫₀ᵗ beta", "info", "no closed form found; lowered by Gauss–Legendre quadrature",
                      spec.span_of("beta"))], None
    return [Proof("B(t) = ∫₀ᵗ beta", "info", f"closed form B(t) = {B}", spec.span_of("beta"))], B
