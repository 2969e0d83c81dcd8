"""ELBO estimator variance per process: uniform vs importance time sampling.

The ELBO is the training signal, so its Monte-Carlo variance matters. For each shipped
spec we take Gaussian data x ~ N(0, s² I_d) (d = 64), whose exact marginal score is known
(-C_t⁻¹ y with C_t = Φ_t blockdiag(s², Σ_v0) Φ_tᵀ + Σ_t^{nh}), and a deliberately
imperfect score (the exact one scaled by 0.9, standing in for a trained network). For a
fixed batch of x we redraw (t, ε) many times and report the per-example standard
deviation of ELBO.total under each time sampler, and their ratio (a ratio against the
uniform baseline, measured in the same process). Results go to bench/results/.

Run: python bench/elbo_variance.py [--reps 400]
"""
import argparse
import json
import os
import platform
import time

import torch

import sdec

SPECS = ["vpsde", "cld", "alda", "malda", "learned2", "learned3"]


def marginal_precision(proc, s2, t):
    Phi, Sig = proc.transition(t, hybrid=False)
    K = proc.K
    C0 = torch.zeros(K, K, dtype=torch.float64)
    C0[0, 0] = s2
    if K > 1:
        C0[1:, 1:] = proc.aux_init_cov.double()
    C = Phi @ C0 @ Phi.transpose(-1, -2) + Sig
    return torch.linalg.inv(C)


def score_fn(proc, s2, scale):
    def score(y, t):
        P = marginal_precision(proc, s2, t.double())  # (B, K, K)
        return -scale * torch.einsum("bkl,bld->bkd", P, y.double()).to(y.dtype)
    return score


def measure(name, reps, d=64, batch=32, s2=0.25, seed=0):
    proc = sdec.compile(f"specs/{name}.sde")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d, generator=gen, dtype=torch.float64) * s2 ** 0.5
    score = score_fn(proc, s2, 0.9)
    out = {}
    with torch.no_grad():
        for sampler in ("uniform", "importance"):
            t0 = time.perf_counter()
            totals = torch.stack([proc.elbo(x, score, time_sampler=sampler, generator=gen).total for _ in range(reps)])
            out[sampler] = {"mean_per_dim": float(totals.mean() / d), "std_per_example": float(totals.std(0).mean()),
                            "seconds": time.perf_counter() - t0}
    out["std_ratio_importance_over_uniform"] = out["importance"]["std_per_example"] / out["uniform"]["std_per_example"]
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=400)
    args = parser.parse_args()
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
               "reps": args.reps, "d": 64, "processes": {}}
    for name in SPECS:
        results["processes"][name] = r = measure(name, args.reps)
        print(f"{name:9s} mean ELBO/dim {r['uniform']['mean_per_dim']:8.4f} (uniform) {r['importance']['mean_per_dim']:8.4f} (importance)  "
              f"std/example uniform {r['uniform']['std_per_example']:9.3f}  importance {r['importance']['std_per_example']:9.3f}  "
              f"ratio {r['std_ratio_importance_over_uniform']:.3f}")
    os.makedirs("bench/results", exist_ok=True)
    with open("bench/results/elbo_variance.json", "w") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
