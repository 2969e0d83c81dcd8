"""`sdec verify`: passes on correct kernels, and fails on broken ones."""
import os

import torch

import sdec
from sdec.cli import main as cli_main
from sdec.backend.verify import check_invariance, check_lyapunov, check_moment_ode, check_simulation, verify_process

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
