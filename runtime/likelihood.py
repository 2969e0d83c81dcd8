"""Log-likelihood of data under a compiled Diffusion, by the probability-flow ODE.

For data x (B, *data_shape) and a score model s(y, t) this computes, per example, a lower
bound on log p(x) in nats:

    total = log pi(y_T) + int_eps^T div f(y_t, t) dt + d log|det Phi(eps)| - log q(v0 | x)

1. Augment: v0 ~ q(v0|x) (``proc.aux_sample``), y0 = (x, v0). For K == 1 there is no v0.
2. Truncate (t_min = eps > 0): y_eps ~ q(y_eps | y0) from the non-hybrid kernel
   (``proc.perturb(y0, eps, hybrid=False)``); the Gaussian "inverse kernel" decoder
   p(y0 | y_eps) = N(Phi^{-1} y_eps, Phi^{-1} Sigma Phi^{-T}) gives exactly
   log p(y0|y_eps) - log q(y_eps|y0) = d log|det Phi(eps)| (see the ELBO truncation term in docs/math.md).
   With t_min = 0 the ODE starts at y0 and the truncation term is 0.
3. Solve the probability-flow ODE dy/dt = F y - 1/2 G G^T s(y, t) from eps to T jointly with
   dl/dt = div f = d tr F(t) - 1/2 div(G G^T s) (torchdiffeq, adaptive by default); then
   log p_eps(y_eps) = log pi(y_T) + l(T).
4. Subtract log q(v0|x): E_q[log p(x, v0) - log q(v0|x)] <= log p(x).

The linear part of the divergence, d tr F(t), is exact. div(G G^T s) only involves the
noised coordinates (rows of G G^T that are not zero: CLD noises v only), so it is computed
exactly by autograd when (number of noised variables) * d <= 64 (one backward per noised
coordinate, each batched over examples) or else by Hutchinson's estimator z^T J z with one
noise draw z per example held fixed for the whole solve (unbiased for the integral).

A solve whose end state lies far outside the prior (a score network that blows up on some
input can send |y_T| to 1e5 and log p to -1e20) is flagged per example: ``prior_z2`` is
|L∞⁻¹ y_T|² / (K d), about 1 for a state drawn from the prior, and ``far_from_prior`` is set
when it exceeds 1 + 8 sqrt(2 / (K d)) (an 8-sigma chi-square excursion) or any coordinate of
L∞⁻¹ y_T exceeds 8 in magnitude.

Dtype: the ODE state follows x's dtype unless ``dtype`` is given. float32 is the natural
choice for a float32 network, but it caps attainable accuracy near rtol ~ 1e-6; pass
``dtype=torch.float64`` (and a float64-capable score_fn) for reference-quality numbers. The
K x K algebra always runs in float64 inside the process. Time is float64 (torchdiffeq).

Evaluation only: results are detached; score_fn is called under ``torch.enable_grad`` with y
requiring grad (for the divergence) and must treat examples independently (no train-mode
batch norm). No collectives are used: under DDP each rank solves its own batch.
"""

import dataclasses

import torch

from .flow import ODESolveError, flow_terms, solve

EXACT_DIVERGENCE_MAX_DIM = 64
HUTCHINSON_NOISES = ("rademacher", "gaussian")
_HINT = ("Loosen rtol/atol, raise max_steps or lower min_step, start later (larger t_min: the "
         "score is stiffest near t = 0), or check that score_fn is smooth in (y, t) and finite.")


@dataclasses.dataclass(frozen=True)
class LikelihoodResult:
    """Per-example (B,) tensors in nats, plus solver statistics.

    total = prior + divergence + truncation - aux_log_prob (a lower bound on log p(x)).
    ``y_start`` is the ODE's initial state (y0 = (x, v0) if t_start == 0, else y_eps) and
    ``y_end`` its state at T.
    """

    total: torch.Tensor
    prior: torch.Tensor
    divergence: torch.Tensor
    aux_log_prob: torch.Tensor
    truncation: torch.Tensor
    nfe: int
    steps: int
    t_start: float
    divergence_method: str
    y_start: torch.Tensor
    y_end: torch.Tensor
    prior_z2: torch.Tensor
    far_from_prior: torch.Tensor


def log_likelihood(proc, x, score_fn, *, rtol=1e-5, atol=1e-5, method="dopri5", t_min=None,
                   exact_divergence=None, hutchinson="rademacher", generator=None,
                   min_step=None, max_steps=10_000, dtype=None, options=None):
    """Probability-flow ODE lower bound on log p(x) per example; returns LikelihoodResult.

    proc: a compiled Diffusion. x: (B, *data_shape). score_fn(y, t) -> same shape as y
    (B, K, *data_shape), t (B,). t_min: truncation time (default ``proc.t_min``; 0 = none).
    exact_divergence: None = exact iff (noised variables) * d <= 64. hutchinson: "rademacher" or "gaussian".
    min_step: smallest allowed adaptive step (default 1e-9 * (T - t_min)); max_steps: budget of
    attempted steps. Both raise :class:`sdec.runtime.flow.ODESolveError`. options: extra torchdiffeq
    options (first_step, max_step, step_t, ...); unknown ones are errors. dtype: ODE state
    dtype (default x.dtype). generator: drives v0, y_eps and the Hutchinson noise.
    """
    if hutchinson not in HUTCHINSON_NOISES:
        raise ValueError(f"unknown Hutchinson noise {hutchinson!r}; valid: "
                         f"{', '.join(HUTCHINSON_NOISES)}")
    dtype = _state_dtype(x, dtype)
    x = x.to(dtype)
    t0 = _check_times(proc, t_min)
    y0, aux_lp = _augment(proc, x, generator)
    y_start, truncation = _truncate(proc, y0, t0, generator)
    d = x[0].numel()
    exact = exact_divergence
    if exact is None:
        exact = sum(bool(n) for n in proc.noised) * d <= EXACT_DIVERGENCE_MAX_DIM
    divergence = divergence_exact if exact else _hutchinson(y_start, hutchinson, generator)
    field = _LogDensityField(proc, score_fn, divergence, d)
    times = torch.tensor([t0, float(proc.T)], dtype=torch.float64, device=x.device)
    state0 = (y_start, torch.zeros(x.shape[0], dtype=dtype, device=x.device))
    min_step = 1e-9 * (proc.T - t0) if min_step is None else float(min_step)
    (ys, ls), nfe, steps = solve(field, state0, times, method=method, rtol=rtol, atol=atol,
                                 min_step=min_step, max_steps=max_steps, options=options,
                                 hint=_HINT)
    with torch.no_grad():
        prior = proc.prior_log_prob(ys[-1]).to(dtype)
    total = prior + ls[-1] + truncation - aux_lp
    div_name = "exact" if exact else f"hutchinson-{hutchinson}"
    z2, far = prior_excursion(proc, ys[-1])
    return LikelihoodResult(total, prior, ls[-1], aux_lp, truncation, nfe, steps, t0,
                            div_name, y_start, ys[-1], z2, far)


def prior_excursion(proc, y):
    """(|L∞⁻¹ y|² / (K d), flag) per example: how far a state lies outside the prior."""
    L = torch.linalg.cholesky(proc.stationary_cov.to(torch.float64))
    flat = y.detach().to(torch.float64).reshape(y.shape[0], y.shape[1], -1)
    z = torch.linalg.solve_triangular(L, flat, upper=False)
    n = z[0].numel()
    z2 = (z * z).sum((1, 2)) / n
    far = (z2 > 1.0 + 8.0 * (2.0 / n) ** 0.5) | (z.abs().amax((1, 2)) > 8.0)
    return z2.to(y.dtype), far


def _state_dtype(x, dtype):
    dtype = x.dtype if dtype is None else dtype
    if not dtype.is_floating_point:
        raise TypeError(f"log_likelihood needs a floating dtype for the ODE state, got {dtype}")
    return dtype


def _check_times(proc, t_min):
    t0 = float(proc.t_min if t_min is None else t_min)
    if not 0.0 <= t0 < float(proc.T):
        raise ValueError(f"t_min must satisfy 0 <= t_min < T = {proc.T}, got {t0}")
    return t0


@torch.no_grad()
def _augment(proc, x, generator):
    """y0 = (x, v0) with v0 ~ q(v0|x); returns (y0, log q(v0|x))."""
    zeros = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    if proc.K == 1:
        return x.unsqueeze(1), zeros
    v0 = proc.aux_sample(x, generator=generator).to(x.dtype)
    return torch.cat([x.unsqueeze(1), v0], dim=1), proc.aux_log_prob(v0).to(x.dtype)


@torch.no_grad()
def _truncate(proc, y0, t0, generator):
    """Draw y_eps ~ q(y_eps | y0) (non-hybrid) and return it with d log|det Phi(eps)|."""
    B = y0.shape[0]
    if t0 == 0.0:
        return y0, torch.zeros(B, dtype=y0.dtype, device=y0.device)
    eps = torch.randn(y0.shape, generator=generator, dtype=y0.dtype, device=y0.device)
    tt = torch.full((B,), t0, dtype=y0.dtype, device=y0.device)
    y_eps = proc.perturb(y0, tt, hybrid=False, eps=eps).y
    phi, _ = proc.transition(torch.tensor(t0, dtype=torch.float64, device=y0.device),
                             hybrid=False)
    d = y0[0, 0].numel()
    logdet = torch.linalg.slogdet(phi.to(torch.float64))[1]
    return y_eps, (d * logdet).to(y0.dtype).expand(B)


class _LogDensityField:
    """Augmented field (t, (y, l)) -> (f(y, t), div f(y, t)) for torchdiffeq."""

    def __init__(self, proc, score_fn, divergence, d):
        self.proc, self.score_fn, self.divergence, self.d = proc, score_fn, divergence, d

    def __call__(self, t, state):
        y = state[0]
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            Fy, Ms, F, M = flow_terms(self.proc, self.score_fn, y, t)
            div_ms = self.divergence(Ms, y, M)
        dl = self.d * torch.diagonal(F).sum() - 0.5 * div_ms
        return (Fy - 0.5 * Ms).detach(), dl.detach().to(y.dtype)


def divergence_exact(h, y, M):
    """sum_c dh_c/dy_c per example, by autograd one coordinate at a time.

    Each backward is batched over examples (they are independent). Variables whose row of M
    (= G G^T) is zero have h identically zero there and are skipped.
    """
    B, K = y.shape[:2]
    out = torch.zeros(B, dtype=y.dtype, device=y.device)
    if not h.requires_grad:
        return out
    hf, d = h.reshape(B, -1), y[0, 0].numel()
    for k in torch.nonzero(M.abs().sum(dim=1) > 0).flatten().tolist():
        for c in range(k * d, (k + 1) * d):
            (g,) = torch.autograd.grad(hf[:, c].sum(), y, retain_graph=True, allow_unused=True)
            if g is not None:
                out = out + g.reshape(B, -1)[:, c]
    return out


def hutchinson_noise(like, kind, generator=None):
    """Noise z with E[z z^T] = I, shaped like ``like``: "rademacher" (+-1) or "gaussian"."""
    if kind == "rademacher":
        bits = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
        return (2 * bits - 1).to(like.dtype)
    if kind == "gaussian":
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    raise ValueError(f"unknown Hutchinson noise {kind!r}; valid: {', '.join(HUTCHINSON_NOISES)}")


def divergence_hutchinson(h, y, z):
    """Unbiased estimate z^T (dh/dy) z per example (one backward)."""
    if not h.requires_grad:
        return torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
    (g,) = torch.autograd.grad((h * z).sum(), y, retain_graph=True, allow_unused=True)
    if g is None:
        return torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
    return (g * z).reshape(y.shape[0], -1).sum(dim=1)


def _hutchinson(like, kind, generator):
    """A divergence callable with one noise draw per example, fixed across the solve."""
    z = hutchinson_noise(like, kind, generator)
    return lambda h, y, M: divergence_hutchinson(h, y, z)


__all__ = ["LikelihoodResult", "log_likelihood", "divergence_exact", "divergence_hutchinson",
           "hutchinson_noise", "prior_excursion", "ODESolveError"]
