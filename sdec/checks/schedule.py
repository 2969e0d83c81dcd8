"""The time change: beta(t) > 0 on [0, T], and B(t) = ∫₀ᵗ beta in closed form."""
from __future__ import annotations

import numpy as np
import sympy as sp

from ..evaluate import T_SYMBOL
from .report import Proof

_s = sp.Symbol("s", nonnegative=True)


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
    span = spec.span_of("beta")
    title = "beta(t) > 0 on [0, T]"
    beta, T = spec.beta, spec.T
    try:
        low = sp.minimum(beta, T_SYMBOL, sp.Interval(0, T))
    except Exception:  # minimum() is not total; fall back to a dense grid
        low = None
    if low is not None and low.is_number:
        if low.is_positive:
            return [Proof(title, "proved", f"exact minimum {low} on [0, {T}]", span)]
        return [Proof(title, "failed", f"beta(t) reaches {low} on [0, {T}]; the time change must stay positive", span)]
    grid = np.linspace(0.0, float(T), 2001)
    f = sp.lambdify(T_SYMBOL, beta, "math")
    values = np.array([float(f(float(x))) for x in grid])
    if np.all(np.isfinite(values)) and values.min() > 0:
        return [Proof(title, "checked", f"numerically on a 2001-point grid (minimum {values.min():.6g})", span)]
    return [Proof(title, "failed", f"beta(t) is not positive and finite on [0, {T}] (minimum {np.nanmin(values):.6g})", span)]


def check_integral(spec):
    B = integrated_beta(spec.beta)
    if B is None:
        return [Proof("B(t) = ∫₀ᵗ beta", "info", "no closed form found; lowered by Gauss–Legendre quadrature",
                      spec.span_of("beta"))], None
    return [Proof("B(t) = ∫₀ᵗ beta", "info", f"closed form B(t) = {B}", spec.span_of("beta"))], B
