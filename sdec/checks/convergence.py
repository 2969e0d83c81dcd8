"""Convergence to the target: A = -(Q + D) Σ∞⁻¹ Hurwitz.

Proof route: with Σ∞ ≻ 0 stationary (A Σ∞ + Σ∞ Aᵀ = -2D), A is Hurwitz if and only if
the noise reaches every variable: rank [D, A D, ..., A^{K-1} D] = K (Kalman). The rank is
computed exactly; eigenvalues are reported numerically as a cross-check.
"""
from __future__ import annotations

import numpy as np
import sympy as sp

from .proofs import Proof, block_span, numeric


def kalman_matrix(A, D):
    K = A.rows
    blocks, power = [], sp.eye(K)
    for _ in range(K):
        blocks.append(power * D)
        power = power * A
    return sp.Matrix.hstack(*blocks)


def reached(A, D) -> tuple:
    """Which variables the noise reaches through the drift (rows of the Kalman matrix)."""
    C = kalman_matrix(A, D)
    return tuple(any(sp.simplify(x) != 0 for x in C.row(i)) for i in range(A.rows))


def check_convergence(spec):
    span = block_span(spec, "D")
    learned_pd = any(b.block == "D" and b.kind in ("psd", "diagonal") and len(b.over) == spec.K for b in spec.learned)
    Q0, D0 = spec.at_init()
    A0 = sp.ImmutableMatrix(-(Q0 + D0) * spec.target.inv())
    eig = np.linalg.eigvals(numeric(A0))
    data = (("eigenvalues", [[float(e.real), float(e.imag)] for e in sorted(eig, key=lambda z: (z.real, z.imag))]),)
    where = "" if not spec.symbols else " at the initial parameter values"
    eig_text = ", ".join(_complex(e) for e in sorted(eig, key=lambda z: (z.real, z.imag)))
    proofs = [Proof("eigenvalues of A (F = beta(t) A)", "info", f"{eig_text}{where}", span, data)]
    title = "noise reaches every variable (Kalman rank [D, AD, ...] = K)"
    conv = "converges to N(0, Σ∞) (every eigenvalue of F has negative real part)"
    if learned_pd:
        proofs.append(Proof(title, "proved", "D is positive definite for every parameter value", span))
        proofs.append(Proof(conv, "proved", "D ≻ 0 and Σ∞ ≻ 0 make A Hurwitz (Lyapunov)", span))
        return proofs
    rank = kalman_matrix(A0, D0).rank(simplify=True)
    if rank == spec.K:
        how = "exact rank" + (where or "")
        verdict = "checked" if spec.symbols else "proved"
        proofs.append(Proof(title, verdict, f"{how}: rank {rank} = K", span))
        proofs.append(Proof(conv, verdict, "Kalman rank + stationarity (Lyapunov)" + where, span))
        if not np.all(eig.real < 0):  # the exact proof stands; float64 cannot resolve this drift
            proofs.append(Proof("float64 eigenvalues agree with the proof", "warning",
                                f"float64 eigenvalues of A have real part up to {eig.real.max():.3g} although "
                                "the exact proof shows every one is negative: the drift is too stiff for "
                                "floating point (time scales far apart)", span))
        return proofs
    missed = [v for v, r in zip(spec.variables, reached(A0, D0)) if not r]
    proofs.append(Proof(title, "failed", f"rank {rank} < K = {spec.K}{where}: the noise never reaches "
                        f"{', '.join(missed) or 'a combination of the variables'}", span))
    proofs.append(Proof(conv, "failed", f"some eigenvalue of A has zero real part (max Re = {eig.real.max():.3g}){where}; "
                        "the process does not forget its start", span))
    return proofs


def _complex(z) -> str:
    if abs(z.imag) < 1e-12:
        return f"{z.real:.6g}"
    return f"{z.real:.6g}{'+' if z.imag >= 0 else '-'}{abs(z.imag):.6g}i"
