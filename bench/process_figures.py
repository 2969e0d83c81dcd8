"""What the processes of the reproduction table look like: the learned Q and D of learned2 and
learned3 (initial and trained), and each process's marginal standard deviations over t.

Reads the trained processes (EMA values of the best checkpoint) from the run directories
`bench/reproduce.py` left, prints Q, D and the mixing at T, and writes

    docs/images/learned_QD.png          Q and D of learned2 and learned3, initial and trained
    docs/images/marginal_std.png        sqrt(Var y_t[k]) per state variable k over t, every process
    bench/results/learned_processes.json

The marginal standard deviation of variable k at time t, for data with per-coordinate
second moment E[x²] (the digits in model space, y = 2x̃ − 1), is
sqrt(Σ_t[k, k] + Φ_t[k, 0]² E[x²]) (`sdec.runtime.monitor.marginal_std`).

    python bench/process_figures.py [--runs-dir /work/repro-runs] [--seed 0] [--steps 1500]
"""
from __future__ import annotations

import argparse
import json
import os

import torch

import sdec
from sdec.runtime import monitor
from sdec.runtime.bpd import prepare
from sdec.runtime.data import load_dataset
from sdec.runtime.saved import load_run

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SPECS = ["vpsde", "cld", "alda", "malda", "learned2", "learned3"]
LEARNED = ["learned2", "learned3"]


def second_moment():
    train = load_dataset("digits", "train")
    y, _ = prepare(train.data, 17, "center", torch.Generator().manual_seed(0), torch.float64)
    return float((y ** 2).mean())


def processes(runs_dir, seed, steps):
    """name -> (initial process, trained process or None)."""
    out = {}
    for name in SPECS:
        initial = sdec.compile(os.path.join(ROOT, "specs", f"{name}.sde"))
        trained = None
        run = os.path.join(runs_dir, f"{name}_seed{seed}_steps{steps}")
        if name in LEARNED and os.path.exists(os.path.join(run, "results.json")):
            trained = load_run(run, "cpu").proc
        out[name] = (initial, trained)
    return out


def matrix_panel(ax, m, title, names):
    import numpy as np
    m = np.asarray(m)
    lim = max(abs(m).max(), 1e-12)
    im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_title(title, fontsize=9)
    return im


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs-dir", default="/work/repro-runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--images", default=os.path.join(ROOT, "docs", "images"))
    args = parser.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    procs = processes(args.runs_dir, args.seed, args.steps)
    m2 = second_moment()
    record = {"runs_dir": args.runs_dir, "seed": args.seed, "steps": args.steps, "data_second_moment": m2,
              "processes": {}}
    times = torch.logspace(-3, 0, 200, dtype=torch.float64)
    for name, (initial, trained) in procs.items():
        entry = {}
        for label, proc in (("initial", initial), ("trained", trained)):
            if proc is None:
                continue
            blocks = monitor.blocks(proc)
            mix = monitor.mixing(proc)
            entry[label] = {"Q": blocks["Q"], "D": blocks["D"], "mixing": mix,
                            "D_eigenvalues": torch.linalg.eigvalsh(proc.D.detach().double()).tolist()}
            if name in LEARNED or label == "initial":
                print(f"{name} ({label}):\n  Q = {blocks['Q']}\n  D = {blocks['D']}\n"
                      f"  eig D = {entry[label]['D_eigenvalues']}\n  KL at T = {mix['kl_T']:.4f} nats/dim, "
                      f"max|Phi(T)| = {mix['phi_T_max']:.4f}")
        record["processes"][name] = entry

    # Q and D of the learned specs.
    fig, axes = plt.subplots(len(LEARNED), 4, figsize=(13, 3.2 * len(LEARNED)))
    for row, name in enumerate(LEARNED):
        initial, trained = procs[name]
        for col, (label, proc) in enumerate((("initial", initial), ("trained", trained))):
            for k, key in enumerate(("Q", "D")):
                ax = axes[row, 2 * k + col]
                if proc is None:
                    ax.set_axis_off()
                    ax.set_title(f"{name} {key} ({label}): no run", fontsize=9)
                    continue
                matrix_panel(ax, getattr(proc, key).detach().double().numpy(),
                             f"{name} {key} ({label})", list(proc.names))
    fig.suptitle(f"learned Q (skew) and D (PSD): spec initial value and trained (EMA, seed {args.seed}, "
                 f"{args.steps} steps on digits)", fontsize=10)
    fig.tight_layout()
    os.makedirs(args.images, exist_ok=True)
    fig.savefig(os.path.join(args.images, "learned_QD.png"), dpi=110)
    plt.close(fig)

    # Marginal standard deviations over t.
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True)
    for ax, (name, (initial, trained)) in zip(axes.flat, procs.items()):
        for label, proc, style in (("initial", initial, "--"), ("trained", trained, "-")):
            if proc is None:
                continue
            if name not in LEARNED and label == "initial":
                style = "-"
            std = monitor.marginal_std(proc, m2, times).numpy()
            for k, var in enumerate(proc.names):
                ax.plot(times.numpy(), std[:, k], style, color=f"C{k}",
                        label=f"{var}" + (f" ({label})" if name in LEARNED else ""))
        ax.set_xscale("log")
        ax.set_title(name)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.legend(fontsize=7)
        ax.set_xlabel("t")
    axes[0, 0].set_ylabel("marginal std of y_t[k]")
    axes[1, 0].set_ylabel("marginal std of y_t[k]")
    fig.suptitle(f"marginal standard deviation per state variable, digits in model space (E[x²] = {m2:.3f}); "
                 f"learned: spec initial (dashed) and trained seed {args.seed} (solid)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(args.images, "marginal_std.png"), dpi=110)
    plt.close(fig)

    with open(os.path.join(HERE, "results", "learned_processes.json"), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
    print("wrote docs/images/learned_QD.png, docs/images/marginal_std.png, bench/results/learned_processes.json")


if __name__ == "__main__":
    main()
