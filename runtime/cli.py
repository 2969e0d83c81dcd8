"""The runtime's subcommands of `sdec`: train, eval, sample, data.

``sdec.cli`` adds them with :func:`add_commands`; heavy imports happen only when a command
runs. User errors (bad option values, missing or malformed data, a changed spec on resume,
a missing checkpoint) are one line on stderr and exit status 2; a non-finite loss exits 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

TRAIN_FLAGS = (  # flag, type, help (defaults live in config.TrainConfig)
    ("--data", str, "data set: digits (default, embedded), mnist, cifar10, imagenet32, folder:PATH, toy:NAME"),
    ("--data-dir", str, "where the data files are (default $SDEC_DATA, else ./data)"),
    ("--image-size", int, "folder: data only: resize to this size (default 32)"),
    ("--steps", int, "optimizer steps (default per data set: digits 1500, toy 4000)"),
    ("--batch-size", int, "examples per step (default 128)"),
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
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    from .config import TrainConfig
    from .train import train
    skip = {"command", "run", "spec"}
    given = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    cfg = TrainConfig(spec=args.spec, **given)
    train(cfg, explicit=frozenset(given))
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
    import torch

    from .evaluate import describe_evaluation, evaluate
    from .saved import load_run
    from .data import load_dataset
    saved = load_run(args.run_dir, args.device)
    cfg = saved.cfg
    data = load_dataset(args.data or cfg.data, args.split, args.data_dir or cfg.data_dir, cfg.image_size)
    x = data.data if args.limit is None else data.data[: _positive(args.limit, "--limit")]
    gen = torch.Generator(device=saved.device).manual_seed(args.seed)
    kw = {"transform": cfg.transform, "generator": gen, "device": saved.device}
    if args.method == "elbo":
        kw["time_samples"] = _positive(cfg.time_samples if args.time_samples is None else args.time_samples, "--time-samples")
    ev = evaluate(saved.proc, saved.net, x, data.levels, method=args.method, **kw)
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


def _run_sample(args) -> int:
    import numpy as np
    import torch

    import sdec

    from . import plots
    from .bpd import from_model
    from .saved import load_run
    saved = load_run(args.run_dir, args.device)
    n, steps = _positive(args.n, "-n"), _positive(args.steps, "--steps")
    gen = torch.Generator(device=saved.device).manual_seed(args.seed)
    shape = tuple(saved.data["shape"])
    y = sdec.sample(saved.proc, saved.proc.score_from_eps(saved.net), n, shape, method=args.method,
                    steps=steps, generator=gen, device=saved.device, return_state=True)
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
    from .step import NonFiniteError
    line = " ".join(str(exc).split())
    print(f"sdec {command}: error: {line}", file=sys.stderr)
    return 1 if isinstance(exc, NonFiniteError) else 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2), no usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
