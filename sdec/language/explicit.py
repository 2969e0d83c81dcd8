"""The matrices form of the process (``drift = ...``, ``diffusion = ...``) and the reduction
of any explicit F(t), G(t) (matrices or equations form) to Q and D:
F(t) = beta(t) A with A constant, G Gᵀ(t) = 2 beta(t) D, Q = -A Σ∞ - D.

A mixin of the Builder (sdec.language.build).
"""
from __future__ import annotations

import sympy as sp

from .exact import is_matrix, shape_text
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
        G = self.value(stmt.value, scope)
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
        A = sp.ImmutableMatrix(F.applyfunc(lambda e: sp.simplify(e / beta)))
        bad = [(i, j) for i in range(self.K) for j in range(self.K) if T_SYMBOL in A[i, j].free_symbols]
        if bad:
            i, j = bad[0]
            self.err(self.span_of(("drift", i, j)) or self.span_of("drift") or self.span_of(("eq", self.variables[i])),
                     f"the drift is not beta(t) times a constant matrix: entry [{self.variables[i]}, {self.variables[j]}] "
                     f"divided by beta(t) is {A[i, j]}, which depends on t")
            return None
        GGT = G * G.T
        D = sp.ImmutableMatrix((GGT / (2 * beta)).applyfunc(sp.simplify))
        bad = [(i, j) for i in range(self.K) for j in range(self.K) if T_SYMBOL in D[i, j].free_symbols]
        if bad:
            i, j = bad[0]
            self.err(self.span_of("diffusion") or self.span_of(("eq", self.variables[i])),
                     f"G Gᵀ(t) is not 2 beta(t) times a constant matrix: entry [{self.variables[i]}, "
                     f"{self.variables[j]}] of G Gᵀ(t) / (2 beta(t)) is {expr_text(D[i, j])}, which depends on t; "
                     "the time change must be shared by drift and noise")
            return None
        Q = sp.ImmutableMatrix((-A * target - D).applyfunc(sp.simplify))
        return form, Q, D, (), sp.ImmutableMatrix(F), sp.ImmutableMatrix(G), wiener
