"""Learnable blocks: symbolic matrices for the proofs, checked initial values.

Every parameterization keeps its constraint for every parameter value:
  skew      Q = W - Wᵀ, W strictly lower triangular (masked entries fixed at 0)
  psd       D = L Lᵀ, L lower triangular with a positive diagonal
  diagonal  D = diag(d), d > 0
  lowrank   D = B Bᵀ, B of size n x r
on the sub-block of the variables listed in ``on (...)`` (all variables by default);
entries outside that sub-block are zero.

``random(std, seed)`` draws the free entries: skew W ~ N(0, std²); psd L = I + strictly
lower N(0, std²); diagonal d = exp(N(0, std²)); lowrank B ~ N(0, std²).
"""
from __future__ import annotations

import numpy as np
import sympy as sp


class InitError(ValueError):
    """The stated initial value does not fit the block's parameterization."""


def symbols(block: str, kind: str, over: tuple, rank: int | None, mask=None) -> dict:
    """Free symbols of a block by role, named so no spec identifier can collide."""
    n = len(over)
    if kind == "skew":
        return {(i, j): sp.Symbol(f"{block}{{{over[i]},{over[j]}}}", real=True)
                for i in range(n) for j in range(i) if mask is None or mask[i, j] != 0}
    if kind == "psd":
        return {(i, j): sp.Symbol(f"L{block}{{{over[i]},{over[j]}}}", positive=True) if i == j
                else sp.Symbol(f"L{block}{{{over[i]},{over[j]}}}", real=True)
                for i in range(n) for j in range(i + 1)}
    if kind == "diagonal":
        return {(i, i): sp.Symbol(f"d{block}{{{over[i]}}}", positive=True) for i in range(n)}
    return {(i, j): sp.Symbol(f"B{block}{{{over[i]},{j + 1}}}", real=True) for i in range(n) for j in range(rank)}


def sub_block(kind: str, syms: dict, n: int, rank: int | None) -> sp.Matrix:
    """The n x n value of the block on its variables, in terms of its symbols."""
    if kind == "skew":
        W = sp.zeros(n, n)
        for (i, j), s in syms.items():
            W[i, j] = s
        return W - W.T
    if kind == "diagonal":
        return sp.diag(*[syms[(i, i)] for i in range(n)])
    if kind == "psd":
        L = sp.zeros(n, n)
        for (i, j), s in syms.items():
            L[i, j] = s
        return L * L.T
    B = sp.Matrix(n, rank, lambda i, j: syms[(i, j)])
    return B * B.T


def embed(sub: sp.Matrix, index: list, K: int) -> sp.ImmutableMatrix:
    full = sp.zeros(K, K)
    for a, i in enumerate(index):
        for b, j in enumerate(index):
            full[i, j] = sub[a, b]
    return sp.ImmutableMatrix(full)


def random_init(kind: str, n: int, rank: int | None, std: float, seed: int, mask=None) -> sp.Matrix:
    """The sub-block value drawn by random(std, seed), as exact binary rationals."""
    rng = np.random.default_rng(seed)
    if kind == "skew":
        W = np.tril(rng.normal(0.0, std, (n, n)), -1)
        if mask is not None:
            W = W * np.array(mask.tolist(), dtype=float)
        value = W - W.T
    elif kind == "psd":
        L = np.eye(n) + np.tril(rng.normal(0.0, std, (n, n)), -1)
        value = L @ L.T
    elif kind == "diagonal":
        value = np.diag(np.exp(rng.normal(0.0, std, n)))
    else:
        B = rng.normal(0.0, std, (n, rank))
        value = B @ B.T
    return sp.Matrix(n, n, lambda i, j: sp.Rational(float(value[i, j])))


def check_init(kind: str, sub: sp.Matrix, rank: int | None, mask=None) -> None:
    """Raise InitError unless the sub-block init lies in the parameterization's range."""
    n = sub.rows
    numeric = np.array(sub.evalf(30).tolist(), dtype=float)
    if kind == "skew":
        if not (sub + sub.T).is_zero_matrix:
            raise InitError("initial value of a skew block must be skew-symmetric")
        if mask is not None and any(sub[i, j] != 0 and mask[i, j] == 0 for i in range(n) for j in range(n)):
            raise InitError("initial value is nonzero where the mask fixes the entry to zero")
        return
    if not (sub - sub.T).is_zero_matrix:
        raise InitError("initial value must be symmetric")
    eig = np.linalg.eigvalsh(numeric)
    scale = max(1.0, float(np.abs(eig).max()))
    if kind == "diagonal":
        if any(sub[i, j] != 0 for i in range(n) for j in range(n) if i != j):
            raise InitError("initial value of a diagonal block must be diagonal")
        if eig.min() <= 0:
            raise InitError("diagonal entries must be positive (the parameterization is d = softplus(raw) > 0)")
    elif kind == "psd":
        if eig.min() <= 1e-12 * scale:
            raise InitError(f"initial value must be positive definite for D = L Lᵀ with a positive diagonal "
                            f"(smallest eigenvalue {eig.min():.3g}); restrict the block with 'on (...)' instead")
    else:
        if eig.min() < -1e-12 * scale:
            raise InitError(f"initial value is not positive semi-definite (eigenvalue {eig.min():.3g})")
        if int((eig > 1e-12 * scale).sum()) > rank:
            raise InitError(f"initial value has rank {int((eig > 1e-12 * scale).sum())}, more than lowrank({rank})")
