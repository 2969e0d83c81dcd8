"""The reproduction table: every shipped process trained at one step budget with one network,
several seeds, evaluated by the ELBO and by the probability-flow ODE, beside classical
baselines.

For each (seed, spec) it runs, as subprocesses of the `sdec` CLI,

    sdec train specs/<spec>.sde --data D --steps N --seed S --out RUNS/<spec>_seed<S>_steps<N> --no-progress
    sdec eval RUN --method ode --json [--limit M]      (probability-flow ODE, rtol = atol = 1e-5;
                                                        seeds in --ode-seeds only)
    sdec eval RUN --json --limit M                     (ELBO on the ODE's examples, for the gap)

The ELBO figure of the table is the one `sdec train` ends with (results.json): the same
`evaluate_elbo` over the whole test split, 16 importance-sampled times per image, that
`sdec eval --json` runs, so it is not computed twice. The ODE evaluation is the CLI's, which
takes the divergence exactly (one backward pass per noised coordinate: 64 per function
evaluation on digits) whenever (noised variables) x d <= 64, i.e. for vpsde, cld and alda,
and by Hutchinson's estimator for malda, learned2 and learned3; that is what makes it costly.

and records BPD (NLL in nats per dimension for toy data), standard errors, NFE, time per
example, the ODE - ELBO gap, wall times and the mixing of the process at T. Seeds are the
outer loop, so a partial table has every process at seed 0 first.

Resumable: each stage writes its own file in the run directory (results.json from training,
eval-ode.json, eval-elbo-subset.json) and is skipped when that file exists;
a run killed mid-training continues with `sdec train --resume`. After every stage the
aggregate JSON and Markdown table are rewritten, so they always show what has finished.
The aggregate JSON is a resume point too: a (spec, seed) whose run directory is gone (a new
machine, a cleaned /work) but whose record the JSON already holds is kept as recorded and
not run again; delete its record (or the JSON) to rerun it.

    python bench/reproduce.py                       # the digits table (defaults below)
    python bench/reproduce.py --steps 6000 --ode-limit 0 --runs-dir /work/repro-runs-long \\
        --out bench/results/reproduction_digits_long   # a longer table, ODE on all test images

--ode-limit 0 means the whole test split.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import torch

SPECS = ["vpsde", "cld", "alda", "malda", "learned2", "learned3"]
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ODE_BATCH = 64  # runtime/evaluate.py evaluate_ode's batch size: one ODE solve per batch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--specs", default=",".join(SPECS), help="comma-separated spec names under specs/")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--data", default="digits", help="data set (digits or toy:NAME)")
    p.add_argument("--steps", type=int, default=1500, help="training steps for every run (default 1500)")
    p.add_argument("--net", default=None, help="network preset (default: the data set's)")
    p.add_argument("--ode-limit", type=int, default=32,
                   help="ODE evaluation on the first M test examples (0: all; default 32)")
    p.add_argument("--ode-seeds", default="0", help="seeds whose runs get the ODE evaluation (default 0; 'all')")
    p.add_argument("--time-sampler", default=None, help="passed to sdec train (default: its default)")
    p.add_argument("--runs-dir", default="/work/repro-runs", help="where the run directories go (outside git)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "reproduction_digits"),
                   help="results path without extension: writes OUT.json and OUT.md")
    p.add_argument("--baselines", default=os.path.join(HERE, "results", "digits_baselines.json"),
                   help="baselines JSON shown beside the table (digits only; '' for none)")
    p.add_argument("--no-ode", action="store_true", help="skip the ODE evaluation")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: rewrite OUT.json and OUT.md from the run directories as they are")
    return p.parse_args(argv)


def run_name(spec, seed, steps):
    return f"{spec}_seed{seed}_steps{steps}"


def sdec(*args, capture=False):
    """Run `python -m sdec ARGS`; return (stdout, seconds). Raises on a non-zero exit."""
    cmd = [sys.executable, "-m", "sdec", *map(str, args)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE if capture else None, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}")
    return (proc.stdout if capture else None), seconds


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2)
    os.replace(tmp, path)


def read_json(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


def stage_train(args, spec, seed, out):
    """Train (or resume) unless results.json exists. Wall time accumulates over segments."""
    if os.path.exists(os.path.join(out, "results.json")):
        return
    timing_path = os.path.join(out, "train-timing.json")
    timing = read_json(timing_path) or {"segments": []}
    cmd = ["train", os.path.join("specs", f"{spec}.sde"), "--data", args.data, "--steps", args.steps,
           "--seed", seed, "--out", out, "--no-progress"]
    if args.net:
        cmd += ["--net", args.net]
    if args.time_sampler:
        cmd += ["--time-sampler", args.time_sampler]
    resumed = os.path.exists(os.path.join(out, "ckpt-last.pt"))
    if resumed:
        cmd.append("--resume")
    os.makedirs(out, exist_ok=True)
    _, seconds = sdec(*cmd)
    timing["segments"].append({"seconds": seconds, "resumed": resumed,
                               "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    write_json(timing_path, timing)


def stage_eval(out, name, *extra):
    path = os.path.join(out, name)
    if os.path.exists(path):
        return
    stdout, seconds = sdec("eval", out, "--json", *extra, capture=True)
    result = json.loads(stdout)
    result["wall_seconds"] = seconds
    write_json(path, result)


def startup_seconds(out):
    """Wall time of `sdec eval` on one example with one time sample: process start, imports,
    checkpoint and data loading, which every eval's wall time includes."""
    _, seconds = sdec("eval", out, "--json", "--limit", 1, "--time-samples", 1, capture=True)
    print(f"eval start-up (process, imports, checkpoint, data): {seconds:.1f} s", flush=True)
    return seconds


def one_run(args, spec, seed, state):
    out = os.path.join(args.runs_dir, run_name(spec, seed, args.steps))
    print(f"[{time.strftime('%H:%M:%S')}] {spec} seed {seed}: {out}", flush=True)
    stage_train(args, spec, seed, out)
    if not args.no_ode and (args.ode_seeds == "all" or seed in [int(v) for v in args.ode_seeds.split(",")]):
        limit = ["--limit", args.ode_limit] if args.ode_limit else []
        stage_eval(out, "eval-ode.json", "--method", "ode", *limit)
        if args.ode_limit:
            stage_eval(out, "eval-elbo-subset.json", *limit)
    if state.get("startup_seconds") is None:
        state["startup_seconds"] = startup_seconds(out)
    return out


def collect(args, out, startup):
    """One run's record from the files in its directory (None if it has not trained yet)."""
    train = read_json(os.path.join(out, "results.json"))
    if train is None:
        return None
    timing = read_json(os.path.join(out, "train-timing.json")) or {"segments": []}
    rec = {"run_dir": out, "step": train["step"], "best_val_bpd": train.get("best_val_bpd"),
           "train_test_bpd": train["bpd"], "mixing": train.get("mixing"),
           "train_wall_seconds": sum(s["seconds"] for s in timing["segments"]),
           "train_resumed": any(s["resumed"] for s in timing["segments"])}
    elbo = train
    rec["elbo"] = {k: train[k] for k in ("bpd", "bpd_stderr", "n", "terms", "time_samples")}
    subset = read_json(os.path.join(out, "eval-elbo-subset.json"))
    if subset and startup is not None:
        rec["elbo"]["seconds_per_example"] = max(subset["wall_seconds"] - startup, 0.0) / subset["n"]
    ode = read_json(os.path.join(out, "eval-ode.json"))
    if ode:
        solves = math.ceil(ode["n"] / ODE_BATCH)
        rec["ode"] = {k: ode[k] for k in ("bpd", "bpd_stderr", "median_bpd", "n", "nfe", "far_from_prior",
                                          "rtol", "atol", "terms", "wall_seconds")}
        rec["ode"]["solves"] = solves
        rec["ode"]["nfe_per_solve"] = ode["nfe"] / solves
        if startup is not None:
            rec["ode"]["seconds_per_example"] = max(ode["wall_seconds"] - startup, 0.0) / ode["n"]
        paired = read_json(os.path.join(out, "eval-elbo-subset.json")) or (elbo if elbo and elbo["n"] == ode["n"] else None)
        if paired and paired["n"] == ode["n"]:
            rec["ode"]["elbo_same_examples_bpd"] = paired["bpd"]
            rec["ode"]["gap_ode_minus_elbo"] = ode["bpd"] - paired["bpd"]
    return rec


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    std = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), std, len(values)


def summarize(records):
    """Per spec: mean and sample standard deviation over seeds of each figure."""
    def pick(rs, *keys):
        out = []
        for r in rs:
            v = r
            for k in keys:
                v = v.get(k) if isinstance(v, dict) else None
            out.append(v)
        return out
    summary = {}
    for spec, by_seed in records.items():
        rs = [r for r in by_seed.values() if r is not None]
        if not rs:
            continue
        s = {}
        for label, keys in {"elbo_bpd": ("elbo", "bpd"), "elbo_stderr": ("elbo", "bpd_stderr"),
                            "ode_bpd": ("ode", "bpd"), "ode_median_bpd": ("ode", "median_bpd"),
                            "ode_gap": ("ode", "gap_ode_minus_elbo"), "ode_nfe_per_solve": ("ode", "nfe_per_solve"),
                            "ode_seconds_per_example": ("ode", "seconds_per_example"),
                            "ode_wall_seconds": ("ode", "wall_seconds"),
                            "elbo_seconds_per_example": ("elbo", "seconds_per_example"),
                            "train_wall_seconds": ("train_wall_seconds",), "kl_T": ("mixing", "kl_T"),
                            "prior_term": ("elbo", "terms", "prior")}.items():
            m, sd, n = mean_std(pick(rs, *keys))
            s[label] = {"mean": m, "std": sd, "n": n}
        s["seeds"] = sorted(int(k) for k, r in by_seed.items() if r is not None)
        s["ode_far_from_prior"] = sum(pick(rs, "ode", "far_from_prior")[i] or 0 for i in range(len(rs)))
        summary[spec] = s
    return summary


def machine():
    return {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "load_average": os.getloadavg()}


def fmt(stat, digits=3, plus=True, scale=1.0):
    if stat is None or stat["mean"] is None:
        return "–"
    text = f"{stat['mean'] * scale:.{digits}f}"
    if plus and stat["std"] is not None:
        text += f" ± {stat['std'] * scale:.{digits}f}"
    return text


def markdown(result):
    cfg = result["config"]
    toy = cfg["data"].startswith("toy:")
    unit = "NLL nats/dim" if toy else "BPD"
    sc = math.log(2) if toy else 1.0  # the runtime reports bits/dim; continuous data: NLL, shown in nats
    lines = [f"# Reproduction table: {cfg['data']}", "",
             f"Generated by `{result['command']}` ({result['status']}).", "",
             f"Machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs, torch "
             f"{result['machine']['torch']}; started {result['started']}, last updated {result['updated']}. "
             "The machine was shared with other engineers' work while this ran, so wall times are "
             "upper bounds for a quiet machine.", "",
             f"Every run: {cfg['steps']} steps, network `{cfg['net'] or 'default preset'}`, seeds "
             f"{cfg['seeds']}; test {unit} of the EMA weights of the best validation checkpoint"
             + (" (continuous data: negative log-likelihood bound per coordinate, no dequantization; "
                "the JSON keeps the runtime's bits)" if toy else "") + ". "
             f"ELBO: whole test split, {cfg.get('time_samples', 16)} importance-sampled times per example. "
             f"ODE: probability-flow likelihood at rtol = atol = 1e-5 on "
             + (f"the first {cfg['ode_limit']} test examples" if cfg["ode_limit"] else "the whole test split")
             + f" of the runs with seed in {cfg['ode_seeds']} (`sdec eval --method ode`: exact divergence for "
             "vpsde, cld, alda; Hutchinson for malda, learned2, learned3); the gap is ODE minus ELBO on those same "
             "examples; the ODE eval wall time covers all its examples and includes the process start-up "
             f"(measured once: {result['eval_startup_seconds'] or float('nan'):.1f} s). Train wall s is "
             "the whole `sdec train` (including its final test ELBO evaluation; for a resumed run only the "
             "last segment). "
             "Mean ± standard deviation over seeds (sample std; none with one seed).", ""]
    lines += [f"| process | seeds | ELBO {unit} | ODE {unit} | ODE − ELBO | ODE NFE per solve | ODE eval wall s "
              "| KL at T (nats/dim) | train wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for spec in cfg["specs"]:
        s = result["summary"].get(spec)
        if s is None:
            lines.append(f"| {spec} | – | not run yet | | | | | | |")
            continue
        lines.append(f"| {spec} | {len(s['seeds'])} | {fmt(s['elbo_bpd'], scale=sc)} | {fmt(s['ode_bpd'], scale=sc)} "
                     f"| {fmt(s['ode_gap'], scale=sc)} "
                     f"| {fmt(s['ode_nfe_per_solve'], 0, False)} | {fmt(s['ode_wall_seconds'], 0, False)} "
                     f"| {fmt(s['kl_T'], 4, False)} | {fmt(s['train_wall_seconds'], 0, False)} |")
    base = result.get("baselines")
    if base:
        lines += ["", "Classical baselines on the same split, dequantization and accounting "
                  "(`bench/digits_baselines.py`, scikit-learn):", "", "| model | test BPD |", "|---|---|"]
        for label, value in base.items():
            lines.append(f"| {label} | {value:.3f} |")
    return "\n".join(lines) + "\n"


BASELINE_LABELS = {"diag_gaussian_bpd": "diagonal Gaussian", "full_covariance_gaussian_bpd": "full-covariance Gaussian",
                   "full_gmm_10_bpd": "full-covariance Gaussian mixture, 10 components",
                   "diag_gmm_10_bpd": "diagonal Gaussian mixture, 10 components",
                   "diag_gmm_100_bpd": "diagonal Gaussian mixture, 100 components"}


def recorded(state, spec, seed):
    """The previous aggregate's record of (spec, seed) when its run directory no longer exists."""
    rec = state["previous_runs"].get(spec, {}).get(str(seed))
    if rec is None or os.path.exists(os.path.join(rec.get("run_dir", ""), "results.json")):
        return None
    return rec


def write_results(args, specs, seeds, state, status):
    records = {spec: {str(seed): recorded(state, spec, seed)
                      or collect(args, os.path.join(args.runs_dir, run_name(spec, seed, args.steps)),
                                 state.get("startup_seconds"))
                      for seed in seeds} for spec in specs}
    base = read_json(args.baselines) if args.baselines else None
    result = {"command": state["command"], "status": status, "started": state["started"],
              "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": state["machine"],
              "config": {"data": args.data, "steps": args.steps, "net": args.net, "specs": specs, "seeds": seeds,
                         "ode_limit": args.ode_limit, "ode_seeds": args.ode_seeds, "ode_rtol": 1e-5, "ode_atol": 1e-5, "time_samples": 16,
                         "time_sampler": args.time_sampler or "importance (sdec train default)",
                         "runs_dir": args.runs_dir},
              "eval_startup_seconds": state.get("startup_seconds"),
              "runs": records, "summary": summarize(records),
              "baselines": {BASELINE_LABELS[k]: v for k, v in (base or {}).items() if k in BASELINE_LABELS}}
    write_json(args.out + ".json", result)
    with open(args.out + ".md", "w", encoding="utf-8") as handle:
        handle.write(markdown(result))


def main(argv=None):
    args = parse_args(argv)
    specs = [s for s in args.specs.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    os.makedirs(args.runs_dir, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    previous = read_json(args.out + ".json") or {}
    state = {"command": "python bench/reproduce.py " + shlex.join(sys.argv[1:] if argv is None else argv),
             "started": previous.get("started")
             or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "machine": machine(), "startup_seconds": previous.get("eval_startup_seconds"),
             "previous_runs": previous.get("runs") or {}}
    # The table's command is the one that trains what it shows: a rewrite names
    # the same runs, so its own arguments without --report-only.
    state["command"] = state["command"].replace(" --report-only", "").strip()
    if args.report_only:
        done = all(recorded(state, spec, seed)
                   or os.path.exists(os.path.join(args.runs_dir, run_name(spec, seed, args.steps), "results.json"))
                   for spec in specs for seed in seeds)
        write_results(args, specs, seeds, state, "complete" if done else "partial")
        print(open(args.out + ".md", encoding="utf-8").read())
        return
    for seed in seeds:
        for spec in specs:
            if recorded(state, spec, seed):
                print(f"{spec} seed {seed}: kept as recorded in {args.out}.json (run directory gone)", flush=True)
                continue
            one_run(args, spec, seed, state)
            write_results(args, specs, seeds, state, "partial")
    write_results(args, specs, seeds, state, "complete")
    print(open(args.out + ".md", encoding="utf-8").read())


if __name__ == "__main__":
    main()
