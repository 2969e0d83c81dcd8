"""How far fusing a learned process's own per-step setup could take its ELBO machinery in the
consecutive regime of bench/kernels.py (section 5: 50 steps of one process in a row): an
upper bound measured, not a design.

Run on demand (not a test):  python bench/elbo_bound.py [--rounds N]

It times 50-step blocks (kernels.consecutive: seeded random order of the blocks every round,
paired ratios per round to vpsde) of vpsde, learned3 as compiled, and a learned3 variant in
which a stage of its step is replaced by values computed once before the loop, so that it
costs nothing at all:

  setup     _prepare: the native map's values from the parameters (Q, D, A = -(Q + D) Σ∞⁻¹,
            ‖A‖₂), the series settings and the importance table, one C call
            (sdec_elbo_prepare) and its Python wrapper, held from one call (the ELBO node
            still runs the map's adjoint in its backward, the SGD step still moves the
            parameters).  Its C time (~13 µs) is the part no marshalling change removes.

The variant still runs the rest of the step as compiled: the time draw, the native pipeline
and its adjoint, randn, the perturbation and its score, the terms, backward, the SGD step and
the benchmark's parameter copy.  The variant's Q and D do not follow its parameters, so
its ELBO is not a process's: before timing, the script checks that at the initial
parameters each variant's ELBO terms equal the compiled process's (the same draw), so the
same work is timed.

After the timing, marshalling() instruments learned3's step (time inside each native node's
forward and backward, and inside the C calls it makes): what a single native autograd node
for the whole fused ELBO, with no Python between its C calls, could remove on top.

Writes bench/results/elbo_bound.json and elbo_bound.md (machine and load included).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import kernels  # noqa: E402  (bench/kernels.py: compiled, consecutive, elbo_step, machine, load)

VARIANTS = ("setup",)


def frozen(proc, stages):
    """proc with the given stages replaced by values computed now (see the module doc)."""
    if "setup" in stages:
        t_min = float(proc.t_min)
        proc._call_memo = {}
        try:
            if not proc._prepare(t_min):
                raise SystemExit("learned3's training step no longer prepares its setup in one call")
            held = {("coeffs", True): proc._call_memo[("coeffs", True)],
                    ("call_table", t_min): proc._call_memo[("call_table", t_min)]}
        finally:
            proc._call_memo = None

        def prepared(at):
            if at != t_min:
                raise SystemExit(f"frozen setup made for t_min={t_min}, asked for {at}")
            proc._call_memo.update(held)
            return True
        proc._prepare = prepared
    return proc


def same_terms(proc, reference, x):
    """The largest relative difference of the ELBO terms of proc and reference (fresh
    instances at their initial parameters) for one seeded importance draw."""
    out = []
    for p in (proc, reference):
        terms = p.elbo(x, lambda y, t: torch.zeros_like(y), time_sampler="importance",
                       generator=torch.Generator().manual_seed(7))
        out.append(torch.stack([terms.total, terms.prior, terms.score_norm, terms.t]).detach())
    return float(((out[0] - out[1]).abs() / out[1].abs().clamp(min=1e-30)).max())


NODES = ("NativeElboKernels", "_Terms")   # learned3's native graph nodes in elbo()
C_CALLS = {"NativeElboKernels.forward": ("sdec_elbo_forward_node",),
           "NativeElboKernels.backward": ("sdec_elbo_backward_node",),
           "_Terms.forward": ("sdec_terms_forward",), "_Terms.backward": ("sdec_terms_backward",),
           "native_prepare": ("sdec_elbo_prepare",)}


def marshalling(x, steps=1500, warmup=200):
    """Where learned3's step spends its time around the C calls: mean µs per step inside each
    native node's forward / backward and inside the setup's wrapper (native_prepare; the rest of
    _prepare is not in it) against the µs inside the C calls they make, by wrapping both
    (perf_counter_ns; the wrappers' own cost is in the node column).  The difference is the
    Python and ATen work of marshalling (allocating the outputs, pointers, ctypes arguments,
    saving for the backward)."""
    proc = kernels.compiled("learned3")
    mod = sys.modules[type(proc).__module__]
    spent, lib = {}, mod._loaded()

    class Timed:
        def __getattr__(self, name):
            return wrapped(name, getattr(lib, name))

    def wrapped(key, f):
        def timed(*a):
            t0 = time.perf_counter_ns()
            try:
                return f(*a)
            finally:
                spent[key] = spent.get(key, 0) + time.perf_counter_ns() - t0
        return timed

    saved = [(cls, meth, cls.__dict__[meth]) for cls in (getattr(mod, n) for n in NODES) for meth in ("forward", "backward")]
    prepare = mod.native_prepare
    try:
        mod._NATIVE_STATE["lib"] = Timed()
        for cls, meth, original in saved:
            setattr(cls, meth, staticmethod(wrapped(f"{cls.__name__}.{meth}", original.__func__)))
        mod.native_prepare = wrapped("native_prepare", prepare)
        step = kernels.elbo_step(proc, x)
        for i in range(warmup + steps):
            if i == warmup:
                spent.clear()
                t0 = time.perf_counter_ns()
            step()
        total = (time.perf_counter_ns() - t0) / steps / 1e3
    finally:
        mod._NATIVE_STATE["lib"] = lib
        for cls, meth, original in saved:
            setattr(cls, meth, original)
        mod.native_prepare = prepare
    rows = {}
    for key, calls in C_CALLS.items():
        node = spent.get(key, 0) / steps / 1e3
        c = sum(spent.get(name, 0) for name in calls) / steps / 1e3
        rows[key] = {"node_us": node, "c_us": c, "marshalling_us": node - c}
    return {"step_us": total, "rows": rows}


def main(argv=None):
    if argv is None:
        kernels.keep_buffers_mapped(__file__)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30, help="rounds of 50-step blocks (default 30)")
    ap.add_argument("--out", default=str(kernels.RESULTS / "elbo_bound"), help="results path without suffix")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    x = torch.randn(kernels.B, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    runs = {"vpsde": (), "learned3": (), **{f"learned3, no {v}": (v,) for v in VARIANTS}}
    procs = {key: ("vpsde" if key == "vpsde" else "learned3", stages) for key, stages in runs.items()}
    check = {}
    for key, (name, stages) in procs.items():
        if stages:
            check[key] = same_terms(frozen(kernels.compiled(name), stages), kernels.compiled(name), x)
            if check[key] > 1e-12:
                raise SystemExit(f"{key}: its ELBO terms differ from the compiled process's by {check[key]:.1e}")
    fns = {key: kernels.elbo_step(frozen(kernels.compiled(name), stages), x) for key, (name, stages) in procs.items()}
    start = kernels.machine()
    res = kernels.consecutive(fns, args.rounds, 50)
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": start,
           "loadavg_end": kernels.load(), "rounds": args.rounds, "terms_check": check,
           "rows": {k: {"us": 1e6 * res[k], "ratio_to_vpsde": res[f"{k}/vpsde"]} for k in fns}}
    lines = [f"Machine: {start.get('cpu', '?')}, torch {start['torch']}, 1 thread, commit {start.get('commit', '?')}, "
             f"{out['date']}; load average at start {start['loadavg_start']}, at end {out['loadavg_end']}.", "",
             f"ELBO machinery per step, 50 consecutive steps ({args.rounds} rounds, medians, paired ratios).", "",
             "| process | µs per step | ratio to vpsde |", "|---|---|---|"]
    lines += [f"| {k} | {r['us']:.0f} | {r['ratio_to_vpsde']:.2f}x |" for k, r in out["rows"].items()]
    out["marshalling"] = m = marshalling(x)
    lines += ["", f"learned3's step ({m['step_us']:.0f} µs, instrumented), per native node: µs inside it and inside "
              "the C calls it makes; the rest is marshalling (outputs, pointers, ctypes arguments, saved tensors).", "",
              "| node | µs in the node | µs in C | marshalling µs |", "|---|---|---|---|"]
    lines += [f"| {k} | {r['node_us']:.1f} | {r['c_us']:.1f} | {r['marshalling_us']:.1f} |" for k, r in m["rows"].items()]
    lines.append(f"| all | {sum(r['node_us'] for r in m['rows'].values()):.1f} | "
                 f"{sum(r['c_us'] for r in m['rows'].values()):.1f} | "
                 f"{sum(r['marshalling_us'] for r in m['rows'].values()):.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    pathlib.Path(args.out + ".json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    pathlib.Path(args.out + ".md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
