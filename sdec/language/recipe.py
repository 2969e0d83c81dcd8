"""The recipe form of the process: Q and D given (whole or entry by entry) or learned
(``learn Q: skew``, ``learn D: psd | diagonal | lowrank(r)``, optionally ``on (...)``).

A mixin of the Builder (sdec.language.build), which supplies the statements, scopes,
``value``, ``err`` and ``block``.
"""
from __future__ import annotations

import sympy as sp

from . import learn
from . import syntax as S
from .exact import Scope, is_matrix, shape_text
from .ir import Learned


class RecipeForm:
    """F(t) = -beta(t) (Q + D) Σ∞⁻¹ and G Gᵀ(t) = 2 beta(t) D from the blocks as written."""

    def recipe(self, target):
        scope = self.scope()
        learned = {}
        for stmt in self.of(S.LearnStmt):
            block = self.learned_block(stmt)
            if block is None:
                continue
            if block[0].block in learned:
                self.err(stmt.span, f"{block[0].block} is learned twice")
                continue
            learned[block[0].block] = block
        blocks = {}
        for name in ("Q", "D"):  # both blocks are looked at, so one run reports the errors of both
            given = self.block(name, scope)
            if name in learned and given is not None:
                self.err(learned[name][0].span, f"{name} is both given and learned; use one "
                         "(fixed entries and tied entries can be written with 'param')")
            elif name in learned:
                blocks[name] = learned[name][1]
                self.where(name, learned[name][0].span)
            elif given is not None:
                blocks[name] = given
            elif self.attempted(name):
                pass  # its error is already reported
            elif name == "Q":
                blocks[name] = sp.ImmutableMatrix(sp.zeros(self.K, self.K))
            else:
                self.err(self.top(), "D is not given; without noise nothing diffuses", "add 'D = ...' or 'learn D: psd ...'")
        if len(blocks) < 2:
            return None
        learned_tuple = tuple(v[0] for k, v in sorted(learned.items()))
        return "recipe", blocks["Q"], blocks["D"], learned_tuple, None, None, ()

    def learned_block(self, stmt):
        block, kind = stmt.block.name, stmt.kind.name
        if block not in ("Q", "D"):
            self.err(stmt.block.span, f"only Q and D can be learned, not '{block}'")
            return None
        allowed = ("skew",) if block == "Q" else ("psd", "diagonal", "lowrank")
        if kind not in allowed:
            self.err(stmt.kind.span, f"{block} cannot be learned as '{kind}'; choose {' or '.join(allowed)}")
            return None
        rank = self._learned_rank(stmt, kind)
        if rank is False:
            return None
        over = self._learned_over(stmt)
        if over is None:
            return None
        n = len(over)
        mask = self._learned_mask(stmt, kind, n)
        if mask is False:
            return None
        init, random = self._learned_init(stmt, kind, over, rank, mask)
        if init is None:
            return None
        index = [self.variables.index(v) for v in over]
        syms = learn.symbols(block, kind, over, rank, mask)
        symbolic = learn.embed(learn.sub_block(kind, syms, n, rank), index, self.K)
        entry = Learned(block, kind, rank, over, mask, init, random, stmt.span)
        return entry, symbolic

    def _learned_rank(self, stmt, kind):
        if kind != "lowrank":
            if stmt.rank is not None:
                self.err(stmt.rank.span, f"'{kind}' takes no rank")
                return False
            return None
        if stmt.rank is None:
            self.err(stmt.kind.span, "lowrank needs a rank, e.g. lowrank(1)")
            return False
        text = stmt.rank.text.replace("_", "")
        if not text.isdigit() or not 1 <= int(text) <= self.K:
            self.err(stmt.rank.span, f"rank must be a whole number from 1 to {self.K}")
            return False
        return int(text)

    def _learned_over(self, stmt):
        if stmt.over is None:
            return self.variables
        names = [i.name for i in stmt.over]
        for ident in stmt.over:
            if ident.name not in self.variables:
                self.err(ident.span, f"'{ident.name}' is not a state variable")
                return None
        if len(set(names)) != len(names):
            self.err(stmt.over[0].span, "a variable is listed twice")
            return None
        return tuple(v for v in self.variables if v in names)

    def _learned_mask(self, stmt, kind, n):
        if stmt.mask is None:
            return None
        if kind != "skew":
            self.err(stmt.mask.span, "masks apply to skew blocks; restrict PSD blocks with 'on (...)', which keeps them PSD")
            return False
        value = self.value(stmt.mask, Scope(constants=self.constants, size=n))
        if value is None:
            return False
        if not is_matrix(value) or value.shape != (n, n) or any(x not in (0, 1) for x in value):
            self.err(stmt.mask.span, f"the mask must be a {n}x{n} matrix of 0s and 1s")
            return False
        if value != value.T:
            self.err(stmt.mask.span, "a skew block's mask must be symmetric (Q[i,j] and Q[j,i] are one parameter)")
            return False
        return sp.ImmutableMatrix(value)

    def _learned_init(self, stmt, kind, over, rank, mask):
        node, n = stmt.init, len(over)
        index = [self.variables.index(v) for v in over]
        random = None
        if isinstance(node, S.Call) and node.func.name == "random":
            args = [self.value(a, Scope(constants=self.constants, size=self.K), expect="scalar") for a in node.args]
            if len(args) != 2:
                self.err(node.span, "write random(std, seed)")
                return None, None
            if None in args:
                return None, None  # already reported
            std, seed = args
            if not (std.is_number and std.is_positive) or not (seed.is_Integer and 0 <= seed < 2**32):
                self.err(node.span, "random(std, seed) needs std > 0 and a whole seed in [0, 2^32)")
                return None, None
            random = (std, int(seed))
            sub = learn.random_init(kind, n, rank, float(std), int(seed), mask)
            full = learn.embed(sub, index, self.K)
        else:
            value = self.value(node, Scope(constants=self.constants, size=self.K))
            if value is None:
                return None, None
            sub = self._given_init(node, value, kind, over, rank)
            if sub is None:
                return None, None
            full = learn.embed(sub, index, self.K)
        try:
            learn.check_init(kind, sub, rank, mask)
        except learn.InitError as exc:
            self.err(node.span, str(exc))
            return None, None
        return sp.ImmutableMatrix(full), random

    def _given_init(self, node, value, kind, over, rank):
        """The n x n sub-block from a written initial value: the K x K matrix (zero outside
        the block), the block's own n x n value, or (lowrank(r)) the n x r factor B of B Bᵀ.
        A square n x n value is the block's value even when r = n."""
        K, n = self.K, len(over)
        index = [self.variables.index(v) for v in over]
        shape = value.shape if is_matrix(value) else None
        if shape == (K, K):
            outside = [(i, j) for i in range(K) for j in range(K)
                       if (i not in index or j not in index) and value[i, j] != 0]
            if outside:
                i, j = outside[0]
                self.err(node.span, f"initial value is nonzero at [{self.variables[i]}, {self.variables[j]}], "
                         "outside the learned variables")
                return None
            return sp.Matrix(n, n, lambda a, c: value[index[a], index[c]])
        if shape == (n, n):
            return sp.Matrix(value)
        if kind == "lowrank" and shape == (n, rank):
            return sp.Matrix(value) * sp.Matrix(value).T
        forms = [f"a {K}x{K} matrix"]
        if n != K:
            forms.append(f"the {n}x{n} block on ({', '.join(over)})")
        if kind == "lowrank" and rank != n:
            forms.append(f"the {n}x{rank} factor B of D = B Bᵀ")
        listed = forms[0] if len(forms) == 1 else ", ".join(forms[:-1]) + " or " + forms[-1]
        self.err(node.span, f"the initial value must be {listed}, got a {shape_text(value)}")
        return None
