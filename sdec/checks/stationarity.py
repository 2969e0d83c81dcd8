"""Stationarity: F Σ∞ + Σ∞ Fᵀ + G Gᵀ = 0 for all t (the Lyapunov identity).

Every form reduces to F(t) = beta(t) A and G Gᵀ(t) = 2 beta(t) D with Q = -A Σ∞ - D
(the recipe gives Q and D; the explicit forms are reduced to them when the spec is
built). Then F Σ∞ = -beta (Q + D), and the residual is exactly

    F Σ∞ + Σ∞ Fᵀ + G Gᵀ = beta(t) (D - Dᵀ - Q - Qᵀ),

so no inverse of Σ∞ and no simplification in t is needed: only the entries of Q + Qᵀ
and D - Dᵀ, which are constants or polynomials in the learnable symbols.
"""
from __future__ import annotations

import sympy as sp

from ..language.budget import SYMBOLIC_SECONDS, limited
from .proofs import Proof, block_span


def residual(spec) -> sp.ImmutableMatrix:
    """F Σ∞ + Σ∞ Fᵀ + G Gᵀ, simplified."""
    core = (spec.D - spec.D.T - spec.Q - spec.Q.T).applyfunc(lambda e: sp.simplify(sp.expand(e)))
    return sp.ImmutableMatrix((spec.beta * core).applyfunc(sp.expand))


def check_stationarity(spec):
    title = "N(0, Σ∞) is stationary (F Σ∞ + Σ∞ Fᵀ + G Gᵀ = 0)"
    span = block_span(spec, "D" if spec.form == "recipe" else "drift")
    step = limited(SYMBOLIC_SECONDS, residual, spec)
    if not step.finished:
        return [Proof(title, "warning", f"not proved: simplifying the residual beta(t) (D - Dᵀ - Q - Qᵀ) ran out "
                      f"of its {SYMBOLIC_SECONDS:g} s budget", span)]
    R = step.value
    if R.is_zero_matrix:
        scope = "for all t and every parameter value" if spec.symbols else "for all t"
        how = "Q skew, D symmetric" if spec.form == "recipe" else "the drift and diffusion as written"
        return [Proof(title, "proved", f"residual = beta(t) (D - Dᵀ - Q - Qᵀ) = 0 {scope} ({how})", span)]
    rows = "; ".join("[" + ", ".join(str(R[i, j]) for j in range(R.cols)) + "]" for i in range(R.rows))
    return [Proof(title, "failed", f"the process is not stationary for the declared target: "
                  f"F Σ∞ + Σ∞ Fᵀ + G Gᵀ = [{rows}] ≠ 0", span, (("residual", [[str(x) for x in R.row(i)] for i in range(R.rows)]),))]
