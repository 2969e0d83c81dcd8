"""What a fused state apply would save: sdec's eager apply against the same arithmetic
compiled into one pass by torch.compile (inductor), for the hybrid perturbation of each
shipped spec with K >= 2.

Run on demand (not a test):  python bench/fused_apply.py [--reps N]

For one batch (B = 128, data 3x32x32, float32, the times of bench/kernels.py), the K x K
factors are computed once; then, interleaved in one process and each with a fresh
``randn(B, K, 3, 32, 32)``:

- floor: ``z = randn; z *= b; z += a * x`` (as in bench/kernels.py);
- eager: sdec's ``_apply(L, eps, "lower", Φ[:, :, 0], x)``: on the CPU in float32 the native
  one-pass apply (kernel_native.c), else one multiply-add per nonzero diagonal of L and one
  for Φ's first column, each a pass over the data (``SDEC_NATIVE=0`` measures those);
- fused: y_i = Φ_i0 x + Σ_{j <= i} L_ij eps_j written per row and compiled by torch.compile,
  which emits one loop over the data.

It shows how much of perturb's distance to the floor is the passes over the data (the rest
is the K x K work and Python). Writes bench/results/fused_apply.json and .md.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import kernels as kb  # noqa: E402  (bench/kernels.py: timing harness, inputs, machine)

NAMES = ("cld", "alda", "malda", "learned2", "learned3")


def fused_rows(K):
    def apply(L, col, x, eps):
        ones = (1,) * (x.dim() - 1)
        rows = []
        for i in range(K):
            r = col[:, i].reshape(-1, *ones) * x
            for j in range(i + 1):
                r = r + L[:, i, j].reshape(-1, *ones) * eps[:, j]
            rows.append(r)
        return torch.stack(rows, 1)
    return apply


def measure(name, reps):
    proc = kb.compiled(name)
    module = sys.modules[type(proc).__module__]
    x, t = kb.inputs(proc)
    K = proc.K
    with torch.no_grad():
        Phi, L, _ = (m.to(torch.float32) for m in proc._kernel_factors(t.to(torch.float64), True))
    col = Phi[:, :, 0].contiguous()
    torch._dynamo.reset()  # compile each spec's apply afresh, so its compile time is its own
    started = time.perf_counter()
    fused = torch.compile(fused_rows(K))
    probe = torch.randn((kb.B, K) + kb.SHAPE)
    with torch.no_grad():
        want = module._apply(L, probe, "lower", col, x)
        got = fused(L, col, x, probe)
    compile_s = time.perf_counter() - started
    err = float((want - got).abs().max() / want.abs().max())
    a, b = torch.rand(kb.B), torch.rand(kb.B)
    shape = (kb.B, K) + kb.SHAPE
    fns = {"floor": kb.floor_fn(K, x, a, b),
           "eager": lambda: module._apply(L, torch.randn(shape), "lower", col, x),
           "fused": lambda: fused(L, col, x, torch.randn(shape))}
    with torch.no_grad():
        med = kb.interleaved(fns, reps)
    return {"K": K, "floor_ms": 1e3 * med["floor"], "eager_ratio": med["eager/floor"],
            "fused_ratio": med["fused/floor"], "eager_cpu_ratio": med["cpu:eager/floor"],
            "fused_cpu_ratio": med["cpu:fused/floor"], "compile_s": compile_s,
            "max_rel_diff": err, "faults_per_call": max(med[f"faults:{k}"] for k in fns)}


def markdown(res):
    m = res["machine"]
    out = [f"Machine: {m.get('cpu', '?')}, {m['cpus']} cores, torch {m['torch']}, {m['threads']} thread(s), "
           f"commit {m.get('commit', '?')}, {res['date']}; load average at start {m['loadavg_start']}, "
           f"at end {res['loadavg_end']}.", "",
           "State apply of the hybrid perturbation plus its randn, ratio to the floor (wall, and in "
           "brackets thread CPU; paired interleaved medians):", "",
           "| spec | K | eager (sdec today) | fused (torch.compile) | compile time | max relative difference | floor (ms) |",
           "|---|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        out.append(f"| {name} | {r['K']} | {r['eager_ratio']:.3f}x ({r['eager_cpu_ratio']:.3f}x) | "
                   f"{r['fused_ratio']:.3f}x ({r['fused_cpu_ratio']:.3f}x) | {r['compile_s']:.1f} s | "
                   f"{r['max_rel_diff']:.1e} | {r['floor_ms']:.2f} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    if argv is None:
        kb.keep_buffers_mapped(__file__)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--out", default=str(kb.RESULTS / "fused_apply"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": kb.machine(), "rows": {}}
    for name in NAMES:
        res["rows"][name] = measure(name, args.reps)
        print(name, res["rows"][name], flush=True)
    res["loadavg_end"] = kb.load()
    md = markdown(res)
    print(md)
    out = pathlib.Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()
