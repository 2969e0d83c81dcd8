"""The process part of the builder: recipe (Q, D, learn), matrices (drift, diffusion)
or equations (dx = ... dt + ... dW). Everything is reduced to Q, D with
F(t) = -beta(t) (Q + D) Σ∞⁻¹ and G Gᵀ(t) = 2 beta(t) D.
"""
from __future__ import annotations

import sympy as sp

from . import learn
from . import syntax as S
from .evaluate import T_SYMBOL, Scope, is_matrix, shape_text
from .ir import Learned

_TARGETS = ("T", "t_min", "Q", "D", "drift", "diffusion")


def build_process(b, beta, target):
    for stmt in b.of(S.AssignStmt):
        if stmt.target.name not in _TARGETS:
            b.err(stmt.target.span, f"cannot assign to '{stmt.target.name}'",
                  f"declare constants with 'const {stmt.target.name} = ...'; assignable: {', '.join(_TARGETS)}")
    for stmt in b.of(S.EntryStmt):
        if stmt.target.name not in ("Q", "D", "drift"):
            b.err(stmt.target.span, f"entries can be assigned in Q, D or drift, not '{stmt.target.name}'")
    recipe = [s for s in b.stmts if _names(s) in ("Q", "D")] + b.of(S.LearnStmt)
    matrices = [s for s in b.stmts if _names(s) in ("drift", "diffusion")]
    equations = b.of(S.EquationStmt)
    used = [(k, v) for k, v in (("recipe", recipe), ("matrices", matrices), ("equations", equations)) if v]
    if not used:
        b.err(b.top(), "the process is not declared",
              "give Q and D (recipe form), drift and diffusion matrices, or one equation 'dx = ... dt + ... dW' per variable")
        return None
    if len(used) > 1:
        first, second = used[0], used[1]
        b.err(second[1][0].span, f"the process is declared in two forms ({first[0]} at line "
              f"{first[1][0].span.line} and {second[0]} here); use one")
        return None
    form = used[0][0]
    if form == "recipe":
        return _recipe(b, target)
    if beta is None or target is None:
        return None
    if form == "matrices":
        return _explicit(b, beta, target, *_matrices(b, beta), form)
    return _explicit(b, beta, target, *_equations(b, beta), form)


def _names(stmt):
    return stmt.target.name if isinstance(stmt, (S.AssignStmt, S.EntryStmt)) else None


# ---- shared: a block given whole or entry by entry --------------------------------

def _block(b, name, scope, cols=None):
    """Q, D or drift from 'X = matrix' or 'X[a, b] = value' statements; None if absent."""
    K = b.K
    whole = b.assignments(name)
    entries = [s for s in b.of(S.EntryStmt) if s.target.name == name]
    if whole is not None and entries:
        b.err(entries[0].span, f"{name} is given whole at line {whole.span.line} and entry by entry here; use one")
        return None
    if whole is not None:
        value = b.value(whole.value, scope)
        if value is None:
            return None
        if not is_matrix(value) or value.shape != (K, K):
            b.err(whole.value.span, f"{name} must be a {K}x{K} matrix (one row and column per state variable), got a {shape_text(value)}")
            return None
        b.where(name, whole.value.span)
        _entry_spans(b, name, whole.value)
        return value
    if not entries:
        return None
    out = sp.zeros(K, K)
    seen = {}
    for stmt in entries:
        idx = []
        for ident in (stmt.row, stmt.col):
            if ident.name not in b.variables:
                b.err(ident.span, f"'{ident.name}' is not a state variable (state: {', '.join(b.variables)})")
            idx.append(b.variables.index(ident.name) if ident.name in b.variables else None)
        value = b.value(stmt.value, scope, expect="scalar")
        if None in idx or value is None:
            continue
        key = tuple(idx)
        if key in seen:
            b.err(stmt.span, f"{name}[{stmt.row.name}, {stmt.col.name}] is assigned twice (first at line {seen[key]})")
            continue
        seen[key] = stmt.span.line
        out[key] = value
        b.where((name,) + key, stmt.value.span)
    b.where(name, entries[0].span)
    return sp.ImmutableMatrix(out)


def _entry_spans(b, name, node):
    if isinstance(node, S.Bracket) and all(isinstance(r, S.Bracket) for r in node.items):
        for i, row in enumerate(node.items):
            for j, item in enumerate(row.items):
                b.where((name, i, j), item.span)


# ---- recipe form ---------------------------------------------------------------------

def _recipe(b, target):
    scope = b.scope()
    learned = {}
    for stmt in b.of(S.LearnStmt):
        block = _learned(b, stmt)
        if block is None:
            continue
        if block[0].block in learned:
            b.err(stmt.span, f"{block[0].block} is learned twice")
            continue
        learned[block[0].block] = block
    blocks = {}
    for name in ("Q", "D"):  # both blocks are looked at, so one run reports the errors of both
        given = _block(b, name, scope)
        if name in learned and given is not None:
            b.err(learned[name][0].span, f"{name} is both given and learned; use one "
                  "(fixed entries and tied entries can be written with 'param')")
        elif name in learned:
            blocks[name] = learned[name][1]
            b.where(name, learned[name][0].span)
        elif given is not None:
            blocks[name] = given
        elif _attempted(b, name):
            pass  # its error is already reported
        elif name == "Q":
            blocks[name] = sp.ImmutableMatrix(sp.zeros(b.K, b.K))
        else:
            b.err(b.top(), "D is not given; without noise nothing diffuses", "add 'D = ...' or 'learn D: psd ...'")
    if len(blocks) < 2:
        return None
    learned_tuple = tuple(v[0] for k, v in sorted(learned.items()))
    return "recipe", blocks["Q"], blocks["D"], learned_tuple, None, None, ()


def _attempted(b, name) -> bool:
    """Was block `name` written at all (whole, entry by entry or learned)?"""
    return (b.assignments(name) is not None or any(s.target.name == name for s in b.of(S.EntryStmt))
            or any(s.block.name == name for s in b.of(S.LearnStmt)))


def _learned(b, stmt):
    block, kind = stmt.block.name, stmt.kind.name
    if block not in ("Q", "D"):
        b.err(stmt.block.span, f"only Q and D can be learned, not '{block}'")
        return None
    allowed = ("skew",) if block == "Q" else ("psd", "diagonal", "lowrank")
    if kind not in allowed:
        b.err(stmt.kind.span, f"{block} cannot be learned as '{kind}'; choose {' or '.join(allowed)}")
        return None
    rank = _rank(b, stmt, kind)
    if rank is False:
        return None
    over = _over(b, stmt)
    if over is None:
        return None
    n = len(over)
    mask = _mask(b, stmt, kind, n)
    if mask is False:
        return None
    init, random = _init(b, stmt, kind, over, rank, mask)
    if init is None:
        return None
    index = [b.variables.index(v) for v in over]
    syms = learn.symbols(block, kind, over, rank, mask)
    symbolic = learn.embed(learn.sub_block(kind, syms, n, rank), index, b.K)
    entry = Learned(block, kind, rank, over, mask, init, random, stmt.span)
    return entry, symbolic


def _rank(b, stmt, kind):
    if kind != "lowrank":
        if stmt.rank is not None:
            b.err(stmt.rank.span, f"'{kind}' takes no rank")
            return False
        return None
    if stmt.rank is None:
        b.err(stmt.kind.span, "lowrank needs a rank, e.g. lowrank(1)")
        return False
    text = stmt.rank.text.replace("_", "")
    if not text.isdigit() or not 1 <= int(text) <= b.K:
        b.err(stmt.rank.span, f"rank must be a whole number from 1 to {b.K}")
        return False
    return int(text)


def _over(b, stmt):
    if stmt.over is None:
        return b.variables
    names = [i.name for i in stmt.over]
    for ident in stmt.over:
        if ident.name not in b.variables:
            b.err(ident.span, f"'{ident.name}' is not a state variable")
            return None
    if len(set(names)) != len(names):
        b.err(stmt.over[0].span, "a variable is listed twice")
        return None
    return tuple(v for v in b.variables if v in names)


def _mask(b, stmt, kind, n):
    if stmt.mask is None:
        return None
    if kind != "skew":
        b.err(stmt.mask.span, "masks apply to skew blocks; restrict PSD blocks with 'on (...)', which keeps them PSD")
        return False
    value = b.value(stmt.mask, Scope(constants=b.constants, size=n))
    if value is None:
        return False
    if not is_matrix(value) or value.shape != (n, n) or any(x not in (0, 1) for x in value):
        b.err(stmt.mask.span, f"the mask must be a {n}x{n} matrix of 0s and 1s")
        return False
    if value != value.T:
        b.err(stmt.mask.span, "a skew block's mask must be symmetric (Q[i,j] and Q[j,i] are one parameter)")
        return False
    return sp.ImmutableMatrix(value)


def _init(b, stmt, kind, over, rank, mask):
    node, n = stmt.init, len(over)
    index = [b.variables.index(v) for v in over]
    random = None
    if isinstance(node, S.Call) and node.func.name == "random":
        args = [b.value(a, Scope(constants=b.constants, size=b.K), expect="scalar") for a in node.args]
        if len(args) != 2:
            b.err(node.span, "write random(std, seed)")
            return None, None
        if None in args:
            return None, None  # already reported
        std, seed = args
        if not (std.is_number and std.is_positive) or not (seed.is_Integer and 0 <= seed < 2**32):
            b.err(node.span, "random(std, seed) needs std > 0 and a whole seed in [0, 2^32)")
            return None, None
        random = (std, int(seed))
        sub = learn.random_init(kind, n, rank, float(std), int(seed), mask)
        full = learn.embed(sub, index, b.K)
    else:
        full = b.value(node, Scope(constants=b.constants, size=b.K))
        if full is None:
            return None, None
        if not is_matrix(full) or full.shape != (b.K, b.K):
            b.err(node.span, f"the initial value must be a {b.K}x{b.K} matrix, got a {shape_text(full)}")
            return None, None
        outside = [(i, j) for i in range(b.K) for j in range(b.K)
                   if (i not in index or j not in index) and full[i, j] != 0]
        if outside:
            i, j = outside[0]
            b.err(node.span, f"initial value is nonzero at [{b.variables[i]}, {b.variables[j]}], outside the learned variables")
            return None, None
        sub = sp.Matrix(n, n, lambda a, c: full[index[a], index[c]])
    try:
        learn.check_init(kind, sub, rank, mask)
    except learn.InitError as exc:
        b.err(node.span, str(exc))
        return None, None
    return sp.ImmutableMatrix(full), random


# ---- explicit forms ------------------------------------------------------------------

def _time_scope(b, beta, state=None):
    return Scope(constants=b.constants, params=b.params, state=state or {}, time=True, beta=beta, size=b.K)


def _matrices(b, beta):
    scope = _time_scope(b, beta)
    drift = _block(b, "drift", scope)
    stmt = b.assignments("diffusion")
    if drift is None:
        if not _attempted(b, "drift"):
            b.err(stmt.span if stmt else b.top(), "the drift matrix is missing", "add 'drift = [[...]]'")
        return None, None, ()
    if stmt is None:
        b.err(b.span_of("drift"), "the diffusion matrix is missing", "add 'diffusion = [[...]]' (K rows, one column per Brownian motion)")
        return None, None, ()
    G = b.value(stmt.value, scope)
    if G is None:
        return None, None, ()
    if not is_matrix(G) or G.rows != b.K:
        b.err(stmt.value.span, f"diffusion must have {b.K} rows (one per state variable), got a {shape_text(G)}")
        return None, None, ()
    b.where("diffusion", stmt.value.span)
    return drift, G, ()


def _equations(b, beta):
    state = {v: sp.Symbol(v, real=True) for v in b.variables}
    scope = _time_scope(b, beta, state)
    by_var, seen, noise_terms = {}, {}, {}
    for stmt in b.of(S.EquationStmt):
        var = stmt.target.name[1:] if stmt.target.name.startswith("d") else None
        if var not in b.variables:
            b.err(stmt.target.span, f"'{stmt.target.name}' does not name the differential of a state variable",
                  f"write one of: {', '.join('d' + v for v in b.variables)}")
            continue
        if var in seen:
            b.err(stmt.span, f"d{var} has two equations (first at line {seen[var]})")
            continue
        seen[var] = stmt.span.line  # written, even if rejected below: no "has no equation" on top
        row = _linear_row(b, stmt, scope, state)
        if row is None:
            continue
        by_var[var] = row
        b.where(("eq", var), stmt.span)
        for noise in stmt.noises:
            _noise_term(b, noise, var, scope, state, noise_terms)
    missing = [v for v in b.variables if v not in seen]
    for v in missing:
        b.err(b.span_of(("var", v)), f"state variable '{v}' has no equation", f"add 'd{v} = ... dt'")
    if len(by_var) != b.K:
        return None, None, ()
    F = sp.ImmutableMatrix([by_var[v] for v in b.variables])
    # canonical columns: sorted names, and a Brownian motion that enters nowhere is dropped
    wiener = sorted({w for (_, w), c in noise_terms.items() if sp.simplify(c) != 0})
    if not wiener:
        if not any(s.noises for s in b.of(S.EquationStmt)):
            b.err(b.top(), "no equation has a noise term ('+ ... dW'); nothing diffuses")
        elif not any(d.severity == "error" for d in b.diags):
            b.err(b.span_of(("eq", b.variables[0])), "every noise coefficient is zero; nothing diffuses")
        return None, None, ()
    G = sp.ImmutableMatrix(b.K, len(wiener), lambda i, j: noise_terms.get((b.variables[i], wiener[j]), 0))
    return F, G, tuple(wiener)


def _noise_term(b, noise, var, scope, state, noise_terms):
    """Add one '± c dW[_name]' term of var's equation into noise_terms[(var, name)]."""
    name = noise.wiener.name[3:] if noise.wiener.name.startswith("dW_") else var
    coeff = sp.Integer(1) if noise.coeff is None else b.value(noise.coeff, scope, expect="scalar")
    if coeff is None:
        return
    if coeff.free_symbols & set(state.values()):
        b.err(noise.coeff.span, "the noise coefficient depends on the state; sdec handles additive noise only")
        return
    key = (var, name)
    noise_terms[key] = noise_terms.get(key, 0) + (coeff if noise.sign == "+" else -coeff)


def _linear_row(b, stmt, scope, state):
    expr = b.value(stmt.drift, scope, expect="scalar")
    if expr is None:
        return None
    symbols = list(state.values())
    row = [sp.diff(expr, s) for s in symbols]
    rest = sp.expand(expr - sum(c * s for c, s in zip(row, symbols)))
    if rest != 0 or any(c.free_symbols & set(symbols) for c in row):
        b.err(stmt.drift.span, f"the drift of {stmt.target.name} is not linear in the state "
              f"(sdec compiles linear diffusions: dy = F(t) y dt + G(t) dW)")
        return None
    return row


def _explicit(b, beta, target, F, G, wiener, form):
    if F is None or G is None:
        return None
    A = sp.ImmutableMatrix(F.applyfunc(lambda e: sp.simplify(e / beta)))
    bad = [(i, j) for i in range(b.K) for j in range(b.K) if T_SYMBOL in A[i, j].free_symbols]
    if bad:
        i, j = bad[0]
        b.err(b.span_of(("drift", i, j)) or b.span_of("drift") or b.span_of(("eq", b.variables[i])),
              f"the drift is not beta(t) times a constant matrix: entry [{b.variables[i]}, {b.variables[j]}] "
              f"divided by beta(t) is {A[i, j]}, which depends on t")
        return None
    GGT = G * G.T
    D = sp.ImmutableMatrix((GGT / (2 * beta)).applyfunc(sp.simplify))
    if any(T_SYMBOL in d.free_symbols for d in D):
        b.err(b.span_of("diffusion") or b.span_of(("eq", b.variables[0])),
              "G Gᵀ(t) is not 2 beta(t) times a constant matrix; the time change must be shared by drift and noise")
        return None
    Q = sp.ImmutableMatrix((-A * target - D).applyfunc(sp.simplify))
    return form, Q, D, (), sp.ImmutableMatrix(F), sp.ImmutableMatrix(G), wiener
