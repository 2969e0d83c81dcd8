"""How far fusing a learned process's own per-step setup could take its ELBO machinery in the
consecutive regime of bench/kernels.py (section 5: 50 steps of one process in a row): an
upper bound measured, not a design.

Run on demand (not a test):  python bench/elbo_bound.py [--rounds N]

It times 50-step blocks (kernels.consecutive: seeded random order of the blocks every round,
paired ratios per round to vpsde) of vpsde, learned3 as compiled, and learned3 variants in
which stages of its step are replaced by values computed once before the loop, so that they
cost nothing at all:

  map       the map from its parameters to Q, D, A = -(Q + D) Σ∞⁻¹ and ‖A‖₂ (_mapped, the
            native map where it runs): one autograd node that returns the initial values and
            a zero gradient (the backward still reaches the parameters, the SGD step still
            runs on them);
  settings  the series settings (_coeffs: the map's values, ‖A‖₂, radius, scale), detached;
  table     the importance table (its C call and Python wrapper);
  all       the three together: what a native node that took the raw parameters and did the
            map, the settings and the table inside its own call could at most remove (it would
            still spend the table's C time, ~20 µs, which this variant does not).

Every variant still runs the rest of the step as compiled: the time draw, the native pipeline
and its adjoint, randn, the perturbation and its score, the terms, backward, the SGD step and
the benchmark's parameter copy.  The variants' Q and D do not follow their parameters, so
their ELBO is not a process's: before timing, the script checks that at the initial
parameters each variant's ELBO terms equal the compiled process's (the same draw), so the
same work is timed.

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

VARIANTS = ("map", "settings", "table")


def frozen(proc, stages):
    """proc with the given stages replaced by values computed now (see the module doc)."""
    if "table" in stages:
        with torch.no_grad():
            table = proc._build_table(float(proc.t_min))
        proc._time_table = lambda t_min: table
    if "settings" in stages:
        proc._call_memo = {}
        try:
            settings = {k: v.detach() if torch.is_tensor(v) else v for k, v in proc._coeffs(True).items()}
        finally:
            proc._call_memo = None
        proc._coeffs = lambda hybrid: settings
    if "map" in stages:
        params = list(proc.parameters())
        Q0, D0, A0 = (v.detach().clone() for v in proc._mapped()[:3])
        norm0 = proc._mapped()[3]

        class Frozen(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *raw):
                return Q0.clone(), D0.clone(), A0.clone()

            @staticmethod
            def backward(ctx, gQ, gD, gA):
                return tuple(torch.zeros_like(p) for p in params)

        def mapped():  # once per elbo() call, as _cached does
            memo = proc._call_memo
            if memo is None:
                return (*Frozen.apply(*params), norm0)
            if "frozen map" not in memo:
                memo["frozen map"] = (*Frozen.apply(*params), norm0)
            return memo["frozen map"]
        proc._mapped = mapped
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


def main(argv=None):
    if argv is None:
        kernels.keep_buffers_mapped(__file__)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30, help="rounds of 50-step blocks (default 30)")
    ap.add_argument("--out", default=str(kernels.RESULTS / "elbo_bound"), help="results path without suffix")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    x = torch.randn(kernels.B, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    runs = {"vpsde": (), "learned3": (), **{f"learned3, no {v}": (v,) for v in VARIANTS},
            "learned3, none of the three": VARIANTS}
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
    text = "\n".join(lines) + "\n"
    print(text)
    pathlib.Path(args.out + ".json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    pathlib.Path(args.out + ".md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
