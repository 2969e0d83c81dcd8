"""The t_min the float64 kernel can be trusted down to.

The spec's t_min is kept unless the kernel's Σ(t_min), computed the way the float64 kernel
computes it (series below the switch; above it the stationary identity, as accurate there as
the kernel's scaling and squaring; emulated with numpy, hybrid
and not), is off by more than EMULATED_TOL (a quarter of ROUNDING_TOL, the accuracy promised:
the kernel's own rounding is not the emulation's) in Σ's own scale against 50 digits; then the
smallest safe t_min is found by bisection and the lowering report says so.
"""
from __future__ import annotations

import ast
import math
from importlib import resources

import mpmath as mp
import numpy as np
import sympy as sp

from ..language.exact import float_rows
from ..language.ir import T_SYMBOL

ROUNDING_TOL = 1e-4  # accepted error of the kernel's float64 Σ(t_min) in its own scale, max|L⁻¹ΔL⁻ᵀ|
# The emulation is another float64 computation of the same Σ: where its error is rounding (a
# nearly singular Σ), the kernel's own rounding differs from it by small factors (drawn K = 4
# specs whose t_min was raised: the native kernel read 1.6x and 2.1x the emulation's 1e-4 at
# the derived t_min, measured at 60 digits), so the emulation is held to a quarter of it.
EMULATED_TOL = ROUNDING_TOL / 4


def _sigma_mp(A, D, S0, Sinf, s):
    """Σ at 50 digits via the stationary identity (cancellation is harmless at this precision)."""
    Phi = mp.expm(s * A)
    return Sinf + Phi * (S0 - Sinf) * Phi.T


def kernel_base_constants(*names) -> tuple:
    """Module-level constants of sdec/emit/kernel_base.py, read from its text: the emitted
    module's numerics are the one source (importing the file would load torch)."""
    text = resources.files("sdec.emit").joinpath("kernel_base.py").read_text(encoding="utf-8")
    found = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = node.value
    return tuple(ast.literal_eval(found[name]) for name in names)


# The kernel base's branch rule: series while s·‖A‖₂ <= SERIES_TAU, SERIES_TERMS terms.
SERIES_TAU, SERIES_TERMS = kernel_base_constants("_SERIES_TAU", "_SERIES_TERMS")
TABLE_BINS = kernel_base_constants("_TABLE_BINS")[0]  # the importance table's bins (lowering report)


def _own_scale_error(approx, Sig) -> float:
    """max|L⁻¹ (approx - Σ) L⁻ᵀ| with L = chol(Σ) at working precision (inf if Σ is not PD)."""
    K = Sig.rows
    try:
        Linv = mp.inverse(mp.cholesky(Sig))
    except (ValueError, ZeroDivisionError):
        return math.inf
    delta = mp.matrix([[mp.mpf(float(approx[i][j])) - Sig[i, j] for j in range(K)] for i in range(K)])
    E = Linv * delta * Linv.T
    return float(max(abs(x) for x in E))


def kernel_sigma64(A, D, S0, Sinf, s) -> list:
    """Σ(s) computed the way the float64 kernel computes it (series below the switch,
    stationary identity above), emulated with numpy."""
    A64, D64, S064, Sinf64 = (np.array(m.tolist(), dtype=float) for m in (A, D, S0, Sinf))
    s = float(s)
    norm = np.linalg.norm(A64, 2)
    if s * norm <= SERIES_TAU:
        out, weight = S064.copy(), 1.0
        AN = A64 @ S064
        N = AN + AN.T + 2.0 * D64
        for k in range(1, SERIES_TERMS):
            weight = weight * s / k
            out = out + weight * N
            AN = A64 @ N
            N = AN + AN.T
        return out.tolist()
    Phi = np.array(mp.expm(s * A).tolist(), dtype=float)
    return (Sinf64 + Phi @ (S064 - Sinf64) @ Phi.T).tolist()


def _inaccurate_at_T(given_state_bad_at_T, hybrid_good_at_t_min) -> str:
    """The note for a kernel whose float64 Σ is off even at T, saying which of the two it is
    where that helps: the kernel given the whole state (Σ0 = 0) and the hybrid one (Σ0 the
    auxiliaries' initial covariance), which the ELBO and training use."""
    if given_state_bad_at_T and hybrid_good_at_t_min:
        return ("the float64 covariance of q(y_t | y_0) (the kernel given the whole state) is inaccurate "
                "even at T, where noise reaches some directions only at high order in t; the hybrid kernel "
                "q(y_t | x), which the ELBO and training use, is accurate at t_min; kept the spec's t_min")
    return "the float64 kernel is inaccurate even at T; kept the spec's t_min"


def derive_t_min(spec) -> tuple[float, str | None]:
    """The spec's t_min, or the smallest t where the float64 kernel's Σ_t (hybrid and not)
    is accurate to ROUNDING_TOL in Σ's own scale, measured against 50 digits (its emulation
    held to EMULATED_TOL)."""
    t_spec = float(spec.t_min)
    Q0, D0 = spec.at_init()
    with mp.workdps(50):
        D = mp.matrix(float_rows(D0))
        Sinf = mp.matrix(float_rows(spec.target))
        A = -(mp.matrix(float_rows(Q0)) + D) * mp.inverse(Sinf)  # numeric: no symbolic inverse
        starts = [mp.zeros(spec.K, spec.K), mp.zeros(spec.K, spec.K)]
        for i in range(1, spec.K):
            for j in range(1, spec.K):
                starts[1][i, j] = mp.mpf(str(sp.N(spec.aux_init[i - 1, j - 1], 50)))
        B = spec.report.B
        f = sp.lambdify(T_SYMBOL, spec.beta, "mpmath")

        def error_at_start(t, S0):
            s = mp.mpf(str(sp.N(B.subs(T_SYMBOL, t), 50))) if B is not None else mp.quad(f, [0, t])
            return _own_scale_error(kernel_sigma64(A, D, S0, Sinf, s), _sigma_mp(A, D, S0, Sinf, s))

        def error_at(t):
            return max(error_at_start(t, S0) for S0 in starts)

        at_spec = [error_at_start(t_spec, S0) for S0 in starts]  # given the state, hybrid
        worst = max(at_spec)
        if worst <= EMULATED_TOL:
            return t_spec, None
        lo, hi = t_spec, float(spec.T)
        at_T = [error_at_start(hi, S0) for S0 in starts]
        if max(at_T) > EMULATED_TOL:
            return t_spec, _inaccurate_at_T(at_T[0] > EMULATED_TOL, at_spec[1] <= EMULATED_TOL)
        for _ in range(60):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if error_at(mid) > EMULATED_TOL else (lo, mid)
            if hi / lo < 1.01:
                break
    return hi, (f"t_min raised from {t_spec:g} to {hi:.4g}: below it the float64 covariance of q(y_t|·) is "
                f"off by more than {ROUNDING_TOL:g} in its own scale ({worst:.3g} at the spec's t_min as "
                f"emulated, which is held to {EMULATED_TOL:g}; measured against 50 digits), so Cholesky and "
                f"the score would be unreliable")
