"""Exact linear algebra over the smallest number field that holds the entries.

sympy's generic Matrix.inv and Matrix.rank simplify every intermediate expression: with
entries like sqrt(2)/10 a 4 x 4 inverse takes seconds and a Kalman rank minutes. Here
the entries are first placed in one field (QQ, or QQ<sqrt(2) + sqrt(3)> and the like, by
sympy's construct_domain with extension=True), where arithmetic and zero tests are exact
and fast. Entries outside any algebraic field (pi, exp(1)) fall back to sympy's domain of
expressions, which is exact but may be slow: callers that must stay fast run these under
a time budget (sdec.language.budget).
"""
from __future__ import annotations

import sympy as sp
from sympy.polys.matrices import DomainMatrix


def field_matrices(*matrices):
    """The matrices as DomainMatrix objects over one common field (same shapes as given)."""
    rows = [list(r) for M in matrices for r in sp.Matrix(M).tolist()]
    width = max(M.cols for M in matrices)
    padded = [r + [sp.Integer(0)] * (width - len(r)) for r in rows]
    big = DomainMatrix.from_list_sympy(len(padded), width, padded, extension=True).to_field()
    out, start = [], 0
    for M in matrices:
        out.append(big.extract(list(range(start, start + M.rows)), list(range(M.cols))))
        start += M.rows
    return out


_INVERSES: dict = {}  # M -> M⁻¹ for the last few matrices (building a field of several roots takes a second)


def exact_inverse(M) -> sp.ImmutableMatrix:
    """M⁻¹, exactly (M square and invertible)."""
    M = sp.ImmutableMatrix(M)
    if M not in _INVERSES:
        (dm,) = field_matrices(M)
        remember_inverse(M, dm.inv().to_Matrix())
    return _INVERSES[M]


def remember_inverse(M, inverse) -> None:
    """Keep M⁻¹ computed elsewhere (e.g. inside a larger field computation) for exact_inverse."""
    if len(_INVERSES) >= 16:
        _INVERSES.pop(next(iter(_INVERSES)))
    _INVERSES[sp.ImmutableMatrix(M)] = sp.ImmutableMatrix(inverse)
