"""Proofs and checks over the IR. ``run_checks(spec)`` returns a Report; failed proofs are errors."""
from __future__ import annotations

from .algebra import check_aux_init, check_psd, check_skew, check_target
from .convergence import check_convergence, reached
from .mixing import MIX_TOL, check_mixing
from .report import Proof, Report, at_init, matrix_text
from .schedule import check_beta, check_integral
from .stationarity import check_stationarity

__all__ = ["run_checks", "Proof", "Report", "MIX_TOL"]


def run_checks(spec, mix_tol: float = MIX_TOL) -> Report:
    proofs = []
    proofs += check_target(spec)
    proofs += check_aux_init(spec)
    proofs += check_beta(spec)
    integral, B = check_integral(spec)
    proofs += integral
    proofs += check_skew(spec)
    proofs += check_psd(spec)
    proofs += check_stationarity(spec)
    basics_ok = all(p.ok for p in proofs)
    mixing = None
    if basics_ok:
        proofs += check_convergence(spec)
        if all(p.ok for p in proofs):
            more, mixing = check_mixing(spec, B, mix_tol)
            proofs += more
    facts = _facts(spec, B, mixing, basics_ok)
    return Report(tuple(proofs), facts)


def _facts(spec, B, mixing, basics_ok):
    Q0, D0 = at_init(spec)
    facts = [
        ("name", spec.name), ("form", spec.form), ("variables", list(spec.variables)),
        ("data", spec.data), ("K", spec.K), ("T", str(spec.T)), ("t_min", str(spec.t_min)),
        ("beta", str(spec.beta)), ("B", str(B) if B is not None else None),
        ("Q", matrix_text(spec.Q)), ("D", matrix_text(spec.D)), ("target", matrix_text(spec.target)),
        ("aux_init", matrix_text(spec.aux_init)), ("F", matrix_text(spec.F)), ("GGT", matrix_text(spec.GGT)),
        ("noised_directly", [v for v, n in zip(spec.variables, spec.noised) if n]),
        ("learnable_parameters", spec.parameter_count),
        ("learnable_symbols", [s.name for s in spec.symbols]),
    ]
    if basics_ok:
        A0 = -(Q0 + D0) * spec.target.inv()
        facts.append(("noise_reaches", [v for v, r in zip(spec.variables, reached(A0, D0)) if r]))
    if mixing is not None:
        facts.append(("mixing", mixing))
    return tuple(facts)
