"""Probability-flow ODE of a compiled Diffusion, and a guarded torchdiffeq solve.

Shared by :mod:`sdec.runtime.likelihood` and :mod:`sdec.runtime.sampling`. Everything here uses only the
public Diffusion interface (``drift``, ``noise_cov``, ``apply_kk``; see runtime/interface.py), so it
works on any compiled process.

The probability-flow ODE of dy = F(t) y dt + G(t) dW with score s(y, t) is

    dy/dt = F(t) y - 1/2 G G^T(t) s(y, t)          (K x K matrices act per data coordinate)

Step guard
----------
torchdiffeq's adaptive solvers accept ``min_step`` and ``max_num_steps`` options, but neither
is a guard: at ``min_step`` a step that fails the error test is *accepted anyway* (the solution
silently loses accuracy), and ``max_num_steps`` counts steps per output interval and fails
with a bare ``AssertionError``. Instead :func:`solve` attaches a ``callback_step`` (documented
torchdiffeq callback, called before every attempted step, accepted or rejected) that raises
:class:`ODESolveError` when the proposed step falls below ``min_step`` or the total number of
attempted steps exceeds ``max_steps``. So a stiff or pathological field fails fast with a
message saying what to change, instead of crawling forever.

Time range
----------
An adaptive torchdiffeq solver may take a last step past the final output time and
interpolate back, evaluating the field beyond it: below t_min, even below 0, where the
kernel is singular (a CholeskyError at t = -0.0026 in a user's run). :func:`solve` therefore
(1) asks the solver to land a step exactly on every output time (``step_t``) and (2) clamps the
time passed to the field into the integration interval, so the field is never evaluated
outside [min(times), max(times)] whatever the solver does.

No collectives are used anywhere (DDP safety: every rank solves its own batch).
"""

import torch
import torchdiffeq

ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_GRID_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams",
                      "implicit_adams")
# torchdiffeq options a caller may pass through ``options``; anything else is an error.
ADAPTIVE_OPTIONS = ("first_step", "max_step", "safety", "ifactor", "dfactor", "step_t", "jump_t")
FIXED_GRID_OPTIONS = ("step_size", "perturb", "interp")
_TORCHDIFFEQ_ASSERTS = ("underflow in dt", "non-finite values", "max_num_steps exceeded")


class ODESolveError(RuntimeError):
    """An ODE solve was stopped by the step guard (or hit a non-finite value).

    Attributes: ``reason`` (short tag: "min_step", "max_steps", "non_finite"), ``t`` (time of
    the failing step, or None), ``dt`` (proposed step), ``steps`` (attempted steps so far) and
    ``nfe`` (field evaluations so far).
    """

    def __init__(self, reason, message, *, t=None, dt=None, steps=0, nfe=0):
        super().__init__(message)
        self.reason, self.t, self.dt, self.steps, self.nfe = reason, t, dt, steps, nfe


def flow_terms(proc, score_fn, y, t):
    """Return (F y, G G^T s, F, GG^T) at scalar time t for state y (B, K, *data).

    K x K matrices come from the process in float64 and are cast to y's dtype; the score is
    called as score_fn(y, t) with t a (B,) tensor of y's dtype.
    """
    t64 = torch.as_tensor(t, dtype=torch.float64, device=y.device)
    F = proc.drift(t64).to(y.dtype)
    M = proc.noise_cov(t64).to(y.dtype)
    s = score_fn(y, t64.to(y.dtype).expand(y.shape[0]))
    if s.shape != y.shape:
        raise ValueError(f"score_fn returned shape {tuple(s.shape)}; expected the state's "
                         f"shape {tuple(y.shape)} = (B, K, *data_shape)")
    return proc.apply_kk(F, y), proc.apply_kk(M, s), F, M


def flow_field(proc, score_fn, y, t):
    """Probability-flow velocity F(t) y - 1/2 G G^T(t) s(y, t)."""
    Fy, Ms, _, _ = flow_terms(proc, score_fn, y, t)
    return Fy - 0.5 * Ms


class _GuardedField:
    """Wraps field(t, state) for torchdiffeq: counts evaluations and guards the step size."""

    def __init__(self, field, min_step, max_steps, hint, t_range):
        self.field, self.min_step, self.max_steps, self.hint = field, min_step, max_steps, hint
        self.lo, self.hi = t_range
        self.nfe = 0
        self.steps = 0

    def __call__(self, t, state):
        self.nfe += 1
        return self.field(t.clamp(self.lo, self.hi), state)

    def callback_step(self, t0, y0, dt):
        """Called by torchdiffeq before every attempted step (t0 in the caller's time)."""
        self.steps += 1
        dt, t0 = abs(_number(dt)), _number(t0)
        where = f"at t = {t0:.6g} after {self.steps - 1} attempted steps ({self.nfe} NFE)"
        if not dt > self.min_step:  # also catches a NaN step
            raise ODESolveError(
                "min_step", f"ODE step size {dt:.3g} fell below min_step = {self.min_step:.3g} "
                f"{where}: the field is too stiff, oscillating or non-finite for the "
                f"tolerances. {self.hint}", t=t0, dt=dt, steps=self.steps, nfe=self.nfe)
        if self.steps > self.max_steps:
            raise ODESolveError(
                "max_steps", f"ODE step budget max_steps = {self.max_steps} exhausted {where} "
                f"(last step {dt:.3g}). {self.hint}", t=t0, dt=dt, steps=self.steps,
                nfe=self.nfe)


def _number(x) -> float:
    """A python float from a tensor (detached: torchdiffeq's times may carry a graph) or number."""
    return float(x.detach()) if torch.is_tensor(x) else float(x)


def check_method(method, options):
    """Validate a torchdiffeq method name and its pass-through options; return options."""
    options = dict(options or {})
    if method in ADAPTIVE_METHODS:
        allowed = ADAPTIVE_OPTIONS
    elif method in FIXED_GRID_METHODS:
        allowed = FIXED_GRID_OPTIONS
    else:
        raise ValueError(f"unknown ODE method {method!r}; valid: "
                         f"{', '.join(ADAPTIVE_METHODS + FIXED_GRID_METHODS)}")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for ODE method {method!r}; "
                         f"valid: {', '.join(allowed)}")
    return options


def solve(field, state0, times, *, method, rtol, atol, min_step, max_steps, options=None,
          hint=""):
    """Integrate d state/dt = field(t, state) over ``times`` with torchdiffeq.odeint.

    ``state0`` is a tensor or tuple of tensors; ``times`` a 1-D float64 tensor (increasing or
    decreasing). Returns (solution at every time, nfe, attempted steps). Raises
    :class:`ODESolveError` if the step drops below ``min_step`` (adaptive methods only) or more
    than ``max_steps`` steps are attempted.
    """
    options = check_method(method, options)
    if method in FIXED_GRID_METHODS and len(times) == 2 and "step_size" not in options:
        raise ValueError(f"fixed-grid method {method!r} would take a single step from "
                         f"{float(times[0])} to {float(times[1])}: pass "
                         f"options={{'step_size': h}} or use an adaptive method")
    adaptive = method in ADAPTIVE_METHODS
    floor = min_step if adaptive else 0.0
    if adaptive and "step_t" not in options:
        options["step_t"] = times  # land exactly on every output time, never step past the end
    guarded = _GuardedField(field, floor, max_steps, hint,
                            (float(times.min()), float(times.max())))
    try:
        sol = torchdiffeq.odeint(guarded, state0, times, rtol=rtol, atol=atol, method=method,
                                 options=options)
    except AssertionError as err:  # torchdiffeq's own checks: underflow / non-finite state
        if not str(err).startswith(_TORCHDIFFEQ_ASSERTS):
            raise
        raise ODESolveError("non_finite", f"torchdiffeq stopped: {err} (after {guarded.steps} "
                            f"steps, {guarded.nfe} NFE). {hint}", steps=guarded.steps,
                            nfe=guarded.nfe) from err
    return sol, guarded.nfe, guarded.steps
