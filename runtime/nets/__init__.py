"""Noise-prediction networks for diffusion states y of shape (B, K, *data_shape).

Every net maps (y, t) -> eps_hat with y's shape and dtype, t a (B,) tensor of continuous
times in (0, T] (a scalar is broadcast). Times are embedded as sinusoids of 1000 * t.
``net.config`` is a dict of primitives with ``build_net(**net.config)`` rebuilding the net.

Presets (default dropout in brackets):
  "tiny"  U-Net for small images such as 8x8 digits: ch 16, ch_mult (1, 2), 1 res block
          per level, attention at level 1 (4x4 for 8x8); ~0.18M parameters [0.1]
  "mnist" U-Net for 28x28 grey images: ch 32, ch_mult (1, 2, 2), 2 res blocks, attention
          at level 2 (7x7); ~1.5M parameters [0.1]
  "cifar" the DDPM CIFAR-10 U-Net: ch 128, ch_mult (1, 2, 2, 2), 2 res blocks, attention
          at level 1 (16x16); ~35.7M parameters [0.1]
  "mlp"   residual MLP on the flattened state: width 256, 3 blocks, LayerNorm [0.0]
"""
from torch import nn

from .layers import timestep_embedding
from .mlp import MLP, MLP_PRESETS, build_mlp
from .unet import UNET_PRESETS, UNet, build_unet

NETS = {**{name: build_unet for name in UNET_PRESETS}, **{name: build_mlp for name in MLP_PRESETS}}

__all__ = ["NETS", "build_net", "default_preset", "UNet", "MLP", "timestep_embedding"]


def _shape(data_shape) -> tuple:
    """data_shape as a tuple of ints (an int d means (d,))."""
    if isinstance(data_shape, int):
        return (data_shape,)
    return tuple(int(s) for s in data_shape)


def build_net(preset: str, *, K: int, data_shape, dropout: float | None = None,
              **overrides) -> nn.Module:
    """Build the noise-prediction net of `preset` for K variables of shape data_shape.

    dropout=None keeps the preset's default. Extra keyword arguments override architecture
    settings (ch, ch_mult, ... for U-Nets; width, depth, ... for the MLP), which is how
    ``build_net(**net.config)`` rebuilds a saved net.
    """
    if preset not in NETS:
        raise ValueError(f"unknown net preset {preset!r}; valid presets: {sorted(NETS)}")
    if int(K) < 1:
        raise ValueError(f"K must be >= 1; got {K}")
    return NETS[preset](preset, K=int(K), data_shape=_shape(data_shape), dropout=dropout,
                        **overrides)


def default_preset(data_shape) -> str:
    """'tiny' for images with H <= 16, 'mnist' for other 1-channel images, 'cifar' for
    other images, 'mlp' for anything that is not (C, H, W)."""
    shape = _shape(data_shape)
    if len(shape) != 3:
        return "mlp"
    C, H, _ = shape
    if H <= 16:
        return "tiny"
    return "mnist" if C == 1 else "cifar"
