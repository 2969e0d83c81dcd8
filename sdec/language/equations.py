"""The equations form of the process: one ``dx = (linear drift) dt + c dW[_name]`` per
state variable, read into F(t) (the drift's coefficients) and G(t) (one column per named
Brownian motion). The reduction to Q and D is the explicit form's (sdec.language.explicit).

A mixin of the Builder (sdec.language.build).
"""
from __future__ import annotations

import sympy as sp

from . import syntax as S


class EquationsForm:
    """dx = ... dt + ... dW equations → (F, G, Brownian motion names)."""

    def equations(self, beta):
        state = {v: sp.Symbol(v, real=True) for v in self.variables}
        scope = self.time_scope(beta, state)
        by_var, seen, noise_terms = {}, {}, {}
        for stmt in self.of(S.EquationStmt):
            var = stmt.target.name[1:] if stmt.target.name.startswith("d") else None
            if var not in self.variables:
                self.err(stmt.target.span, f"'{stmt.target.name}' does not name the differential of a state variable",
                         f"write one of: {', '.join('d' + v for v in self.variables)}")
                continue
            if var in seen:
                self.err(stmt.span, f"d{var} has two equations (first at line {seen[var]})")
                continue
            seen[var] = stmt.span.line  # written, even if rejected below: no "has no equation" on top
            row = self._linear_row(stmt, scope, state)
            if row is None:
                continue
            by_var[var] = row
            self.where(("eq", var), stmt.span)
            for noise in stmt.noises:
                self._noise_term(noise, var, scope, state, noise_terms)
        missing = [v for v in self.variables if v not in seen]
        for v in missing:
            self.err(self.span_of(("var", v)), f"state variable '{v}' has no equation", f"add 'd{v} = ... dt'")
        if len(by_var) != self.K:
            return None, None, ()
        F = sp.ImmutableMatrix([by_var[v] for v in self.variables])
        # canonical columns: sorted names, and a Brownian motion that enters nowhere is dropped
        wiener = sorted({w for (_, w), c in noise_terms.items() if not _is_zero(c)})
        if not wiener:
            if not any(s.noises for s in self.of(S.EquationStmt)):
                self.err(self.top(), "no equation has a noise term ('+ ... dW'); nothing diffuses")
            elif not any(d.severity == "error" for d in self.diags):
                self.err(self.span_of(("eq", self.variables[0])), "every noise coefficient is zero; nothing diffuses")
            return None, None, ()
        G = sp.ImmutableMatrix(self.K, len(wiener), lambda i, j: noise_terms.get((self.variables[i], wiener[j]), 0))
        return F, G, tuple(wiener)

    def _noise_term(self, noise, var, scope, state, noise_terms):
        """Add one '± c dW[_name]' term of var's equation into noise_terms[(var, name)]."""
        name = noise.wiener.name[3:] if noise.wiener.name.startswith("dW_") else var
        coeff = sp.Integer(1) if noise.coeff is None else self.value(noise.coeff, scope, expect="scalar")
        if coeff is None:
            return
        if coeff.free_symbols & set(state.values()):
            self.err(noise.coeff.span, "the noise coefficient depends on the state; sdec handles additive noise only")
            return
        key = (var, name)
        noise_terms[key] = noise_terms.get(key, 0) + (coeff if noise.sign == "+" else -coeff)

    def _linear_row(self, stmt, scope, state):
        expr = self.value(stmt.drift, scope, expect="scalar")
        if expr is None:
            return None
        symbols = list(state.values())
        row = [sp.diff(expr, s) for s in symbols]
        # linear: every coefficient is free of the state (affine) and the drift is 0 at state 0;
        # no expand() of the whole drift, which would multiply out beta(t) = (1 + t/1000)^1000
        rest = expr.subs({s: 0 for s in symbols})
        if not _is_zero(rest) or any(c.free_symbols & set(symbols) for c in row):
            self.err(stmt.drift.span, f"the drift of {stmt.target.name} is not linear in the state "
                     f"(sdec compiles linear diffusions: dy = F(t) y dt + G(t) dW)")
            return None
        return row


def _is_zero(c) -> bool:
    """c is identically 0: structurally, or (a constant) simplified. Assumption queries and
    simplification of expressions in t are avoided: they expand beta(t) = (1 + t/1000)^1000."""
    if c == 0:
        return True
    return not c.free_symbols and sp.simplify(c) == 0
