"""Interval enclosures of IR expressions (sdec.checks.intervals) against mpmath at 50 digits,
and the bisection's three outcomes."""
import mpmath as mp
import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdec.checks.intervals import bisect_positive, enclosure, interval
from sdec.language.ir import T_SYMBOL as t

R = sp.Rational
LEAVES = st.sampled_from([t, t, R(1, 3), R(5, 2), sp.pi, sp.E, R(-7, 4)])


def grow(children):
    return st.one_of(
        st.tuples(children, children).map(lambda ab: ab[0] + ab[1]),
        st.tuples(children, children).map(lambda ab: ab[0] * ab[1]),
        st.tuples(children, st.integers(-3, 4)).map(lambda ap: ap[0] ** ap[1] if ap[0] != 0 or ap[1] > 0 else ap[0]),
        children.map(lambda a: sp.exp(a / 4)), children.map(sp.sin), children.map(sp.cos), children.map(sp.tanh),
        children.map(lambda a: sp.sqrt(a**2 + 1)), children.map(lambda a: sp.log(a**2 + 1)),
        children.map(lambda a: (a**2 + R(1, 2)) ** R(3, 7)),
    )


EXPRESSIONS = st.recursive(LEAVES, grow, max_leaves=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(EXPRESSIONS, st.fractions(0, 2), st.fractions(0, 1, max_denominator=50))
def test_enclosure_holds_every_value_on_the_interval(expr, a, width):
    lo, hi = sp.Rational(a.numerator, a.denominator), sp.Rational(a.numerator, a.denominator) + sp.Rational(
        width.numerator, width.denominator)
    f = enclosure(expr)
    try:
        box = f(interval(lo, hi))
    except (ArithmeticError, ValueError):
        return  # no real value somewhere on the interval (division by an interval holding 0 is inf)
    exact = sp.lambdify(t, expr, "mpmath")  # the IR expression built here, never spec text
    with mp.workdps(50):
        for k in range(5):
            x = mp.mpf(lo.p) / lo.q + (mp.mpf(hi.p) / hi.q - mp.mpf(lo.p) / lo.q) * k / 4
            try:
                value = exact(x)
            except (ZeroDivisionError, ValueError):
                continue
            if mp.im(value) != 0 or not mp.isfinite(value):
                continue
            assert mp.mpf(box.a) - mp.mpf(10) ** -40 <= value <= mp.mpf(box.b) + mp.mpf(10) ** -40, (expr, x)


@pytest.mark.parametrize("expr,T,outcome", [
    (R(1, 10) + R(99, 10) * t, 1, "positive"),
    (sp.cos(100000 * t) + R(3, 2), 1, "positive"),
    (1 + t**997 + t ** R(1, 7) + t ** R(3, 11), 1, "positive"),
    ((t - R(1, 2)) ** 2 - R(1, 16), 1, "nonpositive"),
    (1 + sp.cos(100 * t), 1, "open"),          # touches 0 at pi/100: decided exactly by the caller
    (1 / (t - R(50001, 100000)) ** 2, 1, "open"),  # a pole is no proof
    (sp.log(t - R(1, 2)) + 5, 1, "undefined"),
])
def test_bisection_outcomes(expr, T, outcome):
    assert bisect_positive(expr, T).outcome == outcome


def test_values_below_the_float64_range_are_still_positive():
    """exp(-1000 t) is about 5e-435 at t = 1: as floats its bounds would be 0, which bisection
    took for a zero ('beta(t) is smallest at t = 0.7505 ... must stay positive')."""
    found = bisect_positive(sp.exp(-1000 * t), sp.Integer(1))
    assert found.outcome == "positive"
    assert mp.mpf("5.07e-435") < found.lowest <= mp.exp(-1000)
    assert bisect_positive(sp.exp(-1000 * t) * (t - sp.Rational(1, 2)), sp.Integer(1)).outcome == "nonpositive"
