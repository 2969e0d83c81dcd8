"""The runtime's subcommands of `sdec`: train, eval, sample, data.

``sdec.cli`` adds them with :func:`add_commands`; heavy imports happen only when a command
runs. User errors (bad option values, missing or malformed data, a changed spec on resume,
a missing checkpoint) are one line on stderr and exit status 2; a non-finite loss exits 1.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

TRAIN_FLAGS = (  # flag, type, help (defaults live in config.TrainConfig)
    ("--data", str, "data set: digits (default, embedded), mnist, cifar10, imagenet32, folder:PATH, toy:NAME"),
    ("--data-dir", str, "where the data files are (default $SDEC_DATA, else ./data)"),
    ("--image-size", int, "folder: data only: resize to this size (default 32)"),
    ("--steps", int, "optimizer steps (default per data set: digits 1500, toy 4000)"),
    ("--batch-size", int, "examples per micro-batch on each rank (default 128); the global batch is "
                          "ranks x --grad-accum x --batch-size"),
    ("--grad-accum", int, "micro-batches per rank per step, gradients accumulated (default 1)"),
    ("--lr", float, "network learning rate (default per net preset: tiny 2e-3, mlp 1e-3, else 2e-4)"),
    ("--process-lr", float, "learning rate of learnable Q and D (default: --lr)"),
    ("--weight-decay", float, "AdamW weight decay of the network (default 0)"),
    ("--warmup", int, "linear learning-rate warm-up steps (default 100)"),
    ("--grad-clip", float, "gradient norm clip (default 1.0)"),
    ("--ema-decay", float, "EMA decay (default 0.999)"),
    ("--seed", int, "seed of every random draw (default 0)"),
    ("--out", str, "run directory (default runs/<spec>-<data>)"),
    ("--net", str, "network preset: tiny, mnist, cifar, mlp (default from the data shape)"),
    ("--dropout", float, "dropout (default: the preset's)"),
    ("--objective", str, "elbo (default; trains learnable Q, D too) or eps (noise prediction, fixed processes)"),
    ("--time-sampler", str, "training ELBO times: importance (default), stratified (importance, one time per "
                            "equal-probability stratum across the batch) or uniform"),
    ("--transform", str, "center (y = 2x - 1, default) or logit (alpha = 0.05)"),
    ("--eval-every", int, "validation BPD and checkpoints every N steps (default 500)"),
    ("--sample-every", int, "sample grid every N steps (default 1000)"),
    ("--log-every", int, "metrics line every N steps (default 50)"),
    ("--time-samples", int, "ELBO time samples per example in evaluation (default 16)"),
    ("--val-fraction", float, "fraction of train held out for validation (default 0.1)"),
    ("--sample-steps", int, "Euler–Maruyama steps of the sample grids (default 200)"),
    ("--device", str, "auto (CUDA when present, default), cpu or cuda"),
    ("--precision", str, "fp32 or bf16: bf16 autocasts the network's forward only, the process "
                         "math stays float32/float64 (default bf16 on CUDA, fp32 on CPU)"),
    ("--keep-checkpoints", int, "step checkpoints kept beside ckpt-last.pt and ckpt-best.pt (default 3)"),
)


def add_commands(sub) -> None:
    for add in (_add_train, _add_eval, _add_sample, _add_data):
        add(sub)


def _add_train(sub):
    p = sub.add_parser("train", help="train a score model (and learnable Q, D) on a spec; report test BPD")
    p.add_argument("spec", help="path to a .sde file")
    for flag, kind, text in TRAIN_FLAGS:
        p.add_argument(flag, type=kind, default=None, help=text)
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from <out>/ckpt-last.pt (same spec and settings)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the network (off by default: see the README for when it helps)")
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    from . import distributed
    from .config import TrainConfig
    from .train import train
    skip = {"command", "run", "spec"}
    given = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    cfg = TrainConfig(spec=args.spec, **given)
    try:
        train(cfg, explicit=frozenset(given))
    finally:
        distributed.stop()
    return 0


def _add_eval(sub):
    p = sub.add_parser("eval", help="bits per dimension of a trained run, every term, with its standard error")
    p.add_argument("run_dir", metavar="run", help="a run directory (its best checkpoint) or a checkpoint file")
    p.add_argument("--data", help="data set (default: the run's)")
    p.add_argument("--data-dir")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--method", choices=("elbo", "ode"), default="elbo")
    p.add_argument("--limit", type=int, help="evaluate the first N examples only")
    p.add_argument("--time-samples", type=int, default=None, help="ELBO time samples per example (default: the run's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_run_eval)


def _run_eval(args) -> int:
    from . import distributed
    from .data import load_dataset
    from .evaluate import describe_evaluation, evaluate
    from .saved import load_run
    from .setup import pick_device
    try:
        ranks, device = distributed.start(pick_device(args.device))
        saved = load_run(args.run_dir, str(device))
        cfg = saved.cfg
        data = load_dataset(args.data or cfg.data, args.split, args.data_dir or cfg.data_dir, cfg.image_size)
        x = data.data if args.limit is None else data.data[: _positive(args.limit, "--limit")]
        kw = {"transform": cfg.transform, "seed": args.seed, "ranks": ranks, "device": saved.device}
        if args.method == "elbo":
            kw["time_samples"] = _positive(cfg.time_samples if args.time_samples is None else args.time_samples, "--time-samples")
        ev = evaluate(saved.proc, saved.net, x, data.levels, method=args.method, **kw)
    finally:
        distributed.stop()
    if not ranks.is_main:
        return 0
    result = {**ev.as_json(), "split": args.split, "spec": saved.proc.spec_name, "step": saved.step,
              "checkpoint": saved.path, "data": args.data or cfg.data}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{saved.path} (step {saved.step}, EMA weights) on {result['data']} {args.split}:")
        print(describe_evaluation(ev, data.levels))
    return 0


def _add_sample(sub):
    p = sub.add_parser("sample", help="draw samples from a trained run: a PNG grid and the raw samples (.npz)")
    p.add_argument("run_dir", metavar="run", help="a run directory (its best checkpoint) or a checkpoint file")
    p.add_argument("-n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--method", choices=("em", "ode"), default="em")
    p.add_argument("--steps", type=int, default=500, help="sampler steps (em; ode uses an adaptive solver)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="the PNG to write; FILE.npz is written beside it")
    p.set_defaults(run=_run_sample)


SAMPLE_CHUNK = 256  # samples per generator (seeded by (seed, chunk)) and per rank's batch


def _run_sample(args) -> int:
    import numpy as np

    from . import distributed, plots
    from .bpd import from_model
    from .saved import load_run
    from .setup import pick_device
    n, steps = _positive(args.n, "-n"), _positive(args.steps, "--steps")
    try:
        ranks, device = distributed.start(pick_device(args.device))
        saved = load_run(args.run_dir, str(device))
        y = _draw(saved, n, args.method, steps, args.seed, ranks)
    finally:
        distributed.stop()
    if not ranks.is_main:
        return 0
    x = y[:, 0]
    stem = os.path.splitext(args.out)[0]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    images = None if saved.data["levels"] is None else from_model(x, saved.cfg.transform)
    if images is None:
        plots.save_points(x, args.out)
    else:
        plots.save_grid(images, args.out)
    arrays = {"model_space": x.cpu().numpy(), "state": y.cpu().numpy()}
    if images is not None:
        arrays["images"] = images.cpu().numpy()
    np.savez(stem + ".npz", **arrays)
    print(f"wrote {args.out} and {stem}.npz: {n} samples ({args.method}, step {saved.step}, EMA weights)")
    return 0


def _draw(saved, n, method, steps, seed, ranks):
    """n samples (n, K, *shape) in chunks of SAMPLE_CHUNK, chunk c drawn with a generator
    seeded by (seed, c) on rank c mod world, gathered in order on every rank: the same samples
    on 1 or N ranks."""
    import torch

    import sdec

    from .evaluate import chunk_seed, collect_chunks
    shape = tuple(saved.data["shape"])
    rows = []
    for c in range(ranks.rank, -(-n // SAMPLE_CHUNK), ranks.world):
        m = min(SAMPLE_CHUNK, n - c * SAMPLE_CHUNK)
        gen = torch.Generator(device=saved.device).manual_seed(chunk_seed(seed, c))
        y = sdec.sample(saved.proc, saved.proc.score_from_eps(saved.net), m, shape, method=method,
                        steps=steps, generator=gen, device=saved.device, return_state=True)
        rows.append(y.detach().reshape(m, -1).cpu())
    full = collect_chunks(rows, n, SAMPLE_CHUNK, ranks, saved.proc.K * math.prod(shape),
                          torch.get_default_dtype())
    return full.reshape((n, saved.proc.K) + shape)


def _add_data(sub):
    p = sub.add_parser("data", help="what the loader sees of a data set: sizes, shape, levels, channel means")
    p.add_argument("name", help="digits, mnist, cifar10, imagenet32, folder:PATH or toy:NAME")
    p.add_argument("--data-dir")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_run_data)


def _run_data(args) -> int:
    from .data import describe, format_description
    info = describe(args.name, args.data_dir, args.image_size)
    print(json.dumps(info, indent=2) if args.json else format_description(args.name, info))
    return 0


def _positive(value, flag):
    if value is None or value < 1:
        raise ValueError(f"{flag} must be a positive integer, got {value}")
    return value


def user_errors() -> tuple:
    """Exception types that are the user's to fix: printed as one line, exit 2."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .interface import InterfaceError
    from .setup import RunError
    return (DataError, RunError, CheckpointError, InterfaceError, ValueError)


def report(exc: BaseException, command: str) -> int:
    """Print the error as one line; under torchrun, ranks other than 0 name themselves, and
    stay silent about a non-finite loss (every rank stops with it; rank 0 reports it)."""
    from .distributed import env_rank
    from .step import NonFiniteError
    line = " ".join(str(exc).split())
    rank = env_rank()
    if rank == 0:
        print(f"sdec {command}: error: {line}", file=sys.stderr)
    elif not isinstance(exc, NonFiniteError):
        print(f"sdec {command} (rank {rank}): error: {line}", file=sys.stderr)
    return 1 if isinstance(exc, NonFiniteError) else 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2), no usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
