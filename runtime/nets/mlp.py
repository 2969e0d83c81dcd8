"""Residual MLP noise predictor for vector data (any data_shape is flattened).

The state (B, K, *data_shape) is flattened to K*d features, concatenated with a linear
projection of the sinusoidal time embedding, passed through residual MLP blocks, and
projected back by a zero-initialized linear layer (an untrained net predicts 0).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import batch_times, check_state, preset_settings, timestep_embedding

MLP_PRESETS = {
    # toy 2-D and other low-dimensional data; no dropout by default (small models underfit).
    "mlp": dict(width=256, depth=3, temb_dim=128, layer_norm=True, dropout=0.0),
}


class ResMLPBlock(nn.Module):
    """x + Linear(dropout(SiLU(Linear(SiLU(LayerNorm(x))))))."""

    def __init__(self, width: int, dropout: float, layer_norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(width) if layer_norm else nn.Identity()
        self.fc1 = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, width) -> (B, width)."""
        h = self.fc1(F.silu(self.norm(x)))
        return x + self.fc2(self.dropout(F.silu(h)))


class MLP(nn.Module):
    """Noise-prediction MLP: forward(y (B, K, *data_shape), t (B,)) -> eps_hat of y's shape."""

    def __init__(self, *, K: int, data_shape, width: int, depth: int, temb_dim: int,
                 layer_norm: bool, dropout: float, preset: str = "mlp"):
        super().__init__()
        self.K, self.data_shape = int(K), tuple(int(s) for s in data_shape)
        self.config = dict(preset=preset, K=self.K, data_shape=list(self.data_shape),
                           width=int(width), depth=int(depth), temb_dim=int(temb_dim),
                           layer_norm=bool(layer_norm), dropout=float(dropout))
        n = self.K * math.prod(self.data_shape)
        self.temb_dim = temb_dim
        self.temb_proj = nn.Linear(temb_dim, temb_dim)
        self.inp = nn.Linear(n + temb_dim, width)
        self.blocks = nn.ModuleList(ResMLPBlock(width, dropout, layer_norm) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width) if layer_norm else nn.Identity()
        self.out = nn.Linear(width, n)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, y: torch.Tensor, t) -> torch.Tensor:
        """Predict the noise of every variable: (B, K, *data_shape), t (B,) -> same shape."""
        check_state(y, self.K, self.data_shape)
        B = y.shape[0]
        dtype = self.inp.weight.dtype
        emb = timestep_embedding(batch_times(t, B, y.device), self.temb_dim).to(dtype)
        h = torch.cat([y.reshape(B, -1).to(dtype), self.temb_proj(emb)], dim=1)
        h = self.inp(h)
        for block in self.blocks:
            h = block(h)
        return self.out(F.silu(self.norm_out(h))).reshape(y.shape).to(y.dtype)


def build_mlp(preset: str, *, K: int, data_shape, dropout=None, **overrides) -> MLP:
    """An MLP from a preset of MLP_PRESETS; overrides replace architecture fields."""
    cfg = preset_settings(MLP_PRESETS, preset, "MLP", dropout, overrides)
    return MLP(K=K, data_shape=data_shape, preset=preset, **cfg)
