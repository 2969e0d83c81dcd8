"""Hand-written DiffusionBase subclasses, written the way the code generator emits them
(hooks only).  ``make(name)`` builds one; ``NAMES`` lists them.

MDM settings: beta linear 0.1 -> 10 on [0, 1], Σ∞ = I, v0 ~ N(0, 0.01 I).
``cld_paper``: CLD paper settings, beta = 4, M⁻¹ = 4, Γ = 1, Σ∞ = diag(1, M),
v0 ~ N(0, γ M) with γ = 0.04.
"""
import torch

from sdec.emit.kernel_base import DiffusionBase

F64 = torch.float64


def _t(rows):
    return torch.tensor(rows, dtype=F64)


class _LinearSchedule:
    """beta(t) = 0.1 + 9.9 t (MDM)."""

    def _beta(self, t):
        return 0.1 + 9.9 * t

    def _B(self, t):
        return 0.1 * t + 4.95 * t * t


class VPSDE(_LinearSchedule, DiffusionBase):
    names = ("x",)
    T = 1.0
    t_min = 1e-3
    noised = (True,)

    def __init__(self):
        super().__init__()
        self.register_buffer("_sigma_inf", _t([[1.0]]))
        self.register_buffer("_aux_init_cov", torch.zeros(0, 0, dtype=F64))

    def _blocks(self):
        return _t([[0.0]]), _t([[0.5]])

    def _phi_closed(self, s):
        return torch.exp(-0.5 * s)[..., None, None]


class CLD(_LinearSchedule, DiffusionBase):
    """MDM CLD: M = 1, Γ = 2 (critical damping); no closed-form hook."""
    names = ("x", "v")
    T = 1.0
    t_min = 1e-3
    noised = (False, True)

    def __init__(self):
        super().__init__()
        self.register_buffer("_sigma_inf", torch.eye(2, dtype=F64))
        self.register_buffer("_aux_init_cov", _t([[0.01]]))

    def _blocks(self):
        return _t([[0.0, -1.0], [1.0, 0.0]]), _t([[0.0, 0.0], [0.0, 2.0]])


class CLDPaper(DiffusionBase):
    """CLD paper: beta = 4, M = 1/4, Γ = 1, with the critical-damping closed-form Φ."""
    names = ("x", "v")
    T = 1.0
    t_min = 1e-5
    noised = (False, True)

    def __init__(self):
        super().__init__()
        self.register_buffer("_sigma_inf", _t([[1.0, 0.0], [0.0, 0.25]]))
        self.register_buffer("_aux_init_cov", _t([[0.04 * 0.25]]))

    def _beta(self, t):
        return 4.0 + 0.0 * t

    def _B(self, t):
        return 4.0 * t

    def _blocks(self):
        return _t([[0.0, -1.0], [1.0, 0.0]]), _t([[0.0, 0.0], [0.0, 1.0]])

    def _phi_closed(self, s):
        # A = [[0, 4], [-1, -4]] has the double eigenvalue -2: Φ = e^{-2s} (I + s (A + 2I))
        e = torch.exp(-2.0 * s)
        row0 = torch.stack([e * (1 + 2 * s), e * 4 * s], -1)
        row1 = torch.stack([-e * s, e * (1 - 2 * s)], -1)
        return torch.stack([row0, row1], -2)


class ALDA(_LinearSchedule, DiffusionBase):
    """Third-order Langevin, L = 1/M = 1, γ = ψ = 1."""
    names = ("x", "v", "a")
    T = 1.0
    t_min = 1e-3
    noised = (False, False, True)

    def __init__(self):
        super().__init__()
        self.register_buffer("_sigma_inf", torch.eye(3, dtype=F64))
        self.register_buffer("_aux_init_cov", 0.01 * torch.eye(2, dtype=F64))

    def _blocks(self):
        Q = _t([[0.0, -1.0, 0.0], [1.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
        return Q, torch.diag(_t([0.0, 0.0, 1.0]))


class MALDA(_LinearSchedule, DiffusionBase):
    """Q_ij = -1 above the diagonal, +1 below; D = diag(0, Γ, Γ), Γ = 2√M, M = 1."""
    names = ("x", "v", "a")
    T = 1.0
    t_min = 1e-3
    noised = (False, True, True)

    def __init__(self):
        super().__init__()
        self.register_buffer("_sigma_inf", torch.eye(3, dtype=F64))
        self.register_buffer("_aux_init_cov", 0.01 * torch.eye(3 - 1, dtype=F64))

    def _blocks(self):
        Q = _t([[0.0, -1.0, -1.0], [1.0, 0.0, -1.0], [1.0, 1.0, 0.0]])
        return Q, torch.diag(_t([0.0, 2.0, 2.0]))


class Learned(_LinearSchedule, DiffusionBase):
    """Q = W - Wᵀ, D = L Lᵀ, L lower triangular with softplus diagonal (K = 2 or 3)."""
    T = 1.0
    t_min = 1e-3

    def __init__(self, K=2):
        super().__init__()
        self.names = ("x", "v", "a")[:K]
        self.noised = (True,) * K
        g = torch.Generator().manual_seed(1234 + K)
        self.W = torch.nn.Parameter(0.5 * torch.randn(K, K, generator=g, dtype=F64))
        self.L_raw = torch.nn.Parameter(0.5 * torch.randn(K, K, generator=g, dtype=F64))
        self.register_buffer("_sigma_inf", torch.eye(K, dtype=F64))
        self.register_buffer("_aux_init_cov", 0.01 * torch.eye(K - 1, dtype=F64))

    def _L(self):
        diag = torch.nn.functional.softplus(torch.diagonal(self.L_raw))
        return torch.tril(self.L_raw, -1) + torch.diag(diag)

    def _blocks(self):
        L = self._L()
        return self.W - self.W.mT, L @ L.mT

    def _D_sqrt(self):
        return self._L()


_FACTORIES = {
    "vpsde": VPSDE,
    "cld": CLD,
    "cld_paper": CLDPaper,
    "alda": ALDA,
    "malda": MALDA,
    "learned": lambda: Learned(2),
    "learned3": lambda: Learned(3),
}
NAMES = tuple(_FACTORIES)
FIXED = ("vpsde", "cld", "cld_paper", "alda", "malda")


def make(name):
    """A fresh kernel by name (see NAMES)."""
    if name not in _FACTORIES:
        raise KeyError(f"unknown kernel {name!r}; valid: {', '.join(NAMES)}")
    return _FACTORIES[name]()


def mdm_B(t):
    """B(t) of the MDM schedule, for reference computations."""
    return 0.1 * t + 4.95 * t * t

