"""The time budget of symbolic steps (sdec.language.budget) and the verdicts when it runs out."""
import signal
import sys
import threading
import time

import pytest
import sympy as sp

import sdec
from sdec.checks import convergence, schedule, stationarity
from sdec.language import budget
from sdec.language.budget import limited
from sdec.language.ir import T_SYMBOL as t

HEAD = ("sde b\nstate x, v\ninit v ~ normal(0, 0.01)\nbeta(t) = {}\nT = 1\ntarget normal(0, I)\n"
        "Q = [[0, -1], [1, 0]]\nD = diag(0, 1)\n")
HARD = 1 / (1 + t**2 + t**5 + t**11) ** 3  # sympy integrates this for minutes


def test_a_step_that_finishes_returns_its_value():
    step = limited(5.0, sp.expand, (t + 1) ** 2)
    assert step.finished and step.value == t**2 + 2 * t + 1 and step.limited


def test_a_step_that_runs_out_is_stopped_and_says_so():
    s = sp.Symbol("s")
    step = limited(0.05, sp.integrate, HARD.subs(t, s), (s, 0, t))
    assert not step.finished and step.value is None and step.budget == 0.05


def test_an_alarm_that_is_swallowed_is_raised_again():
    """Python drops an exception raised inside a gc callback or a __del__ (Hypothesis installs
    a gc callback); the step must still stop soon after its budget, not run to its end."""
    swallowed = []

    def step():
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            try:
                while time.monotonic() < end:
                    pass
            except budget.OutOfTime:  # what an "Exception ignored in ..." amounts to
                swallowed.append(time.monotonic())
                if len(swallowed) == 3:
                    raise
        return "ran to its end"

    out = limited(0.05, step)
    assert not out.finished and out.value is None
    assert len(swallowed) == 3 and out.seconds < 1.0
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # nothing left armed


def test_no_alarm_is_raised_inside_a_finalizer():
    """A __del__ that runs past the budget is left alone (an OutOfTime there is swallowed and
    handed to sys.unraisablehook, which the next alarm can hit in turn: under pytest that
    failed a test); the step stops right after it, back in its own code."""
    unraisable = []

    class Slow:
        def __del__(self):
            end = time.monotonic() + 0.2
            while time.monotonic() < end:
                pass

    def step():
        Slow()  # finalized at once, inside the step, past the 0.05 s budget
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            pass
        return "ran to its end"

    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        out = limited(0.05, step)
    finally:
        sys.unraisablehook = hook
    assert not out.finished and 0.2 <= out.seconds < 1.0
    assert unraisable == []
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_no_alarm_is_raised_inside_the_unraisable_hook():
    """An OutOfTime swallowed in a gc callback (Hypothesis installs one) goes to
    sys.unraisablehook; pytest's formats a traceback there, the repeated alarm interrupted
    that, and pytest failed an unrelated test ("Failed to process unraisable exception", a
    fresh CI run).  The alarm now leaves the running hook alone: the hook finishes (here a
    slow one), and the step stops once it is back in its own code."""
    import gc
    started, finished = [], []

    def slow_callback(phase, info):
        if phase == "start":
            end = time.monotonic() + 0.2
            while time.monotonic() < end:
                pass

    def slow_hook(unraisable):
        started.append(unraisable.exc_type)
        end = time.monotonic() + 0.1  # ten retry periods of the alarm
        while time.monotonic() < end:
            pass
        finished.append(unraisable.exc_type)

    def step():
        gc.collect()  # the callback runs past the 0.05 s budget: the alarm lands in it
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            pass
        return "ran to its end"

    hook = sys.unraisablehook
    sys.unraisablehook = slow_hook
    gc.callbacks.append(slow_callback)
    try:
        out = limited(0.05, step)
    finally:
        gc.callbacks.remove(slow_callback)
        sys.unraisablehook = hook
    assert not out.finished and out.seconds < 1.0
    assert started and finished == started == [budget.OutOfTime] * len(started)  # each call ran to its end
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_errors_of_the_step_itself_propagate():
    with pytest.raises(ZeroDivisionError):
        limited(5.0, lambda: 1 / 0)


def test_an_inner_budget_never_outlasts_the_outer_one():
    s = sp.Symbol("s")
    inner = []
    outer = limited(0.05, lambda: inner.append(limited(60.0, sp.integrate, HARD.subs(t, s), (s, 0, t))))
    assert not outer.finished or (inner and not inner[0].finished)


def test_outside_the_main_thread_the_step_runs_unlimited():
    out = []
    worker = threading.Thread(target=lambda: out.append(limited(0.001, sp.expand, (t + 1) ** 3)))
    worker.start()
    worker.join()
    assert out[0].finished and not out[0].limited and out[0].value == sp.expand((t + 1) ** 3)


def test_integration_out_of_time_falls_back_to_quadrature_and_says_why(monkeypatch):
    monkeypatch.setattr(schedule, "SYMBOLIC_SECONDS", 1e-6)
    spec = sdec.parse(HEAD.format("1/(1 + t^2 + t^5 + t^11)^3"))
    detail = next(p.detail for p in spec.report.proofs if p.name.startswith("B(t)"))
    assert detail.startswith("no closed form found (sympy's integrator ran out of its 1e-06 s budget)")
    assert spec.report.B is None


def test_kalman_rank_out_of_time_is_checked_at_40_digits(monkeypatch):
    monkeypatch.setattr(convergence, "SYMBOLIC_SECONDS", 1e-6)
    spec = sdec.parse(HEAD.format("1").replace("normal(0, I)", "normal(0, I + sqrt(2)/10*ones(2, 2))"))
    rank = next(p for p in spec.report.proofs if p.name.startswith("noise reaches"))
    assert rank.verdict == "checked" and "at 40 digits: the exact rank ran out of its time budget" in rank.detail
    bad = sdec.analyze(HEAD.format("1").replace("Q = [[0, -1], [1, 0]]", "Q = [[0, 0], [0, 0]]"), "b.sde")
    message = next(d.message for d in bad.diagnostics if "rank" in d.message)
    assert message.startswith("rank 1 < K = 2 (at 40 digits") and "never reaches the variable x" in message


def test_stationarity_out_of_time_is_a_warning_saying_what_is_not_proved(monkeypatch):
    monkeypatch.setattr(stationarity, "SYMBOLIC_SECONDS", 1e-6)
    result = sdec.analyze(HEAD.format("1"), "b.sde")
    proof = next(p for p in result.spec.report.proofs if p.name.startswith("N(0, Σ∞) is stationary"))
    assert proof.verdict == "warning" and proof.detail.startswith("not proved: simplifying the residual")
    assert budget.SYMBOLIC_SECONDS == 2.0  # the module's own default is untouched


@pytest.mark.parametrize("process", [
    "drift = beta(t) * [[0, 1], [-1, -1]]\ndiffusion = sqrt(2 * beta(t)) * [[0], [1]]\n",
    "dx = beta(t) * v dt\ndv = beta(t) * (-x - v) dt + sqrt(2 * beta(t)) dW\n",
])
def test_explicit_forms_never_expand_beta(monkeypatch, process):
    # (1 + t/1000)^1000 multiplied out has 1001 terms with ~3000-digit rationals: reading the drift
    # and noise as beta(t) times constants must not expand it (it hung for minutes)
    monkeypatch.setattr(schedule, "SYMBOLIC_SECONDS", 0.2)  # B(t) may fall back to quadrature here
    text = HEAD.format("(1 + t/1000)^1000 - t/2").split("Q = ")[0] + process
    spec = sdec.parse(text, "p.sde")
    assert spec.Q == sp.Matrix([[0, -1], [1, 0]]) and spec.D == sp.diag(0, 1)


def test_a_slow_simplify_keeps_the_integral_as_integrated(monkeypatch):
    """simplify only tidies B (3t/2 + sin(100000 t)/100000 takes it ~1.5 s): past its share of
    the budget the integral is kept as integrated instead of being lost to quadrature (whose
    30-digit reference and 64-node panels both miss 16,000 oscillations)."""
    def stuck(expr):
        time.sleep(5)
        return expr
    monkeypatch.setattr(schedule, "SIMPLIFY_SECONDS", 0.05)
    monkeypatch.setattr(schedule.sp, "simplify", stuck)
    start = time.monotonic()
    B, why = schedule.integral_outcome(sp.cos(100000 * t) + sp.Rational(3, 2))
    assert time.monotonic() - start < 1.0
    assert why is None and B == sp.Rational(3, 2) * t + sp.sin(100000 * t) / 100000
