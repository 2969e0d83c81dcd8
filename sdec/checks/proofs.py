"""Proof records (one claim, its verdict and location) and the Report of every proof about a spec."""
from __future__ import annotations

import attrs
import numpy as np

from ..language.diagnostics import Span
from ..language.exact import float_rows

VERDICTS = ("proved", "checked", "warning", "failed", "info")


@attrs.frozen
class Proof:
    """One claim about a spec and how it was established.

    verdict: "proved" (exactly, for every parameter value), "checked" (numerically, or
    only at the initial parameter values: ``detail`` says which), "warning", "failed",
    or "info" (a fact, e.g. which variables are noised).
    """

    name: str
    verdict: str = attrs.field(validator=attrs.validators.in_(VERDICTS))
    detail: str
    span: Span | None = attrs.field(default=None, eq=False)
    data: tuple = ()

    @property
    def ok(self) -> bool:
        return self.verdict != "failed"


@attrs.frozen
class Report:
    """The proofs about a spec, JSON-ready facts, and B(t) = ∫₀ᵗ beta in closed form (None
    when there is none, or when beta(t) was rejected): integrated once here, the lowering
    carries it into the emitted module."""

    proofs: tuple
    facts: tuple  # ((key, value), ...) JSON-ready values
    B: object = attrs.field(default=None, eq=False)

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.proofs)

    def fact(self, key, default=None):
        return next((v for k, v in self.facts if k == key), default)


def block_span(spec, name: str):
    """Where block ``name`` ("Q", "D" or "drift") is written, in any form of the process.

    Recipe form: the Q or D statement (an unwritten Q, which is 0, points at the state
    declaration). Matrices form: the drift or diffusion matrix. Equations form: the data
    variable's equation for the drift, the first equation with a noise term for D.
    """
    if spec.form == "recipe":
        return spec.span_of("D" if name == "drift" else name) or spec.span_of("state")
    if spec.form == "matrices":
        return spec.span_of("diffusion" if name == "D" else "drift")
    if name == "D":
        noised = [v for v, n in zip(spec.variables, spec.noised) if n]
        return spec.span_of(("eq", (noised or spec.variables)[0]))
    return spec.span_of(("eq", spec.data))


def numeric(matrix):
    return np.array(float_rows(matrix), dtype=float)


def matrix_text(matrix) -> list:
    """JSON-ready nested lists of strings, exact where possible."""
    return [[str(matrix[i, j]) for j in range(matrix.cols)] for i in range(matrix.rows)]
