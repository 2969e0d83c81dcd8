"""`sdec verify`: passes on correct kernels, and fails on broken ones."""
import math
import os

import pytest
import torch

import sdec
from sdec.cli import main as cli_main
from sdec.backend.verify import (check_invariance, check_lyapunov, check_moment_ode, check_semigroup, check_simulation,
                                 verify_process)

SPECS = os.path.join(os.path.dirname(__file__), "..", "specs")


def test_verify_command_passes_on_cld(capsys):
    assert cli_main(["verify", os.path.join(SPECS, "cld.sde"), "--samples", "4000", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "7 passed, 0 failed" in out and "Euler–Maruyama" in out


def test_verify_process_runs_gradchecks_for_learnable_specs():
    proc = sdec.compile(os.path.join(SPECS, "learned2.sde"))
    checks = verify_process(proc, samples=2000, seed=1)
    names = [c.name for c in checks]
    assert any("gradcheck through elbo" in n for n in names)
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]



def test_checks_catch_a_kernel_that_disagrees_with_its_sde():
    proc = sdec.compile(os.path.join(SPECS, "malda.sde"))
    honest = proc.noise_cov
    proc.noise_cov = lambda t: 1.1 * honest(t)   # the SDE now says more noise than the kernel
    with torch.no_grad():
        bad = check_moment_ode(proc) + check_lyapunov(proc) + check_simulation(proc, 4000, 0)
    assert sum(not c.passed for c in bad) >= 2


def test_invariance_catches_a_wrong_transition():
    proc = sdec.compile(os.path.join(SPECS, "cld.sde"))
    honest = proc.transition

    def skewed(t, hybrid=True):
        Phi, Sigma = honest(t, hybrid)
        return 1.001 * Phi, Sigma

    proc.transition = skewed
    with torch.no_grad():
        assert not check_invariance(proc)[0].passed


SCALED = """sde scaled
state x, v
init v ~ normal(0, 0.01)
beta(t) = 2
T = 1
target normal(0, [[{c}, {h}], [{h}, {c}]])
Q = [[0, -{c}], [{c}, 0]]
D = [[{c}, 0], [0, {c}]]
"""


@pytest.mark.parametrize("c", ["1", "1000000", "1/1000000"])
def test_invariance_is_measured_in_the_targets_own_scale(c, tmp_path):
    """Σ∞, Q and D all times c leave A and Φ alone and scale Σ and the error E by c: the check
    reads the same error for every c (in Σ∞'s own scale), where max |E| moved with c (at
    c = 1e6 past the 1e-10 tolerance)."""
    errors = []
    for scale in ("1", c):
        path = tmp_path / f"scaled_{len(errors)}.sde"
        path.write_text(SCALED.format(c=scale, h=f"({scale}) / 2"))
        proc = sdec.compile(str(path))
        with torch.no_grad():
            check = check_invariance(proc)[0]
            Phi, Sigma = proc.transition(torch.tensor([0.3, 1.0], dtype=torch.float64), hybrid=False)
            S = proc.stationary_cov.double()
            raw = float((Phi @ S @ Phi.mT + Sigma - S).abs().max())
        assert check.passed, (scale, check.error)
        errors.append((check.error, raw))
    (own1, raw1), (own_c, raw_c) = errors
    assert own_c <= 1e-13 and own1 <= 1e-13
    if c == "1000000":
        assert raw_c > 1e3 * max(raw1, 1e-16)  # the absolute error did grow with the target


def test_lyapunov_check_fails_on_a_sigma_that_is_not_finite(monkeypatch):
    """A kernel whose Σ is not finite (here NaN past t = 0.2; before the series coefficients
    were scaled, a K = 4 spec with ||A||_2 = 5.7e6 gave one): the Lyapunov check fails with an
    infinite error, where it halved its step to zero and divided by it."""
    proc = sdec.compile(os.path.join(SPECS, "learned3.sde"))
    transition = proc.transition

    def broken(t, hybrid=True):
        Phi, Sig = transition(t, hybrid)
        return Phi, torch.where((t > 0.2)[:, None, None], float("nan"), Sig)
    monkeypatch.setattr(proc, "transition", broken)
    with torch.no_grad():
        check = check_lyapunov(proc)[0]
    assert not check.passed and check.error == math.inf


DRAWN_STIFF = """sde gen
state x, v, w, u
init (v, w, u) ~ normal(0, [[1/100, -3/100, -3/100], [-3/100, 1/10, 3/50], [-3/100, 3/50, 19/100]])
beta(t) = 1
T = 1/2
target normal(0, [[1, -3, -3, -3], [-3, 10, 6, 6], [-3, 6, 73/4, 33/2], [-3, 6, 33/2, 433/16]])
Q = [[0, 3, 3, 3], [-3, 0, 3, 3], [-3, -3, 0, 3], [-3, -3, -3, 0]]
D = [[9, 9, 9, 9], [9, 9, 9, 9], [9, 9, 9, 9], [9, 9, 9, 9]]
"""


@pytest.mark.parametrize("native", [True, False])
def test_a_stiff_drawn_spec_passes_invariance_and_semigroup(native, monkeypatch):
    """A spec the slow property test drew (||A||_2 = 2.3e6, Σ∞'s condition number 5e6) failed
    both checks: invariance 1.7e-10 (squaring Φ ≈ I lost the slow directions' digits; E = Φ - I
    doubles now) and semigroup 1.9e-10, of which most was the reference's own error
    (torch.linalg.matrix_exp; the check now takes the step at 40 digits).  Both pass with their
    1e-10 tolerances, and torch's matrix_exp is shown to be the wrong ruler here."""
    from sdec.backend.verify import _expm_reference
    monkeypatch.setenv("SDEC_NATIVE", "1" if native else "0")
    proc = sdec.compile_text(DRAWN_STIFF, "drawn.sde")
    with torch.no_grad():
        checks = check_invariance(proc) + check_semigroup(proc)
        assert all(c.passed for c in checks), checks
        assert max(c.error for c in checks) < 6e-11
        M = 0.25 * proc._A_D()[0]
        assert float((torch.linalg.matrix_exp(M) - _expm_reference(M)).abs().max()) > 1e-10


ILL_CONDITIONED6 = """sde gen
state x, masks, normals, w, dt_, z
target normal(0, [[1/16, -3/4, -3/4, -3/16, 0, 0], [-3/4, 145/16, 17/2, 5/2, 1/4, -1/2], [-3/4, 17/2, 53/4, 5/4, -13/8, 15/4], [-3/16, 5/2, 5/4, 93/16, 23/8, -5/2], [0, 1/4, -13/8, 23/8, 35/8, 11/8], [0, -1/2, 15/4, -5/2, 11/8, 73/4]])
dmasks = beta(t) * ((-19338263/18) * x + (-2188234/27) * masks + (-54185/6) * normals + (4391/2) * w + (-4031/27) * dt_ + (-475/9) * z) dt
T = 1/2
init (masks, normals, w, dt_, z) ~ normal(0, [[1/100, 0, 3/400, -3/400, 1/50], [0, 1/100, 1/50, 0, -3/400], [3/400, 1/50, 89/1600, -13/1600, 3/100], [-3/400, 0, -13/1600, 13/800, -1/40], [1/50, -3/400, 3/100, -1/40, 227/1600]])
dx = beta(t) * ((2740906/27) * x + (620296/81) * masks + (7681/9) * normals + (-622/3) * w + (1136/81) * dt_ + (139/27) * z) dt
dnormals = beta(t) * ((-137983385/54) * x + (-15613270/81) * masks + (-386711/18) * normals + (31337/6) * w + (-29045/81) * dt_ + (-3361/27) * z) dt + sqrt(2 * beta(t)) * (-1) dW_n0 + sqrt(2 * beta(t)) * (-1) dW_n1 + sqrt(2 * beta(t)) * (-1/2) dW_n2 + sqrt(2 * beta(t)) * (-3) dW_n3 + sqrt(2 * beta(t)) * (-1/2) dW_n5
beta(t) = 1 + 1/2 * t + 2 * t^2
dw = beta(t) * ((-1198375/9) * x + (-271228/27) * masks + (-3355/3) * normals + (271) * w + (-446/27) * dt_ + (-64/9) * z) dt
ddt_ = beta(t) * ((227111/9) * x + (51380/27) * masks + (1279/6) * normals + (-53) * w + (136/27) * dt_ + (13/18) * z) dt
dz = beta(t) * ((-181906037/54) * x + (-20583406/81) * masks + (-254878/9) * normals + (41297/6) * w + (-37979/81) * dt_ + (-8951/54) * z) dt + sqrt(2 * beta(t)) * (-3) dW_n2 + sqrt(2 * beta(t)) * (-2) dW_n3 + sqrt(2 * beta(t)) * (2) dW_n4 + sqrt(2 * beta(t)) * (-1) dW_n5
"""


def test_invariance_is_evaluated_past_its_own_float64_rounding():
    """A K = 6 spec the property strategies drew (explicit form, ||A||_2 = 4.4e6, Σ∞'s
    condition number 2.4e7).  The residual Φ Σ∞ Φᵀ + Σ - Σ∞ evaluated in float64 and scaled
    by L⁻¹ on both sides read 1.25e-10 (a failure), yet the same float64 Φ and Σ give 7.9e-12
    at 40 digits, and Φ, Σ are the 60-digit reference rounded: the check measured its own
    rounding.  It evaluates the residual at 40 digits now, the semigroup's product too."""
    proc = sdec.compile_text(ILL_CONDITIONED6, "ill6.sde")
    with torch.no_grad():
        checks = check_invariance(proc) + check_semigroup(proc)
    assert all(c.passed for c in checks), checks
    assert max(c.error for c in checks) < 2e-11, checks


def test_the_high_precision_residual_is_exact_on_exact_inputs_and_nan_on_bad_ones():
    from sdec.backend.verify import _own_scale_error
    S = torch.tensor([[4.0, 1.0], [1.0, 2.0 ** -30]], dtype=torch.float64) + torch.diag(torch.tensor([0.0, 1.0], dtype=torch.float64))
    Phi = torch.tensor([[[0.5, 0.0], [0.0, 0.5]]], dtype=torch.float64)
    Sigma = 0.75 * S[None]  # S - Φ S Φᵀ, exact in float64
    assert _own_scale_error(Phi, Sigma, S) == 0.0
    assert _own_scale_error(Phi, Sigma + 2.0 ** -20, S) > 0.0
    assert math.isnan(_own_scale_error(Phi, Sigma * math.nan, S))
    assert math.isnan(_own_scale_error(Phi, Sigma, -S))  # not positive definite


def test_expm_reference_of_a_matrix_that_is_not_finite_is_nan():
    """mpmath's expm does not return on a NaN matrix: the reference gives NaN (the check fails)."""
    from sdec.backend.verify import _expm_reference
    out = _expm_reference(torch.tensor([[math.nan, 0.0], [0.0, 1.0]], dtype=torch.float64))
    assert out.shape == (2, 2) and bool(out.isnan().all())


STIFF = """sde stiff
state x
beta(t) = 1000000
T = 1
target normal(0, 1)
D = [[1]]
"""


def test_stiff_schedule_is_reported_instead_of_hanging(capsys, tmp_path):
    """‖F‖ = 1e6: the RK4 reference would need 1e8 steps and Euler–Maruyama is unstable, so
    both say why they were not run; the cheap checks still run, and the exit status is 0."""
    from sdec.backend.verify import MAX_RK4_STEPS, render_checks
    proc = sdec.compile_text(STIFF, "stiff.sde")
    with torch.no_grad():
        (ode,) = check_moment_ode(proc)
        (em,) = check_simulation(proc, 100, 0)
    assert ode.passed and ode.skipped.startswith("stiff schedule: max ‖F(t)‖ = 1e+06 on [0, T] needs 1e+08 RK4 steps")
    assert f"{MAX_RK4_STEPS:,}" in ode.skipped
    assert em.passed and em.skipped.startswith("stiff schedule: dt ‖F(t)‖ reaches 500")
    path = tmp_path / "stiff.sde"
    path.write_text(STIFF)
    assert cli_main(["verify", str(path), "--samples", "100"]) == 0
    out = capsys.readouterr().out
    assert out.count("[SKIP]") == 2 and "0 failed, 2 not run (see SKIP above)" in out
    assert "[FAIL]" not in out


def _vp_with(beta):
    """vpsde.sde with another schedule, compiled from text written here."""
    text = open(os.path.join(SPECS, "vpsde.sde"), encoding="utf-8").read()
    lines = [f"beta(t) = {beta}" if ln.startswith("beta(t)") else ln for ln in text.splitlines()]
    return sdec.compile(sdec.parse("\n".join(lines) + "\n"))


def test_lyapunov_check_resolves_a_fast_schedule():
    # cos(100000 t) + 1.5 changes 10^5 times faster than ||F||: the step must follow it
    # (the fixed step h = min(1e-4 t, 1e-3 / ||F||) reported a relative error of 0.127)
    proc = _vp_with("cos(100000*t) + 1.5")
    with torch.no_grad():
        [lyap] = check_lyapunov(proc)
        [ode] = check_moment_ode(proc)
    assert lyap.skipped is None and lyap.error <= 1e-5, lyap
    assert ode.skipped == "beta(t) varies faster than a 65,537-point probe of [0, T] resolves"
    # the same check still fails a kernel whose noise disagrees with its SDE
    honest = proc.noise_cov
    proc.noise_cov = lambda t: 1.01 * honest(t)
    with torch.no_grad():
        assert not check_lyapunov(proc)[0].passed


def test_lyapunov_check_leaves_out_what_float64_cannot_resolve():
    # beta = exp(-700 t): past t ~ 0.03 Sigma changes below float64 rounding; a central
    # difference there is 0 against a right side of 1e-152 (it used to FAIL with error 0.997)
    proc = _vp_with("exp(-700*t)")
    with torch.no_grad():
        [lyap] = check_lyapunov(proc)
    assert lyap.passed and lyap.skipped == "Σ(t) changes below float64 resolution at every probe time"


@pytest.mark.slow
def test_moment_ode_check_follows_how_fast_beta_changes():
    # exp(-700 t): ||F|| <= 350 asked for 35,000 RK4 steps per unit time, too few for a
    # coefficient that changes at rate 700 (error 1.69e-7 > 1e-7); 70,000 resolve it
    proc = _vp_with("exp(-700*t)")
    with torch.no_grad():
        [ode] = check_moment_ode(proc)
    assert ode.skipped is None and ode.error <= 1e-9, ode
