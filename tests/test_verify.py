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
