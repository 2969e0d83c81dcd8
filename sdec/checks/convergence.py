"""Convergence to the target: A = -(Q + D) Σ∞⁻¹ Hurwitz.

Proof route: with Σ∞ ≻ 0 stationary (A Σ∞ + Σ∞ Aᵀ = -2D), A is Hurwitz if and only if
the noise reaches every direction of the state: rank [D, A D, ..., A^{K-1} D] = K
(Kalman). The rank is computed exactly over the number field of the entries
(sdec.language.linalg) within a time budget; past it, at 40 digits with mpmath, and the
verdict says so. A direction w with wᵀ [D, A D, ...] = 0 is never reached by the noise;
along it A has an eigenvalue with real part exactly 0 (Lyapunov), so the process does not
forget its start. Eigenvalues are reported numerically as a cross-check.
"""
from __future__ import annotations

import attrs
import mpmath as mp
import numpy as np
import sympy as sp
from sympy.polys.matrices import DomainMatrix

from ..language.format import number_text
from ..language.linalg import field_matrices, remember_inverse
from ..language.budget import SYMBOLIC_SECONDS, limited
from .proofs import Proof, block_span, numeric


@attrs.frozen
class Reach:
    """What the noise reaches: the Kalman rank, per variable whether its row is nonzero,
    and a basis of the directions never reached (as exact vectors, empty at full rank)."""

    rank: int
    rows: tuple
    missed: tuple
    exact: bool  # False: decided at 40 digits because the exact route ran out of time


def reach(Q0, D0, target, seconds: float | None = None) -> Reach:
    """The Kalman test of A = -(Q0 + D0) Σ∞⁻¹ and D0 (numbers, no free symbols), exactly
    within `seconds` (default SYMBOLIC_SECONDS), else at 40 digits."""
    step = limited(SYMBOLIC_SECONDS if seconds is None else seconds, _exact_reach, Q0, D0, target)
    if step.finished and step.value is not None:
        return step.value
    return _numeric_reach(Q0, D0, target)


def _exact_reach(Q0, D0, target):
    try:
        M, D, S = field_matrices(sp.Matrix(Q0 + D0), sp.Matrix(D0), sp.Matrix(target))
    except (ValueError, TypeError, NotImplementedError, sp.PolynomialError):
        return None
    S_inv = S.inv()
    remember_inverse(target, S_inv.to_Matrix())  # F = beta A for the report, without a second field
    A = -M * S_inv
    blocks, power = [D], D
    for _ in range(A.shape[0] - 1):
        power = A * power
        blocks.append(power)
    C = DomainMatrix.hstack(*blocks)
    zero = C.domain.zero
    rows = tuple(any(x != zero for x in row) for row in C.to_list())
    missed = tuple(sp.ImmutableMatrix(v) for v in C.transpose().to_Matrix().nullspace())
    return Reach(C.rank(), rows, missed, True)


def _numeric_reach(Q0, D0, target):
    with mp.workdps(40):
        def mpm(M):
            return mp.matrix([[mp.mpf(str(sp.N(M[i, j], 45))) for j in range(M.cols)] for i in range(M.rows)])
        A = -(mpm(Q0) + mpm(D0)) * mp.inverse(mpm(target))
        D = mpm(D0)
        K = A.rows
        blocks, power = [D], D
        for _ in range(K - 1):
            power = A * power
            blocks.append(power)
        C = mp.matrix(K, K * K)
        for b, block in enumerate(blocks):
            for i in range(K):
                for j in range(K):
                    C[i, b * K + j] = block[i, j]
        U, sv, _ = mp.svd_r(C)
        scale = max(max(abs(x) for x in C), mp.mpf(1))
        rank = sum(1 for s in sv if s > mp.mpf(10) ** -30 * scale)
        rows = tuple(any(abs(C[i, j]) > mp.mpf(10) ** -30 * scale for j in range(C.cols)) for i in range(K))
        missed = tuple(sp.ImmutableMatrix([sp.Float(str(U[i, k]), 6) for i in range(K)]) for k in range(rank, K))
    return Reach(rank, rows, missed, False)


def direction_text(vector, names) -> str:
    """A direction of the state as a combination of the variables: 'x - 2 v', '(sqrt(2)/2) w'."""
    first = next((c for c in vector if c != 0), 1)
    if first.is_number and first.is_negative:
        vector = [-c for c in vector]
    text = ""
    for c, name in zip(vector, names):
        if c == 0:
            continue
        negative = bool(c.is_number and c.is_negative)
        size = -c if negative else c
        coef = "" if size == 1 else (number_text(size) if size.is_Float else sp.sstr(size) if size.is_Rational
                                     else f"({sp.sstr(size)})") + " "
        if not text:
            text = ("-" if negative else "") + coef + name
        else:
            text += (" - " if negative else " + ") + coef + name
    return text or "0"


def check_convergence(spec):
    span = block_span(spec, "D")
    learned_pd = any(b.block == "D" and b.kind in ("psd", "diagonal") and len(b.over) == spec.K for b in spec.learned)
    Q0, D0 = spec.at_init()
    A0 = -(numeric(Q0) + numeric(D0)) @ np.linalg.inv(numeric(spec.target))
    eig = sorted(np.linalg.eigvals(A0), key=lambda z: (z.real, z.imag))
    data = (("eigenvalues", [[float(e.real), float(e.imag)] for e in eig]),)
    where = "" if not spec.symbols else " at the initial parameter values"
    eig_text = ", ".join(_complex(e) for e in eig)
    proofs = [Proof("eigenvalues of A (F = beta(t) A)", "info", f"{eig_text}{where} (float64)", span, data)]
    title = "noise reaches every variable (Kalman rank [D, AD, ...] = K)"
    conv = "converges to N(0, Σ∞) (every eigenvalue of F has negative real part)"
    if learned_pd:
        proofs.append(Proof(title, "proved", "D is positive definite for every parameter value", span))
        proofs.append(Proof(conv, "proved", "D ≻ 0 and Σ∞ ≻ 0 make A Hurwitz (Lyapunov)", span))
        return proofs, None
    r = reach(Q0, D0, spec.target)
    how = "exact" if r.exact else "at 40 digits: the exact rank ran out of its time budget"
    if r.rank == spec.K:
        verdict = "checked" if (spec.symbols or not r.exact) else "proved"
        proofs.append(Proof(title, verdict, f"rank {r.rank} = K ({how}{where})", span))
        proofs.append(Proof(conv, verdict, "Kalman rank + stationarity (Lyapunov)" + where, span))
        if not all(e.real < 0 for e in eig):  # the exact proof stands; float64 cannot resolve this drift
            proofs.append(Proof("float64 eigenvalues agree with the proof", "warning",
                                "float64 eigenvalues of A do not all have negative real parts although "
                                "the exact proof shows every one is negative: the drift is too stiff for "
                                "floating point (time scales far apart)", span))
        return proofs, r
    missed = ", ".join(direction_text(v, spec.variables) for v in r.missed)
    alone = [v for v, row in zip(spec.variables, r.rows) if not row]
    what = (f"the variable{'s' if len(alone) > 1 else ''} {', '.join(alone)}" if len(alone) == len(r.missed) and alone
            else f"the combination{'s' if len(r.missed) > 1 else ''} {missed} of the variables")
    if spec.form == "equations" and alone and len(alone) == len(r.missed):
        # each missed direction is one variable: its own equation is where noise or a coupling goes
        span = spec.span_of(("eq", alone[0])) or span
    proofs.append(Proof(title, "failed", f"rank {r.rank} < K = {spec.K} ({how}{where}): the noise never reaches {what}",
                        span))
    proofs.append(Proof(conv, "failed", f"A has an eigenvalue with real part exactly 0 along what the noise never "
                        f"reaches (stationary with Σ∞ ≻ 0: Lyapunov){where}; the process does not forget its start",
                        span))
    return proofs, r


def _complex(z) -> str:
    if abs(z.imag) < 1e-12:
        return f"{z.real:.6g}"
    return f"{z.real:.6g}{'+' if z.imag >= 0 else '-'}{abs(z.imag):.6g}i"
