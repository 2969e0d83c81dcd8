"""One training step and the state it advances (the loop itself is in train.py).

Reproducibility: the global batch of a step is ``world x grad_accum`` micro-batches of
``batch_size`` examples (world = the number of torchrun ranks). Micro-batch m of step s is
the m-th slice of that step's global batch, and every random draw it needs (dequantization,
auxiliary and kernel noise, times, dropout) comes from generators seeded by (seed, s, m); the
data order of epoch e comes from (seed, e). Rank r computes micro-batches
r*grad_accum .. (r+1)*grad_accum - 1. So the draws are functions of an example's place in the
global batch, never of the rank that computes it: any launch with the same micro-batch size
and the same number of micro-batches per step (2 ranks x batch 8, or 1 process x batch 8 x
--grad-accum 2) trains the same model, up to the order of float sums. Nothing is per rank:
training state is a function of the step plus what the checkpoint holds (network, process,
EMA, optimizer), so N steps, a kill, and N more with ``--resume`` give the same weights as 2N
steps in one go, on any number of ranks.
"""
from __future__ import annotations

import json
import math
import os
import time

import attrs
import torch

from contextlib import nullcontext

from . import checkpoint as ckpt
from .bpd import bits_per_dim, prepare
from .config import TrainConfig
from .distributed import Ranks
from .ema import EMA
from .evaluate import ELBO_TERMS
from .setup import RunError, lr_at

_SALT = {"step": 1, "dropout": 2, "epoch": 3, "val": 4, "sample": 5, "test": 6}
_MICRO = 15_485_863  # a prime: (step, micro-batch) pairs map to distinct seeds
_MOD = 2 ** 63 - 1


class NonFiniteError(RunError):
    """The loss or a gradient became NaN/inf; names the step and the term."""


def seed_for(seed: int, index: int, what: str, micro: int = 0) -> int:
    """A distinct 63-bit seed for (run seed, step or epoch, purpose, micro-batch); micro-batch
    0 has the seed a single-process run has always had."""
    return (seed * 1_000_003 + index * 7919 + _SALT[what] * 104_729 + micro * _MICRO) % _MOD


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
    plotted_at: float = -math.inf              # time.monotonic() of the last figure refresh
    ranks: Ranks = attrs.field(factory=Ranks)
    objective: torch.nn.Module | None = None   # Objective over (net, proc)
    trainer: torch.nn.Module | None = None     # the objective, wrapped in DDP under torchrun

    @property
    def model(self) -> torch.nn.ModuleDict:
        return torch.nn.ModuleDict({"net": self.net, "process": self.proc})

    @property
    def micro_batches(self) -> int:
        """Micro-batches per step over all ranks."""
        return self.ranks.world * self.cfg.grad_accum

    @property
    def micro_size(self) -> int:
        n = self.splits.train.shape[0]
        return min(self.cfg.batch_size, n // self.micro_batches)

    @property
    def global_batch(self) -> int:
        return self.micro_size * self.micro_batches


def batch_for(run: Run, step: int, micro: int = 0) -> torch.Tensor:
    """Micro-batch ``micro`` of a step: a slice of the step's global batch, taken from
    epoch-wise shuffles of the train split seeded per epoch."""
    x = run.splits.train
    n = x.shape[0]
    bs, total = run.micro_size, run.global_batch
    per_epoch = n // total
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed_for(run.cfg.seed, epoch, "epoch")))
    lo = i * total + micro * bs
    xb = x[perm[lo:lo + bs]]
    if run.device.type == "cuda":
        xb = xb.pin_memory()  # page-locked, so the copy below is asynchronous
    return xb.to(run.device, non_blocking=True)


def _generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


class Objective(torch.nn.ModuleDict):
    """The network and the process as one module (keys "net", "process", as in checkpoints):
    ``forward(x_raw, generator)`` returns (loss, per-term mean dict) of one micro-batch. This is
    the module DistributedDataParallel wraps, so the learnable Q, D are averaged and kept
    identical on every rank like the network's weights.

    Precision: with ``autocast`` (a dtype, e.g. torch.bfloat16) only the network's forward
    runs under torch.autocast; its output is cast back to the state's dtype before the
    process turns it into a score, so the kernel (Φ, Σ, Cholesky) and the ELBO's K x K algebra
    stay in float32/float64, outside autocast. ``fast_net`` is the network's call
    (torch.compile'd with --compile); the module itself stays the plain network.
    """

    def __init__(self, net, proc, cfg: TrainConfig, levels, autocast=None, fast_net=None):
        super().__init__({"net": net, "process": proc})
        self.levels, self.cfg, self.autocast = levels, cfg, autocast
        self._fast = (fast_net,)  # a tuple: not registered as a submodule

    def eps_net(self, y, t):
        call = self["net"] if self._fast[0] is None else self._fast[0]
        if self.autocast is None:
            return call(y, t)
        with torch.autocast(device_type=y.device.type, dtype=self.autocast):
            out = call(y, t)
        return out.to(y.dtype)

    def forward(self, x_raw, gen):
        cfg, proc = self.cfg, self["process"]
        D = x_raw[0].numel()
        y, ldj = prepare(x_raw, self.levels, cfg.transform, gen)
        if cfg.objective == "eps":
            return self._eps_loss(y, gen)
        terms = proc.elbo(y, proc.score_from_eps(self.eps_net), time_sampler=cfg.time_sampler,
                          generator=gen)
        bpd = bits_per_dim({k: getattr(terms, k) for k in ELBO_TERMS}, ldj, D, self.levels)
        means = {k: v.mean() for k, v in bpd.items()}
        return means["total"], means

    def _eps_loss(self, y, gen):
        proc = self["process"]
        n = y.shape[0]
        u = torch.rand(n, generator=gen, dtype=torch.float64, device=y.device)
        t = (proc.t_min + (proc.T - proc.t_min) * u).to(y.dtype)
        pert = proc.perturb(y, t, generator=gen)
        mse = ((self.eps_net(pert.y, t) - pert.eps) ** 2).mean()
        return mse, {"eps_mse": mse}


def _gathered_terms(run: Run, terms: dict, step: int) -> torch.Tensor:
    """Every rank's term means (world, n_terms) float64; NonFiniteError on every rank at once
    if any rank's term is not finite (so no rank is left waiting in the backward pass)."""
    local = torch.stack([v.detach().to(torch.float64).reshape(()) for v in terms.values()])
    rows = run.ranks.gather_rows(local[None])
    bad = ~torch.isfinite(rows)
    if bad.any():
        where = torch.nonzero(bad)[0].tolist()
        rank, name = where[0], list(terms)[where[1]]
        on = f" on rank {rank}" if run.ranks.active else ""
        raise NonFiniteError(f"non-finite loss at step {step + 1}: the {name!r} term is "
                             f"{float(rows[rank, where[1]]):g}{on}")
    return rows


def train_step(run: Run, step: int) -> dict:
    """One optimizer step over this rank's micro-batches; returns the logged numbers (means
    over the global batch). Raises NonFiniteError (on every rank alike)."""
    cfg = run.cfg
    run.net.train()
    run.optimizer.zero_grad(set_to_none=True)
    trainer = run.trainer or run.objective
    rows, accum = [], cfg.grad_accum
    for a in range(accum):
        micro = run.ranks.rank * accum + a
        torch.manual_seed(seed_for(cfg.seed, step, "dropout", micro))
        gen = _generator(run.device, seed_for(cfg.seed, step, "step", micro))
        x = batch_for(run, step, micro)
        defer = run.ranks.active and a < accum - 1  # reduce the gradients once, after the last
        with trainer.no_sync() if defer else nullcontext():
            loss, terms = trainer(x, gen)
            rows.append(_gathered_terms(run, terms, step))
            (loss / accum if accum > 1 else loss).backward()
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    mean = torch.cat(rows).mean(0) if len(rows) * rows[0].shape[0] > 1 else rows[0][0]
    if not torch.isfinite(gnorm):
        raise NonFiniteError(f"non-finite gradient at step {step + 1} (loss {float(mean[0]):g}): "
                             "the backward pass of the ELBO produced NaN/inf")
    for group in run.optimizer.param_groups:
        base = cfg.lr if group.get("name") == "net" else cfg.process_lr
        group["lr"] = lr_at(step, base, cfg.warmup)
    run.optimizer.step()
    run.ema.update(run.model, step)
    out = {k: float(v) for k, v in zip(terms, mean)}
    out.update(loss=out[_loss_key(terms)], grad_norm=float(gnorm), lr=run.optimizer.param_groups[0]["lr"])
    return out


def _loss_key(terms: dict) -> str:
    return "total" if "total" in terms else "eps_mse"


def checkpoint_state(run: Run) -> dict:
    return {"step": run.step, "net": run.net.state_dict(), "process": run.proc.state_dict(),
            "ema": run.ema.state_dict(), "optimizer": run.optimizer.state_dict(),
            "rng": ckpt.rng_state(run.device), "spec_text": run.proc.spec_text,
            "spec_hash": run.proc.spec_hash, "config": run.cfg.as_dict(),
            "net_config": dict(run.net.config), "best_val": run.best_val,
            "best_step": run.best_step, "micro_batches": run.micro_batches,
            "micro_size": run.micro_size,
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


def batch_change(run: Run, state: dict) -> str | None:
    """A warning if the resumed run's global batch differs from the checkpoint's (another
    number of ranks without a matching --grad-accum), else None."""
    before = (state.get("micro_batches", 1), state.get("micro_size", run.micro_size))
    now = (run.micro_batches, run.micro_size)
    if before == now:
        return None
    return (f"the checkpoint was trained with {before[0]} micro-batch(es) of {before[1]} per step "
            f"(global batch {before[0] * before[1]}), this launch has {now[0]} of {now[1]} "
            f"(global batch {now[0] * now[1]}) and continues with it; ranks x --grad-accum = "
            f"{before[0]} with the same --batch-size would continue the original run exactly")


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed (by rank 0 only:
    ``enabled`` is False on the other ranks)."""

    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint's step (they will be redone)."""
        if not self.enabled or not os.path.exists(self.path):
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
