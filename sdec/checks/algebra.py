"""Q skew-symmetric, D positive semi-definite, Σ∞ and the initial covariance positive definite."""
from __future__ import annotations

import numpy as np
import sympy as sp

from ..language.format import expr_text
from .proofs import Proof, block_span, numeric


def check_target(spec):
    return _definite(spec.target, "Σ∞ (target covariance) is symmetric positive definite",
                     "The target covariance Σ∞", spec.span_of("target"), strict=True)


def check_aux_init(spec):
    if spec.K == 1:
        return []
    span = spec.span_of(("init", spec.auxiliaries[0]))
    return _definite(spec.aux_init, "q(v0|x) covariance is symmetric positive definite",
                     "The initial covariance of the auxiliaries", span, strict=True)


def _definite(M, title, what, span, strict):
    if not (M - M.T).is_zero_matrix:
        return [Proof(title, "failed", f"{what} is not symmetric", span)]
    eig = np.linalg.eigvalsh(numeric(M))
    exact = M.is_positive_definite if strict else M.is_positive_semidefinite
    if exact is True:
        return [Proof(title, "proved", f"exact (eigenvalues from {eig.min():.6g} to {eig.max():.6g})", span)]
    kind = "positive definite" if strict else "positive semi-definite"
    return [Proof(title, "failed", f"{what} is not {kind} (eigenvalue {eig.min():.6g})", span)]


def check_skew(spec):
    title = "Q is skew-symmetric"
    if spec.form != "recipe":
        return []  # explicit forms: Q is derived; the stationarity residual says it all
    if any(b.block == "Q" for b in spec.learned):
        return [Proof(title, "proved", "by parameterization Q = W - Wᵀ (every parameter value)", block_span(spec, "Q"))]
    S = (spec.Q + spec.Q.T).applyfunc(sp.simplify)
    if S.is_zero_matrix:
        how = "symbolically, for every parameter value" if spec.Q.free_symbols else "exact"
        return [Proof(title, "proved", how, block_span(spec, "Q"))]
    K, names = spec.K, spec.variables
    i, j = next((i, j) for i in range(K) for j in range(K) if S[i, j] != 0)
    if i == j:
        msg = f"Q is not skew-symmetric: Q[{names[i]}, {names[i]}] = {spec.Q[i, i]} (the diagonal must be 0)"
    else:
        msg = (f"Q is not skew-symmetric: Q[{names[i]}, {names[j]}] = {spec.Q[i, j]} but "
               f"Q[{names[j]}, {names[i]}] = {spec.Q[j, i]} (must be {-spec.Q[i, j]})")
    span = spec.span_of(("Q", i, j)) or spec.span_of(("Q", j, i)) or block_span(spec, "Q")
    return [Proof(title, "failed", msg, span)]


def check_psd(spec):
    title = "D is positive semi-definite"
    span = block_span(spec, "D")
    learned = next((b for b in spec.learned if b.block == "D"), None)
    if learned is not None:
        how = {"psd": "D = L Lᵀ", "diagonal": "D = diag(d), d > 0", "lowrank": "D = B Bᵀ"}[learned.kind]
        return [Proof(title, "proved", f"by parameterization {how} (every parameter value)", span)]
    D = spec.D
    if not (D - D.T).applyfunc(sp.simplify).is_zero_matrix:
        return [_not_symmetric(spec, title, span)]
    if D.free_symbols:
        exact = _psd_symbolic(D)
        if exact:
            return [Proof(title, "proved", "symbolically, for every admissible parameter value", span)]
        _, D0 = spec.at_init()
        eig = np.linalg.eigvalsh(numeric(D0))
        if D0.is_positive_semidefinite:
            return [Proof(title, "checked", f"at the initial parameter values only (smallest eigenvalue {eig.min():.6g}); "
                          "not proved for every value", span)]
        return [Proof(title, "failed", f"D is not positive semi-definite at the initial values (eigenvalue {eig.min():.6g})", span)]
    eig = np.linalg.eigvalsh(numeric(D))
    if D.is_positive_semidefinite:
        return [Proof(title, "proved", f"exact (eigenvalues from {eig.min():.6g} to {eig.max():.6g})", span)]
    return [Proof(title, "failed", f"D is not positive semi-definite (eigenvalue {eig.min():.6g})", span)]


def _psd_symbolic(D) -> bool:
    """Sufficient structural test: diagonal with entries that sympy proves nonnegative."""
    K = D.rows
    if any(D[i, j] != 0 for i in range(K) for j in range(K) if i != j):
        return False
    return all(D[i, i].is_nonnegative is True for i in range(K))


def _not_symmetric(spec, title, span):
    """Name the first pair of entries that differ, at the one written second."""
    D, names, K = spec.D, spec.variables, spec.K
    i, j = next((i, j) for i in range(K) for j in range(i + 1, K) if sp.simplify(D[i, j] - D[j, i]) != 0)
    spans = [s for s in (spec.span_of(("D", i, j)), spec.span_of(("D", j, i))) if s is not None]
    second = max(spans, key=lambda s: (s.line, s.column)) if spans else span
    return Proof(title, "failed", f"D is not symmetric: D[{names[i]}, {names[j]}] = {expr_text(D[i, j])} but "
                 f"D[{names[j]}, {names[i]}] = {expr_text(D[j, i])}", second)
