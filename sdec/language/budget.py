"""A wall-clock budget for one symbolic step (integration, simplification, solving, inversion).

sympy has no time limit and cannot be interrupted cooperatively: a reasonable-looking
beta(t) can keep ``integrate`` or ``minimum`` busy for minutes. ``limited`` runs one step
under a budget and tells the caller whether it finished, so the caller can fall back to a
numeric route and say in its verdict what was checked rather than proved:

    from sdec.language.budget import SYMBOLIC_SECONDS, limited

    step = limited(SYMBOLIC_SECONDS, sp.integrate, beta, (t, 0, t))
    if step.finished:
        B = step.value                     # exceptions of the step itself propagate
    else:                                  # ran out: numeric route, and say so
        B = None
        note = f"no closed form within {step.budget:g} s ({what})"

How: ``signal.setitimer(ITIMER_REAL)`` with a SIGALRM handler that raises ``OutOfTime``
inside the running step (the main thread only; Python runs the handler between bytecodes,
so a single long C call finishes first). Python swallows an exception raised inside a gc
callback or a __del__ (e.g. Hypothesis's gc callback in the tests), so after the budget the
alarm repeats every RETRY_SECONDS until one OutOfTime reaches ``limited``; it does not raise
inside a __del__ or an import at all (``_interruptible``). OutOfTime derives
from BaseException, so sympy's own ``except Exception`` clauses cannot swallow it. Budgets
nest: an inner budget never outlasts the outer one, and the outer timer is re-armed with
what is left of it.

Measured (2-core machine, shared): arming and disarming the timer costs about 25 µs per
step; ``integrate`` of 1/(1 + t^2 + t^5 + t^11)^3 under a 0.5 s budget returns after
0.505 s (and the other slow schedules of issue 7 within 0.509 s). A forked worker with a timeout was the alternative: it also bounds C calls,
but costs a fork of a process holding sympy (and maybe torch threads) per step and must
pickle the result back; the timer was chosen.

Outside the main thread (or where SIGALRM does not exist) signals cannot be used: the step
runs WITHOUT a limit there, and ``Outcome.limited`` is False. Verdicts are therefore the
same in every thread; only the protection against a runaway step is lost.
"""
from __future__ import annotations

import signal
import sys
import threading
import time

import attrs

SYMBOLIC_SECONDS = 2.0  # default budget of one symbolic step of a check (20x what a reasonable spec needs)


class OutOfTime(BaseException):
    """Raised inside a step whose budget has run out (never escapes ``limited``)."""


@attrs.frozen
class Outcome:
    """What became of a budgeted step: its value if it finished in time."""

    value: object
    finished: bool
    seconds: float        # wall time the step took (up to the budget)
    budget: float
    limited: bool = True  # False: no timer could be armed (not the main thread); ran unlimited


def can_limit() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def limited(seconds: float, fn, *args, **kwargs) -> Outcome:
    """Run fn(*args, **kwargs) with a wall-clock budget of `seconds` (> 0).

    Returns Outcome(value, finished=True, ...) when fn returns in time and
    Outcome(None, finished=False, ...) when the budget runs out. Exceptions raised by fn
    itself propagate unchanged.
    """
    start = time.monotonic()
    if not can_limit():
        value = fn(*args, **kwargs)
        return Outcome(value, True, time.monotonic() - start, seconds, limited=False)
    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    budget = min(seconds, outer_left) if outer_left > 0 else seconds
    live = [True]  # this call's alarm raises only while live (see _disarm)
    root = sys._getframe()

    def alarm(signum, frame):
        if live[0] and _interruptible(frame, root):
            raise OutOfTime()

    previous = signal.signal(signal.SIGALRM, alarm)
    try:
        try:
            # after the budget, again every RETRY_SECONDS: an OutOfTime that lands where
            # Python swallows exceptions (a gc callback, a __del__) is raised again
            signal.setitimer(signal.ITIMER_REAL, max(budget, 1e-6), RETRY_SECONDS)
            try:
                value = fn(*args, **kwargs)
            finally:
                _disarm(live)
        except OutOfTime:
            _disarm(live)
            return Outcome(None, False, time.monotonic() - start, seconds)
        return Outcome(value, True, time.monotonic() - start, seconds)
    finally:
        _disarm(live)
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
        if outer_left > 0:  # re-arm the enclosing budget with what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-6))


RETRY_SECONDS = 0.01


def _interruptible(frame, root) -> bool:
    """Whether an OutOfTime raised at frame can reach ``limited`` (whose frame is root): not
    from inside a finalizer (__del__), the import system or the running sys.unraisablehook
    (an OutOfTime swallowed in a gc callback reached pytest's hook, the repeated alarm
    interrupted its traceback formatting, and pytest failed an unrelated test in a fresh CI
    run), where Python would swallow it
    (and hand it to sys.unraisablehook, itself open to the next alarm: under pytest an alarm
    that landed in the hook's own import failed a test) or leave an import half done. The
    alarm repeats every RETRY_SECONDS, so the step stops once it is back in its own code."""
    hook = sys.unraisablehook  # (pytest's is a functools.partial)
    hook_code = getattr(getattr(hook, "func", hook), "__code__", None)
    while frame is not None and frame is not root:
        code = frame.f_code
        if (code.co_name == "__del__" or code.co_filename.startswith("<frozen importlib")
                or code is hook_code):
            return False
        frame = frame.f_back
    return True


def _disarm(live) -> None:
    """Stop this call's alarm for good. An alarm can land at any bytecode until live[0] is
    False; one that lands before the assignment is caught here and the assignment retried,
    so no OutOfTime escapes once this returns."""
    while True:
        try:
            live[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            return
        except OutOfTime:
            continue
