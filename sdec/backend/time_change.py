"""B(t) = ∫₀ᵗ beta as the emitted module computes it, chosen by measured accuracy.

The schedule check integrates beta once (``spec.report.B``, exact, or None). An exact
expression is not a float64 recipe: a polynomial expanded into monomials with alternating
coefficients (beta = 1 + (1 - t)^100) cancels catastrophically, and exp(2t)/2 - 1/2 loses
its relative accuracy as t → 0. So the lowering tries, in order,

1. the closed form rewritten with expm1/log1p where sympy's rewriting rules apply
   (exp(x) - 1 → expm1(x), log(1 + x) → log1p(x)), after pulling out common factors;
2. the closed form as integrated;
3. composite Gauss–Legendre quadrature of beta on [0, t] (64 nodes per panel, 1 to 16
   equal panels), which has no cancellation for beta > 0 and so keeps full relative
   accuracy at small t;

and emits the first whose float64 values are within ACCEPT relative error of a 30-digit
reference on a grid of [t_lo, T] (geometric from t_lo, so t near t_min is tested, plus
uniform). The reference is the exact B evaluated in mpmath when B is proved to be the
integral (B' - beta simplifies to 0 and B(0) = 0, within the symbolic budget) and two working
precisions agree to 30 digits; otherwise an mpmath quadrature of beta, which would need ~10^4
panels to follow beta = cos(100000 t) + 1.5 and so is used only when it must be. If none
reaches ACCEPT, the most accurate one is emitted and the lowering report carries a warning
when its error exceeds REQUIRED.
"""
from __future__ import annotations

import functools
import math

import attrs
import mpmath as mp
import numpy as np
import sympy as sp
from sympy.codegen.rewriting import expm1_opt, log1p_opt, optimize

from ..emit.torch_expr import fold_constants
from ..language.budget import SYMBOLIC_SECONDS, limited
from ..language.ir import T_SYMBOL

ACCEPT = 1e-14      # relative error at which a form is taken without looking further
REQUIRED = 1e-12    # relative error above which the lowering report warns
GL_NODES = 64
GL_PANELS = (1, 2, 4, 8, 16)
GRID_POINTS = 40    # geometric points and uniform points each
DIGITS = 30


@attrs.frozen
class TimeChange:
    """How B(t) is emitted: ``closed`` (a sympy expression in t) or quadrature ``nodes`` and
    ``weights`` on [0, 1] (B(t) = t Σ w_k beta(t x_k)), with the measured accuracy."""
    closed: sp.Expr | None
    nodes: tuple | None
    weights: tuple | None
    panels: int
    error: float          # max relative error of the float64 form on the grid
    points: int           # grid size
    t_lo: float
    rejected: tuple       # (description, error) of forms tried before it
    reference: str = "quadrature of beta"  # what the errors are measured against

    def describe(self) -> str:
        if self.closed is not None:
            how = f"closed form {_short(self.closed, 200)}"
        else:
            how = f"Gauss–Legendre quadrature of beta on [0, t], {self.panels} panel(s) of {GL_NODES} nodes"
        note = (f"; max relative error {self.error:.2g} against {DIGITS}-digit mpmath ({self.reference}) on "
                f"{self.points} points of [{self.t_lo:g}, T]")
        tried = "".join(f"; {what}" if err != err else f"; {what} rejected (relative error {err:.2g})"
                        for what, err in self.rejected)  # err NaN: a step that was not completed
        return how + note + tried


def _short(expr, limit: int = 60) -> str:
    text = str(expr)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def stable_form(B: sp.Expr) -> sp.Expr:
    """B with exp(x) - 1 and log(1 + x) rewritten as expm1 and log1p where they appear."""
    B = sp.factor_terms(B)
    return optimize(B, [expm1_opt, log1p_opt]) if B.has(sp.exp, sp.log) else B


def _budgeted_stable_form(B: sp.Expr):
    """(stable_form(B), None), or (None, why) when the rewriting overruns its time budget."""
    step = limited(SYMBOLIC_SECONDS, stable_form, B)
    if step.finished:
        return step.value, None
    return None, (f"the expm1/log1p rewriting of B did not finish within the {SYMBOLIC_SECONDS:g} s budget "
                  "for a symbolic step")


def grid(t_lo: float, T: float) -> np.ndarray:
    geometric = np.geomspace(t_lo, T, GRID_POINTS) if 0 < t_lo < T else np.array([T])
    uniform = np.linspace(0.0, T, GRID_POINTS + 1)[1:]
    return np.unique(np.concatenate([[t_lo], geometric, uniform, [T]]))


def reference(beta: sp.Expr, points: np.ndarray) -> list:
    """∫₀ᵗ beta at each point, at DIGITS digits: mpmath quadrature between consecutive points
    (tanh-sinh from 0, which copes with endpoint singularities such as sqrt(t); after that
    Gauss–Legendre where its error estimate is tiny, else tanh-sinh)."""
    f = sp.lambdify(T_SYMBOL, beta, "mpmath")
    out, total, last = [], mp.mpf(0), mp.mpf(0)
    with mp.workdps(DIGITS):
        for t in points:
            t = mp.mpf(float(t))
            value, err = (0, 1) if last == 0 else mp.quad(f, [last, t], method="gauss-legendre", error=True)
            if not err <= abs(value) * mp.mpf(10) ** (5 - DIGITS):
                value = mp.quad(f, [last, (last + t) / 2, t])
            total += value
            last = t
            out.append(+total)
    return out


def exact_reference(beta: sp.Expr, B: sp.Expr, points: np.ndarray) -> list | None:
    """B at each point to DIGITS digits, or None: B must be proved to be ∫₀ᵗ beta (B' - beta
    simplifies to 0 and B(0) = 0 within the symbolic budget), and its values at 2 DIGITS and
    3 DIGITS working digits must agree to DIGITS digits (a form that cancels, e.g. a polynomial
    in monomials, loses digits; extra precision restores them, and the agreement shows it)."""
    def proved():
        try:
            return (sp.simplify(sp.diff(B, T_SYMBOL) - beta) == 0
                    and sp.simplify(B.subs(T_SYMBOL, 0)) == 0)
        except Exception:  # noqa: BLE001 - sympy failing to decide is "not proved"
            return False
    step = limited(SYMBOLIC_SECONDS, proved)
    if not (step.finished and step.value):
        return None
    try:
        f = sp.lambdify(T_SYMBOL, B, "mpmath")
        values = []
        for digits in (2 * DIGITS, 3 * DIGITS):
            with mp.workdps(digits):
                values.append([mp.mpf(f(mp.mpf(float(t)))) for t in points])
    except (TypeError, ValueError, ArithmeticError):  # e.g. a complex or undefined value
        return None
    out = []
    with mp.workdps(DIGITS):
        for lo, hi in zip(*values):
            if not (mp.isfinite(hi) and abs(lo - hi) <= abs(hi) * mp.mpf(10) ** (-DIGITS)):
                return None
            out.append(+hi)
    return out


def _closed_values(expr: sp.Expr, points: np.ndarray) -> np.ndarray:
    f = sp.lambdify(T_SYMBOL, fold_constants(expr), modules=[{"expm1": np.expm1, "log1p": np.log1p}, np])
    with np.errstate(all="ignore"):
        return np.broadcast_to(np.asarray(f(points), dtype=float), points.shape)


def quadrature_rule(panels: int) -> tuple:
    """Composite Gauss–Legendre nodes and weights on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(GL_NODES)
    nodes, weights = [], []
    for p in range(panels):
        nodes.extend((p + (x + 1) / 2) / panels)
        weights.extend(w / (2 * panels))
    return tuple(float(v) for v in nodes), tuple(float(v) for v in weights)


def _quadrature_values(beta, nodes, weights, points):
    f = sp.lambdify(T_SYMBOL, fold_constants(beta), [np])  # np, not "numpy": see checks/schedule.py
    x, w = np.asarray(nodes), np.asarray(weights)
    with np.errstate(all="ignore"):
        tx = points[:, None] * x[None, :]
        vals = np.broadcast_to(np.asarray(f(tx), dtype=float), tx.shape)
        return ((points[:, None] * w) * vals).sum(-1)


def _error(values, ref) -> float:
    worst = 0.0
    for v, r in zip(values, ref):
        if not math.isfinite(v):
            return math.inf
        worst = max(worst, float(abs(mp.mpf(float(v)) - r) / abs(r)) if r != 0 else abs(v))
    return worst


@functools.lru_cache(maxsize=256)
def choose(beta: sp.Expr, B: sp.Expr | None, t_lo: float, T: float) -> TimeChange:
    points = grid(t_lo, T)
    ref = exact_reference(beta, B, points) if B is not None else None
    against = "the exact B, proved by differentiation" if ref is not None else "quadrature of beta"
    if ref is None:
        ref = reference(beta, points)
    tried = []
    if B is not None:
        stable, why = _budgeted_stable_form(B)
        if why is not None:
            tried.append((why, math.nan, None, None, 0))
        forms = [stable] if stable is not None else []
        if stable != B:
            forms.append(B)
        for expr in forms:
            err = _error(_closed_values(expr, points), ref)
            if err <= ACCEPT:
                return TimeChange(expr, None, None, 0, err, len(points), t_lo, tuple((d, e) for d, e, *_ in tried), against)
            tried.append((f"closed form {_short(expr)}", err, expr, None, 0))
    for panels in GL_PANELS:
        nodes, weights = quadrature_rule(panels)
        err = _error(_quadrature_values(beta, nodes, weights, points), ref)
        if err <= ACCEPT:
            return TimeChange(None, nodes, weights, panels, err,
                              len(points), t_lo, tuple((d, e) for d, e, *_ in tried), against)
        tried.append((f"quadrature with {panels} panel(s)", err, None, (nodes, weights), panels))
    best = min((item for item in tried if item[1] == item[1]), key=lambda item: item[1])
    rest = tuple((d, e) for d, e, *_ in tried if d != best[0])
    rule = best[3] or (None, None)
    return TimeChange(best[2], rule[0], rule[1], best[4], best[1], len(points), t_lo, rest, against)
