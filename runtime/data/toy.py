"""Continuous 2-D toy distributions, generated in memory (``toy:NAME``).

checkerboard: uniform on the 8 dark squares of a 4x4 board covering [-2, 2]^2.
moons: two interleaved half circles with Gaussian noise 0.05, centred, scaled by 2 (about
       [-3, 3] x [-1.5, 1.5]).
swissroll: the 2-D swiss roll t(cos t, sin t), t in [1.5pi, 4.5pi], noise 0.25, divided by
       5 (about [-2.5, 2.5]^2).
8gaussians: 8 Gaussians (std 0.1) centred on the circle of radius 2 at angles k*pi/4.

float32 (N, 2), no labels, levels None. The train split is 20000 points drawn with seed
TRAIN_SEED, the test split 2000 points with seed TEST_SEED (a private torch.Generator;
the global RNG is never touched), so the two never coincide.
"""
from __future__ import annotations

import math

import torch

from .base import Dataset

SIZES = {"train": 20000, "test": 2000}
SEEDS = {"train": 0, "test": 1}


def checkerboard(n: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform on the squares (row + col even) of a 4x4 board over [-2, 2]^2."""
    cell = torch.randint(0, 8, (n,), generator=gen)
    row = cell // 2
    col = 2 * (cell % 2) + row % 2
    offset = torch.rand(n, 2, generator=gen)
    return torch.stack([col + offset[:, 0], row + offset[:, 1]], dim=1) - 2.0


def moons(n: int, gen: torch.Generator) -> torch.Tensor:
    """Two interleaved half circles, noise 0.05, centred and scaled by 2."""
    t = math.pi * torch.rand(n, generator=gen)
    lower = torch.rand(n, generator=gen) < 0.5
    x = torch.where(lower, 1.0 - torch.cos(t), torch.cos(t))
    y = torch.where(lower, 0.5 - torch.sin(t), torch.sin(t))
    points = torch.stack([x, y], dim=1) + 0.05 * torch.randn(n, 2, generator=gen)
    return 2.0 * (points - torch.tensor([0.5, 0.25]))


def swissroll(n: int, gen: torch.Generator) -> torch.Tensor:
    """t (cos t, sin t) for t uniform in [1.5pi, 4.5pi], noise 0.25, divided by 5."""
    t = 1.5 * math.pi * (1.0 + 2.0 * torch.rand(n, generator=gen))
    points = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)
    return (points + 0.25 * torch.randn(n, 2, generator=gen)) / 5.0


def eight_gaussians(n: int, gen: torch.Generator) -> torch.Tensor:
    """Equal mixture of 8 Gaussians, std 0.1, centres 2(cos k pi/4, sin k pi/4)."""
    angle = torch.randint(0, 8, (n,), generator=gen).to(torch.float32) * (math.pi / 4)
    centres = 2.0 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centres + 0.1 * torch.randn(n, 2, generator=gen)


TOYS = {"checkerboard": checkerboard, "moons": moons, "swissroll": swissroll,
        "8gaussians": eight_gaussians}


def load_toy(toy: str, split: str) -> Dataset:
    """The named toy set's split: float32 (N, 2), fixed seed per split."""
    gen = torch.Generator().manual_seed(SEEDS[split])
    data = TOYS[toy](SIZES[split], gen).to(torch.float32).contiguous()
    return Dataset(f"toy:{toy}", split, data, None, None)
