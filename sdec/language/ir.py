"""The checked intermediate representation of a spec.

All values are exact sympy objects (rationals, symbols, sqrt, pi, ...); they become
floats only when lowered. Positions live in ``spans`` and proofs in ``report``; both are
excluded from equality, so a spec printed back to text and parsed again compares equal.
"""
from __future__ import annotations

import attrs
import sympy as sp

from .diagnostics import Span
from .linalg import exact_inverse

T_SYMBOL = sp.Symbol("t", nonnegative=True)  # the time variable of beta(t), drift, diffusion
DEFAULT_T_MIN = sp.Rational(1, 1000)          # t_min when the spec does not set it
FORMS = ("recipe", "matrices", "equations")
LEARN_KINDS = ("skew", "psd", "diagonal", "lowrank")


@attrs.frozen
class Param:
    """A learnable scalar: ``param a = 0.5`` or ``param g > 0 = 2``."""

    name: str
    positive: bool
    init: sp.Expr
    span: Span | None = attrs.field(eq=False, default=None, repr=False)

    @property
    def symbol(self) -> sp.Symbol:
        return param_symbol(self.name, self.positive)


def param_symbol(name: str, positive: bool) -> sp.Symbol:
    return sp.Symbol(name, positive=True) if positive else sp.Symbol(name, real=True)


@attrs.frozen
class Learned:
    """A whole learnable block: ``learn D: psd on (v, w) init ...``.

    ``over`` lists the variables the block acts on (all by default); entries outside
    that sub-block are zero. ``mask`` (skew only) marks the free entries of the
    sub-block. ``init`` is the full K x K initial value; ``random`` is (std, seed) when
    the init was drawn with ``random(std, seed)``.
    """

    block: str
    kind: str
    rank: int | None
    over: tuple
    mask: sp.ImmutableMatrix | None
    init: sp.ImmutableMatrix
    random: tuple | None = None
    span: Span | None = attrs.field(eq=False, default=None, repr=False)

    @property
    def parameter_count(self) -> int:
        n = len(self.over)
        if self.kind == "skew":
            if self.mask is None:
                return n * (n - 1) // 2
            return sum(1 for i in range(n) for j in range(i) if self.mask[i, j] != 0)
        if self.kind == "psd":
            return n * (n + 1) // 2
        if self.kind == "diagonal":
            return n
        return n * self.rank


@attrs.frozen
class Spec:
    name: str
    variables: tuple
    constants: tuple          # ((name, value), ...)
    params: tuple             # (Param, ...)
    T: sp.Expr
    t_min: sp.Expr
    beta: sp.Expr             # in T_SYMBOL
    target: sp.ImmutableMatrix        # Σ∞, K x K
    aux_init: sp.ImmutableMatrix      # covariance of q(v0|x), (K-1) x (K-1)
    form: str                 # one of FORMS
    Q: sp.ImmutableMatrix
    D: sp.ImmutableMatrix
    learned: tuple = ()       # (Learned, ...)
    drift: sp.ImmutableMatrix | None = None      # F(t) as written (matrices/equations forms)
    diffusion: sp.ImmutableMatrix | None = None  # G(t) as written (matrices/equations forms)
    wiener: tuple = ()        # Brownian motion names (equations form)
    spans: tuple = attrs.field(eq=False, default=(), repr=False)
    source: str | None = attrs.field(eq=False, default=None, repr=False)
    filename: str | None = attrs.field(eq=False, default=None, repr=False)
    report: object = attrs.field(eq=False, default=None, repr=False)

    @property
    def K(self) -> int:
        return len(self.variables)

    @property
    def data(self) -> str:
        return self.variables[0]

    @property
    def auxiliaries(self) -> tuple:
        return self.variables[1:]

    @property
    def t(self) -> sp.Symbol:
        return T_SYMBOL

    @property
    def A(self) -> sp.ImmutableMatrix:
        """The constant matrix with F(t) = beta(t) A: A = -(Q + D) Σ∞⁻¹."""
        return sp.ImmutableMatrix(-(self.Q + self.D) * exact_inverse(self.target))

    @property
    def F(self) -> sp.ImmutableMatrix:
        return sp.ImmutableMatrix(self.beta * self.A)

    @property
    def GGT(self) -> sp.ImmutableMatrix:
        return sp.ImmutableMatrix(2 * self.beta * self.D)

    @property
    def symbols(self) -> tuple:
        """Every learnable symbol in Q and D, sorted by name."""
        free = (self.Q.free_symbols | self.D.free_symbols) - {T_SYMBOL}
        return tuple(sorted(free, key=lambda s: s.name))

    @property
    def noised(self) -> tuple:
        """Per variable: does noise enter it directly (D_ii not identically zero)?"""
        return tuple(self.D[i, i] != 0 for i in range(self.K))

    @property
    def parameter_count(self) -> int:
        return len(self.params) + sum(b.parameter_count for b in self.learned)

    def at_init(self) -> tuple:
        """(Q, D) with every learnable symbol replaced by its initial value (exact)."""
        subs = {p.symbol: p.init for p in self.params}
        Q, D = self.Q.subs(subs), self.D.subs(subs)
        for block in self.learned:
            if block.block == "Q":
                Q = block.init
            else:
                D = block.init
        return sp.ImmutableMatrix(Q), sp.ImmutableMatrix(D)

    def span_of(self, key) -> Span | None:
        for k, span in self.spans:
            if k == key:
                return span
        return None
