"""ELBO estimator variance at a trained model on digits, per process and time sampler.

`bench/elbo_variance.py` measures the variance with an analytic score on Gaussian data; this
script measures it where it matters: the trained networks of the reproduction table
(seed-0 runs of `bench/reproduce.py`, EMA weights of the best checkpoint), on the first B
test images, in bits per dimension. Each of R repetitions draws fresh dequantization,
auxiliary and kernel noise and times, for B images at once, under four time samplers:

- uniform: t ~ U[t_min, T], weight T − t_min (`proc.elbo(..., time_sampler="uniform")`);
- importance: sdec's p(t) ∝ tr(Σ_t⁻¹ G Gᵀ(t)) derived from the compiled process;
- mdm_vp: the MDM code's VP density p(t) ∝ β(t) / (1 − exp(−B(t))), applied to every process
  with that process's own β and B = ∫₀ᵗ β (read from the generated module's private
  `_beta` and `_B`: no public accessor exists yet). It is sampled exactly as a piecewise-
  constant density on 4096 log-spaced bins of [t_min, T] and weighted by 1/p(t); the ELBO is
  evaluated at those t with `time_sampler="uniform"` (weight T − t_min) and the score term,
  which is linear in the weight, rescaled to 1/p(t);
- stratified: sdec's importance density, one time in each of B equal-probability strata
  across the batch (`time_sampler="stratified"`).

Reported per process and sampler: the mean BPD (all four estimate the same bound, so the
means must agree within their standard errors), the per-example standard deviation of one
draw (std over repetitions, root-mean-square over images), and the standard deviation of the
batch mean times sqrt(B), which equals the per-example figure for independent draws and is
what stratification lowers (it leaves each draw's law unchanged and correlates the batch).

    python bench/elbo_variance_trained.py [--runs-dir /work/repro-runs] [--reps 64] [--batch 128]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import time

import torch

from sdec.runtime.bpd import prepare
from sdec.runtime.data import load_dataset
from sdec.runtime.saved import load_run

HERE = os.path.dirname(os.path.abspath(__file__))
SPECS = ["vpsde", "cld", "alda", "malda", "learned2", "learned3"]
SAMPLERS = ["uniform", "importance", "mdm_vp", "stratified"]
MDM_BINS = 4096


class VPDensity:
    """p(t) ∝ β(t) / (1 − exp(−B(t))) on [t_min, T], piecewise constant on log-spaced bins."""

    def __init__(self, proc, t_min, T):
        edges = torch.logspace(math.log10(t_min), math.log10(T), MDM_BINS + 1, dtype=torch.float64)
        edges[0], edges[-1] = t_min, T
        mid = 0.5 * (edges[1:] + edges[:-1])
        with torch.no_grad():
            dens = proc.beta(mid) / (-torch.expm1(-proc.B(mid)))
        mass = dens * (edges[1:] - edges[:-1])
        self.edges, self.probs = edges, mass / mass.sum()
        self.density = self.probs / (edges[1:] - edges[:-1])
        self.cdf = torch.cumsum(self.probs, 0)

    def sample(self, n, generator):
        u = torch.rand(2, n, generator=generator, dtype=torch.float64)
        i = torch.searchsorted(self.cdf, u[0] * self.cdf[-1], right=True).clamp(0, MDM_BINS - 1)
        t = self.edges[i] + u[1] * (self.edges[i + 1] - self.edges[i])
        return t, 1.0 / self.density[i]


def draw(proc, score_fn, y, sampler, vp, gen):
    """One ELBO draw per example (nats), for the given time sampler."""
    if sampler != "mdm_vp":
        return proc.elbo(y, score_fn, time_sampler=sampler, generator=gen).total.double()
    t, w = vp.sample(y.shape[0], gen)
    terms = proc.elbo(y, score_fn, t=t.to(y.dtype), time_sampler="uniform", generator=gen)
    scale = w / (float(proc.T) - float(proc.t_min))
    return (terms.total.double() - terms.score.double() + terms.score.double() * scale)


def measure(run_dir, x, reps, seed):
    saved = load_run(run_dir, "cpu")
    proc, net = saved.proc, saved.net
    score_fn = proc.score_from_eps(net)
    vp = VPDensity(proc, float(proc.t_min), float(proc.T))
    D = x[0].numel()
    out = {"run_dir": run_dir, "step": saved.step}
    with torch.no_grad():
        for k, sampler in enumerate(SAMPLERS):
            gen = torch.Generator().manual_seed(seed * 1000 + k)
            t0 = time.perf_counter()
            rows = []
            for _ in range(reps):
                y, ldj = prepare(x, 17, "center", gen, torch.float32)
                elbo = draw(proc, score_fn, y, sampler, vp, gen)
                rows.append(-(elbo + ldj.double()) / (D * math.log(2)) + math.log2(17))
            bpd = torch.stack(rows)  # (reps, B)
            per_example = bpd.std(0)
            batch_mean = bpd.mean(1)
            out[sampler] = {
                "mean_bpd": float(bpd.mean()),
                "mean_bpd_stderr_mc": float(batch_mean.std() / math.sqrt(reps)),
                "std_per_example": float(per_example.pow(2).mean().sqrt()),
                "std_batch_mean_times_sqrtB": float(batch_mean.std() * math.sqrt(x.shape[0])),
                "seconds": time.perf_counter() - t0}
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs-dir", default="/work/repro-runs")
    parser.add_argument("--seed", type=int, default=0, help="the table seed whose runs are used")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--specs", default=",".join(SPECS))
    parser.add_argument("--reps", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "elbo_variance_trained.json"))
    args = parser.parse_args()
    x = load_dataset("digits", "test").data[: args.batch]
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python bench/elbo_variance_trained.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
              "reps": args.reps, "batch": args.batch, "samplers": SAMPLERS, "processes": {}}
    if os.path.exists(args.out):  # resume: keep processes already measured with the same settings
        with open(args.out, encoding="utf-8") as handle:
            old = json.load(handle)
        if (old.get("reps"), old.get("batch")) == (args.reps, args.batch):
            result["processes"] = old.get("processes", {})
    for name in args.specs.split(","):
        run = os.path.join(args.runs_dir, f"{name}_seed{args.seed}_steps{args.steps}")
        if name in result["processes"]:
            continue
        if not os.path.exists(os.path.join(run, "results.json")):
            print(f"{name}: no finished run at {run}; skipped")
            continue
        result["processes"][name] = r = measure(run, x, args.reps, args.seed)
        print(f"{name:9s} " + "  ".join(f"{s}: mean {r[s]['mean_bpd']:.3f} std/ex {r[s]['std_per_example']:.2f} "
                                        f"batch {r[s]['std_batch_mean_times_sqrtB']:.2f}" for s in SAMPLERS), flush=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
