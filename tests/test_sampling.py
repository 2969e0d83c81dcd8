"""Tests for sdec.runtime.sampling: Gaussian data covariance, registry, options, reproducibility."""

import math

import pytest
import torch

from gaussian_truth import marginal_cov, reverse_cov, true_score
from kernels import make
from sdec.runtime.flow import ODESolveError
from sdec.runtime.sampling import SAMPLERS, register_sampler, sample, time_grid

S2 = 0.25  # data variance
N = 20000


def assert_cov_matches(x, var):
    """Sample covariance of x (n, d) equals var * I within ~4 standard errors."""
    x = x.to(torch.float64)
    cov = x.T @ x / x.shape[0]
    se = var * math.sqrt(2.0 / x.shape[0])  # s.e. of a variance (off-diagonal: var/sqrt(n))
    torch.testing.assert_close(cov, var * torch.eye(x.shape[1], dtype=torch.float64),
                               rtol=0, atol=4 * se)
    assert x.mean(0).abs().max() < 4 * math.sqrt(var / x.shape[0])


def expected_var(proc, method, t_min=None):
    """Exact variance of x at t_min for the reverse SDE ("em") or flow ("ode") from the prior."""
    t_min = proc.t_min if t_min is None else t_min
    return float(reverse_cov(proc, S2, t_min, sde=(method == "em"))[0, 0])


@pytest.mark.parametrize("name", ["vpsde", "cld"])
@pytest.mark.parametrize("method", ["em", "ode"])
def test_true_score_reproduces_data_covariance(name, method):
    proc = make(name)
    x = sample(proc, true_score(proc, S2), N, (2,), method=method, steps=200,
               generator=torch.Generator().manual_seed(0))
    assert x.shape == (N, 2) and x.dtype == torch.float32
    # ~ S2: the law of x at t_min, up to the prior mismatch at T (see reverse_cov)
    assert abs(expected_var(proc, method) - S2) < 2e-3
    assert_cov_matches(x, expected_var(proc, method))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vpsde", "cld"])
@pytest.mark.parametrize("method", ["em", "ode"])
def test_true_score_covariance_tight(name, method):
    proc = make(name)
    x = sample(proc, true_score(proc, S2), 200_000, (2,), method=method, steps=500,
               generator=torch.Generator().manual_seed(5))
    assert_cov_matches(x, expected_var(proc, method))


def test_fixed_grid_ode_solver_and_full_state():
    proc = make("cld")
    y = sample(proc, true_score(proc, S2), N, (2,), method="ode", steps=100, grid="uniform",
               options={"solver": "rk4"}, generator=torch.Generator().manual_seed(1),
               return_state=True)
    assert y.shape == (N, 2, 2)
    cov = marginal_cov(proc, S2, proc.t_min)
    assert_cov_matches(y[:, 0], float(cov[0, 0]))
    assert_cov_matches(y[:, 1], float(cov[1, 1]))


@pytest.mark.parametrize("method", ["em", "ode"])
def test_generator_makes_runs_reproducible(method):
    proc = make("cld")
    run = lambda seed: sample(proc, true_score(proc, S2), 64, (3,), method=method, steps=20,
                              generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(2), run(2))
    assert not torch.equal(run(2), run(3))


def test_registry_rejects_unknown_names_and_duplicates():
    proc = make("vpsde")
    with pytest.raises(ValueError, match="valid: em, ode"):
        sample(proc, true_score(proc, S2), 4, (2,), method="ddim")
    with pytest.raises(ValueError, match="already registered"):
        register_sampler("em")(lambda *a, **k: None)
    assert set(SAMPLERS) >= {"em", "ode"}


@pytest.mark.parametrize("kw, match", [
    (dict(options={"denoize": False}), "valid: denoise"),
    (dict(method="ode", options={"solver": "dopri7"}), "unknown ODE method"),
    (dict(method="ode", options={"solver_options": {"bogus": 1}}), "unknown option"),
    (dict(grid="cubic"), "valid: quadratic, uniform"),
    (dict(steps=0), "positive integer"),
    (dict(t_min=-1.0), "t_min"),
])
def test_bad_options_are_errors(kw, match):
    proc = make("vpsde")
    with pytest.raises(ValueError, match=match):
        sample(proc, true_score(proc, S2), 4, (2,), **kw)


def test_time_grids():
    proc = make("vpsde")
    for grid in ("uniform", "quadratic"):
        t = time_grid(proc, 10, grid, t_min=1e-3)
        assert t[0] == proc.T and t[-1] == 1e-3 and bool((t[1:] < t[:-1]).all())
    quad = time_grid(proc, 10, "quadratic", t_min=0.0)
    assert quad[-2] - quad[-1] < quad[0] - quad[1]  # quadratic is dense near t_min


@pytest.mark.parametrize("name", ["vpsde", "cld"])
def test_em_noise_factor_squares_to_noise_cov(name):
    """The sampler's G(t) is the process's diffusion(t): G G^T = noise_cov(t), also where
    G G^T is singular (CLD puts no noise on x)."""
    proc = make(name)
    for t in (0.0, 1e-3, 0.5, 1.0):
        t = torch.tensor(t, dtype=torch.float64)
        G = proc.diffusion(t)
        torch.testing.assert_close(G @ G.T, proc.noise_cov(t), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["vpsde", "cld"])
def test_apply_kk_is_a_matrix_product_per_data_coordinate(name):
    """proc.apply_kk (the samplers' and the ODE's K x K apply) against an einsum, for a
    (K, K) and a per-example (B, K, K) matrix, with and without a graph."""
    proc = make(name)
    gen = torch.Generator().manual_seed(0)
    K = proc.K
    y = torch.randn(3, K, 2, 5, generator=gen, dtype=torch.float64)
    for M in (torch.randn(K, K, generator=gen, dtype=torch.float64),
              torch.randn(3, K, K, generator=gen, dtype=torch.float64)):
        pattern = "kl,bl...->bk..." if M.dim() == 2 else "bkl,bl...->bk..."
        want = torch.einsum(pattern, M, y)
        torch.testing.assert_close(proc.apply_kk(M, y), want, rtol=1e-13, atol=1e-13)
        yg = y.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(proc.apply_kk(M, yg).sum(), yg)
        ones = torch.ones_like(y)
        want_g = torch.einsum(pattern, M.mT, ones)
        torch.testing.assert_close(g, want_g, rtol=1e-13, atol=1e-13)


def test_ode_sampler_guard_raises():
    proc = make("vpsde")
    wild = lambda y, t: 1e6 * torch.sin(1e6 * t)[:, None, None] * torch.ones_like(y)
    with pytest.raises(ODESolveError, match="max_steps"):
        sample(proc, wild, 4, (2,), method="ode", options={"max_steps": 50})


def test_em_without_denoising_adds_last_step_noise():
    proc = make("vpsde")
    run = lambda **kw: sample(proc, true_score(proc, S2), 8, (2,), method="em", steps=5,
                              generator=torch.Generator().manual_seed(4), **kw)
    assert not torch.equal(run(), run(options={"denoise": False}))


@pytest.mark.parametrize("name", ["vpsde", "cld"])
def test_adaptive_ode_never_evaluates_the_score_outside_the_time_range(name):
    """dopri5 may step past the end time and interpolate back; the score must never be
    asked for t < t_min (a user's run died there with a CholeskyError at t = -0.0026)."""
    proc = make(name)
    exact = true_score(proc, S2)
    seen = []

    def score(y, t):
        seen.append(float(t.min()))
        return exact(y, t)

    # loose tolerances make big steps, the case where the last step overshoots
    sample(proc, score, 64, 4, method="ode", dtype=torch.float64,
           options={"rtol": 1e-2, "atol": 1e-2}, generator=torch.Generator().manual_seed(0))
    assert min(seen) >= proc.t_min
