"""IR → kernel plan: which form each quantity takes, numbers as float64 literals.

Choices made here, all reported by ``lowering_report``:
- B(t): closed form from sympy, else Gauss–Legendre quadrature of beta (64 nodes on [0, t]).
- Φ(s): closed form when A has only rational real eigenvalues (VP, CLD: polynomial times
  exponentials, checked against mpmath); else scaling and squaring of its Taylor series. Near s = 0 the
  kernel base uses exact Taylor series for Φ and Σ (structural zeros stay exact).
- Σ(s): Taylor series for small s·‖A‖, stationary identity Σ∞ + Φ(Σ0 - Σ∞)Φᵀ above.
- t_min: the spec's, unless the float64 kernel is inaccurate there (sdec.backend.t_min).
- learnable parameters: raw tensors and their initial values (sdec.backend.learned).
"""
from __future__ import annotations

import hashlib
import re

import attrs
import mpmath as mp
import numpy as np
import sympy as sp

from ..language.exact import float_rows
from ..language.format import expr_text, format_spec
from .learned import block_plan, param_plan
from .t_min import SERIES_TAU, derive_t_min

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
    B: sp.Expr | None
    gauss_legendre: tuple | None    # (nodes, weights) on [-1, 1] when B has no closed form
    fixed: dict = attrs.field(eq=False)   # "Q"/"D" -> float matrix (no parameters)
    symbolic: dict = attrs.field(eq=False)  # "Q"/"D" -> sympy matrix in param symbols
    params: tuple = ()
    blocks: tuple = ()
    phi_closed: sp.ImmutableMatrix | None = None
    D_sqrt: tuple | None = None     # S with S Sᵀ = D for a fixed D

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
    B = spec.report.B
    gl = None
    if B is None:
        nodes, weights = np.polynomial.legendre.leggauss(64)
        gl = (tuple(float(x) for x in nodes), tuple(float(w) for w in weights))
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
    phi = None if (spec.symbols or learned) else closed_form_phi(spec.A)
    t_min, note = derive_t_min(spec)
    return KernelPlan(
        spec_name=spec.name, source_hash=hashlib.sha256(format_spec(spec).encode()).hexdigest()[:16],
        names=spec.variables, T=float(spec.T), t_min=t_min, t_min_spec=float(spec.t_min), t_min_note=note,
        noised=tuple(bool(n) for n in spec.noised), sigma_inf=float_rows(spec.target), aux_init=float_rows(spec.aux_init),
        beta=spec.beta, B=B, gauss_legendre=gl, fixed=fixed, symbolic=symbolic, params=params, blocks=blocks,
        phi_closed=phi, D_sqrt=fixed_sqrt(spec.D) if "D" in fixed else None)


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


def closed_form_phi(A) -> sp.ImmutableMatrix | None:
    """expm(s A) in closed form when every eigenvalue of A is a real rational, else None."""
    charpoly = A.charpoly(sp.Symbol("lam"))
    roots = sp.roots(charpoly, multiple=True)
    if len(roots) != A.rows or not all(r.is_Rational for r in roots):
        return None
    Phi = (S_SYMBOL * sp.Matrix(A)).exp().applyfunc(lambda e: sp.factor_terms(sp.expand(e)))
    if Phi.has(sp.I) or any(e.has(sp.sinh, sp.cosh, sp.sin, sp.cos) for e in Phi):
        return None
    with mp.workdps(40):
        Am = mp.matrix(float_rows(A))
        for s in (0.01, 0.7, 3.0):
            ref = mp.expm(s * Am)
            got = Phi.subs(S_SYMBOL, sp.Float(s, 40)).evalf(40)
            if max(abs(float(got[i, j]) - float(ref[i, j])) for i in range(A.rows) for j in range(A.rows)) > 1e-14:
                return None
    return sp.ImmutableMatrix(Phi)


def lowering_report(plan: KernelPlan) -> str:
    lines = [f"sde {plan.spec_name}: K = {plan.K}, state ({', '.join(plan.names)}), T = {plan.T:g}, t_min = {plan.t_min:g}"]
    if plan.t_min_note:
        lines.append(f"  NOTE: {plan.t_min_note}")
    lines.append(f"  beta(t) = {expr_text(plan.beta)}: printed as a torch expression")
    lines.append("  B(t)   : " + (f"closed form {expr_text(plan.B)}" if plan.B is not None
                                  else "Gauss–Legendre quadrature of beta, 64 nodes on [0, t]"))
    if plan.phi_closed is not None:
        lines.append("  Φ(t)   : closed form expm(B(t) A) from sympy (real rational eigenvalues), verified against mpmath")
    else:
        lines.append("  Φ(t)   : expm(B(t) A) by scaling and squaring of its Taylor series (no closed form used)")
    if plan.K == 1:
        lines.append("  Σ(t)   : closed form -Σ∞ expm1(2 a B(t)) + Σ0 e^(2 a B(t)), a = A (K = 1; no cancellation near 0)")
    else:
        lines.append(f"  near 0 : exact Taylor series in s = B(t) for Φ and Σ when s·‖A‖₂ ≤ {SERIES_TAU:g} "
                     "(structural zeros stay exact)")
        lines.append("  Σ(t)   : stationary identity Σ∞ + Φ (Σ0 - Σ∞) Φᵀ above the series range")
    lines.append("  ELBO   : score_norm by Gauss–Legendre in log t; divergence and truncation exact; importance "
                 "time density p(t) ∝ tr(Σ_t⁻¹ G Gᵀ(t)) on [t_min, T] (piecewise constant, 512 geometric bins)")
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
