"""DDPM / score_sde style U-Net predicting the noise of all K variables of an image state.

The K variables' C channels are stacked into K*C input channels; the output has the same
K*C channels and is reshaped back to (B, K, C, H, W). Attention is placed by level index
(level 0 is full resolution, level i has H / 2**i), so a preset does not depend on the size.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .layers import (AttnBlock, Downsample, ResBlock, TimeEmbedding, Upsample, batch_times,
                     check_state, group_norm, preset_settings)

# Architecture of each preset; dropout is the preset's default, overridable in build_net.
UNET_PRESETS = {
    # 8x8 digits on a 2-core CPU: 8x8 (16 ch) -> 4x4 (32 ch, attention); ~0.18M parameters.
    # (ch 32 costs 12.5 GFLOP per forward+backward of 128 states, ~0.2 s on 2 threads.)
    "tiny": dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), dropout=0.1),
    # 28x28 grey images: 28 (32 ch) -> 14 (64) -> 7 (64, attention); ~1.5M parameters.
    "mnist": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_levels=(2,), dropout=0.1),
    # DDPM CIFAR-10: 32 (128) -> 16 (256, attention) -> 8 (256) -> 4 (256); ~35.7M parameters.
    "cifar": dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_levels=(1,), dropout=0.1),
}


class _Stage(nn.Module):
    """A residual block optionally followed by self-attention."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, dropout: float, attn: bool):
        super().__init__()
        self.res = ResBlock(c_in, c_out, temb_dim, dropout)
        self.attn = AttnBlock(c_out) if attn else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Residual block then attention."""
        return self.attn(self.res(x, temb))


class UNet(nn.Module):
    """Noise-prediction U-Net: forward(y (B, K, C, H, W), t (B,)) -> eps_hat of y's shape/dtype."""

    def __init__(self, *, K: int, data_shape, ch: int, ch_mult, num_res_blocks: int,
                 attn_levels, dropout: float, preset: str = "custom"):
        super().__init__()
        C, H, W = (int(s) for s in data_shape)
        self.K, self.data_shape = int(K), (C, H, W)
        self.config = dict(preset=preset, K=self.K, data_shape=[C, H, W], ch=int(ch),
                           ch_mult=[int(m) for m in ch_mult], num_res_blocks=int(num_res_blocks),
                           attn_levels=[int(a) for a in attn_levels], dropout=float(dropout))
        self.factor = 2 ** (len(ch_mult) - 1)
        temb_dim = 4 * ch
        self.temb = TimeEmbedding(ch, temb_dim)
        self.conv_in = nn.Conv2d(self.K * C, ch, 3, padding=1)
        chans = self._build_down(ch, ch_mult, num_res_blocks, set(attn_levels), temb_dim, dropout)
        cur = chans[-1]
        self.mid = nn.ModuleList([_Stage(cur, cur, temb_dim, dropout, attn=True),
                                  _Stage(cur, cur, temb_dim, dropout, attn=False)])
        cur = self._build_up(chans, ch, ch_mult, num_res_blocks, set(attn_levels), temb_dim,
                             dropout)
        self.norm_out = group_norm(cur)
        self.conv_out = nn.Conv2d(cur, self.K * C, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _build_down(self, ch, ch_mult, nrb, attn_levels, temb_dim, dropout) -> list:
        """Create self.down; return the channel count of every skip activation, in order."""
        self.down = nn.ModuleList()
        chans, cur = [ch], ch
        for level, mult in enumerate(ch_mult):
            for _ in range(nrb):
                self.down.append(_Stage(cur, ch * mult, temb_dim, dropout, level in attn_levels))
                cur = ch * mult
                chans.append(cur)
            if level != len(ch_mult) - 1:
                self.down.append(Downsample(cur))
                chans.append(cur)
        return chans

    def _build_up(self, chans, ch, ch_mult, nrb, attn_levels, temb_dim, dropout) -> int:
        """Create self.up (consuming chans from the end); return the final channel count."""
        self.up = nn.ModuleList()
        chans, cur = list(chans), chans[-1]
        for level in reversed(range(len(ch_mult))):
            for _ in range(nrb + 1):
                c_in = cur + chans.pop()
                cur = ch * ch_mult[level]
                self.up.append(_Stage(c_in, cur, temb_dim, dropout, level in attn_levels))
            if level != 0:
                self.up.append(Upsample(cur))
        return cur

    def forward(self, y: torch.Tensor, t) -> torch.Tensor:
        """Predict the noise of every variable: (B, K, C, H, W), t (B,) -> (B, K, C, H, W)."""
        check_state(y, self.K, self.data_shape)
        B, (C, H, W) = y.shape[0], self.data_shape
        x = y.reshape(B, self.K * C, H, W).to(self.conv_in.weight.dtype)
        x = F.pad(x, (0, -W % self.factor, 0, -H % self.factor))
        temb = self.temb(batch_times(t, B, y.device))
        h = self._unet(x, temb)[:, :, :H, :W]
        return h.reshape(B, self.K, C, H, W).to(y.dtype)

    def _unet(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """The U-Net proper on padded (B, K*C, H', W') inputs."""
        hs = [self.conv_in(x)]
        for m in self.down:
            hs.append(m(hs[-1], temb) if isinstance(m, _Stage) else m(hs[-1]))
        h = hs[-1]
        for m in self.mid:
            h = m(h, temb)
        for m in self.up:
            h = m(torch.cat([h, hs.pop()], dim=1), temb) if isinstance(m, _Stage) else m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def build_unet(preset: str, *, K: int, data_shape, dropout=None, **overrides) -> UNet:
    """A UNet from a preset of UNET_PRESETS; overrides replace architecture fields."""
    if len(tuple(data_shape)) != 3:
        raise ValueError(f"U-Net preset {preset!r} needs image data_shape (C, H, W); got "
                         f"{tuple(data_shape)}. Use preset 'mlp' for vector data.")
    cfg = preset_settings(UNET_PRESETS, preset, "U-Net", dropout, overrides)
    return UNet(K=K, data_shape=data_shape, preset=preset, **cfg)
