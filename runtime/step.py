"""One training step and the state it advances (the loop itself is in train.py).

Reproducibility: every random draw of step s (data dequantization, auxiliary and kernel
noise, times, dropout) comes from generators seeded by (seed, s), and the data order of epoch
e from (seed, e). Training state is therefore a function of the step alone plus what the
checkpoint holds (network, process, EMA, optimizer), so N steps, a kill, and N more with
``--resume`` give the same weights as 2N steps in one go.
"""
from __future__ import annotations

import json
import math
import os
import time

import attrs
import torch

from . import checkpoint as ckpt
from .bpd import bits_per_dim, prepare
from .config import TrainConfig
from .ema import EMA
from .evaluate import ELBO_TERMS
from .setup import RunError, lr_at

_SALT = {"step": 1, "dropout": 2, "epoch": 3, "val": 4, "sample": 5, "test": 6}


class NonFiniteError(RunError):
    """The loss or a gradient became NaN/inf; names the step and the term."""


def seed_for(seed: int, index: int, what: str) -> int:
    """A distinct 63-bit seed for (run seed, step or epoch, purpose)."""
    return (seed * 1_000_003 + index * 7919 + _SALT[what] * 104_729) % (2 ** 63 - 1)


@attrs.define
class Run:
    """Everything a training run holds (mutable: the step advances)."""

    cfg: TrainConfig
    proc: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA
    splits: object
    device: torch.device
    step: int = 0
    best_val: float = math.inf
    best_step: int = -1
    mix_warned: bool = False

    @property
    def model(self) -> torch.nn.ModuleDict:
        return torch.nn.ModuleDict({"net": self.net, "process": self.proc})


def batch_for(run: Run, step: int) -> torch.Tensor:
    """The examples of a step: epoch-wise shuffles of the train split, seeded per epoch."""
    x = run.splits.train
    n = x.shape[0]
    bs = min(run.cfg.batch_size, n)
    per_epoch = n // bs
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed_for(run.cfg.seed, epoch, "epoch")))
    return x[perm[i * bs:(i + 1) * bs]].to(run.device, non_blocking=True)


def _generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def step_loss(run: Run, x_raw, gen) -> tuple:
    """(loss, per-term mean BPD dict) for one batch; the loss is the batch's mean BPD (elbo) or
    the noise-prediction MSE (eps)."""
    levels, D = run.splits.levels, x_raw[0].numel()
    y, ldj = prepare(x_raw, levels, run.cfg.transform, gen)
    if run.cfg.objective == "eps":
        return _eps_loss(run, y, gen)
    terms = run.proc.elbo(y, run.proc.score_from_eps(run.net), time_sampler=run.cfg.time_sampler,
                          generator=gen)
    bpd = bits_per_dim({k: getattr(terms, k) for k in ELBO_TERMS}, ldj, D, levels)
    means = {k: v.mean() for k, v in bpd.items()}
    return means["total"], means


def _eps_loss(run: Run, y, gen):
    n = y.shape[0]
    u = torch.rand(n, generator=gen, dtype=torch.float64, device=y.device)
    t = (run.proc.t_min + (run.proc.T - run.proc.t_min) * u).to(y.dtype)
    pert = run.proc.perturb(y, t, generator=gen)
    mse = ((run.net(pert.y, t) - pert.eps) ** 2).mean()
    return mse, {"eps_mse": mse}


def first_non_finite(terms: dict):
    for k, v in terms.items():
        if not torch.isfinite(v).all():
            return k
    return None


def train_step(run: Run, step: int) -> dict:
    """One optimizer step; returns the logged numbers. Raises NonFiniteError."""
    cfg = run.cfg
    torch.manual_seed(seed_for(cfg.seed, step, "dropout"))
    gen = _generator(run.device, seed_for(cfg.seed, step, "step"))
    run.net.train()
    loss, terms = step_loss(run, batch_for(run, step), gen)
    bad = first_non_finite(terms)
    if bad is not None:
        raise NonFiniteError(f"non-finite loss at step {step + 1}: the {bad!r} term is "
                             f"{float(terms[bad].detach()):g}")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    if not torch.isfinite(gnorm):
        raise NonFiniteError(f"non-finite gradient at step {step + 1} (loss {float(loss):g}): "
                             "the backward pass of the ELBO produced NaN/inf")
    for group in run.optimizer.param_groups:
        base = cfg.lr if group.get("name") == "net" else cfg.process_lr
        group["lr"] = lr_at(step, base, cfg.warmup)
    run.optimizer.step()
    run.ema.update(run.model, step)
    out = {k: float(v.detach()) for k, v in terms.items()}
    out.update(loss=float(loss.detach()), grad_norm=float(gnorm), lr=run.optimizer.param_groups[0]["lr"])
    return out


def checkpoint_state(run: Run) -> dict:
    return {"step": run.step, "net": run.net.state_dict(), "process": run.proc.state_dict(),
            "ema": run.ema.state_dict(), "optimizer": run.optimizer.state_dict(),
            "rng": ckpt.rng_state(run.device), "spec_text": run.proc.spec_text,
            "spec_hash": run.proc.spec_hash, "config": run.cfg.as_dict(),
            "net_config": dict(run.net.config), "best_val": run.best_val,
            "best_step": run.best_step,
            "data": {"name": run.splits.name, "shape": list(run.splits.shape),
                     "levels": run.splits.levels}}


def restore(run: Run, state: dict) -> None:
    """Load a checkpoint's training state into a freshly built run."""
    if state["spec_hash"] != run.proc.spec_hash:
        raise RunError(f"cannot resume: the checkpoint was trained on a different spec "
                       f"(hash {state['spec_hash']}, now {run.proc.spec_hash}); restore the "
                       f"spec it was trained on or train into a new --out directory")
    run.net.load_state_dict(state["net"])
    run.proc.load_state_dict(state["process"])
    run.ema.load_state_dict(state["ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    ckpt.set_rng_state(state["rng"], run.device)
    run.step, run.best_val, run.best_step = state["step"], state["best_val"], state["best_step"]


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed."""

    def __init__(self, path: str):
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint's step (they will be redone)."""
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as handle:
            keep = [ln for ln in handle if ln.strip() and json.loads(ln).get("step", 0) <= step]
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.writelines(keep)


class Throughput:
    def __init__(self):
        self.t0, self.n = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.n += n

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        rate = self.n / dt if dt > 0 else 0.0
        self.t0, self.n = time.perf_counter(), 0
        return rate
