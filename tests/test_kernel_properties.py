"""Property-based verification of compiled kernels (Hypothesis over generated stationary specs).

Every generated spec (random K, skew Q, PSD D, SPD Σ∞, schedules, all three forms and the
learnable blocks) is compiled through the real pipeline, and its kernel must satisfy the
identities that hold for every linear stationary diffusion, each checked independently of
how the kernel computes them.
"""

import mpmath as mp
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import sdec
from sdec.backend.lower import lower
from sdec.backend.verify import (SEMIGROUP_TIMES, _own_scale_error, _semigroup_error, _times, check_invariance,
                                 check_lyapunov, check_moment_ode, check_semigroup)

from strategies import parsed, specs

KERNEL = settings(max_examples=12, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
KERNEL_SLOW = settings(max_examples=80, deadline=None, derandomize=False,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


def _identities(g, noted_singular_ok=False):
    """The identities, and the Cholesky factor of both kernels at t_min; with noted_singular_ok
    the kernel given the whole state is exempt where the lowering's t_min note says float64
    cannot hold it (a rank-one D at K >= 5)."""
    spec = parsed(g)
    proc = sdec.compile(spec)
    exempt = noted_singular_ok and "q(y_t | y_0)" in (lower(spec).t_min_note or "")
    with torch.no_grad():
        checks = check_invariance(proc) + check_semigroup(proc) + check_lyapunov(proc)
        # every kernel must factor at its (possibly derived) t_min, hybrid or not
        for hybrid in (True,) if exempt else (True, False):
            _, Sigma = proc.transition(torch.tensor(proc.t_min, dtype=torch.float64), hybrid=hybrid)
            assert int(torch.linalg.cholesky_ex(Sigma)[1]) == 0, (g.text, hybrid)
    failed = [c for c in checks if not c.passed]
    if failed:
        failed = _not_float64s(proc, failed)
    assert not failed, (g.text, failed)
    return proc


def _exact_kernel(proc, t):
    """Φ and Σ(t | y0) of the process's own float64 A and D at the times t, at 60 digits (Van
    Loan's block exponential of [[A, 2D], [0, -Aᵀ]] at s = B(t), from the exact float64 values
    of s, A and D), rounded to float64."""
    A, D = (m.detach() for m in proc._A_D())
    K, Ps, Ss = proc.K, [], []
    with mp.workdps(60):
        Z = mp.zeros(2 * K, 2 * K)
        for i in range(K):
            for j in range(K):
                Z[i, j], Z[i, K + j], Z[K + i, K + j] = A[i, j].item(), 2 * D[i, j].item(), -A[j, i].item()
        for s in proc.B(t).detach().tolist():
            E = mp.expm(mp.mpf(s) * Z)
            P, F = E[0:K, 0:K], E[0:K, K:2 * K]
            Sg = F * P.T
            Ps.append([[float(P[i, j]) for j in range(K)] for i in range(K)])
            Ss.append([[float((Sg[i, j] + Sg[j, i]) / 2) for j in range(K)] for i in range(K)])
    return torch.tensor(Ps, dtype=torch.float64), torch.tensor(Ss, dtype=torch.float64)


def _not_float64s(proc, failed):
    """The failed checks that the float64 process itself does not explain.  Where the kernel is
    its own float64 A and D's exact kernel, rounded (within 1e-12 of each matrix's largest entry
    at every time the invariance and semigroup checks read), an invariance or semigroup check
    that the exact kernel fails too reads float64, not the kernel: rounding A moves the
    process's stationary law away from Σ∞, and the semigroup check rounds its expm argument
    (B(t2) - B(t1)) A to float64, which a non-normal A with ‖A‖₂ ~ 5e6 turns into 1e-5 in Φ.
    Any other failure, or any on a kernel that is not its float64 process's, is kept."""
    t = torch.cat([_times(proc), torch.tensor([f * proc.T for f in SEMIGROUP_TIMES], dtype=torch.float64)])
    Phi, Sigma = proc.transition(t, hybrid=False)
    P, S = _exact_kernel(proc, t)
    if not all(float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())
               for got, want in ((Phi, P), (Sigma, S))):
        return failed
    own = {"target invariance": _own_scale_error(P[:-2], S[:-2], proc.stationary_cov.double()),
           "semigroup": _semigroup_error(proc, P[-2], P[-1])}
    return [c for c in failed
            if not any(c.name.startswith(k) and v > c.tolerance for k, v in own.items())]


@KERNEL
@given(specs(max_K=4))
def test_generated_kernels_satisfy_the_stationary_identities(g):
    _identities(g)


@KERNEL
@given(specs(forms=("learn",), max_K=3))
def test_generated_learnable_kernels_give_finite_elbo_gradients(g):
    proc = _identities(g)
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    e = proc.elbo(x, lambda y, t: -y, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(e.total).all()
    params = [p for p in proc.parameters() if p.requires_grad]
    if params:
        (-e.total.sum()).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


KERNEL_WIDE = settings(max_examples=40, deadline=None, derandomize=False,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


# drawn by the test below (slow profile, 28 Nov 2026): ‖A‖₂ = 5.0e6, eigenvalues up to ±1238i,
# a rank-one D; its kernel is its float64 A and D's exact kernel rounded, bit for bit, yet
# `sdec verify` reads invariance 5.0e-10 and semigroup 1.4e-5 (tolerance 1e-10 each)
BEYOND_FLOAT64 = """sde gen
state x, v, w, u, z, y2
param g > 0 = 1
target normal(0, [[9/16, -9/4, -9/4, -9/4, -9/8, 3/4], [-9/4, 10, 6, 6, 3/2, -3], [-9/4, 6, 19, 15, 27/2, -9/4], [-9/4, 6, 15, 109/4, 15, -41/8], [-9/8, 3/2, 27/2, 15, 325/16, -15/16], [3/4, -3, -9/4, -41/8, -15/16, 179/16]])
init v ~ normal(0, 1/50)
T = 3
init y2 ~ normal(0, 1/100)
beta(t) = 2 + 1 * t + 3/2 * t^2
Q = [[0, -1/2, 3/4, -1, 1/2, -1], [1/2, 0, 1, -2, -1/2, -1/2], [-3/4, -1, 0, -1/2, -q, -1/4], [1, 2, 1/2, 0, -2, 3], [-1/2, 1/2, q, 2, 0, 1], [1, 1/2, 1/4, -3, -1, 0]]
D = g * [[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 15/2]]
param q = 3
init w ~ normal(0, 3/200)
init z ~ normal(0, 3/400)
init u ~ normal(0, 3/200)
"""


def test_a_spec_beyond_float64_fails_verify_only_by_its_float64_process():
    """The drawn spec above: its invariance and semigroup readings fail, and both are the
    float64 process's own (its exact kernel fails them alike); a kernel 1e-9 off its float64
    process's exact kernel is not excused."""
    proc = sdec.compile(sdec.parse(BEYOND_FLOAT64, "gen.sde"))
    with torch.no_grad():
        failed = [c for c in check_invariance(proc) + check_semigroup(proc) + check_lyapunov(proc) if not c.passed]
        assert sorted(c.name.split()[0] for c in failed) == ["semigroup", "target"]
        assert _not_float64s(proc, failed) == []
        transition = proc.transition
        proc.transition = lambda t, hybrid=True: tuple(v * (1 + 1e-9) for v in transition(t, hybrid=hybrid))
        assert _not_float64s(proc, failed) == failed


@pytest.mark.slow
@KERNEL_WIDE
@given(specs(min_K=5, max_K=6))
def test_generated_kernels_with_five_and_six_variables_satisfy_the_identities(g):
    """The same identities at K = 5 and 6, where the drawn specs get stiffest (||A||_2 up to
    4e6, 20 doublings: the double-double chain and the 40-digit invariance residual came from
    two specs drawn here).  The kernel given the whole state must factor at t_min unless the
    lowering says float64 cannot hold it (a rank-one D: noise reaches some directions only at
    orders up to t^(2K - 1), see the t_min note); the hybrid kernel, which training uses, always."""
    _identities(g, noted_singular_ok=True)


@pytest.mark.slow
@KERNEL_SLOW
@given(specs(max_K=4))
def test_generated_kernels_match_the_moment_odes(g):
    proc = _identities(g)
    with torch.no_grad():
        check = check_moment_ode(proc)[0]
    assert check.passed, (g.text, check)
