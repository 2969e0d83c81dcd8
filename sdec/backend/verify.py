"""`sdec verify`: check a compiled spec's kernels against independent computations.

Each check measures an error and compares it with a stated tolerance:
- Euler–Maruyama simulation of the declared SDE (the module's own drift(t) and
  diffusion(t), so its noise factor is checked too) vs the kernel's mean and covariance
  (tolerance from the Monte-Carlo standard error, 5 sigma, plus the EM bias bound);
- a direct RK4 solution of the moment ODEs dm = F m, dΣ = FΣ + ΣFᵀ + GGᵀ;
- invariance of the target: Φ Σ∞ Φᵀ + Σ(t | y0) = Σ∞ (evaluated at 40 digits);
- the semigroup in B(t): Φ(t2) = expm((B(t2) - B(t1)) A) Φ(t1);
- the Lyapunov ODE by central finite differences;
- gradcheck through transition and elbo w.r.t. every learnable parameter;
- dtype: float32 in, float32 out.
"""
from __future__ import annotations

import math
import numbers

import attrs
import mpmath as mp
import torch

from . import MAX_SAMPLES


MAX_RK4_STEPS = 200_000   # the moment-ODE reference gives up beyond this (a stiff schedule)
EM_STEPS = 1000
EM_MAX_STEP = 0.5         # Euler–Maruyama is not run when dt ‖F(t)‖ exceeds this (unstable)


@attrs.frozen
class Check:
    name: str
    error: float
    tolerance: float
    detail: str = ""
    skipped: str | None = None  # why the check was not run (it then neither passes nor fails)

    @property
    def passed(self) -> bool:
        return self.skipped is not None or (math.isfinite(self.error) and self.error <= self.tolerance)


def _skip(name, why) -> Check:
    return Check(name, math.nan, math.nan, skipped=why)


def _stiffness(proc, stop) -> float:
    """max ‖F(t)‖₂ over 65 points of [0, stop]."""
    probe = torch.linspace(0.0, stop, 65, dtype=torch.float64)
    return float(torch.linalg.matrix_norm(proc.drift(probe), ord=2).max())


def _variation(proc, stop) -> float:
    """max |d log beta / dt| over [0, stop] (F(t) = beta(t) A varies at this rate), from log
    beta on 2^16 + 1 points; inf when 2^14 + 1 points give an estimate more than 2x off
    (beta then varies faster than the probe resolves)."""
    def estimate(n):
        t = torch.linspace(0.0, stop, n, dtype=torch.float64)
        return float((torch.diff(torch.log(proc.beta(t))).abs() / (stop / (n - 1))).max())
    fine, coarse = estimate(2 ** 16 + 1), estimate(2 ** 14 + 1)
    return fine if fine <= 2.0 * max(coarse, 1e-300) else math.inf


def _times(proc):
    T, t0 = proc.T, proc.t_min
    return torch.tensor([t0, (t0 * T) ** 0.5, 0.25 * T, 0.5 * T, T], dtype=torch.float64)


def _A(proc, t):
    return proc.drift(t) / proc.beta(torch.as_tensor(t, dtype=torch.float64))[..., None, None]


def check_simulation(proc, samples, seed):
    """EM paths from a fixed y0 (non-hybrid) to t1 = T/2; compare moments to the kernel."""
    K, t1, steps = proc.K, 0.5 * proc.T, EM_STEPS
    name = f"Euler–Maruyama mean and covariance at t = {t1:g} ({samples} paths)"
    stiff = _stiffness(proc, t1) * t1 / steps
    if not stiff <= EM_MAX_STEP:
        return [_skip(name, f"stiff schedule: dt ‖F(t)‖ reaches {stiff:.3g} with {steps} steps on [0, {t1:g}] "
                            f"(Euler–Maruyama is unstable beyond {EM_MAX_STEP})")]
    gen = torch.Generator().manual_seed(seed)
    y0 = torch.zeros(K, dtype=torch.float64)
    y0[0] = 1.0
    if K > 1:
        y0[1] = -0.5
    y = y0.expand(samples, K).clone()
    dt = t1 / steps
    mid = (torch.arange(steps, dtype=torch.float64) + 0.5) * dt  # midpoints in time for F and G
    Fs, Gs = proc.drift(mid), proc.diffusion(mid)  # G(t) of the module: its noise factor is checked too
    for k in range(steps):
        y = y + dt * y @ Fs[k].T + math.sqrt(dt) * torch.randn(samples, K, generator=gen, dtype=torch.float64) @ Gs[k].T
    Phi, Sigma = proc.transition(torch.tensor(t1, dtype=torch.float64), hybrid=False)
    mean, cov = Phi @ y0, Sigma
    emp_mean = y.mean(0)
    emp_cov = torch.cov(y.T).reshape(K, K)
    se_mean = (torch.diagonal(cov) / samples).sqrt()
    se_cov = ((torch.diagonal(cov)[:, None] * torch.diagonal(cov)[None, :] + cov ** 2) / samples).sqrt()
    bias = 2.0 * dt * float(torch.linalg.matrix_norm(proc.drift(torch.tensor(t1)), ord=2))  # O(dt) EM bias, loose
    z_mean = float(((emp_mean - mean).abs() / (5 * se_mean + bias)).max())
    z_cov = float(((emp_cov - cov).abs() / (5 * se_cov + bias)).max())
    return [Check(f"Euler–Maruyama mean at t = {t1:g} ({samples} paths)", z_mean, 1.0,
                  "max |Δmean| / (5 s.e. + EM bias bound)"),
            Check(f"Euler–Maruyama covariance at t = {t1:g}", z_cov, 1.0, "max |ΔΣ| / (5 s.e. + EM bias bound)")]


def check_moment_ode(proc, hybrid=True):
    """Classical RK4 on the moment ODEs (4000 steps per unit time, more for stiff F), from Σ0 =
    blockdiag(0, Σ_v0), compared with the kernel at 5 times. F and G Gᵀ are evaluated
    through the public interface, batched over all RK4 stage times of a segment."""
    K = proc.K
    Sigma = torch.zeros(K, K, dtype=torch.float64)
    if K > 1 and hybrid:
        Sigma[1:, 1:] = proc.aux_init_cov.double()
    Phi = torch.eye(K, dtype=torch.float64)
    start, worst = 0.0, 0.0
    name = "moment ODEs (RK4) vs Φ(t), Σ(t) at 5 times"
    stiffness, variation = _stiffness(proc, proc.T), _variation(proc, proc.T)
    if not math.isfinite(variation):
        return [_skip(name, "beta(t) varies faster than a 65,537-point probe of [0, T] resolves")]
    # steps per unit time: h ||F|| <= 0.01 keeps RK4 at ~1e-11, and h |d log beta/dt| <= 0.01
    # resolves how fast F itself changes
    rate = max(4000.0, 100.0 * stiffness, 100.0 * variation)
    if not rate * proc.T <= MAX_RK4_STEPS:
        why = (f"stiff schedule: max ‖F(t)‖ = {stiffness:.3g}" if stiffness >= variation
               else f"fast schedule: max |d log beta/dt| = {variation:.3g}")
        return [_skip(name, f"{why} on [0, T] needs {rate * proc.T:.3g} RK4 steps (the limit is "
                            f"{MAX_RK4_STEPS:,})")]
    for stop in sorted(float(x) for x in _times(proc)):
        n = max(8, int(rate * (stop - start)) + 1)
        h = (stop - start) / n
        grid = start + h * torch.arange(2 * n + 1, dtype=torch.float64) / 2  # every half step
        F, GG = proc.drift(grid), proc.noise_cov(grid)
        for k in range(n):
            Phi, Sigma = _rk4_step(F[2 * k:2 * k + 3], GG[2 * k:2 * k + 3], Phi, Sigma, h)
        Pk, Sk = proc.transition(torch.tensor(stop, dtype=torch.float64), hybrid=hybrid)
        scale = float(torch.diagonal(Sk).max())
        worst = max(worst, float((Phi - Pk).abs().max()), float((Sigma - Sk).abs().max()) / scale)
        start = stop
    return [Check(name, worst, 1e-7, "max abs error, Σ relative to its scale")]


def _rk4_step(F, GG, P, S, h):
    """One RK4 step; F and GG hold the values at t, t + h/2, t + h."""
    def rhs(i, P, S):
        return F[i] @ P, F[i] @ S + S @ F[i].T + GG[i]
    k1 = rhs(0, P, S)
    k2 = rhs(1, P + h / 2 * k1[0], S + h / 2 * k1[1])
    k3 = rhs(1, P + h / 2 * k2[0], S + h / 2 * k2[1])
    k4 = rhs(2, P + h * k3[0], S + h * k3[1])
    return (P + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0]),
            S + h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1]))


def check_invariance(proc):
    """Φ Σ∞ Φᵀ + Σ(t|y0) = Σ∞, the error E in Σ∞'s own scale, max |L⁻¹ E L⁻ᵀ| with L = chol Σ∞:
    the same for Σ∞ and c Σ∞ (an absolute error grew with the target's size: a stiff generated
    spec with Σ∞ entries up to 19 read 1.0e-10 absolute, 4.6e-12 in its own scale).  E and its
    scaling are evaluated at 40 digits from the kernel's float64 Φ, Σ and Σ∞ (_own_scale_error),
    so the check measures the kernel, not its own rounding."""
    t = _times(proc)
    Phi, Sigma = proc.transition(t, hybrid=False)
    S = proc.stationary_cov.double()
    return [Check("target invariance Φ Σ∞ Φᵀ + Σ(t|y0) = Σ∞ (in Σ∞'s own scale)",
                  _own_scale_error(Phi, Sigma, S), 1e-10)]


def _own_scale_error(Phi, Sigma, S):
    """max over the batch of max |L⁻¹ (Φ S Φᵀ + Σ - S) L⁻ᵀ|, L = chol S, at 40 digits from the
    float64 values.  In float64 the residual's own rounding, scaled by L⁻¹ twice, can exceed the
    kernel's error: a K = 6 spec with Σ∞'s condition number 2.4e7 read 1.25e-10 (a failure),
    where the same float64 Φ and Σ give 7.9e-12 at 40 digits.  NaN if anything is not finite
    (or S is not positive definite)."""
    if not all(bool(torch.isfinite(v).all()) for v in (Phi, Sigma, S)):
        return math.nan
    with mp.workdps(40):
        Sm = mp.matrix(S.tolist())
        try:
            Li = mp.cholesky(Sm) ** -1
        except (ValueError, ZeroDivisionError):
            return math.nan
        worst = mp.mpf(0)
        for P, Sg in zip(Phi.tolist(), Sigma.tolist()):
            P = mp.matrix(P)
            W = Li * (P * Sm * P.T + mp.matrix(Sg) - Sm) * Li.T
            worst = max([worst] + [abs(W[a, b]) for a in range(W.rows) for b in range(W.cols)])
        return float(worst)


def _expm_reference(M, rounded=True):
    """expm of a float64 K x K matrix at 40 significant digits (mpmath, from M's exact values),
    rounded to float64 (or, rounded=False, the mpmath matrix itself; None if M is not finite).
    torch.linalg.matrix_exp is not accurate enough to check a kernel against: on a stiff spectrum (eigenvalues -4.5e6 and -0.036, s = 0.25) it was 7e-10 off,
    seven times the semigroup tolerance and five times the kernel's own error.  A matrix that
    is not finite gives NaN (mpmath's expm would not return on it)."""
    if not bool(torch.isfinite(M).all()):
        return torch.full(M.shape, math.nan, dtype=torch.float64) if rounded else None
    with mp.workdps(40):
        E = mp.expm(mp.matrix(M.tolist()))
        if not rounded:
            return E
        return torch.tensor([[float(E[i, j]) for j in range(E.cols)] for i in range(E.rows)],
                            dtype=torch.float64)


def check_semigroup(proc):
    """Φ(t2) against expm((B(t2) - B(t1)) A) Φ(t1), the step and the product at 40 digits
    (_expm_reference); NaN (a failure) where anything is not finite."""
    t1, t2 = SEMIGROUP_TIMES[0] * proc.T, SEMIGROUP_TIMES[1] * proc.T
    Phi1, _ = proc.transition(torch.tensor(t1, dtype=torch.float64))
    Phi2, _ = proc.transition(torch.tensor(t2, dtype=torch.float64))
    return [Check("semigroup Φ(t2) = expm((B(t2) - B(t1)) A) Φ(t1)", _semigroup_error(proc, Phi1, Phi2), 1e-10)]


SEMIGROUP_TIMES = (0.2, 0.7)   # check_semigroup's t1, t2 as fractions of T


def _semigroup_error(proc, Phi1, Phi2):
    """max |expm((B(t2) - B(t1)) A) Φ1 - Φ2| for check_semigroup's t1, t2 (SEMIGROUP_TIMES),
    the step and the product at 40 digits; NaN where anything is not finite."""
    t1, t2 = SEMIGROUP_TIMES[0] * proc.T, SEMIGROUP_TIMES[1] * proc.T
    B = proc.B(torch.tensor([t1, t2], dtype=torch.float64))
    A = _A(proc, torch.tensor(t1, dtype=torch.float64))
    step = _expm_reference(((B[1] - B[0]) * A).detach(), rounded=False)
    if step is None or not (bool(torch.isfinite(Phi1).all()) and bool(torch.isfinite(Phi2).all())):
        return math.nan
    with mp.workdps(40):  # the product at 40 digits too: the check's own rounding stays out
        R = step * mp.matrix(Phi1.tolist()) - mp.matrix(Phi2.tolist())
        return float(max(abs(R[i, j]) for i in range(R.rows) for j in range(R.cols)))


def check_lyapunov(proc):
    """Central differences of Σ against FΣ + ΣFᵀ + GGᵀ, relative to the size of those terms
    (near stationarity the sum itself is ~0, so it cannot be the scale). The step starts at
    h = min(1e-4 t, 1e-3 / ‖F(t)‖) and is halved until two successive quotients agree to a
    tenth of the tolerance, so a schedule that changes faster than ‖F‖ (beta = exp(-700 t),
    cos(100000 t) + 1.5) is resolved too. A time where even the smallest step cannot resolve
    the change of Σ above float64 rounding (the quotient's rounding error, 64 eps max|Σ| / h,
    exceeds a tenth of the tolerance times the scale) is left out and said so; if every time is,
    the check is skipped."""
    name = "Lyapunov ODE dΣ/dt = FΣ + ΣFᵀ + GGᵀ (central differences)"
    tol, worst, unresolved = 1e-5, 0.0, []
    times = _times(proc)[1:-1].tolist()
    for t in times:
        err = _lyapunov_error(proc, t, tol)
        if err is None:
            unresolved.append(t)
        else:
            worst = max(worst, err)
    if len(unresolved) == len(times):
        return [_skip(name, "Σ(t) changes below float64 resolution at every probe time")]
    note = "relative" + (f"; t = {', '.join(f'{u:.3g}' for u in unresolved)} left out: Σ changes below "
                         "float64 resolution there" if unresolved else "")
    return [Check(name, worst, tol, note)]


def _lyapunov_error(proc, t, tol):
    """The relative Lyapunov residual at t from central differences whose step is halved until
    two quotients agree to tol / 10, or None once the quotient's rounding error reaches that
    (or the step underflows); inf where Σ is not finite (the check then fails, where it ran
    out of steps and divided by zero)."""
    t64 = torch.tensor(t, dtype=torch.float64)
    F, GG = proc.drift(t64), proc.noise_cov(t64)
    h = min(1e-4 * t, 1e-3 / max(float(torch.linalg.matrix_norm(F, ord=2)), 1e-300))
    previous = None
    while h > 0.0:
        _, S = proc.transition(torch.tensor([t - h, t, t + h], dtype=torch.float64))
        if not bool(torch.isfinite(S).all()):
            return math.inf
        FS = F @ S[1]
        scale = float((2 * FS.abs() + GG.abs()).max())
        if 64 * torch.finfo(torch.float64).eps * float(S.abs().max()) / h > 0.1 * tol * scale:
            return None
        dS = (S[2] - S[0]) / (2 * h)
        if previous is not None and float((dS - previous).abs().max()) <= 0.1 * tol * scale:
            return float((dS - (FS + FS.T + GG)).abs().max()) / scale
        previous, h = dS, h / 2
    return None


def check_gradients(proc, seed):
    """gradcheck (float64) of transition and elbo as functions of the raw parameters."""
    named = [(n, p) for n, p in proc.named_parameters() if p.requires_grad]
    if not named:
        return []
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64) * proc.T

    def score(y, tt):
        return -y

    names = [n for n, _ in named]

    def call(method):
        def fn(*values):
            return torch.func.functional_call(_Method(proc, method), {"proc." + n: v for n, v in zip(names, values)}, ())
        return fn

    transition_out = call(lambda p: p.transition(t))
    elbo_out = call(lambda p: p.elbo(x, score, t=t, generator=torch.Generator().manual_seed(seed)).total)

    inputs = tuple(p.detach().clone().requires_grad_(True) for _, p in named)
    count = sum(p.numel() for _, p in named)
    out = []
    for name, fn in (("transition", transition_out), ("elbo", elbo_out)):
        try:
            torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
            out.append(Check(f"gradcheck through {name} w.r.t. {count} parameters", 0.0, 0.0))
        except RuntimeError as exc:  # GradcheckError is a RuntimeError
            out.append(Check(f"gradcheck through {name} w.r.t. {count} parameters", 1.0, 0.0,
                             str(exc).splitlines()[0]))
    return out


class _Method(torch.nn.Module):
    """Wraps one method call as forward(), so torch.func.functional_call can swap parameters."""

    def __init__(self, proc, method):
        super().__init__()
        self.proc, self.method = proc, method

    def forward(self):
        return self.method(self.proc)


def check_dtype(proc):
    t32 = torch.tensor([0.1, 0.5], dtype=torch.float32) * proc.T
    Phi, Sigma = proc.transition(t32)
    bad = int(Phi.dtype != torch.float32) + int(Sigma.dtype != torch.float32)
    return [Check("dtype follows the input (float32 in, float32 out)", float(bad), 0.0)]


def verify(spec, samples=20000, seed=0):
    """Compile a spec and run every check on it."""
    _check_arguments(samples, seed)
    from .compiler import compile as compile_spec
    return verify_process(compile_spec(spec), samples=samples, seed=seed)


def verify_process(proc, samples=20000, seed=0):
    """Run every check on a compiled Diffusion (or any object with its interface and hooks)."""
    _check_arguments(samples, seed)
    checks = []
    with torch.no_grad():  # value checks need no graph (and then reuse the cached kernel)
        checks += check_invariance(proc)
        checks += check_semigroup(proc)
        checks += check_lyapunov(proc)
        checks += check_moment_ode(proc)
        checks += check_simulation(proc, samples, seed)
        checks += check_dtype(proc)
    checks += check_gradients(proc, seed)
    return checks


def _check_arguments(samples, seed) -> None:
    """samples: a whole number from 2 (a covariance needs two paths) to MAX_SAMPLES;
    seed: 0 .. 2**63 - 1."""
    if (isinstance(samples, bool) or not isinstance(samples, numbers.Integral)
            or not 2 <= samples <= MAX_SAMPLES):
        raise ValueError(f"samples must be a whole number from 2 to {MAX_SAMPLES}, got {samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= 2 ** 63 - 1:
        raise ValueError(f"seed must be a whole number from 0 to 2**63 - 1, got {seed!r}")


def render_checks(spec, checks) -> str:
    lines = [f"sdec verify {spec.filename or spec.name}: {len(checks)} checks"]
    for c in checks:
        if c.skipped is not None:
            lines.append(f"  [SKIP] {c.name}: not run, {c.skipped}")
            continue
        mark = "PASS" if c.passed else "FAIL"
        lines.append(f"  [{mark}] {c.name}: error {c.error:.3g} (tolerance {c.tolerance:.3g})" + (f"  {c.detail}" if c.detail else ""))
    failed = sum(not c.passed for c in checks)
    skipped = sum(c.skipped is not None for c in checks)
    lines.append(f"{len(checks) - failed - skipped} passed, {failed} failed"
                 + (f", {skipped} not run (see SKIP above)" if skipped else ""))
    return "\n".join(lines)
