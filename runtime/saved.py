"""A saved run, rebuilt for evaluation and sampling from its checkpoint alone.

The checkpoint holds the spec text (the process is recompiled from it, so a moved or edited
spec file does not matter), the network configuration and the EMA values of both; those EMA
values are what :func:`load_run` returns, in eval mode.
"""
from __future__ import annotations

import attrs
import torch

from . import checkpoint as ckpt
from .config import TrainConfig
from .nets import build_net
from .setup import compile_stored, pick_device


@attrs.frozen
class SavedRun:
    path: str
    cfg: TrainConfig
    proc: torch.nn.Module
    net: torch.nn.Module
    step: int
    data: dict
    device: torch.device


def load_run(run_or_checkpoint: str, device: str = "auto", prefer: str = ckpt.BEST) -> SavedRun:
    """The EMA process and network of a run directory's best checkpoint (or a given file)."""
    path = ckpt.resolve(run_or_checkpoint, prefer)
    dev = pick_device(device)
    state = ckpt.load(path, map_location=dev)
    proc = compile_stored(state["spec_text"], f"<spec stored in {path}>")
    if proc.spec_hash != state["spec_hash"]:
        raise ckpt.CheckpointError(f"{path}: the stored spec compiles to hash {proc.spec_hash}, "
                                   f"not the recorded {state['spec_hash']} (written by another sdec?)")
    net = build_net(**state["net_config"])
    model = torch.nn.ModuleDict({"net": net, "process": proc})
    model.load_state_dict(state["ema"]["shadow"])
    model.to(dev).train(False)  # eval mode
    cfg = TrainConfig(**state["config"])
    return SavedRun(path, cfg, model["process"], model["net"], state["step"], state["data"], dev)
