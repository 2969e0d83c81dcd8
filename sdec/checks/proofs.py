"""Proof records and the report that ``sdec check`` prints."""
from __future__ import annotations

import attrs
import sympy as sp

from ..diagnostics import Span

VERDICTS = ("proved", "checked", "holds", "warning", "failed", "info")


@attrs.frozen
class Proof:
    """One claim about a spec and how it was established.

    verdict: "proved" (exactly, for every parameter value), "checked" (numerically, or
    only at the initial parameter values: ``detail`` says which), "warning", "failed",
    or "info" (a fact, e.g. which variables are noised).
    """

    name: str
    verdict: str
    detail: str
    span: Span | None = attrs.field(default=None, eq=False)
    data: tuple = ()

    @property
    def ok(self) -> bool:
        return self.verdict != "failed"


@attrs.frozen
class Report:
    proofs: tuple
    facts: tuple  # ((key, value), ...) JSON-ready values

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.proofs)

    def fact(self, key, default=None):
        return next((v for k, v in self.facts if k == key), default)


def at_init(spec):
    """Q and D with every learnable symbol replaced by its initial value (exact)."""
    subs = {p.symbol: p.init for p in spec.params}
    Q, D = spec.Q.subs(subs), spec.D.subs(subs)
    for block in spec.learned:
        if block.block == "Q":
            Q = block.init
        else:
            D = block.init
    return sp.ImmutableMatrix(Q), sp.ImmutableMatrix(D)


def is_learnable(spec) -> bool:
    return bool(spec.symbols)


def numeric(matrix):
    import numpy as np
    return np.array(matrix.evalf(30).tolist(), dtype=float)


def matrix_text(matrix) -> list:
    """JSON-ready nested lists of strings, exact where possible."""
    return [[str(matrix[i, j]) for j in range(matrix.cols)] for i in range(matrix.rows)]
