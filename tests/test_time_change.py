"""B(t) as emitted: stable closed forms or quadrature, checked against mpmath at compile time.

Independent reference: 30-digit mpmath quadrature of beta, or an antiderivative written out in
the test (never the sympy closed form)."""
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


K4_IRRATIONAL = """sde k4
state x, v, w, u
init (v, w, u) ~ normal(0, 0.01)
beta(t) = 1
T = 1
target normal(0, I + sqrt(2)/10*ones(4,4))
Q = [[0, -1, 0, 0], [1, 0, -1, 0], [0, 1, 0, -1], [0, 0, 1, 0]]
D = diag(0, 1, 1, 1)
"""


def test_irrational_drift_skips_the_symbolic_eigenvalue_search(monkeypatch):
    """A = -(Q + D) Σ∞⁻¹ with sqrt(2) entries: the exact charpoly and roots took 20 s; the
    lowering now goes straight to the matrix exponential."""
    import sdec.backend.lower as lowering

    def no_symbolic_work(*args, **kwargs):
        raise AssertionError("symbolic characteristic polynomial attempted")

    spec = sdec.parse(K4_IRRATIONAL, "k4.sde")
    monkeypatch.setattr(lowering.sp, "Poly", no_symbolic_work)
    plan = lower(spec)
    assert plan.phi_closed is None and "expm(B(t) A) by scaling and squaring of its Taylor series" in lowering_report(plan)


def test_rational_eigenvalues_are_found_exactly():
    from sdec.backend.lower import _rational_eigenvalues
    assert _rational_eigenvalues(sp.Matrix([[0, 4], [-1, -4]]))            # CLD: -2, -2
    assert not _rational_eigenvalues(sp.Matrix([[0, 1], [-2, 0]]))         # ±i sqrt(2)
    assert not _rational_eigenvalues(sp.Matrix([[0, 1], [2, 0]]))          # ±sqrt(2): real, irrational
    assert not _rational_eigenvalues(sp.Matrix([[sp.sqrt(2), 0], [0, 1]]))


def test_symbolic_steps_past_their_budget_fall_back_and_say_so(monkeypatch):
    """With a budget too small for any symbolic step, the lowering still gives correct
    numbers (matrix exponential, quadrature or the unrewritten closed form) and its report
    names each step that ran out."""
    import sdec.backend.lower as lowering
    import sdec.backend.time_change as time_change
    import time

    def slow(*args, **kwargs):
        time.sleep(5)

    spec = sdec.parse(ONE_D.format(beta="exp(2*t)"), "budget.sde")
    lowering._closed_form_phi.cache_clear()
    time_change.choose.cache_clear()
    monkeypatch.setattr(time_change, "stable_form", slow)
    monkeypatch.setattr(lowering, "_symbolic_phi", slow)
    monkeypatch.setattr(lowering, "SYMBOLIC_SECONDS", 0.05)
    monkeypatch.setattr(time_change, "SYMBOLIC_SECONDS", 0.05)
    plan = lower(spec)
    report = lowering_report(plan)
    assert plan.phi_closed is None
    assert "the closed form of expm(s A) did not finish within the 2 s budget" not in report
    assert "did not finish within the 0.05 s budget" in report
    assert "the expm1/log1p rewriting of B did not finish within the 0.05 s budget" in report
    assert plan.time_change.error <= 1e-14  # a form that is accurate was still found
    lowering._closed_form_phi.cache_clear()
    time_change.choose.cache_clear()


def test_exact_drift_matrix_past_its_budget_gives_the_same_module_numbers(monkeypatch):
    import time
    import sdec.backend.lower as lowering
    from sdec.emit.module import generate_source
    spec = sdec.parse_file(os.path.join(SPECS, "cld.sde"))
    reference = sdec.compile(spec).transition(torch.tensor([0.01, 0.5, 1.0], dtype=torch.float64))
    monkeypatch.setattr(type(spec), "A", property(lambda self: time.sleep(5)))
    monkeypatch.setattr(lowering, "SYMBOLIC_SECONDS", 0.05)
    plan = lower(spec)
    assert plan.phi_closed is None and plan.exact["A"] is None
    assert "the exact A = -(Q + D) Σ∞⁻¹ did not finish within the 0.05 s budget" in lowering_report(plan)
    from sdec.backend.compiler import load_source
    proc = load_source(generate_source(plan)).Diffusion()
    Phi, Sigma = proc.transition(torch.tensor([0.01, 0.5, 1.0], dtype=torch.float64))
    assert torch.allclose(Phi, reference[0], rtol=0, atol=1e-13)
    assert torch.allclose(Sigma, reference[1], rtol=1e-12, atol=1e-15)


def test_fast_oscillating_schedule_gets_its_closed_form_checked_exactly():
    # the quadrature reference cannot follow 16,000 periods of cos(100000 t) (it took ~10 s
    # and misjudged the closed form); the exact B, proved by differentiation, is the reference
    proc = sdec.compile_text(ONE_D.format(beta="cos(100000*t) + 3/2"), "fast.sde")
    report = lowering_report(lower(sdec.parse(ONE_D.format(beta="cos(100000*t) + 3/2"), "fast.sde")))
    assert "B(t)   : closed form" in report and "the exact B, proved by differentiation" in report
    ts = _grid(1e-4, 1.0)
    got = proc._B(torch.tensor(ts, dtype=torch.float64)).tolist()
    with mp.workdps(40):  # the antiderivative written out here, independently of sympy
        worst = max(float(abs(mp.mpf(g) - (mp.sin(100000 * mp.mpf(t)) / 100000 + mp.mpf(3) / 2 * mp.mpf(t)))
                          / (mp.sin(100000 * mp.mpf(t)) / 100000 + mp.mpf(3) / 2 * mp.mpf(t)))
                    for t, g in zip(ts, got))
    assert worst <= 1e-14


def test_exact_reference_only_for_a_B_proved_to_be_the_integral():
    from sdec.backend.time_change import exact_reference, grid, reference
    from sdec.language.ir import T_SYMBOL as t
    points = grid(1e-3, 1.0)
    assert exact_reference(sp.exp(2 * t), sp.exp(2 * t) / 2, points) is None        # B(0) != 0
    assert exact_reference(2 * t + 1, t ** 2, points) is None                        # B' != beta
    exact = exact_reference(sp.exp(2 * t), sp.exp(2 * t) / 2 - sp.Rational(1, 2), points)
    quad = reference(sp.exp(2 * t), points)
    assert max(float(abs(e - q) / q) for e, q in zip(exact, quad)) <= 1e-25
