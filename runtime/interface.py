"""The one interface between the compiler and the runtime: a compiled ``Diffusion``.

The runtime (training, evaluation, samplers, likelihood) uses a process only through the
members below, which every module emitted by ``sdec.compile`` / ``sdec compile -o`` has.
:func:`check_process` validates an object against it before any training starts, with
messages that name the expected shapes (a process written by hand works too, if it passes).

State tensors have the layout (B, K, *data_shape): the data variable first, then the K-1
auxiliaries. Every K x K matrix is float64.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Diffusion(Protocol):
    """What the runtime needs of a process (see the README's interface table)."""

    spec_name: str        # the name declared by `sde NAME`
    names: tuple          # state variable names, data first
    T: float              # horizon
    t_min: float          # ELBO truncation time
    noised: tuple         # per variable: does noise enter it directly?
    spec_text: str        # the .sde source it was compiled from
    spec_hash: str        # canonical hash of the spec (formatting-insensitive)

    @property
    def K(self) -> int: ...
    @property
    def Q(self) -> torch.Tensor: ...
    @property
    def D(self) -> torch.Tensor: ...
    @property
    def stationary_cov(self) -> torch.Tensor: ...

    def elbo(self, x, score_fn, t=None, time_sampler="uniform", t_min=None, generator=None): ...
    def perturb(self, x, t, hybrid=True, eps=None, generator=None): ...
    def score_from_eps(self, eps_fn, hybrid=True): ...
    def prior_sample(self, n, data_shape, generator=None, dtype=None, device=None): ...
    def prior_log_prob(self, y): ...
    def transition(self, t, hybrid=True): ...
    def drift(self, t): ...
    def noise_cov(self, t): ...
    def diffusion(self, t): ...
    def apply_kk(self, mat, y): ...
    def aux_sample(self, x, generator=None): ...
    def aux_log_prob(self, v0): ...
    def state_dict(self, *args, **kwargs): ...
    def load_state_dict(self, state_dict, strict=True): ...
    def parameters(self, recurse=True): ...


class InterfaceError(TypeError):
    """An object handed to the runtime is not a usable compiled Diffusion."""


def _members():
    return sorted(n for n in dir(Diffusion) if not n.startswith("_")) + sorted(
        Diffusion.__annotations__)


def check_process(proc) -> None:
    """Raise InterfaceError unless ``proc`` has every member with the documented shapes."""
    missing = sorted({n for n in _members() if not hasattr(proc, n)})
    if missing:
        raise InterfaceError(f"{type(proc).__name__} is not a compiled sdec Diffusion: "
                             f"missing {', '.join(missing)}")
    K = proc.K
    if len(proc.names) != K or len(proc.noised) != K:
        raise InterfaceError(f"names {proc.names!r} and noised {proc.noised!r} must both have "
                             f"K = {K} entries")
    if not 0.0 < float(proc.t_min) < float(proc.T):
        raise InterfaceError(f"need 0 < t_min < T, got t_min={proc.t_min}, T={proc.T}")
    for name in ("Q", "D", "stationary_cov"):
        _expect(getattr(proc, name), (K, K), name)
    t = torch.tensor([proc.t_min, proc.T], dtype=torch.float64)
    Phi, Sig = proc.transition(t)
    _expect(Phi, (2, K, K), "transition(t)[0] for t of shape (2,)")
    _expect(Sig, (2, K, K), "transition(t)[1] for t of shape (2,)")
    _expect(proc.drift(t), (2, K, K), "drift(t) for t of shape (2,)")
    _expect(proc.noise_cov(t), (2, K, K), "noise_cov(t) for t of shape (2,)")
    _expect(proc.diffusion(t), (2, K, K), "diffusion(t) for t of shape (2,)")
    y = proc.prior_sample(3, (1, 2), dtype=torch.float64)
    _expect(y, (3, K, 1, 2), "prior_sample(3, (1, 2))")
    _expect(proc.apply_kk(proc.D, y), (3, K, 1, 2), "apply_kk(D, y) for y of shape (3, K, 1, 2)")


def _expect(value, shape, what):
    if not torch.is_tensor(value) or tuple(value.shape) != shape:
        got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
        raise InterfaceError(f"{what} must be a tensor of shape {shape}, got {got}")
    if not torch.isfinite(value).all():
        raise InterfaceError(f"{what} has non-finite entries")
