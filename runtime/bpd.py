"""Bits per dimension: dequantization, the map to model space, and the accounting.

Discrete data x_int in {0..L-1}^D (L levels: 256 for 8-bit images, 17 for scikit-learn's
digits) is dequantized uniformly, x̃ = (x_int + u) / L with u ~ U[0, 1)^D, and mapped to the
model's space y with a log-determinant ldj = log |dy/dx̃|:

- "center": y = 2 x̃ - 1 in [-1, 1), ldj = D log 2;
- "logit":  y = logit(α + (1 - 2α) x̃), ldj = Σ_i [log(1 - 2α) - log(s_i (1 - s_i))],
  s = α + (1 - 2α) x̃ (α = 0.05 as in the MDM code).

For any density p on model space, E_u[log p(y) + ldj] - D log L is a lower bound on the log
probability of x_int (Jensen over the cells of side 1/L). So, per example,

    BPD = -(ELBO + ldj) / (D ln 2) + log2(L)

with D the number of data dimensions (auxiliary variables never count). Every term of the ELBO
contributes -term / (D ln 2); "transform" is -ldj / (D ln 2) and "dequantization" is log2(L).
A density uniform on the data cube ([-1, 1]^D, log p = -D log 2) gives exactly log2(L).

Continuous data (toy sets, levels None) has no dequantization and no transform: the figure is
the negative log-likelihood, -ELBO / (D ln 2) bits per dimension (or -ELBO / D nats).
"""
from __future__ import annotations

import math

import torch

TRANSFORMS = ("center", "logit")
LOGIT_ALPHA = 0.05


def dequantize(x_int, levels, generator=None, dtype=torch.float32):
    """x̃ = (x_int + u) / levels in [0, 1), u ~ U[0, 1) per coordinate."""
    x = x_int.to(dtype)
    u = torch.rand(x.shape, generator=generator, dtype=dtype, device=x.device)
    return (x + u) / levels


def to_model(x01, transform="center", alpha=LOGIT_ALPHA):
    """(y, ldj per example) for x̃ in [0, 1)^D; ldj = log |det dy/dx̃|."""
    n, D = x01.shape[0], x01[0].numel()
    if transform == "center":
        ldj = torch.full((n,), D * math.log(2.0), dtype=x01.dtype, device=x01.device)
        return 2.0 * x01 - 1.0, ldj
    if transform == "logit":
        s = alpha + (1.0 - 2.0 * alpha) * x01
        y = torch.log(s) - torch.log1p(-s)
        per = math.log(1.0 - 2.0 * alpha) - torch.log(s) - torch.log1p(-s)
        return y, per.reshape(n, -1).sum(1)
    raise ValueError(f"unknown transform {transform!r}; valid: {', '.join(TRANSFORMS)}")


def from_model(y, transform="center", alpha=LOGIT_ALPHA):
    """Inverse of to_model, clamped to [0, 1]: model-space samples back to [0, 1] images."""
    if transform == "center":
        return ((y + 1.0) / 2.0).clamp(0.0, 1.0)
    if transform == "logit":
        return ((torch.sigmoid(y) - alpha) / (1.0 - 2.0 * alpha)).clamp(0.0, 1.0)
    raise ValueError(f"unknown transform {transform!r}; valid: {', '.join(TRANSFORMS)}")


def prepare(x, levels, transform="center", generator=None, dtype=torch.float32):
    """Raw data → (model-space y, ldj). Discrete data is dequantized; continuous data
    (levels None) passes through with ldj = 0."""
    if levels is None:
        y = x.to(dtype)
        return y, torch.zeros(y.shape[0], dtype=dtype, device=y.device)
    return to_model(dequantize(x, levels, generator, dtype), transform)


def bits_per_dim(terms: dict, ldj, D: int, levels):
    """Per-example BPD terms from per-example log-density terms in nats.

    terms: name → (n,) tensor, summing to a lower bound on log p(y). Returns name → (n,)
    tensor in bits per dimension, with "transform" and "dequantization" added (when the data
    is discrete) and "total" their sum.
    """
    scale = -1.0 / (D * math.log(2.0))
    out = {name: scale * value for name, value in terms.items()}
    if levels is not None:
        out["transform"] = scale * ldj
        out["dequantization"] = torch.full_like(ldj, math.log2(levels))
    out["total"] = sum(out.values())
    return out
