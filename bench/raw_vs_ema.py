"""Test ELBO of the raw (optimizer) weights against the EMA weights of the same checkpoint.

`sdec eval` and the table use the EMA weights (decay 0.999 by default). In a 1500-step run
the EMA averages over roughly the last thousand steps, while the validation BPD is still
falling fast, so the EMA can lag the raw weights; this measures by how much. Both are
evaluated on the same test images with the same generator seed (same dequantization, times
and noise), in eval mode (no dropout), with `sdec.runtime.evaluate.evaluate_elbo`.

    python bench/raw_vs_ema.py RUN_DIR [RUN_DIR ...] [--checkpoint ckpt-last.pt] [--time-samples 16]
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from sdec.runtime import checkpoint as ckpt
from sdec.runtime.data import load_dataset
from sdec.runtime.evaluate import evaluate_elbo
from sdec.runtime.nets import build_net
from sdec.runtime.saved import load_run


def raw_model(path):
    saved = load_run(path, "cpu")  # EMA values; the raw ones are loaded over a second copy
    state = ckpt.load(path, map_location="cpu")
    net = build_net(**state["net_config"])
    net.load_state_dict(state["net"])
    proc = load_run(path, "cpu").proc
    proc.load_state_dict(state["process"])
    return saved, proc.train(False), net.train(False)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--checkpoint", default="ckpt-last.pt")
    parser.add_argument("--time-samples", type=int, default=16)
    parser.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    args = parser.parse_args()
    test = load_dataset("digits", "test")
    out = {}
    for run in args.runs:
        path = os.path.join(run, args.checkpoint)
        saved, proc, net = raw_model(path)
        row = {"checkpoint": path, "step": saved.step, "ema_decay": saved.cfg.ema_decay}
        for label, (p, n) in (("ema", (saved.proc, saved.net)), ("raw", (proc, net))):
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                ev = evaluate_elbo(p, n, test.data, test.levels, transform=saved.cfg.transform,
                                   time_samples=args.time_samples, generator=gen)
            row[label] = {"bpd": ev.bpd, "bpd_stderr": ev.bpd_stderr, "prior": ev.terms["prior"]}
        row["raw_minus_ema"] = row["raw"]["bpd"] - row["ema"]["bpd"]
        out[run] = row
        print(f"{run} step {saved.step}: EMA {row['ema']['bpd']:.3f} ± {row['ema']['bpd_stderr']:.3f}, "
              f"raw {row['raw']['bpd']:.3f} ± {row['raw']['bpd_stderr']:.3f} test BPD", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(out, handle, indent=2)


if __name__ == "__main__":
    main()
