"""The matrices form of the process (``drift = ...``, ``diffusion = ...``) and the reduction
of any explicit F(t), G(t) (matrices or equations form) to Q and D:
F(t) = beta(t) A with A constant, G Gᵀ(t) = 2 beta(t) D, Q = -A Σ∞ - D.

A mixin of the Builder (sdec.language.build).
"""
from __future__ import annotations

import sympy as sp

from .exact import is_matrix, shape_text
from .budget import SYMBOLIC_SECONDS, limited
from .format import expr_text
from .ir import T_SYMBOL


class ExplicitForm:
    """drift and diffusion matrices as written, and their reduction to (Q, D)."""

    def matrices(self, beta):
        scope = self.time_scope(beta)
        drift = self.block("drift", scope)
        stmt = self.assignments("diffusion")
        if drift is None:
            if not self.attempted("drift"):
                self.err(stmt.span if stmt else self.top(), "the drift matrix is missing", "add 'drift = [[...]]'")
            return None, None, ()
        if stmt is None:
            self.err(self.span_of("drift"), "the diffusion matrix is missing", "add 'diffusion = [[...]]' (K rows, one column per Brownian motion)")
            return None, None, ()
        G = self.one_by_one(self.value(stmt.value, scope))
        if G is None:
            return None, None, ()
        if not is_matrix(G) or G.rows != self.K:
            self.err(stmt.value.span, f"diffusion must have {self.K} rows (one per state variable), got a {shape_text(G)}")
            return None, None, ()
        self.where("diffusion", stmt.value.span)
        return drift, G, ()

    def explicit(self, beta, target, F, G, wiener, form):
        if F is None or G is None:
            return None
        A = sp.ImmutableMatrix(F.applyfunc(lambda e: _constant_ratio(e, beta)))
        bad = [(i, j) for i in range(self.K) for j in range(self.K) if _depends_on_t(A[i, j])]
        if bad:
            i, j = bad[0]
            self.err(self.span_of(("drift", i, j)) or self.span_of("drift") or self.span_of(("eq", self.variables[i])),
                     f"the drift is not beta(t) times a constant matrix: entry [{self.variables[i]}, {self.variables[j]}] "
                     f"divided by beta(t) is {_ratio_text(A[i, j])}")
            return None
        GGT = G * G.T
        D = sp.ImmutableMatrix(GGT.applyfunc(lambda e: _constant_ratio(e, 2 * beta)))
        bad = [(i, j) for i in range(self.K) for j in range(self.K) if _depends_on_t(D[i, j])]
        if bad:
            i, j = bad[0]
            self.err(self.span_of("diffusion") or self.span_of(("eq", self.variables[i])),
                     f"G Gᵀ(t) is not 2 beta(t) times a constant matrix: entry [{self.variables[i]}, "
                     f"{self.variables[j]}] of G Gᵀ(t) / (2 beta(t)) is {_ratio_text(D[i, j])}; "
                     "the time change must be shared by drift and noise")
            return None
        Q = sp.ImmutableMatrix((-A * target - D).applyfunc(sp.simplify))
        return form, Q, D, (), sp.ImmutableMatrix(F), sp.ImmutableMatrix(G), wiener


class _Undecided:
    """A ratio sympy could not simplify within the budget (kept for the message)."""

    def __init__(self, expr):
        self.expr = expr
        self.free_symbols = {T_SYMBOL}


def _constant_ratio(e, beta):
    """e / beta simplified: the constant it is, or an expression in t, or _Undecided when
    simplification ran out of its time budget ((1 + t/1000)^1000 takes sympy minutes)."""
    step = limited(SYMBOLIC_SECONDS, _ratio, e, beta)
    return step.value if step.finished else _Undecided(e / beta)


def _ratio(e, beta):
    at0 = beta.subs(T_SYMBOL, 0)
    if at0 != 0 and at0.is_finite:  # the constant it must be, if any; e = c beta then cancels exactly
        c = e.subs(T_SYMBOL, 0) / at0
        if e - c * beta == 0:
            return c
    q = e / beta
    return q if T_SYMBOL not in q.free_symbols else sp.simplify(q)


def _depends_on_t(value) -> bool:
    return T_SYMBOL in value.free_symbols


def _ratio_text(value) -> str:
    if isinstance(value, _Undecided):
        return (f"{expr_text(value.expr)}, which sympy could not reduce to a constant within "
                f"{SYMBOLIC_SECONDS:g} s (write the matrix as beta(t) * [[...]])")
    return f"{expr_text(value)}, which depends on t"
