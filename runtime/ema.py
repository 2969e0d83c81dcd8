"""Exponential moving average of a module's parameters (network and process alike).

The shadow copy lives in float32/float64 like its parameter and is updated in place after
each optimizer step with decay min(decay, (1 + step) / (10 + step)) (a short warm-up, so early
averages are not dominated by the random initialisation). Evaluation and sampling use a
*copy* of the modules with the shadow values loaded (:meth:`EMA.copy_into`), never a swap
of the training weights.
"""
from __future__ import annotations

import copy

import torch


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        for k, v in module.state_dict().items():
            s = self.shadow[k]
            if v.dtype.is_floating_point:
                s.mul_(d).add_(v.detach(), alpha=1.0 - d)
            else:
                s.copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)

    def copy_into(self, module: torch.nn.Module) -> torch.nn.Module:
        """A deep copy of ``module`` in eval mode holding the averaged values."""
        clone = copy.deepcopy(module)
        clone.load_state_dict(self.shadow)
        return clone.train(False)  # eval mode
