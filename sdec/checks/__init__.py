"""Proofs and checks over the IR. ``run_checks(spec)`` returns a Report; failed proofs are errors."""
from __future__ import annotations

from .algebra import check_aux_init, check_psd, check_skew, check_target
from .convergence import check_convergence, direction_text
from .mixing import MIX_TOL, check_mixing
from .ranges import check_ranges
from .proofs import Proof, Report, matrix_text
from .schedule import check_beta, check_integral
from .stationarity import check_stationarity

__all__ = ["run_checks", "Proof", "Report", "MIX_TOL"]


def run_checks(spec, mix_tol: float = MIX_TOL) -> Report:
    """Each group of proofs runs only when what it builds on holds (no Σ∞⁻¹ of a singular Σ∞)."""
    proofs = check_ranges(spec)
    if proofs:
        return Report(tuple(proofs), _facts(spec, None, None, False, False))
    target = check_target(spec)
    proofs += target
    proofs += check_aux_init(spec)
    beta = check_beta(spec)
    proofs += beta
    B = None
    if _ok(beta):
        integral, B = check_integral(spec)
        proofs += integral
    blocks = check_skew(spec) + check_psd(spec)
    proofs += blocks
    if _ok(target) and _ok(blocks):  # a non-skew Q or non-symmetric D is the whole story: no follow-on
        proofs += check_stationarity(spec)
    basics_ok = _ok(proofs)
    mixing, reach = None, None
    if basics_ok:
        more, reach = check_convergence(spec)
        proofs += more
        if _ok(proofs):
            more, mixing = check_mixing(spec, B, mix_tol)
            proofs += more
    return Report(tuple(proofs), _facts(spec, B, mixing, basics_ok, _ok(target), reach), B)


def _ok(proofs) -> bool:
    return all(p.ok for p in proofs)


def _facts(spec, B, mixing, basics_ok, target_ok, reach=None):
    facts = [
        ("name", spec.name), ("form", spec.form), ("variables", list(spec.variables)),
        ("data", spec.data), ("K", spec.K), ("T", str(spec.T)), ("t_min", str(spec.t_min)),
        ("beta", str(spec.beta)), ("B", str(B) if B is not None else None),
        ("Q", matrix_text(spec.Q)), ("D", matrix_text(spec.D)), ("target", matrix_text(spec.target)),
        ("aux_init", matrix_text(spec.aux_init)),
        ("F", matrix_text(spec.F) if target_ok else None), ("GGT", matrix_text(spec.GGT)),
        ("noised_directly", [v for v, n in zip(spec.variables, spec.noised) if n]),
        ("learnable_parameters", spec.parameter_count),
        ("learnable_symbols", [s.name for s in spec.symbols]),
    ]
    if basics_ok:  # reach is None when a learned D ≻ 0 reaches everything by construction
        rows = reach.rows if reach is not None else (True,) * spec.K
        facts.append(("noise_reaches", [v for v, r in zip(spec.variables, rows) if r]))
        facts.append(("noise_misses", [direction_text(w, spec.variables) for w in reach.missed] if reach else []))
    if mixing is not None:
        facts.append(("mixing", mixing))
    return tuple(facts)
