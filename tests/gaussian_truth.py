"""Exact marginals and scores for Gaussian data x ~ N(0, s2 I), through the public interface.

With y0 = (x, v0), v0 ~ q(v0|x) = N(0, aux_init_cov), the state y_t is Gaussian with
covariance (per data coordinate)

    C_t = Phi_t Sigma_data Phi_t^T + Sigma^{nh}_t,   Sigma_data = blockdiag(s2, aux_init_cov),

where (Phi_t, Sigma^{nh}_t) = proc.transition(t, hybrid=False). Its score is -C_t^{-1} y.
Used by test_likelihood.py and test_sampling.py.
"""

import math

import torch


def data_cov(proc, s2):
    """Sigma_data (K, K) float64."""
    K = proc.K
    cov = torch.zeros(K, K, dtype=torch.float64)
    cov[0, 0] = s2
    if K > 1:
        cov[1:, 1:] = proc.aux_init_cov.to(torch.float64)
    return cov


def marginal_cov(proc, s2, t):
    """C_t for a scalar time t (float64 (K, K))."""
    t = torch.as_tensor(t, dtype=torch.float64)
    phi, sig = proc.transition(t, hybrid=False)
    phi, sig = phi.to(torch.float64), sig.to(torch.float64)
    return phi @ data_cov(proc, s2) @ phi.T + sig


def true_score(proc, s2):
    """score_fn(y, t) = -C_t^{-1} y for the Gaussian data. t (B,) must be one repeated time."""
    cache = {}

    def score(y, t):
        key = float(t[0])
        assert bool((t == t[0]).all()), "test score expects one time per call"
        if key not in cache:
            cache[key] = torch.linalg.inv(marginal_cov(proc, s2, key))
        prec = cache[key].to(dtype=y.dtype, device=y.device)
        B, K = y.shape[:2]
        return -torch.einsum("kl,bld->bkd", prec, y.reshape(B, K, -1)).reshape(y.shape)

    return score


def gauss_log_prob(y, cov):
    """log N(y; 0, cov (x) I) per example, float64; y (B, K, *data_shape)."""
    B, K = y.shape[:2]
    yf = y.reshape(B, K, -1).to(torch.float64)
    d = yf.shape[-1]
    quad = torch.einsum("bkd,kl,bld->b", yf, torch.linalg.inv(cov), yf)
    return -0.5 * (quad + d * torch.logdet(cov) + K * d * math.log(2 * math.pi))


def reverse_cov(proc, s2, t_end, *, sde):
    """Exact covariance (K, K) at t_end of the reverse process started from the prior at T.

    With the true (linear) score, y stays Gaussian; its covariance P solves, backwards from
    P(T) = Sigma_inf, dP/dt = A P + P A^T - [sde] G G^T with A = F + c G G^T C_t^{-1},
    c = 1 (reverse SDE) or 1/2 (probability-flow ODE). It differs from C_{t_end} by how the
    prior mismatch N(0, Sigma_inf) vs q_T propagates (the ODE keeps it, the SDE forgets it).
    """
    from scipy.integrate import solve_ivp

    K = proc.K

    def rhs(t, p):
        P = torch.tensor(p.reshape(K, K))
        tt = torch.tensor(t, dtype=torch.float64)
        F, M = proc.drift(tt).double(), proc.noise_cov(tt).double()
        A = F + (1.0 if sde else 0.5) * M @ torch.linalg.inv(marginal_cov(proc, s2, t))
        return (A @ P + P @ A.T - (M if sde else 0.0 * M)).numpy().ravel()

    p0 = proc.stationary_cov.double().numpy().ravel()
    sol = solve_ivp(rhs, (float(proc.T), float(t_end)), p0, method="DOP853", rtol=1e-10,
                    atol=1e-12)
    return torch.tensor(sol.y[:, -1].reshape(K, K))
