"""Tests for sdec.runtime.likelihood: exactness on Gaussian data, divergence estimators, step guard."""

import math

import pytest
import torch

from gaussian_truth import data_cov, gauss_log_prob, marginal_cov, true_score
from kernels import make
from sdec.runtime.flow import ODESolveError
from sdec.runtime.likelihood import (divergence_exact, divergence_hutchinson, hutchinson_noise,
                                     log_likelihood)

S2 = 0.25  # data variance


def gaussian_batch(B, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return math.sqrt(S2) * torch.randn(B, d, generator=g, dtype=dtype)


def flow_identity_error(proc, r):
    """|log p_ODE(y_start) - [log q_t0(y_start) + log pi(y_T) - log q_T(y_T)]| per example.

    With the true score the probability-flow ODE transports q_t0 to q_T exactly, so the ODE
    log-density of y_start (prior pi at T) differs from log q_t0 only by the prior mismatch.
    """
    q_start = gauss_log_prob(r.y_start, marginal_cov(proc, S2, r.t_start))
    q_end = gauss_log_prob(r.y_end, marginal_cov(proc, S2, proc.T))
    expect = q_start + proc.prior_log_prob(r.y_end).double() - q_end
    return (r.prior + r.divergence - expect).abs()


@pytest.mark.parametrize("name", ["vpsde", "cld"])
def test_gaussian_data_exact_without_truncation(name):
    proc = make(name)
    x = gaussian_batch(8, 3, seed=0)
    r = log_likelihood(proc, x, true_score(proc, S2), rtol=1e-7, atol=1e-7, t_min=0.0,
                       generator=torch.Generator().manual_seed(1))
    assert r.divergence_method == "exact" and r.t_start == 0.0
    assert torch.equal(r.y_start[:, 0], x)
    assert flow_identity_error(proc, r).max() < 1e-4
    v0 = r.y_start[:, 1:]
    expect_aux = gauss_log_prob(v0, data_cov(proc, S2)[1:, 1:]) if proc.K > 1 else 0 * r.total
    torch.testing.assert_close(r.aux_log_prob, expect_aux, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(r.truncation, torch.zeros_like(r.total))
    torch.testing.assert_close(r.total, r.prior + r.divergence - r.aux_log_prob)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cld_paper", "alda", "malda", "learned", "learned3"])
@pytest.mark.parametrize("t_min", [0.0, None])
def test_gaussian_data_exact_other_processes(name, t_min):
    proc = make(name)
    with torch.no_grad():
        r = log_likelihood(proc, gaussian_batch(8, 3, seed=17), true_score(proc, S2),
                           rtol=1e-7, atol=1e-7, t_min=t_min,
                           generator=torch.Generator().manual_seed(18))
    assert flow_identity_error(proc, r).max() < 1e-4


@pytest.mark.parametrize("name", ["vpsde", "cld"])
def test_gaussian_data_exact_with_truncation(name):
    proc = make(name)
    x = gaussian_batch(8, 3, seed=2)
    r = log_likelihood(proc, x, true_score(proc, S2), rtol=1e-7, atol=1e-7, t_min=1e-3,
                       generator=torch.Generator().manual_seed(3))
    assert flow_identity_error(proc, r).max() < 1e-4
    # d log|det Phi(eps)| = d * int_0^eps tr F(t) dt, by independent quadrature of drift()
    ts = torch.linspace(0.0, 1e-3, 2001, dtype=torch.float64)
    tr = torch.diagonal(proc.drift(ts).to(torch.float64), dim1=-2, dim2=-1).sum(-1)
    expect = 3 * torch.trapezoid(tr, ts)
    torch.testing.assert_close(r.truncation, expect.expand(8), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(r.total,
                               r.prior + r.divergence + r.truncation - r.aux_log_prob)


def test_generator_makes_runs_reproducible():
    proc, x = make("cld"), gaussian_batch(4, 2, seed=4)
    run = lambda seed: log_likelihood(proc, x, true_score(proc, S2), t_min=1e-3,
                                      generator=torch.Generator().manual_seed(seed)).total
    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_dtype_follows_input_unless_given():
    proc, x = make("vpsde"), gaussian_batch(4, 2, seed=7, dtype=torch.float32)
    r32 = log_likelihood(proc, x, true_score(proc, S2), t_min=0.0)  # K = 1: no randomness
    r64 = log_likelihood(proc, x, true_score(proc, S2), t_min=0.0, dtype=torch.float64)
    assert r32.total.dtype == torch.float32 and r64.total.dtype == torch.float64
    torch.testing.assert_close(r32.total.double(), r64.total, rtol=0, atol=1e-3)


def _nonlinear_h(y):
    """A smooth field h(y) with a non-constant, non-diagonal Jacobian, per example."""
    B = y.shape[0]
    w = torch.linspace(-1.0, 1.0, y[0].numel(), dtype=y.dtype).reshape(y[0].shape)
    return torch.tanh(y * w + y.roll(1, dims=-1)) + y.reshape(B, -1).pow(2).sum(1).reshape(
        B, *([1] * (y.dim() - 1))) * w


def test_exact_divergence_equals_jacobian_trace():
    y = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    div = divergence_exact(_nonlinear_h(y), y, torch.ones(2, 2, dtype=torch.float64))
    for b in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: _nonlinear_h(v[None])[0], y[b])
        torch.testing.assert_close(div[b], jac.reshape(8, 8).trace())


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(kind):
    n = 20000  # one point replicated; each row is an independent estimate
    y = torch.randn(1, 2, 4, dtype=torch.float64).expand(n, 2, 4).clone().requires_grad_(True)
    h = _nonlinear_h(y)
    exact = divergence_exact(h, y, torch.ones(2, 2, dtype=torch.float64))[0]
    z = hutchinson_noise(y, kind, torch.Generator().manual_seed(8))
    est = divergence_hutchinson(h, y, z)
    se = est.std() / math.sqrt(n)
    assert est.std() > 0  # the estimator is really random here
    assert abs(est.mean() - exact) < 4 * se


def test_hutchinson_likelihood_matches_exact_on_average():
    proc = make("cld")
    x = gaussian_batch(1, 3, seed=9).expand(400, 3)
    kw = dict(t_min=0.0, rtol=1e-6, atol=1e-6)
    exact = log_likelihood(proc, x, true_score(proc, S2), **kw,
                           generator=torch.Generator().manual_seed(10))
    hutch = log_likelihood(proc, x, true_score(proc, S2), **kw, exact_divergence=False,
                           hutchinson="gaussian", generator=torch.Generator().manual_seed(10))
    assert hutch.divergence_method == "hutchinson-gaussian"
    diff = hutch.divergence - exact.divergence  # same v0 draws: same generator stream
    assert diff.std() > 0 and abs(diff.mean()) < 4 * diff.std() / 20


def test_large_problems_default_to_hutchinson():
    proc = make("malda")  # 2 noised variables * d = 40 > 64
    r = log_likelihood(proc, gaussian_batch(2, 40, seed=11), true_score(proc, S2))
    assert r.divergence_method == "hutchinson-rademacher"
    assert torch.isfinite(r.total).all()


def test_exact_divergence_counts_noised_coordinates_only():
    proc = make("cld")  # K * d = 80 > 64, but CLD noises only v: 40 coordinates
    r = log_likelihood(proc, gaussian_batch(2, 40, seed=11), true_score(proc, S2))
    assert r.divergence_method == "exact"


def test_end_state_far_outside_prior_is_flagged():
    proc = make("vpsde")
    x = gaussian_batch(4, 3, seed=12)
    r = log_likelihood(proc, x, true_score(proc, S2), t_min=0.0)
    assert not bool(r.far_from_prior.any())
    assert (r.prior_z2 < 5).all()

    def blowing_up(y, t):  # a score that sends one example far away
        s = true_score(proc, S2)(y, t)
        return s - torch.tensor([1e4, 0, 0, 0], dtype=y.dtype).reshape(-1, 1, 1)

    r = log_likelihood(proc, x, blowing_up, t_min=0.0)
    assert r.far_from_prior.tolist() == [True, False, False, False]
    assert float(r.prior_z2[0]) > 100


def wild_score(y, t):
    """Huge values oscillating fast in t: an adaptive solver cannot resolve it cheaply."""
    return 1e6 * torch.sin(1e6 * t).reshape(-1, *([1] * (y.dim() - 1))) * torch.ones_like(y)


@pytest.mark.parametrize("kw, reason", [(dict(max_steps=100), "max_steps"),
                                        (dict(min_step=1e-4), "min_step")])
def test_step_guard_raises_instead_of_hanging(kw, reason):
    proc = make("vpsde")
    with pytest.raises(ODESolveError, match=reason) as info:
        log_likelihood(proc, gaussian_batch(2, 2, seed=12), wild_score, **kw)
    err = info.value
    assert err.reason == reason and err.steps <= 101 and err.nfe > 0
    assert "rtol" in str(err) and "max_steps" in str(err)  # says what to change


def test_non_finite_score_raises_solve_error():
    proc = make("vpsde")
    nan_score = lambda y, t: torch.full_like(y, float("nan"))
    with pytest.raises(ODESolveError):
        log_likelihood(proc, gaussian_batch(2, 2, seed=13), nan_score)


@pytest.mark.parametrize("kw, match", [(dict(method="dopri7"), "valid: dopri5"),
                                       (dict(options={"min_stp": 1}), "unknown option"),
                                       (dict(hutchinson="sphere"), "rademacher"),
                                       (dict(method="rk4"), "step_size"),
                                       (dict(t_min=2.0), "t_min")])
def test_bad_arguments_are_errors(kw, match):
    proc = make("vpsde")
    with pytest.raises(ValueError, match=match):
        log_likelihood(proc, gaussian_batch(2, 2, seed=14), true_score(proc, S2), **kw)


def test_wrong_score_shape_is_reported():
    proc = make("cld")
    with pytest.raises(ValueError, match="expected the state's shape"):
        log_likelihood(proc, gaussian_batch(2, 2, seed=15), lambda y, t: y[:, :1])


def test_fixed_grid_method_with_step_size():
    proc, x = make("vpsde"), gaussian_batch(4, 2, seed=16)
    ref = log_likelihood(proc, x, true_score(proc, S2), t_min=0.0, rtol=1e-8, atol=1e-8)
    rk4 = log_likelihood(proc, x, true_score(proc, S2), t_min=0.0, method="rk4",
                         options={"step_size": 0.01})
    torch.testing.assert_close(rk4.total, ref.total, rtol=0, atol=1e-4)
