"""Samplers for compiled Diffusions: reverse-time SDE and probability-flow ODE.

Every sampler starts from the prior y_T ~ N(0, Sigma_inf (x) I) (``proc.prior_sample``) and
runs from T down to t_min on a time grid; :func:`sample` returns the data variable
y[:, 0] (or the whole state with ``return_state=True``). Samplers live in the plain dict
:data:`SAMPLERS` from name to function; all share the signature

    sampler(proc, score_fn, y_T, times, *, generator, **options) -> y at times[-1]

with ``times`` a decreasing float64 grid from T to t_min. Only the public Diffusion
interface is used (``prior_sample``, ``drift``, ``noise_cov``, ``diffusion``, ``apply_kk``), so
any compiled process works.

- "em": Euler-Maruyama on the reverse SDE dy = [F y - G G^T s] dt + G dW_bar, with G(t) =
  ``proc.diffusion(t)`` (G G^T = ``proc.noise_cov(t)``; singular for CLD, ALDA and MALDA,
  which put no noise on x: any square root gives the same noise law). By default the last
  step is noise-free ("denoising", option ``denoise``): noise injected at the final step
  could never be removed, and returning the mean of the last transition is the usual
  practice (score_sde, CLD).
- "ode": the probability-flow ODE dy/dt = F y - 1/2 G G^T s with torchdiffeq, adaptive
  (``solver="dopri5"`` by default, with the step guard of :mod:`sdec.runtime.flow`; ``steps`` and
  ``grid`` are then unused) or a fixed-grid solver ("euler", "rk4", ...) on the time grid.
"""

import inspect
import math

import torch

from .flow import ADAPTIVE_METHODS, flow_field, flow_terms, solve

SAMPLERS = {}


def register_sampler(name):
    """Decorator adding a sampler to :data:`SAMPLERS`; a duplicate name is an error."""
    def add(fn):
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} is already registered")
        SAMPLERS[name] = fn
        return fn
    return add


def sample(proc, score_fn, n, data_shape, *, method="em", steps=500, grid="quadratic",
           t_min=None, generator=None, dtype=torch.float32, device=None, return_state=False,
           options=None):
    """Draw n samples of the data variable, shape (n, *data_shape).

    method: a name in SAMPLERS ("em", "ode"). steps: number of grid intervals. grid:
    "quadratic" (t_i = t_min + (T - t_min)(i/N)^2, dense near t_min) or "uniform". t_min:
    end time (default ``proc.t_min``). generator: torch.Generator for every random draw.
    return_state: return the whole state (n, K, *data_shape). options: dict of
    method-specific options (see the sampler's signature); unknown ones are errors.
    score_fn(y, t) is called under ``torch.no_grad``.
    """
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; valid: {', '.join(sorted(SAMPLERS))}")
    sampler = SAMPLERS[method]
    options = _check_options(method, sampler, options)
    times = time_grid(proc, steps, grid, t_min, device)
    data_shape = (data_shape,) if isinstance(data_shape, int) else tuple(data_shape)
    y = proc.prior_sample(n, data_shape, generator=generator, dtype=dtype,
                          device=device)
    with torch.no_grad():
        y = sampler(proc, score_fn, y, times, generator=generator, **options)
    return y if return_state else y[:, 0]


def _check_options(method, sampler, options):
    options = dict(options or {})
    params = inspect.signature(sampler).parameters
    valid = [p for p, v in params.items() if v.kind == v.KEYWORD_ONLY and p != "generator"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for sampler {method!r}; "
                         f"valid: {', '.join(valid)}")
    return options


GRIDS = {
    "uniform": lambda u: u,
    "quadratic": lambda u: u * u,
}


def time_grid(proc, steps, grid="quadratic", t_min=None, device=None):
    """Decreasing float64 times t_N = T > ... > t_0 = t_min, t_i = t_min + (T - t_min) g(i/N)."""
    if grid not in GRIDS:
        raise ValueError(f"unknown time grid {grid!r}; valid: {', '.join(sorted(GRIDS))}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    T = float(proc.T)
    t0 = float(proc.t_min if t_min is None else t_min)
    if not 0.0 <= t0 < T:
        raise ValueError(f"t_min must satisfy 0 <= t_min < T = {T}, got {t0}")
    u = torch.linspace(1.0, 0.0, int(steps) + 1, dtype=torch.float64, device=device)
    times = t0 + (T - t0) * GRIDS[grid](u)
    times[0], times[-1] = T, t0  # exact endpoints
    return times


@register_sampler("em")
def euler_maruyama(proc, score_fn, y, times, *, generator=None, denoise=True):
    """Euler-Maruyama on the reverse SDE from times[0] = T down to times[-1].

    y_{t-h} = y_t - h [F y_t - G G^T s(y_t, t)] + sqrt(h) G(t) z, z ~ N(0, I); with
    ``denoise`` the last step omits the noise.
    """
    last = len(times) - 2
    for i in range(len(times) - 1):
        t, h = times[i], float(times[i] - times[i + 1])
        Fy, Ms, _, _ = flow_terms(proc, score_fn, y, t)
        y = y - h * (Fy - Ms)
        if i < last or not denoise:
            z = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device)
            G = proc.diffusion(t.to(y.device)).to(y.dtype)
            y = y + math.sqrt(h) * proc.apply_kk(G, z)
    return y


@register_sampler("ode")
def probability_flow(proc, score_fn, y, times, *, generator=None, solver="dopri5", rtol=1e-5,
                     atol=1e-5, min_step=None, max_steps=10_000, solver_options=None):
    """Integrate the probability-flow ODE from times[0] to times[-1] with torchdiffeq.

    Adaptive solvers use only the endpoints (and the min_step / max_steps guard, default
    min_step 1e-9 * (T - t_min)); fixed-grid solvers step on ``times``.
    """
    span = float(times[0] - times[-1])
    adaptive = solver in ADAPTIVE_METHODS
    grid = times[[0, -1]] if adaptive else times
    min_step = 1e-9 * span if min_step is None else float(min_step)
    hint = "Loosen rtol/atol, raise max_steps or lower min_step, or use a larger t_min."
    sol, _, _ = solve(lambda t, state: flow_field(proc, score_fn, state, t), y, grid,
                      method=solver, rtol=rtol, atol=atol, min_step=min_step,
                      max_steps=max_steps, options=solver_options, hint=hint)
    return sol[-1]


__all__ = ["SAMPLERS", "GRIDS", "register_sampler", "sample", "time_grid",
           "euler_maruyama", "probability_flow"]
