"""Building a run: the process from its spec, the data splits, the network, the optimizer.

Everything a training run, an evaluation or a sampler needs is rebuilt from a resolved
:class:`~sdec.runtime.config.TrainConfig` and, for a saved run, the spec text stored in its
checkpoint (so a run directory is self-contained: the spec file may have moved or changed).
"""
from __future__ import annotations

import os
import shutil

import attrs
import torch

import sdec

from .config import TrainConfig
from .data import DataError, load_dataset
from .interface import check_process
from .nets import build_net, default_preset

VAL_SPLIT_SEED = 20230501  # the validation split is the same for every run of a dataset


class RunError(RuntimeError):
    """A user-facing problem with a run (bad option, changed spec, unwritable directory)."""


@attrs.define
class Splits:
    train: torch.Tensor
    val: torch.Tensor
    levels: int | None
    shape: tuple
    name: str


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device is available (use --device auto or cpu)")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise RunError(f"--device {name}: unknown device; valid: auto, cpu, cuda")
    return torch.device(name)


def compile_spec(path: str):
    """Compile the spec file; the process carries its text and hash."""
    proc = sdec.compile(path)
    check_process(proc)
    return proc


def compile_stored(text: str, name: str = "<checkpoint spec>"):
    proc = sdec.compile_text(text, name)
    check_process(proc)
    return proc


def load_splits(cfg: TrainConfig) -> Splits:
    """Train and validation tensors; validation is carved from train, never from test."""
    data = load_dataset(cfg.data, "train", cfg.data_dir, cfg.image_size)
    n = data.n
    n_val = max(1, round(cfg.val_fraction * n))
    if n - n_val < 1:
        raise DataError(f"{cfg.data}: {n} training examples are too few to carve a validation split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
    x = data.data
    return Splits(x[perm[n_val:]], x[perm[:n_val]], data.levels, tuple(data.shape), data.name)


def build_model(proc, shape, preset: str | None, dropout=None):
    preset = preset or default_preset(tuple(shape))
    net = build_net(preset, K=proc.K, data_shape=tuple(shape), dropout=dropout)
    return net, preset


def param_groups(net, proc, cfg: TrainConfig):
    groups = [{"params": list(net.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay,
               "name": "net"}]
    learn = [p for p in proc.parameters() if p.requires_grad]
    if learn:
        groups.append({"params": learn, "lr": cfg.process_lr, "weight_decay": 0.0,
                       "name": "process"})
    return groups


def lr_at(step: int, base: float, warmup: int) -> float:
    """Linear warm-up to ``base`` over ``warmup`` steps, then constant (a pure function of the
    step, so a resumed run follows the same schedule)."""
    return base * min(1.0, (step + 1) / warmup) if warmup > 0 else base


def check_out_dir(path: str) -> None:
    """Fail at start-up, not after an hour, if the run directory cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        with open(probe, "wb") as handle:
            handle.write(b"x" * 4096)
        os.remove(probe)
    except OSError as exc:
        raise RunError(f"--out {path}: cannot write there ({exc.strerror or exc})") from None


def checkpoint_bytes(modules) -> int:
    """About the size of one checkpoint: the weights (network and process), their EMA and
    AdamW's two moments, i.e. four copies of every parameter, plus 1 MB for the rest."""
    params = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    return 4 * params + (1 << 20)


def check_disk_space(path: str, one_checkpoint: int, keep: int) -> None:
    """Fail at start-up if the run directory cannot hold the run's checkpoints: ``keep`` step
    files, ckpt-best.pt, and the temporary file of the write in progress (ckpt-last.pt is a
    hard link). Checkpoints already in the directory (a resumed run) are replaced in turn, so
    their space counts as available."""
    need = (keep + 2) * one_checkpoint
    have = shutil.disk_usage(path).free
    existing = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
                   if n.startswith("ckpt-") and n.endswith(".pt")
                   and os.path.isfile(os.path.join(path, n)))
    if have + existing < need:
        raise RunError(f"--out {path}: not enough free disk space: {_mb(have)} free, the checkpoints "
                       f"need about {_mb(need)} ({keep} step files, the best and one being written, "
                       f"{_mb(one_checkpoint)} each); free some space, choose another --out or "
                       "lower --keep-checkpoints")


def _mb(n: int) -> str:
    return f"{n / 2 ** 20:,.1f} MB"
