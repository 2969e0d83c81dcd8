"""Building blocks of the U-Net and the MLP: time embedding, residual, attention, resampling.

The blocks follow the DDPM / score_sde design (Ho et al. 2020; Song et al. 2021):
GroupNorm -> SiLU -> conv residual blocks with an additive time embedding, single-head
self-attention on the pixels, strided-conv downsampling and nearest + conv upsampling.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

# Continuous times t in (0, T] are embedded as sinusoids of TIME_SCALE * t, the continuous
# analogue of DDPM's integer steps 0..999. With the highest frequency 1, t = 1e-5 maps to
# angle 0.01 and t = 1e-3 to angle 1, so small times stay finite and distinguishable.
TIME_SCALE = 1000.0
MAX_PERIOD = 10000.0


def timestep_embedding(t: torch.Tensor, dim: int, scale: float = TIME_SCALE) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of continuous times t (B,), computed in float32.

    Frequencies are geometric from 1 down to 1/MAX_PERIOD; the first half of the
    features are sines, the second half cosines (a zero column pads an odd dim).
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) / max(half - 1, 1)
    freqs = torch.exp(-math.log(MAX_PERIOD) * exponent)
    angles = scale * t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def num_groups(ch: int, max_groups: int = 32) -> int:
    """The largest group count <= max_groups that divides ch (32 for multiples of 32)."""
    for g in range(min(max_groups, ch), 0, -1):
        if ch % g == 0:
            return g
    return 1


def group_norm(ch: int) -> nn.GroupNorm:
    """GroupNorm over ch channels with num_groups(ch) groups (per-example statistics)."""
    return nn.GroupNorm(num_groups(ch), ch, eps=1e-6)


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of t (dim ch) followed by Linear -> SiLU -> Linear to dim out."""

    def __init__(self, ch: int, out: int):
        super().__init__()
        self.ch = ch
        self.dense0 = nn.Linear(ch, out)
        self.dense1 = nn.Linear(out, out)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) times -> (B, out) features."""
        emb = timestep_embedding(t, self.ch).to(self.dense0.weight.dtype)
        return self.dense1(F.silu(self.dense0(emb)))


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, + time projection, GroupNorm -> SiLU -> dropout -> conv3x3,
    plus a skip path (1x1 conv when the channel count changes)."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, c_out)
        self.norm2 = group_norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x (B, c_in, H, W), temb (B, temb_dim) -> (B, c_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3)
        out = F.scaled_dot_product_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution (even sizes in, exact halves out)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling followed by a 3x3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def batch_times(t, batch: int, device) -> torch.Tensor:
    """t as a (batch,) tensor on device: a float or 0-d tensor is broadcast, (batch,) kept."""
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must have shape ({batch},) or be a scalar; got {tuple(t.shape)}")
    return t


def check_state(y: torch.Tensor, K: int, data_shape: tuple) -> None:
    """Raise ValueError unless y has shape (B, K, *data_shape)."""
    if tuple(y.shape[1:]) != (K, *data_shape):
        raise ValueError(f"expected a state of shape (B, {K}, {', '.join(map(str, data_shape))}); "
                         f"got {tuple(y.shape)}")


def preset_settings(presets: dict, preset: str, what: str, dropout, overrides: dict) -> dict:
    """A preset's architecture settings with overrides (unknown names are errors) and an
    explicit dropout applied."""
    cfg = dict(presets[preset])
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown {what} settings {sorted(unknown)}; valid: {sorted(cfg)}")
    cfg.update(overrides)
    if dropout is not None:
        cfg["dropout"] = dropout
    return cfg
