"""Training with and without stratified times: the same spec, seed, network and step budget,
`sdec train --time-sampler importance` against `--time-sampler stratified`.

Stratified times leave each time's law unchanged (so the training objective's expectation
is the same bound) and lower the variance of the batch mean; this measures whether that
shows in the curves. Runs `sdec train` as subprocesses (resumable: a run whose results.json
exists is not retrained), then reads metrics.jsonl and writes

    bench/results/stratified_curves.json   validation BPD per evaluation, final test BPD, the
                                           standard deviation of the training loss about its
                                           running mean (a direct view of the batch-mean noise)
    docs/images/stratified_curves.png      validation BPD and training loss over steps

    python bench/stratified_curves.py [--specs cld,learned3] [--steps 600] [--eval-every 100]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SAMPLERS = ("importance", "stratified")


def train(spec, sampler, args):
    out = os.path.join(args.runs_dir, f"{spec}_{sampler}_seed{args.seed}_steps{args.steps}")
    if os.path.exists(os.path.join(out, "results.json")):
        return out, None
    cmd = [sys.executable, "-m", "sdec", "train", os.path.join("specs", f"{spec}.sde"), "--steps", str(args.steps),
           "--seed", str(args.seed), "--eval-every", str(args.eval_every), "--log-every", "10",
           "--time-sampler", sampler, "--out", out, "--no-progress"]
    if os.path.exists(os.path.join(out, "ckpt-last.pt")):
        cmd.append("--resume")
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return out, time.perf_counter() - t0


def read(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as handle:
        lines = [json.loads(line) for line in handle if line.strip()]
    tr = [(r["step"], r["total"]) for r in lines if r.get("kind") == "train"]
    val = [(r["step"], r["val_bpd"]) for r in lines if r.get("kind") == "val"]
    with open(os.path.join(out, "results.json"), encoding="utf-8") as handle:
        res = json.load(handle)
    return tr, val, res


def roughness(tr, window=10):
    """Std of the logged training loss about its centred running mean (after step 100)."""
    y = torch.tensor([v for s, v in tr if s > 100], dtype=torch.float64)
    if y.numel() <= window:
        return None
    smooth = torch.nn.functional.avg_pool1d(y[None, None], window, 1, padding=window // 2,
                                            count_include_pad=False)[0, 0, : y.numel()]
    return float((y - smooth).std())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--specs", default="cld,learned3")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs-dir", default="/work/repro-runs-stratified")
    parser.add_argument("--images", default=os.path.join(ROOT, "docs", "images"))
    args = parser.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = args.specs.split(",")
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python bench/stratified_curves.py " + " ".join(sys.argv[1:]),
              "steps": args.steps, "eval_every": args.eval_every, "seed": args.seed, "runs": {}}
    fig, axes = plt.subplots(2, len(specs), figsize=(6 * len(specs), 7), squeeze=False)
    for col, spec in enumerate(specs):
        for k, sampler in enumerate(SAMPLERS):
            out, seconds = train(spec, sampler, args)
            tr, val, res = read(out)
            result["runs"][f"{spec}/{sampler}"] = {
                "run_dir": out, "wall_seconds_this_invocation": seconds, "val_bpd": val,
                "best_val_bpd": res.get("best_val_bpd"), "test_bpd": res["bpd"], "test_bpd_stderr": res["bpd_stderr"],
                "train_loss_roughness": roughness(tr)}
            print(f"{spec} {sampler}: test {res['bpd']:.3f} ± {res['bpd_stderr']:.3f}, val {val}, "
                  f"loss roughness {result['runs'][f'{spec}/{sampler}']['train_loss_roughness']}", flush=True)
            axes[0, col].plot(*zip(*val), "o-", color=f"C{k}", label=sampler)
            axes[1, col].plot(*zip(*tr), color=f"C{k}", lw=0.8, alpha=0.8, label=sampler)
        axes[0, col].set_title(f"{spec}: validation BPD (EMA)")
        axes[1, col].set_title(f"{spec}: training loss (batch-mean ELBO BPD)")
        axes[1, col].set_ylim(top=min(axes[1, col].get_ylim()[1], 12))
        for ax in axes[:, col]:
            ax.set_xlabel("step")
            ax.legend()
    fig.suptitle(f"importance vs stratified training times, digits, seed {args.seed}, {args.steps} steps", fontsize=10)
    fig.tight_layout()
    os.makedirs(args.images, exist_ok=True)
    fig.savefig(os.path.join(args.images, "stratified_curves.png"), dpi=110)
    with open(os.path.join(HERE, "results", "stratified_curves.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
