"""Every number the kernels compute with lies within floating-point reach.

T, t_min, Σ∞, the initial covariance, and Q and D (at the initial parameter values) must
have entries that are 0 or between SMALLEST and LARGEST in size. Exact arithmetic accepts
2^4000; a float64 kernel does not, and eigenvalues computed in floating point from such
entries are meaningless. Reported only when it fails: the other proofs then do not run.
"""
from __future__ import annotations

from decimal import Decimal

import sympy as sp

from .proofs import Proof

LARGEST = sp.Integer(10) ** 30
SMALLEST = sp.Rational(1, 10 ** 30)


def check_ranges(spec):
    for label, value, span in _numbers(spec):
        size = abs(value) if value.is_Rational else abs(sp.N(value, 15))
        if size != 0 and not SMALLEST <= size <= LARGEST:
            shown = format(Decimal(str(sp.N(value, 15))).normalize(), ".6g")
            return [Proof("numbers are within floating-point range", "failed",
                          f"{label} = {shown} is out of range: nonzero numbers must lie between 1e-30 and "
                          "1e30 in size", span)]
    return []


def _numbers(spec):
    """(label, exact value, span) for every number that reaches the kernels."""
    names = spec.variables
    yield "T", spec.T, spec.span_of("T")
    yield "t_min", spec.t_min, spec.span_of("t_min")
    for p in spec.params:
        yield f"parameter {p.name}", p.init, p.span
    for i in range(spec.K):
        for j in range(spec.K):
            yield f"Σ∞[{names[i]}, {names[j]}]", spec.target[i, j], spec.span_of("target")
    aux = spec.auxiliaries
    for i in range(len(aux)):
        for j in range(len(aux)):
            yield (f"initial covariance [{aux[i]}, {aux[j]}]", spec.aux_init[i, j],
                   spec.span_of(("init", aux[i])))
    Q0, D0 = spec.at_init()
    for name, M in (("Q", Q0), ("D", D0)):
        for i in range(spec.K):
            for j in range(spec.K):
                yield f"{name}[{names[i]}, {names[j]}]", M[i, j], _entry_span(spec, name, i, j)


def _entry_span(spec, name, i, j):
    if spec.form == "recipe":
        return spec.span_of((name, i, j)) or spec.span_of(name)
    if name == "D":
        return spec.span_of("diffusion") or spec.span_of(("eq", spec.variables[i]))
    return spec.span_of(("drift", i, j)) or spec.span_of("drift") or spec.span_of(("eq", spec.variables[i]))
