"""Stationarity: F Σ∞ + Σ∞ Fᵀ + G Gᵀ = 0 for all t (the Lyapunov identity)."""
from __future__ import annotations

import sympy as sp

from .proofs import Proof, block_span


def residual(spec) -> sp.ImmutableMatrix:
    """F Σ∞ + Σ∞ Fᵀ + G Gᵀ, simplified. Explicit forms use the matrices as written."""
    S = spec.target
    if spec.form == "recipe":
        F, GGT = spec.F, spec.GGT
    else:
        F, GGT = spec.drift, spec.diffusion * spec.diffusion.T
    R = F * S + S * F.T + GGT
    return sp.ImmutableMatrix(R.applyfunc(lambda e: sp.simplify(sp.expand(e))))


def check_stationarity(spec):
    title = "N(0, Σ∞) is stationary (F Σ∞ + Σ∞ Fᵀ + G Gᵀ = 0)"
    R = residual(spec)
    span = block_span(spec, "D" if spec.form == "recipe" else "drift")
    if R.is_zero_matrix:
        scope = "for all t and every parameter value" if spec.symbols else "for all t"
        return [Proof(title, "proved", f"residual simplifies to 0 {scope}", span)]
    rows = "; ".join("[" + ", ".join(str(R[i, j]) for j in range(R.cols)) + "]" for i in range(R.rows))
    return [Proof(title, "failed", f"the process is not stationary for the declared target: "
                  f"F Σ∞ + Σ∞ Fᵀ + G Gᵀ = [{rows}] ≠ 0", span, (("residual", [[str(x) for x in R.row(i)] for i in range(R.rows)]),))]
