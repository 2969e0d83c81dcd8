"""IR → kernel plan: which form each quantity takes, numbers as float64 literals.

Choices made here, all reported by ``lowering_report``:
- B(t): the closed form from the schedule check in a float64-stable form (expm1/log1p), else
  Gauss–Legendre quadrature of beta, whichever is accurate against mpmath on a grid of
  [t_min, T] (sdec.backend.time_change).
- Φ(s): closed form when A has only rational real eigenvalues (VP, CLD: polynomial times
  exponentials) and its float64 values match mpmath's expm on a grid of s up to B(T);
  else scaling and squaring of its Taylor series. Near s = 0 the kernel base uses exact
  Taylor series for Φ and Σ (structural zeros stay exact); for K = 1 Σ has a closed form.
- Σ(s): Taylor series for small s·‖A‖, scaling and squaring of the series above.
- t_min: the spec's, unless the float64 kernel is inaccurate there (sdec.backend.t_min).
- learnable parameters: raw tensors and their initial values (sdec.backend.learned).
"""
from __future__ import annotations

import functools
import hashlib
import re

import attrs
import mpmath as mp
import numpy as np
import sympy as sp

from ..language.exact import float_rows
from ..language.format import expr_text, format_spec, hash_text
from ..language.ir import T_SYMBOL
from ..emit.torch_expr import fold_constants
from .learned import block_plan, param_plan
from .t_min import SERIES_TAU, TABLE_BINS, derive_t_min
from .time_change import REQUIRED, TimeChange, choose
from ..language.budget import SYMBOLIC_SECONDS, limited

S_SYMBOL = sp.Symbol("s", nonnegative=True)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@attrs.frozen
class KernelPlan:
    spec_name: str
    source_hash: str
    names: tuple
    T: float
    t_min: float
    t_min_spec: float
    t_min_note: str | None
    noised: tuple
    sigma_inf: tuple
    aux_init: tuple
    beta: sp.Expr
    time_change: TimeChange         # how B(t) is emitted: closed form or quadrature, with its accuracy
    fixed: dict = attrs.field(eq=False)   # "Q"/"D" -> float matrix (no parameters)
    symbolic: dict = attrs.field(eq=False)  # "Q"/"D" -> sympy matrix in param symbols
    params: tuple = ()
    blocks: tuple = ()
    phi_closed: sp.ImmutableMatrix | None = None
    phi_note: str | None = None     # why a closed form Φ was not used, or its measured accuracy
    D_sqrt: tuple | None = None     # S with S Sᵀ = D for a fixed D
    canonical: str = ""             # the spec as `sdec fmt` prints it (for the module docstring)
    exact: dict = attrs.field(factory=dict, eq=False)  # exact matrices and times for the docstring

    @property
    def K(self) -> int:
        return len(self.names)


def lower(spec) -> KernelPlan:
    """The kernel plan of a checked spec (from sdec.parse): B(t) comes from its proofs."""
    if spec.report is None:
        raise ValueError("lower() needs a checked spec (from sdec.parse or sdec.analyze)")
    for name in spec.variables:
        if not _IDENT.match(name):
            raise ValueError(f"variable name {name!r} is not an identifier")  # grammar guarantees this
    t_min, note = derive_t_min(spec)
    time_change = choose(spec.beta, spec.report.B, min(t_min, float(spec.t_min)), float(spec.T))
    params = tuple(param_plan(p) for p in spec.params)
    blocks = tuple(block_plan(b, spec) for b in spec.learned)
    learned = {b.block for b in spec.learned}
    fixed, symbolic = {}, {}
    for name, M in (("Q", spec.Q), ("D", spec.D)):
        if name in learned:
            continue
        if M.free_symbols:
            symbolic[name] = M
        else:
            fixed[name] = float_rows(M)
    A, phi, phi_note = None, None, None
    if not (spec.symbols or learned):
        step = limited(SYMBOLIC_SECONDS, lambda: spec.A)  # exact inverse of Σ∞
        if step.finished:
            A = step.value
            phi, phi_note = closed_form_phi(A, _s_max(spec))
        else:
            phi_note = (f"the exact A = -(Q + D) Σ∞⁻¹ did not finish within the {SYMBOLIC_SECONDS:g} s budget "
                        "for a symbolic step; the module computes A in float64 and uses the matrix exponential")
    canonical = format_spec(spec)
    exact = {"Q": spec.Q, "D": spec.D, "target": spec.target, "aux_init": spec.aux_init, "T": spec.T,
             "t_min": spec.t_min, "A": A}
    exact.update({b.block + "_init": b.init for b in spec.learned})
    return KernelPlan(
        spec_name=spec.name, source_hash=hashlib.sha256(hash_text(canonical).encode()).hexdigest()[:16],
        canonical=canonical, exact=exact,
        names=spec.variables, T=float(spec.T), t_min=t_min, t_min_spec=float(spec.t_min), t_min_note=note,
        noised=tuple(bool(n) for n in spec.noised), sigma_inf=float_rows(spec.target), aux_init=float_rows(spec.aux_init),
        beta=spec.beta, time_change=time_change, fixed=fixed, symbolic=symbolic, params=params,
        blocks=blocks, phi_closed=phi, phi_note=phi_note, D_sqrt=fixed_sqrt(spec.D) if "D" in fixed else None)


def fixed_sqrt(D) -> tuple:
    """A square root of a constant PSD D: exact entrywise for a diagonal D, else the
    symmetric root from a 30-digit mpmath eigendecomposition (eigenvalues that are
    negative only by rounding are set to 0; D was proved PSD)."""
    K = D.rows
    if all(D[i, j] == 0 for i in range(K) for j in range(K) if i != j):
        return tuple(tuple(float(sp.N(sp.sqrt(D[i, i]), 30)) if i == j else 0.0 for j in range(K)) for i in range(K))
    with mp.workdps(30):
        w, V = mp.eigsy(mp.matrix(float_rows(D)))
        root = V * mp.diag([mp.sqrt(max(x, 0)) for x in w]) * V.T
        return tuple(tuple(float(root[i, j]) for j in range(K)) for i in range(K))


def _s_max(spec) -> float:
    """B(T) at 30 digits: the largest s the kernel evaluates Φ(s) at."""
    B = spec.report.B
    if B is not None:
        return float(sp.N(B.subs(T_SYMBOL, spec.T), 30))
    f = sp.lambdify(T_SYMBOL, spec.beta, "mpmath")
    with mp.workdps(30):
        return float(mp.quad(f, [0, mp.mpf(float(spec.T))]))


PHI_POINTS = 16


def closed_form_phi(A, s_max: float = 3.0, seconds: float | None = None):
    """See _closed_form_phi, run under a time budget (default SYMBOLIC_SECONDS; past it: no
    closed form, and the note says so); cached, since tests and training compile the same
    spec often."""
    seconds = SYMBOLIC_SECONDS if seconds is None else seconds
    return _closed_form_phi(sp.ImmutableMatrix(A), float(s_max), float(seconds))


@functools.lru_cache(maxsize=128)
def _closed_form_phi(A, s_max: float, seconds: float):
    step = limited(seconds, _symbolic_phi, A)
    if not step.finished:
        return None, (f"the closed form of expm(s A) did not finish within the {seconds:g} s budget "
                      "for a symbolic step; the matrix exponential is used")
    return _checked_phi(step.value, A, s_max) if step.value is not None else (None, None)


def _rational_eigenvalues(A) -> bool:
    """True when every eigenvalue of A is a real rational: A rational (an irrational entry is
    taken as no, without symbolic work), its float64 eigenvalues real, and its characteristic
    polynomial over QQ a product of linear factors."""
    A = sp.ImmutableMatrix(A)
    if not all(e.is_Rational for e in A):
        return False
    w = np.linalg.eigvals(np.array(float_rows(A)))
    if np.abs(w.imag).max(initial=0.0) > 1e-9 * max(1.0, np.abs(w).max(initial=0.0)):
        return False
    factors = sp.Poly(A.charpoly(sp.Symbol("lam")).as_expr(), sp.Symbol("lam"), domain="QQ").factor_list()[1]
    return all(f.degree() == 1 for f, _ in factors)


def _symbolic_phi(A):
    """expm(s A) in closed form when every eigenvalue of A is a real rational, else None."""
    if not _rational_eigenvalues(A):
        return None
    Phi = (S_SYMBOL * sp.Matrix(A)).exp().applyfunc(lambda e: sp.factor_terms(sp.expand(e)))
    if Phi.has(sp.I) or any(e.has(sp.sinh, sp.cosh, sp.sin, sp.cos) for e in Phi):
        return None
    return Phi


def _checked_phi(Phi, A, s_max: float):
    """(Phi, its measured accuracy) when the float64 closed form matches mpmath's expm to
    REQUIRED in max-entry scale on a grid of s over the range where the kernel uses it (from
    the series switch to s_max); else (None, why it was rejected)."""
    K = A.rows
    Af = float_rows(A)
    norm = float(np.linalg.norm(np.array(Af), 2))
    s_lo = min(SERIES_TAU / norm if norm > 0 else 1.0, s_max) / 2
    points = np.geomspace(s_lo, max(s_max, 2 * s_lo), PHI_POINTS)
    entries = [sp.lambdify(S_SYMBOL, fold_constants(Phi[i, j]), [np]) for i in range(K) for j in range(K)]
    worst = 0.0
    with mp.workdps(30), np.errstate(all="ignore"):
        Am = mp.matrix(Af)
        for s in points:
            ref = mp.expm(mp.mpf(float(s)) * Am)
            scale = max(abs(ref[i, j]) for i in range(K) for j in range(K))
            got = [float(f(float(s))) for f in entries]
            err = max(abs(mp.mpf(got[i * K + j]) - ref[i, j]) for i in range(K) for j in range(K)) / scale
            if not all(np.isfinite(got)) or err > REQUIRED:
                return None, (f"closed-form Φ rejected: off by {float(err):.2g} of max|Φ| at s = {s:.4g} "
                              "against 30-digit mpmath")
            worst = max(worst, float(err))
    return sp.ImmutableMatrix(Phi), (f"max error {worst:.2g} of max|Φ| against 30-digit mpmath on "
                                     f"{PHI_POINTS} points of s in [{points[0]:.3g}, {points[-1]:.3g}]")


def lowering_report(plan: KernelPlan) -> str:
    lines = [f"sde {plan.spec_name}: K = {plan.K}, state ({', '.join(plan.names)}), T = {plan.T:g}, t_min = {plan.t_min:g}"]
    if plan.t_min_note:
        lines.append(f"  NOTE: {plan.t_min_note}")
    lines.append(f"  beta(t) = {expr_text(plan.beta)}: printed as a torch expression")
    tc = plan.time_change
    lines.append("  B(t)   : " + tc.describe())
    if tc.error > REQUIRED:
        lines.append(f"  WARNING: no form of B(t) tried is accurate to {REQUIRED:g} relative; the most accurate one is used")
    if plan.phi_closed is not None:
        lines.append(f"  Φ(t)   : closed form expm(B(t) A) from sympy (real rational eigenvalues); {plan.phi_note}")
    else:
        lines.append("  Φ(t)   : expm(B(t) A) by scaling and squaring of its Taylor series" + (f" ({plan.phi_note})" if plan.phi_note else
                                                                                       " (no closed form used)"))
    if plan.K == 1:
        lines.append("  Σ(t)   : closed form -Σ∞ expm1(2 a B(t)) + Σ0 e^(2 a B(t)), a = A (K = 1; no cancellation near 0)")
    else:
        lines.append(f"  near 0 : exact Taylor series in s = B(t) for Φ and Σ when s·‖A‖₂ ≤ {SERIES_TAU:g} "
                     "(structural zeros stay exact)")
        lines.append("  Σ(t)   : scaling and squaring above the series range (the series at s/2^j, j doublings "
                     "Σn ← Σn + Φ Σn Φᵀ, Σ = Φ Σ0 Φᵀ + Σn: sums of PSD terms, no cancellation)")
    lines.append("  ELBO   : score_norm, divergence and truncation exact (score_norm from log det Σ at t_min and T); "
                 f"importance time density p(t) ∝ tr(Σ_t⁻¹ G Gᵀ(t)) on [t_min, T] (piecewise constant on {TABLE_BINS} "
                 "geometric bins, each bin's mass from the same log det identity)")
    lines.append("  Q, D   : " + ", ".join(
        [f"{k} fixed" for k in plan.fixed] + [f"{k} from parameters (sympy → torch)" for k in plan.symbolic] +
        [f"{b.block} learned {b.kind}{'(%d)' % b.rank if b.rank else ''} over "
         f"({', '.join(plan.names[i] for i in b.index)})" for b in plan.blocks]))
    count = sum(1 for _ in plan.params) + sum(sum(len(r) for r in b.raw_init) for b in plan.blocks)
    lines.append(f"  learnable parameters: {count}" + "".join(
        f"\n    {p.attr}{' (softplus)' if p.positive else ''} init raw {p.raw_init:.6g}" for p in plan.params) + "".join(
        f"\n    {a}: {len(r)} value(s)" for b in plan.blocks for a, r in zip(b.attrs_, b.raw_init)))
    lines.append(f"  noise enters directly: {', '.join(n for n, z in zip(plan.names, plan.noised) if z)}")
    return "\n".join(lines)
