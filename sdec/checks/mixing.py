"""Mixing by T: how far q(y_T | x) still is from the target N(0, Σ∞).

Computed at 30 significant digits with mpmath (exact input values): Φ(T) = expm(B(T) A),
Σ_T = Σ∞ + Φ (Σ0 - Σ∞) Φᵀ with the hybrid Σ0 = blockdiag(0, Σ_v0). Reported per data
coordinate: KL(q(y_T | x=0) ‖ target) and the extra ½ (Φ e_x)ᵀ Σ∞⁻¹ (Φ e_x) that a data
value of size 1 adds. A warning when their sum exceeds MIX_TOL.
"""
from __future__ import annotations

import mpmath as mp
import sympy as sp

from ..language.format import number_text
from ..language.ir import T_SYMBOL
from .proofs import Proof

MIX_TOL = 0.01  # nats per data coordinate


def _mp(matrix):
    return mp.matrix([[mp.mpf(str(sp.N(matrix[i, j], 40))) for j in range(matrix.cols)] for i in range(matrix.rows)])


def mixing_numbers(spec, B_closed):
    with mp.workdps(30):
        if B_closed is not None:
            BT = mp.mpf(str(sp.N(B_closed.subs(T_SYMBOL, spec.T), 40)))
        else:
            f = sp.lambdify(T_SYMBOL, spec.beta, "mpmath")
            BT = mp.quad(f, [0, mp.mpf(str(sp.N(spec.T, 40)))])
        Q0, D0 = spec.at_init()
        S = _mp(spec.target)
        A = -(_mp(Q0) + _mp(D0)) * mp.inverse(S)
        Phi = mp.expm(BT * A)
        K = spec.K
        S0 = mp.zeros(K, K)
        for i in range(1, K):
            for j in range(1, K):
                S0[i, j] = mp.mpf(str(sp.N(spec.aux_init[i - 1, j - 1], 40)))
        ST = S + Phi * (S0 - S) * Phi.T
        Sinv = mp.inverse(S)
        if mp.det(ST) <= 0:  # Σ_T ≈ the singular hybrid Σ0 when T is tiny: no finite KL at 30 digits
            raise ValueError("Σ_T is singular at 30 digits (T is too short for the noise to spread)")
        kl0 = (sum((Sinv * ST)[i, i] for i in range(K)) - K + mp.log(mp.det(S)) - mp.log(mp.det(ST))) / 2
        col = Phi[:, 0]
        mean = (col.T * Sinv * col)[0, 0] / 2
        return {"B_T": float(BT), "phi_T_max": float(max(abs(x) for x in Phi)),
                "phi_T": [[float(Phi[i, j]) for j in range(K)] for i in range(K)],
                "kl_x0": float(kl0), "mean_term_unit_x": float(mean)}


def check_mixing(spec, B_closed, tol=MIX_TOL):
    title = f"mixed by T = {number_text(spec.T)} (KL to target per coordinate ≤ {number_text(tol)})"
    try:
        n = mixing_numbers(spec, B_closed)
    except (ZeroDivisionError, ValueError) as exc:  # singular Σ_T etc.
        return [Proof(title, "warning", f"could not evaluate the kernel at T: {exc}", spec.span_of("T"))], None
    total = n["kl_x0"] + n["mean_term_unit_x"]
    where = " (at the initial parameter values)" if spec.symbols else ""
    detail = (f"B(T) = {n['B_T']:.6g}, max|Φ(T)| = {n['phi_T_max']:.4g}, KL(q(y_T|x=0) ‖ target) = "
              f"{n['kl_x0']:.3g} nats, + {n['mean_term_unit_x']:.3g} for |x| = 1{where}")
    if total > tol:
        return [Proof(title, "warning", "the process has NOT reached its target by T: " + detail +
                      "; the prior term of the ELBO will pay for it (raise T or beta)", spec.span_of("T"),
                      tuple(n.items()))], n
    return [Proof(title, "checked", detail, spec.span_of("T"), tuple(n.items()))], n
