"""IR → kernel plan: which form each quantity takes, numbers as float64 literals.

Choices made here, all reported by ``lowering_report``:
- B(t): closed form from sympy, else Gauss–Legendre quadrature of beta (64 nodes on [0, t]).
- Φ(s): closed form when A has only rational real eigenvalues (VP, CLD: polynomial times
  exponentials, checked against mpmath); else torch.linalg.matrix_exp. Near s = 0 the
  kernel base uses exact Taylor series for Φ and Σ (structural zeros stay exact).
- Σ(s): Taylor series for small s·‖A‖, stationary identity Σ∞ + Φ(Σ0 - Σ∞)Φᵀ above.
- t_min: the spec's, unless the float64 kernel's Σ(t_min) (hybrid or not, emulated with numpy)
  is off by more than ROUNDING_TOL in Σ's own scale against 50 digits; then the smallest
  safe t_min is derived and reported.
"""
from __future__ import annotations

import math
import re

import attrs
import mpmath as mp
import numpy as np
import sympy as sp

from .evaluate import T_SYMBOL

S_SYMBOL = sp.Symbol("s", nonnegative=True)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ROUNDING_TOL = 1e-4  # accepted error of the kernel's float64 Σ(t_min) in its own scale, max|L⁻¹ΔL⁻ᵀ|


@attrs.frozen
class ParamPlan:
    attr: str           # attribute name in the generated module
    symbol: sp.Symbol
    positive: bool
    raw_init: float


@attrs.frozen
class BlockPlan:
    """A learned block: its parameter tensors and index literals."""

    block: str
    kind: str
    index: tuple        # global indices of the learned variables
    rank: int | None
    entries: tuple      # skew: ((i, j), ...) global (row > col) positions of free entries
    raw_init: tuple     # flat float values of the raw parameter(s)
    attrs_: tuple       # generated parameter attribute names


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


def _floats(M) -> tuple:
    return tuple(tuple(float(sp.N(M[i, j], 30)) for j in range(M.cols)) for i in range(M.rows))


def inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def lower(spec) -> KernelPlan:
    import hashlib
    from .checks.schedule import integrated_beta
    from .printer import format_spec
    for name in spec.variables:
        if not _IDENT.match(name):
            raise ValueError(f"variable name {name!r} is not an identifier")  # grammar guarantees this
    B = integrated_beta(spec.beta)
    gl = None
    if B is None:
        nodes, weights = np.polynomial.legendre.leggauss(64)
        gl = (tuple(float(x) for x in nodes), tuple(float(w) for w in weights))
    params = tuple(_param_plan(p) for p in spec.params)
    blocks = tuple(_block_plan(b, spec) for b in spec.learned)
    learned = {b.block for b in spec.learned}
    fixed, symbolic = {}, {}
    for name, M in (("Q", spec.Q), ("D", spec.D)):
        if name in learned:
            continue
        if M.free_symbols:
            symbolic[name] = M
        else:
            fixed[name] = _floats(M)
    phi = None if (spec.symbols or learned) else closed_form_phi(spec.A)
    t_min, note = derive_t_min(spec)
    return KernelPlan(
        spec_name=spec.name, source_hash=hashlib.sha256(format_spec(spec).encode()).hexdigest()[:16],
        names=spec.variables, T=float(spec.T), t_min=t_min, t_min_spec=float(spec.t_min), t_min_note=note,
        noised=tuple(bool(n) for n in spec.noised), sigma_inf=_floats(spec.target), aux_init=_floats(spec.aux_init),
        beta=spec.beta, B=B, gauss_legendre=gl, fixed=fixed, symbolic=symbolic, params=params, blocks=blocks,
        phi_closed=phi, D_sqrt=fixed_sqrt(spec.D) if "D" in fixed else None)


def _param_plan(p) -> ParamPlan:
    init = float(sp.N(p.init, 30))
    return ParamPlan(f"p_{p.name}", p.symbol, p.positive, inverse_softplus(init) if p.positive else init)


def _block_plan(b, spec) -> BlockPlan:
    index = tuple(spec.variables.index(v) for v in b.over)
    init = np.array(_floats(b.init))
    sub = init[np.ix_(index, index)]
    n = len(index)
    if b.kind == "skew":
        entries = tuple((index[i], index[j]) for i in range(n) for j in range(i)
                        if b.mask is None or b.mask[i, j] != 0)
        raw = tuple(float(init[i, j]) for i, j in entries)
        return BlockPlan(b.block, b.kind, index, None, entries, (raw,), (f"theta_{b.block}",))
    if b.kind == "diagonal":
        raw = tuple(inverse_softplus(float(sub[i, i])) for i in range(n))
        return BlockPlan(b.block, b.kind, index, None, (), (raw,), (f"theta_{b.block}",))
    if b.kind == "psd":
        L = np.linalg.cholesky(sub)
        off = tuple((index[i], index[j]) for i in range(n) for j in range(i))
        raw_off = tuple(float(L[i, j]) for i in range(n) for j in range(i))
        raw_diag = tuple(inverse_softplus(float(L[i, i])) for i in range(n))
        return BlockPlan(b.block, b.kind, index, None, off, (raw_off, raw_diag),
                         (f"theta_{b.block}_offdiag", f"theta_{b.block}_diag"))
    w, V = np.linalg.eigh(sub)
    order = np.argsort(w)[::-1][: b.rank]
    Bm = V[:, order] * np.sqrt(np.clip(w[order], 0.0, None))  # rank ≤ r was checked by the builder
    return BlockPlan(b.block, b.kind, index, b.rank, (), (tuple(float(x) for x in Bm.reshape(-1)),),
                     (f"theta_{b.block}",))


def fixed_sqrt(D) -> tuple:
    """A square root of a constant PSD D: exact entrywise for a diagonal D, else the
    symmetric root from a 30-digit mpmath eigendecomposition (eigenvalues that are
    negative only by rounding are set to 0; D was proved PSD)."""
    K = D.rows
    if all(D[i, j] == 0 for i in range(K) for j in range(K) if i != j):
        return tuple(tuple(float(sp.N(sp.sqrt(D[i, i]), 30)) if i == j else 0.0 for j in range(K)) for i in range(K))
    with mp.workdps(30):
        w, V = mp.eigsy(mp.matrix(_floats(D)))
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
        Am = mp.matrix(_floats(A))
        for s in (0.01, 0.7, 3.0):
            ref = mp.expm(s * Am)
            got = Phi.subs(S_SYMBOL, sp.Float(s, 40)).evalf(40)
            if max(abs(float(got[i, j]) - float(ref[i, j])) for i in range(A.rows) for j in range(A.rows)) > 1e-14:
                return None
    return sp.ImmutableMatrix(Phi)


def _sigma_mp(A, D, S0, Sinf, s):
    """Σ at 50 digits via the stationary identity (cancellation is harmless at this precision)."""
    Phi = mp.expm(s * A)
    return Sinf + Phi * (S0 - Sinf) * Phi.T


# The kernel base's branch rule (sdec/emit/kernel_base.py; a test keeps them equal).
SERIES_TAU = 3.0
SERIES_TERMS = 48


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


def derive_t_min(spec) -> tuple[float, str | None]:
    """The spec's t_min, or the smallest t where the float64 kernel's Σ_t (hybrid and not)
    is accurate to ROUNDING_TOL in Σ's own scale, measured against 50 digits."""
    from .checks import at_init
    from .checks.schedule import integrated_beta
    t_spec = float(spec.t_min)
    Q0, D0 = at_init(spec)
    with mp.workdps(50):
        A = mp.matrix(_floats(-(Q0 + D0) * spec.target.inv()))
        D = mp.matrix(_floats(D0))
        Sinf = mp.matrix(_floats(spec.target))
        starts = [mp.zeros(spec.K, spec.K), mp.zeros(spec.K, spec.K)]
        for i in range(1, spec.K):
            for j in range(1, spec.K):
                starts[1][i, j] = mp.mpf(str(sp.N(spec.aux_init[i - 1, j - 1], 50)))
        B = integrated_beta(spec.beta)
        f = sp.lambdify(T_SYMBOL, spec.beta, "mpmath")

        def error_at(t):
            s = mp.mpf(str(sp.N(B.subs(T_SYMBOL, t), 50))) if B is not None else mp.quad(f, [0, t])
            return max(_own_scale_error(kernel_sigma64(A, D, S0, Sinf, s), _sigma_mp(A, D, S0, Sinf, s))
                       for S0 in starts)

        worst = error_at(t_spec)
        if worst <= ROUNDING_TOL:
            return t_spec, None
        lo, hi = t_spec, float(spec.T)
        if error_at(hi) > ROUNDING_TOL:
            return t_spec, "the float64 kernel is inaccurate even at T; kept the spec's t_min"
        for _ in range(60):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if error_at(mid) > ROUNDING_TOL else (lo, mid)
            if hi / lo < 1.01:
                break
    return hi, (f"t_min raised from {t_spec:g} to {hi:.4g}: below it the float64 covariance of q(y_t|·) is "
                f"off by more than {ROUNDING_TOL:g} in its own scale ({worst:.3g} at the spec's t_min, "
                f"measured against 50 digits), so Cholesky and the score would be unreliable")


def lowering_report(plan: KernelPlan) -> str:
    from .printer import expr_text
    lines = [f"sde {plan.spec_name}: K = {plan.K}, state ({', '.join(plan.names)}), T = {plan.T:g}, t_min = {plan.t_min:g}"]
    if plan.t_min_note:
        lines.append(f"  NOTE: {plan.t_min_note}")
    lines.append(f"  beta(t) = {expr_text(plan.beta)}: printed as a torch expression")
    lines.append("  B(t)   : " + (f"closed form {expr_text(plan.B)}" if plan.B is not None
                                  else "Gauss–Legendre quadrature of beta, 64 nodes on [0, t]"))
    if plan.phi_closed is not None:
        lines.append("  Φ(t)   : closed form expm(B(t) A) from sympy (real rational eigenvalues), verified against mpmath")
    else:
        lines.append("  Φ(t)   : torch.linalg.matrix_exp(B(t) A) (no closed form used)")
    lines.append("  near 0 : exact Taylor series in s = B(t) for Φ and Σ when s·‖A‖₂ ≤ 3 (structural zeros stay exact)")
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
