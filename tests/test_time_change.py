"""B(t) as emitted: stable closed forms or quadrature, checked against mpmath at compile time.

Independent reference: 30-digit mpmath quadrature of beta (never the sympy closed form)."""
import math
import os

import mpmath as mp
import pytest
import sympy as sp
import torch
from sympy.codegen.cfunctions import expm1

import sdec
from sdec.backend.lower import closed_form_phi, lower, lowering_report

SPECS = os.path.join(os.path.dirname(__file__), "..", "specs")
SHIPPED = ("vpsde", "cld", "alda", "malda", "learned2", "learned3")

ONE_D = """sde oned
state x
beta(t) = {beta}
T = 1
t_min = 1e-4
target normal(0, 1)
D = [[1]]
"""

BETAS = {  # spec text -> mpmath function
    "exp(2*t)": lambda t: mp.exp(2 * t),
    "1 + (1 - t)^100": lambda t: 1 + (1 - t) ** 100,
    "1 + (1 - t)^60": lambda t: 1 + (1 - t) ** 60,
    "1/(1 + t)": lambda t: 1 / (1 + t),
    "exp(-t)": lambda t: mp.exp(-t),
    "tanh(t) + 1/2": lambda t: mp.tanh(t) + mp.mpf(1) / 2,
}


def _grid(t_min, T):
    """t_min itself, points just above it, a geometric sweep and a uniform one."""
    pts = {t_min, t_min * (1 + 1e-9), 1.5 * t_min, T}
    pts |= {t_min * (T / t_min) ** (k / 24) for k in range(25)}
    pts |= {T * k / 16 for k in range(1, 17)}
    return sorted(pts)


def _worst_relative_error(proc, beta_mp, t_min, T):
    ts = _grid(t_min, T)
    got = proc._B(torch.tensor(ts, dtype=torch.float64)).tolist()
    worst, ref, last = 0.0, mp.mpf(0), mp.mpf(0)
    with mp.workdps(30):
        for t, g in zip(ts, got):
            ref += mp.quad(beta_mp, [last, mp.mpf(t)])
            last = mp.mpf(t)
            worst = max(worst, float(abs(mp.mpf(g) - ref) / ref))
    return worst


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_B_matches_mpmath_to_1e14(name):
    spec = sdec.parse_file(os.path.join(SPECS, f"{name}.sde"))
    beta = sp.lambdify(sp.Symbol("t"), spec.beta.subs({s: sp.Symbol("t") for s in spec.beta.free_symbols}), "mpmath")
    proc = sdec.compile(spec)
    assert _worst_relative_error(proc, beta, float(spec.t_min), float(spec.T)) <= 1e-14


@pytest.mark.parametrize("beta", sorted(BETAS))
def test_B_matches_mpmath_to_1e14(beta):
    proc = sdec.compile_text(ONE_D.format(beta=beta), "oned.sde")
    assert _worst_relative_error(proc, BETAS[beta], 1e-4, 1.0) <= 1e-14


@pytest.mark.parametrize("power", [100, 60])
def test_steep_polynomial_schedule_compiles_to_correct_numbers(power):
    """The expanded closed form of ∫ 1 + (1 - t)^n cancels (B(1) was -4.7e10 for n = 100);
    quadrature is emitted instead and the report says why."""
    spec = sdec.parse(ONE_D.format(beta=f"1 + (1 - t)^{power}"), "steep.sde")
    report = lowering_report(lower(spec))
    assert "B(t)   : Gauss–Legendre quadrature" in report and "rejected (relative error" in report
    proc = sdec.compile(spec)
    B1 = float(proc._B(torch.tensor([1.0], dtype=torch.float64)))
    assert abs(B1 - (1 + 1 / (power + 1))) <= 1e-14
    Phi, Sigma = proc.transition(torch.tensor([1.0], dtype=torch.float64))
    # dx = -beta x dt + sqrt(2 beta) dW from x0: Φ = exp(-B), Σ = 1 - exp(-2B)
    assert abs(float(Phi) - math.exp(-B1)) <= 1e-15
    assert abs(float(Sigma) - (-math.expm1(-2 * B1))) <= 1e-15


def test_small_t_closed_form_uses_expm1():
    plan = lower(sdec.parse(ONE_D.format(beta="exp(2*t)"), "e.sde"))
    assert plan.time_change.closed is not None and plan.time_change.closed.has(expm1)
    assert "max relative error" in lowering_report(plan)


def test_closed_form_phi_that_cancels_is_rejected():
    """Eigenvalues -1 and -(1 + 1e-6): the closed form's (e^{-s} - e^{-(1+1e-6)s}) / 1e-6 loses
    about 10 digits, so the lowering keeps the matrix exponential and says why."""
    A = sp.Matrix([[-1, 1], [0, -1 - sp.Rational(1, 10**6)]])
    phi, note = closed_form_phi(A, 3.0)
    assert phi is None and note.startswith("closed-form Φ rejected")
    phi, note = closed_form_phi(sp.Matrix([[-1, 1], [0, -2]]), 3.0)
    assert phi is not None and "max error" in note
