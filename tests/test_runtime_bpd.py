"""BPD accounting pinned by cases with known answers."""
import math

import pytest
import torch

import sdec
from gaussian_truth import marginal_cov
from kernels import make
from sdec.runtime.bpd import bits_per_dim, dequantize, from_model, prepare, to_model
from sdec.runtime.evaluate import evaluate_elbo


@pytest.mark.parametrize("transform", ["center", "logit"])
@pytest.mark.parametrize("levels", [2, 17, 256])
def test_density_uniform_on_the_data_cube_gives_log2_levels(transform, levels):
    """A model whose density is uniform on the dequantized cube [0, 1)^D (pushed to model
    space: log p(y) = -ldj(y)) scores exactly log2(levels) bits per dimension."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, levels, (50, 1, 4, 4), generator=g)
    y, ldj = prepare(x, levels, transform, g, dtype=torch.float64)
    bpd = bits_per_dim({"log_density": -ldj}, ldj, 16, levels)
    assert torch.allclose(bpd["total"], torch.full((50,), math.log2(levels), dtype=torch.float64),
                          atol=1e-12)
    assert bpd["dequantization"][0] == math.log2(levels)


def test_center_transform_terms():
    x = torch.tensor([[0, 16]])
    y, ldj = to_model(dequantize(x, 17, torch.Generator().manual_seed(1), torch.float64))
    assert float(y.min()) >= -1 and float(y.max()) < 1
    assert float(ldj[0]) == pytest.approx(2 * math.log(2))
    assert torch.allclose(from_model(y), dequantize(x, 17, torch.Generator().manual_seed(1), torch.float64))


def test_logit_log_det_against_autograd():
    x01 = torch.rand(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y, ldj = to_model(x01, "logit")
    for i in range(3):
        J = torch.autograd.functional.jacobian(lambda v: to_model(v[None], "logit")[0][0], x01[i])
        assert float(ldj[i]) == pytest.approx(float(torch.logdet(J)), abs=1e-10)
    assert torch.allclose(from_model(y, "logit"), x01)


def test_continuous_data_has_no_dequantization_term():
    bpd = bits_per_dim({"a": torch.tensor([-2.0])}, torch.zeros(1), 1, None)
    assert set(bpd) == {"a", "total"}
    assert float(bpd["total"]) == pytest.approx(2 / math.log(2))


def exact_eps_net(proc, s2):
    """The noise-prediction net whose score is the exact score of N(0, s2 I) data:
    s = -C_t⁻¹ y, and eps = -L_tᵀ s with L_t = chol Σ_t (hybrid kernel)."""
    K = proc.K
    C0 = torch.zeros(K, K, dtype=torch.float64)
    C0[0, 0] = s2
    C0[1:, 1:] = proc.aux_init_cov

    def net(y, t):
        t64 = t.to(torch.float64)
        Phi, Snh = proc.transition(t64, hybrid=False)
        C = Phi @ C0 @ Phi.mT + Snh
        L = torch.linalg.cholesky(proc.transition(t64, hybrid=True)[1])
        s = -torch.linalg.solve(C, y.double().reshape(y.shape[0], K, -1))
        return (-(L.mT @ s)).reshape(y.shape).to(y.dtype)
    return net


@pytest.mark.parametrize("name", ["vpsde", "cld"])
def test_elbo_bpd_with_exact_score_matches_the_analytic_figure(name):
    """Gaussian data, exact score: E[BPD] = -(E log p(x) - gap) / (d ln 2), with the gap
    (prior mismatch at T + truncation) computed analytically."""
    proc = make(name)
    s2, d, n = 0.25, 3, 400
    x = math.sqrt(s2) * torch.randn(n, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ev = evaluate_elbo(proc, exact_eps_net(proc, s2), x, None, time_samples=64,
                       generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    logp = -0.5 * (x * x / s2 + math.log(2 * math.pi * s2)).sum(1)
    K, Sinf = proc.K, proc.stationary_cov.double()
    CT = marginal_cov(proc, s2, proc.T)
    kl = 0.5 * (torch.trace(torch.linalg.solve(Sinf, CT)) - K + torch.logdet(Sinf) - torch.logdet(CT))
    C0 = marginal_cov(proc, s2, 0.0)
    Phi, _ = proc.transition(torch.tensor(proc.t_min, dtype=torch.float64), hybrid=False)
    trunc = 0.5 * (torch.logdet(marginal_cov(proc, s2, proc.t_min)) - torch.logdet(Phi.double() @ C0 @ Phi.double().mT))
    gap = float(d * (kl + trunc))
    # per-example analytic figure; compare the mean of the differences (same examples)
    analytic = -(logp - gap) / (d * math.log(2))
    diff = ev.per_example - analytic
    se = float(diff.std()) / math.sqrt(n)
    assert abs(float(diff.mean())) < 4 * se + 1e-9, (float(diff.mean()), se)
    assert se < 0.2  # d = 3: a few bits per dim per example
    assert ev.bpd_stderr > 0 and ev.n == n
    assert set(ev.terms) == {"prior", "score", "score_norm", "divergence", "truncation", "aux_entropy"}
    assert sum(ev.terms.values()) == pytest.approx(ev.bpd, abs=1e-9)
