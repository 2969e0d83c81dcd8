"""Pictures a run leaves behind: sample grids, the training curve, the process, Q and D.

matplotlib with the Agg backend (no display needed); torchvision for image grids.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from sdec import MIX_TOL


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def save_grid(images01: torch.Tensor, path: str, nrow: int | None = None) -> None:
    """(N, C, H, W) in [0, 1] → one PNG grid (nearest-neighbour upscaled for tiny images)."""
    from torchvision.utils import make_grid, save_image
    x = images01.detach().float().cpu()
    if x.shape[-1] < 32:
        factor = max(1, 32 // x.shape[-1])
        x = torch.nn.functional.interpolate(x, scale_factor=factor, mode="nearest")
    nrow = nrow or max(1, int(round(len(x) ** 0.5)))
    save_image(make_grid(x, nrow=nrow, padding=2, pad_value=1.0), path)


def save_points(points: torch.Tensor, path: str, reference: torch.Tensor | None = None) -> None:
    """2-D samples (toy data) as a scatter plot, with the data beside them when given."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    if reference is not None:
        r = reference.detach().cpu().numpy()
        ax.scatter(r[:, 0], r[:, 1], s=2, alpha=0.3, label="data")
    p = points.detach().cpu().numpy()
    ax.scatter(p[:, 0], p[:, 1], s=2, alpha=0.6, label="samples")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def read_metrics(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(ln) for ln in handle if ln.strip()]


def plot_training(records: list, path: str) -> None:
    """Train BPD (per logged step) and validation BPD with its error bar, and mixing at T."""
    plt = _pyplot()
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    fig, (ax, mix) = plt.subplots(1, 2, figsize=(10, 3.6))
    if train and "train_bpd" in train[0]:
        ax.plot([r["step"] for r in train], [r["train_bpd"] for r in train], lw=0.8, label="train (batch)")
    if val:
        ax.errorbar([r["step"] for r in val], [r["val_bpd"] for r in val],
                    yerr=[r["val_bpd_stderr"] or 0.0 for r in val], marker="o", ms=3, label="validation (EMA)")
    ax.set_xlabel("step"), ax.set_ylabel("bits / dim"), ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    if train and "kl_T" in train[0]:
        mix.semilogy([r["step"] for r in train], [max(r["kl_T"], 1e-16) for r in train], label="KL(q(y_T|x)‖π) per dim")
        mix.semilogy([r["step"] for r in train], [r["phi_T_max"] for r in train], label="max|Φ(T)|")
        mix.axhline(MIX_TOL, color="grey", ls=":", label=f"tolerance {MIX_TOL} nats")
        mix.set_xlabel("step"), mix.legend(), mix.grid(alpha=0.3)
    mix.set_title("mixing at T")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_process(times, stds: dict, names, path: str) -> None:
    """Marginal standard deviation of each state variable over t (one line per process)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label, s in stds.items():
        for k, name in enumerate(names):
            ax.plot(times, s[:, k].numpy(), label=f"{name} ({label})",
                    ls="-" if label == "trained" else "--")
    ax.set_xscale("log"), ax.set_xlabel("t"), ax.set_ylabel("marginal std"), ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_blocks(records: list, names, path: str) -> None:
    """Entries of Q (upper triangle) and D (lower triangle and diagonal) over training."""
    plt = _pyplot()
    train = [r for r in records if r.get("kind") == "train" and "Q" in r]
    if not train:
        return
    steps = [r["step"] for r in train]
    Q = np.array([r["Q"] for r in train])
    D = np.array([r["D"] for r in train])
    K = Q.shape[1]
    fig, (aq, ad) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i in range(K):
        for j in range(K):
            if j > i:
                aq.plot(steps, Q[:, i, j], label=f"Q[{names[i]},{names[j]}]")
            if j <= i:
                ad.plot(steps, D[:, i, j], label=f"D[{names[i]},{names[j]}]")
    for ax, title in ((aq, "Q (skew: upper triangle)"), (ad, "D (symmetric: lower triangle)")):
        ax.set_title(title), ax.set_xlabel("step"), ax.grid(alpha=0.3), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
