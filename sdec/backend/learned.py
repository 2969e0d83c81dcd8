"""Learnable parameters in the kernel plan: the raw tensors the emitted module trains.

A ``param g > 0`` is stored raw through softplus; a learned block by its parameterization
(sdec.language.learn): skew W below the diagonal, psd L with a softplus diagonal, diagonal
d through softplus, lowrank the n x r factor B. Raw initial values are derived here from
the spec's exact initial values.
"""
from __future__ import annotations

import math

import attrs
import numpy as np
import sympy as sp

from ..language.exact import float_rows


@attrs.frozen
class ParamPlan:
    attr: str           # attribute name in the generated module
    symbol: sp.Symbol
    positive: bool
    raw_init: float


@attrs.frozen
class BlockPlan:
    """A learned block: its parameter tensors and index literals."""

    block: str
    kind: str
    index: tuple        # global indices of the learned variables
    rank: int | None
    entries: tuple      # skew: ((i, j), ...) global (row > col) positions of free entries
    raw_init: tuple     # flat float values of the raw parameter(s)
    attrs_: tuple       # generated parameter attribute names


def inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def param_plan(p) -> ParamPlan:
    init = float(sp.N(p.init, 30))
    return ParamPlan(f"p_{p.name}", p.symbol, p.positive, inverse_softplus(init) if p.positive else init)


def block_plan(b, spec) -> BlockPlan:
    index = tuple(spec.variables.index(v) for v in b.over)
    init = np.array(float_rows(b.init))
    sub = init[np.ix_(index, index)]
    n = len(index)
    if b.kind == "skew":
        entries = tuple((index[i], index[j]) for i in range(n) for j in range(i)
                        if b.mask is None or b.mask[i, j] != 0)
        raw = tuple(float(init[i, j]) for i, j in entries)
        return BlockPlan(b.block, b.kind, index, None, entries, (raw,), (f"theta_{b.block}",))
    if b.kind == "diagonal":
        raw = tuple(inverse_softplus(float(sub[i, i])) for i in range(n))
        return BlockPlan(b.block, b.kind, index, None, (), (raw,), (f"theta_{b.block}",))
    if b.kind == "psd":
        L = np.linalg.cholesky(sub)
        off = tuple((index[i], index[j]) for i in range(n) for j in range(i))
        raw_off = tuple(float(L[i, j]) for i in range(n) for j in range(i))
        raw_diag = tuple(inverse_softplus(float(L[i, i])) for i in range(n))
        return BlockPlan(b.block, b.kind, index, None, off, (raw_off, raw_diag),
                         (f"theta_{b.block}_offdiag", f"theta_{b.block}_diag"))
    w, V = np.linalg.eigh(sub)
    order = np.argsort(w)[::-1][: b.rank]
    Bm = V[:, order] * np.sqrt(np.clip(w[order], 0.0, None))  # rank ≤ r was checked by the builder
    return BlockPlan(b.block, b.kind, index, b.rank, (), (tuple(float(x) for x in Bm.reshape(-1)),),
                     (f"theta_{b.block}",))
