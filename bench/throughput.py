"""Training throughput of `sdec train` on this machine, and where a step's time goes.

Run on demand (not a test):  python bench/throughput.py [--quick] [--breakdown-only]

1. Examples per second of `sdec train` for the ``tiny`` preset (8x8 digits) and the ``mnist``
   preset (28x28, synthetic images written in the published MNIST IDX format), as a single
   process (1 and 2 threads) and as 2 gloo ranks under torchrun (1 thread each), read
   from the ``examples_per_sec`` that rank 0 logs in metrics.jsonl (the first logged window,
   which holds the warm-up, is dropped; the median of the rest is reported).
2. The fraction of a training step (forward + backward) spent in the compiled process versus
   the network, for the mnist preset on 28x28 data: the full step of the training objective,
   the network alone on the same (B, K, 28, 28) state (forward + backward of its output), and
   the process alone (the same ELBO with a free score function, forward + backward). Process
   share = (full step - network alone) / full step; the process-alone time is reported beside
   it as a cross-check.
3. ``--compile`` on CPU at the tiny preset: steps per second with and without (1 thread;
   the compilation itself is timed separately, in the warm-up steps).
4. The data loaders on this machine: seconds to read and parse the MNIST IDX files per 10^4
   images, and examples per second at which a training micro-batch is gathered from memory.

Writes bench/results/throughput.json with the machine's description; --breakdown-only runs
part 2 alone and writes bench/results/step_breakdown.json.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "throughput.json"


def write_mnist(root: pathlib.Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """Random 28x28 uint8 images and labels in the IDX format (4 gzipped files)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        with gzip.open(root / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        with gzip.open(root / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 0x801, n) + labels.tobytes())


def train_rate(spec, data_args, steps, log_every, batch, ranks, threads, out, extra=()):
    """Median logged examples/s of `sdec train` (the first window dropped)."""
    common = ["train", str(spec), "--out", str(out), "--steps", str(steps), "--batch-size", str(batch),
              "--eval-every", str(10 * steps), "--sample-every", str(10 * steps),
              "--log-every", str(log_every), "--time-samples", "1", "--no-progress", "--device", "cpu",
              *data_args, *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if ranks == 1:
        cmd = [sys.executable, "-m", "sdec", *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(ranks), "-m", "sdec", *common]
    # the final test evaluation is not part of the measurement: it runs after the last log line
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    with open(out / "metrics.jsonl", encoding="utf-8") as handle:
        rates = [json.loads(ln)["examples_per_sec"] for ln in handle
                 if ln.strip() and json.loads(ln)["kind"] == "train"]
    return statistics.median(rates[1:]), rates


def step_breakdown(preset, shape, batch, reps, spec):
    """Seconds per forward + backward: full objective, network alone, process alone."""
    from sdec.runtime.bpd import prepare
    from sdec.runtime.config import TrainConfig
    from sdec.runtime.nets import build_net
    from sdec.runtime.step import Objective
    import sdec

    torch.manual_seed(0)
    proc = sdec.compile(str(spec))
    net = build_net(preset, K=proc.K, data_shape=shape)
    cfg = TrainConfig(spec=str(spec))
    obj = Objective(net, proc, cfg, 256)
    x = torch.randint(0, 256, (batch,) + shape, dtype=torch.uint8)

    def full():
        loss, _ = obj(x, torch.Generator().manual_seed(1))
        loss.backward()

    y_state = torch.randn((batch, proc.K) + shape)
    t = torch.rand(batch) * 0.9 + 0.05

    def net_only():
        net(y_state, t).square().mean().backward()

    free = torch.zeros((), requires_grad=True)

    def proc_only():  # the same ELBO, the score network replaced by a free function
        y, _ = prepare(x, 256, "center", torch.Generator().manual_seed(1))
        terms = proc.elbo(y, proc.score_from_eps(lambda s, tt: s * free), time_sampler="importance",
                          generator=torch.Generator().manual_seed(2))
        sum(getattr(terms, k).mean() for k in ("prior", "score", "score_norm", "divergence")).backward()

    out = {}
    for name, fn in (("full_step", full), ("network_alone", net_only), ("process_alone", proc_only)):
        fn()  # warm-up (kernel caches, allocator)
        times = []
        for _ in range(reps):
            net.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    out["process_share"] = (out["full_step"] - out["network_alone"]) / out["full_step"]
    out["process_alone_share"] = out["process_alone"] / out["full_step"]
    return out


def step_breakdowns(reps):
    """step_breakdown of the mnist preset (batch 32, 28x28) for vpsde, cld and learned3."""
    rows = []
    for name in ("vpsde", "cld", "learned3"):
        rows.append({"spec": name, "batch": 32, "shape": [1, 28, 28],
                     **step_breakdown("mnist", (1, 28, 28), 32, reps, REPO / "specs" / f"{name}.sde")})
        print("breakdown", rows[-1], flush=True)
    return rows


def compile_rate(spec, steps, compile_):
    """Steps/s of train_step at the tiny preset on digits, in-process (compile time excluded)."""
    from sdec.runtime.config import TrainConfig
    from sdec.runtime.step import train_step
    from sdec.runtime.train import build_run
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(spec=str(spec), out=tmp, steps=steps, net="tiny", device="cpu",
                          progress=False, compile=compile_)
        run = build_run(cfg, explicit=frozenset())
        t0 = time.perf_counter()
        for s in range(3):  # warm-up (and compilation)
            train_step(run, s)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for s in range(3, steps):
            train_step(run, s)
        return (steps - 3) / (time.perf_counter() - t0), warm


def loader_rates(root):
    from sdec.runtime.data import load_dataset
    t0 = time.perf_counter()
    ds = load_dataset("mnist", "train", str(root))
    parse = time.perf_counter() - t0
    x = ds.data
    gen = torch.Generator().manual_seed(0)
    batch, reps = 128, 200
    t0 = time.perf_counter()
    for _ in range(reps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        x[idx].contiguous()
    gather = batch * reps / (time.perf_counter() - t0)
    return {"images": int(x.shape[0]), "parse_seconds_per_10k": parse / x.shape[0] * 1e4,
            "gather_examples_per_sec": gather, "batch": batch}


def machine():
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "load_average_at_start": os.getloadavg()}


def main():
    torch.set_num_threads(1)  # in-process parts: one thread (see the README: a shared machine)
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    ap.add_argument("--breakdown-only", action="store_true",
                    help="only part 2, the process's share of a step (writes step_breakdown.json)")
    args = ap.parse_args()
    q = args.quick
    result = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    if args.breakdown_only:
        result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                          capture_output=True, text=True).stdout.strip()
        result["step_breakdown_mnist"] = step_breakdowns(3 if q else 12)
        result["machine"]["load_average_at_end"] = os.getloadavg()
        out = RESULTS.with_name("step_breakdown.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
        return
    spec = REPO / "specs" / "cld.sde"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        data = tmp / "mnist"
        write_mnist(data, 2000, 100)
        result["loaders"] = loader_rates(data)
        print("loaders", result["loaders"], flush=True)
        rows = []
        tiny = ["--data", "digits", "--net", "tiny"]
        mnist = ["--data", "mnist", "--data-dir", str(data), "--net", "mnist"]
        # (preset, data, batch per rank, steps, log every, ranks, threads per rank)
        plan = [("tiny", tiny, 128, 40, 10, 1, 1), ("tiny", tiny, 128, 12, 4, 1, 2),
                ("tiny", tiny, 128, 40, 10, 2, 1),
                ("mnist", mnist, 32, 12, 4, 1, 1), ("mnist", mnist, 32, 12, 4, 2, 1)]
        if q:
            plan = [(p, d, b, max(4, n // 4), max(2, e // 4), r, t) for p, d, b, n, e, r, t in plan]
        for preset, data_args, batch, steps, every, ranks, threads in plan:
            rate, all_rates = train_rate(spec, data_args, steps, every, batch, ranks, threads,
                                         tmp / f"{preset}-{ranks}-{threads}")
            rows.append({"preset": preset, "ranks": ranks, "threads_per_rank": threads,
                         "batch_per_rank": batch, "global_batch": batch * ranks,
                         "examples_per_sec": rate, "windows": all_rates, "steps": steps})
            print(rows[-1], flush=True)
        result["training"] = rows
    result["step_breakdown_mnist"] = step_breakdowns(3 if q else 8)
    eager, _ = compile_rate(spec, 10 if q else 20, False)
    compiled, warm = compile_rate(spec, 10 if q else 20, True)
    result["compile_tiny"] = {"eager_steps_per_sec": eager, "compiled_steps_per_sec": compiled,
                              "compiled_warmup_seconds": warm, "batch": 128}
    print("compile", result["compile_tiny"], flush=True)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
