"""What a learned process is doing while it trains: mixing at T, Q and D.

Mixing is measured as ``sdec check`` measures it (per data coordinate, hybrid kernel):
KL(q(y_T | x = 0) ‖ N(0, Σ∞)) plus the extra ½ (Φ_T e_x)ᵀ Σ∞⁻¹ (Φ_T e_x) that a data value
of size 1 adds, and max|Φ(T)|. A learned process can drift into not mixing by T (its prior
term stays exact, so the ELBO is still a bound, but samples started from the prior are then
off); the trainer warns when the sum passes ``sdec.MIX_TOL``.
"""
from __future__ import annotations

import torch

import sdec


@torch.no_grad()
def mixing(proc) -> dict:
    T = torch.tensor([float(proc.T)], dtype=torch.float64)
    Phi, Sig = (m[0].to(torch.float64) for m in proc.transition(T, hybrid=True))
    S = proc.stationary_cov.to(torch.float64)
    K = S.shape[0]
    Sinv_Sig = torch.linalg.solve(S, Sig)
    kl0 = 0.5 * (torch.trace(Sinv_Sig) - K + torch.logdet(S) - torch.logdet(Sig))
    col = Phi[:, 0]
    mean_term = 0.5 * col @ torch.linalg.solve(S, col)
    total = float(kl0 + mean_term)
    return {"kl_T_x0": float(kl0), "kl_T_unit_x": float(mean_term), "kl_T": total,
            "phi_T_max": float(Phi.abs().max()), "mixed": total <= sdec.MIX_TOL}


@torch.no_grad()
def blocks(proc) -> dict:
    """Current Q and D as nested lists (for metrics.jsonl and the plots)."""
    return {"Q": proc.Q.tolist(), "D": proc.D.tolist()}


@torch.no_grad()
def marginal_std(proc, second_moment: float, times) -> torch.Tensor:
    """(len(times), K) standard deviation of each state variable of y_t, for data with
    E[x²] = second_moment per coordinate: Σ_t[k, k] + Φ_t[k, 0]² E[x²]."""
    t = torch.as_tensor(times, dtype=torch.float64)
    Phi, Sig = proc.transition(t, hybrid=True)
    var = Sig.diagonal(dim1=-2, dim2=-1) + Phi[..., :, 0] ** 2 * second_moment
    return var.clamp(min=0).sqrt()
