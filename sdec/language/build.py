"""Syntax statements → the IR (sdec.language.ir.Spec): name resolution, sizes, forms.

Every user error becomes a Diagnostic pointing at the construct at fault; the builder
goes on after an error where it can, so one run reports several.
"""
from __future__ import annotations

import sympy as sp

from . import syntax as S
from .diagnostics import Diagnostic, Span, error, warning
from .equations import EquationsForm
from .exact import FAILED, FUNCTIONS, EvalError, Scope, evaluate, is_matrix, shape_text
from .explicit import ExplicitForm
from .format import expr_text, number_text
from .ir import DEFAULT_T_MIN, T_SYMBOL, Param, Spec
from .recipe import RecipeForm

MAX_STATE = 8
KEYWORDS = {"sde", "state", "const", "param", "init", "target", "normal", "learn", "on", "mask", "dt"}
RESERVED = KEYWORDS | {"t", "pi", "I", "beta", "random", "T", "t_min", "Q", "D", "drift", "diffusion"} | set(FUNCTIONS)
_TARGETS = ("T", "t_min", "Q", "D", "drift", "diffusion")  # what '=' can assign


class _Abort(Exception):
    """Stop building: a missing piece makes the rest meaningless."""


class Builder(RecipeForm, ExplicitForm, EquationsForm):
    """Statements → Spec. The process forms are mixins, one module each."""

    def __init__(self, statements, filename: str):
        self.stmts = statements
        self.filename = filename
        self.diags: list[Diagnostic] = []
        self.spans: list = []
        self.constants: dict = {}
        self.params: dict = {}
        self.param_list: list = []

    # ---- helpers --------------------------------------------------------------------
    def err(self, span, message, hint=None):
        self.diags.append(error(span, message, hint))

    def where(self, key, span):
        if span is not None:
            self.spans.append((key, span))

    def top(self) -> Span:
        """Where an error about a missing statement points: the 'sde' line, else the end of
        the last statement (never a comment or a blank line)."""
        named = self.of(S.SdeStmt)
        if named:
            return named[0].span
        if self.stmts:
            last = self.stmts[-1].span
            return Span.point(self.filename, last.end_line, last.end_column)
        return Span.point(self.filename, 1, 1)

    def value(self, node, scope, expect=None, uses="state variables appear only in the drift of an equation ('dx = ... dt')"):
        """Evaluate, turning EvalError into a diagnostic; None on failure. `uses` is what the
        message about a state variable used where it cannot be says next."""
        try:
            result = evaluate(node, scope)
        except EvalError as exc:
            if exc.message is not None:
                message = exc.message
                if any(message == f"unknown name '{s.name.name}'" for s in self.of(S.ParamStmt)):
                    message = (f"{message[len('unknown name '):]} is a learnable parameter; parameters can be used "
                               "in Q, D, drift, diffusion and the equations only")
                elif getattr(self, "variables", None) and any(message == f"unknown name '{v}'" for v in self.variables):
                    message = f"{message[len('unknown name '):]} is a state variable; {uses}"
                self.err(exc.span or getattr(node, "span", None), message, exc.hint)
            return None
        if expect == "scalar" and is_matrix(result):
            self.err(node.span, f"expected a scalar, got a {shape_text(result)}")
            return None
        return result

    def of(self, kind):
        return [s for s in self.stmts if isinstance(s, kind)]

    def single(self, kind, what):
        found = self.of(kind)
        for extra in found[1:]:
            self.err(extra.span, f"{what} is declared twice (first at line {found[0].span.line})")
        return found[0] if found else None

    def scope(self, **kw):
        return Scope(constants=self.constants, params=self.params, size=self.K, **kw)

    # ---- the whole spec -------------------------------------------------------------
    def build(self) -> Spec | None:
        try:
            name = self.name()
            self.variables = self.state()
            self.K = len(self.variables)
            self.declare_constants()
            self.declare_params()
            beta = self.beta()
            T, t_min = self.horizon()
            target = self.target()
            aux = self.aux_init()
            process = self.process(beta, target)
        except _Abort:
            return None
        if any(d.severity == "error" for d in self.diags) or None in (beta, T, t_min, target, aux, process):
            return None
        form, Q, D, learned, drift, diffusion, wiener = process
        self.warn_unused()
        return Spec(name=name, variables=self.variables, constants=tuple(self.constants.items()),
                    params=tuple(self.param_list), T=T, t_min=t_min, beta=beta, target=target,
                    aux_init=aux, form=form, Q=Q, D=D, learned=tuple(learned), drift=drift,
                    diffusion=diffusion, wiener=wiener, spans=tuple(self.spans), filename=self.filename)

    def name(self) -> str:
        stmt = self.single(S.SdeStmt, "the spec name ('sde NAME')")
        if stmt is None:  # point at the first statement, where 'sde NAME' belongs
            first = self.stmts[0].span if self.stmts else self.top()
            self.err(Span.point(self.filename, first.line, first.column), "missing the spec name",
                     "start the file with 'sde NAME'")
            return "unnamed"
        self.where("name", stmt.span)
        if stmt.name.name in RESERVED:
            self.err(stmt.name.span, f"'{stmt.name.name}' is reserved and cannot name the spec")
        return stmt.name.name

    def state(self) -> tuple:
        stmt = self.single(S.StateStmt, "the state")
        if stmt is None:
            self.err(self.top(), "missing the state declaration", "declare it as 'state x, v' (data variable first)")
            raise _Abort
        self.where("state", stmt.span)
        seen = set()
        for ident in stmt.names:
            if ident.name in seen:
                self.err(ident.span, f"state variable '{ident.name}' is declared twice")
            elif ident.name in RESERVED:
                self.err(ident.span, f"'{ident.name}' is reserved and cannot name a state variable")
            seen.add(ident.name)
            self.where(("var", ident.name), ident.span)
        if len(stmt.names) > MAX_STATE:
            self.err(stmt.span, f"{len(stmt.names)} state variables; sdec handles at most {MAX_STATE}")
        if any(d.severity == "error" for d in self.diags if d.span and d.span.line == stmt.span.line):
            raise _Abort
        return tuple(i.name for i in stmt.names)

    def check_new_name(self, ident) -> bool:
        name = ident.name
        if name in RESERVED:
            self.err(ident.span, f"'{name}' is reserved and cannot be redefined")
        elif name in self.variables:
            self.err(ident.span, f"'{name}' is already a state variable")
        elif name in self.constants or name in self.params:
            self.err(ident.span, f"'{name}' is defined twice")
        else:
            return True
        return False

    def declare_constants(self):
        for stmt in self.of(S.ConstStmt):
            if not self.check_new_name(stmt.name):
                continue
            value = self.value(stmt.value, self.scope())
            self.constants[stmt.name.name] = FAILED if value is None else value
            self.where(("const", stmt.name.name), stmt.span)

    def declare_params(self):
        for stmt in self.of(S.ParamStmt):
            if not self.check_new_name(stmt.name):
                continue
            positive = stmt.bound is not None
            if positive and stmt.bound.text.replace("_", "").strip("0.") != "":
                self.err(stmt.bound.span, "a parameter bound must be '> 0'")
            self.params[stmt.name.name] = FAILED  # until the initial value is accepted
            init = self.value(stmt.init, Scope(constants=self.constants, size=self.K), expect="scalar")
            if init is None:
                continue
            if init.free_symbols or not init.is_real:
                self.err(stmt.init.span, "a parameter's initial value must be a number")
                continue
            if positive and not init.is_positive:
                self.err(stmt.init.span, f"parameter '{stmt.name.name}' is declared > 0 but starts at {number_text(init)}")
                continue
            param = Param(stmt.name.name, positive, init, stmt.span)
            self.param_list.append(param)
            self.params[param.name] = param.symbol
            self.where(("param", param.name), stmt.span)

    def beta(self):
        funcs = self.of(S.FuncStmt)
        for stmt in funcs:
            if stmt.name.name != "beta":
                self.err(stmt.name.span, f"only beta(t) can be defined, not {stmt.name.name}()")
        funcs = [f for f in funcs if f.name.name == "beta"]
        for extra in funcs[1:]:
            self.err(extra.span, f"beta(t) is defined twice (first at line {funcs[0].span.line})")
        if not funcs:
            self.err(self.top(), "missing the time change beta(t)", "e.g. 'beta(t) = 0.1 + 9.9*t' or 'beta(t) = 4'")
            return None
        stmt = funcs[0]
        self.where("beta", stmt.body.span)
        constants = dict(self.constants)
        if stmt.arg.name != "t":
            self.err(stmt.arg.span, "write the time change as beta(t)")
            return None
        value = self.value(stmt.body, Scope(constants=constants, time=True, size=self.K), expect="scalar",
                           uses="beta(t) may use only t and constants")
        if value is not None and value.free_symbols - {T_SYMBOL}:
            self.err(stmt.body.span, "beta(t) may depend only on t and constants")
            return None
        return value

    def assignments(self, name):
        found = [s for s in self.of(S.AssignStmt) if s.target.name == name]
        for extra in found[1:]:
            self.err(extra.span, f"{name} is assigned twice (first at line {found[0].span.line})")
        return found[0] if found else None

    def horizon(self):
        values = []
        for key, default in (("T", None), ("t_min", DEFAULT_T_MIN)):
            stmt = self.assignments(key)
            if stmt is None:
                if default is None:
                    self.err(self.top(), "missing the time horizon", "e.g. 'T = 1'")
                values.append(default)
                continue
            self.where(key, stmt.value.span)
            value = self.value(stmt.value, Scope(constants=self.constants, size=self.K), expect="scalar")
            if value is not None and not (value.is_number and value.is_positive):
                self.err(stmt.value.span, f"{key} must be a positive number, got {number_text(value) if value.is_number else expr_text(value)}")
                value = None
            values.append(value)
        T, t_min = values
        if T is not None and t_min is not None and not (t_min < T) == True:  # noqa: E712 (sympy relational)
            self.err(self.span_of("t_min") or self.span_of("T") or self.top(), f"t_min = {number_text(t_min)} must be smaller than T = {number_text(T)}")
        return T, t_min

    def span_of(self, key):
        return next((s for k, s in self.spans if k == key), None)

    def target(self):
        stmt = self.single(S.TargetStmt, "the target distribution")
        if stmt is None:
            self.err(self.top(), "missing the target distribution", "e.g. 'target normal(0, I)'")
            return None
        self.where("target", stmt.cov.span)
        self.zero_mean(stmt.mean)
        return self.covariance(stmt.cov, self.K, "the target covariance")

    def zero_mean(self, node):
        value = self.value(node, Scope(constants=self.constants, size=self.K))
        if value is None:
            return
        if (is_matrix(value) and not value.is_zero_matrix) or (not is_matrix(value) and value != 0):
            self.err(node.span, "only zero-mean normal laws are supported: write normal(0, ...)")

    def covariance(self, node, n, what):
        value = self.value(node, Scope(constants=self.constants, size=self.K))
        if value is None:
            return None
        if not is_matrix(value):
            value = sp.ImmutableMatrix(sp.eye(n) * value)
        if value.shape != (n, n):
            self.err(node.span, f"{what} must be {n}x{n}, got a {shape_text(value)}")
            return None
        if value.free_symbols:
            self.err(node.span, f"{what} must be a constant matrix")
            return None
        return sp.ImmutableMatrix(value)

    def aux_init(self):
        aux = self.variables[1:]
        blocks, written = {}, set()
        for stmt in self.of(S.InitStmt):
            names = [i.name for i in stmt.variables]
            bad = [i for i in stmt.variables if i.name not in aux]
            for ident in bad:
                what = "is the data variable; its initial law is the data" if ident.name == self.variables[0] \
                    else "is not an auxiliary state variable"
                self.err(ident.span, f"'{ident.name}' {what}")
            again = [i for i in stmt.variables if any(i.name in b for b in blocks)]
            for ident in again:
                self.err(ident.span, f"initial law of '{ident.name}' is given twice")
            if bad or again or len(set(names)) != len(names):
                continue
            written.update(names)
            self.zero_mean(stmt.mean)
            cov = self.covariance(stmt.cov, len(names), "the initial covariance")
            if cov is not None:
                blocks[tuple(names)] = cov
                for name in names:
                    self.where(("init", name), stmt.cov.span)
        missing = [v for v in aux if not any(v in b for b in blocks)]
        for name in (v for v in missing if v not in written):  # a rejected init is reported already
            self.err(self.span_of(("var", name)), f"auxiliary variable '{name}' has no initial law",
                     f"add 'init {name} ~ normal(0, 0.01)'")
        if missing or len(blocks) != len({tuple(k) for k in blocks}):
            return None
        full = sp.zeros(len(aux), len(aux))
        for names, cov in blocks.items():
            idx = [aux.index(n) for n in names]
            for a, i in enumerate(idx):
                for b, j in enumerate(idx):
                    full[i, j] = cov[a, b]
        return sp.ImmutableMatrix(full)

    # ---- the process: which form, and blocks given whole or entry by entry -------------
    def process(self, beta, target):
        for stmt in self.of(S.AssignStmt):
            if stmt.target.name not in _TARGETS:
                self.err(stmt.target.span, f"cannot assign to '{stmt.target.name}'",
                         f"declare constants with 'const {stmt.target.name} = ...'; assignable: {', '.join(_TARGETS)}")
        for stmt in self.of(S.EntryStmt):
            if stmt.target.name not in ("Q", "D", "drift"):
                self.err(stmt.target.span, f"entries can be assigned in Q, D or drift, not '{stmt.target.name}'")
        recipe = [s for s in self.stmts if _names(s) in ("Q", "D")] + self.of(S.LearnStmt)
        matrices = [s for s in self.stmts if _names(s) in ("drift", "diffusion")]
        equations = self.of(S.EquationStmt)
        used = [(k, v) for k, v in (("recipe", recipe), ("matrices", matrices), ("equations", equations)) if v]
        if not used:
            self.err(self.top(), "the process is not declared",
                     "give Q and D (recipe form), drift and diffusion matrices, or one equation 'dx = ... dt + ... dW' per variable")
            return None
        if len(used) > 1:
            first, second = used[0], used[1]
            self.err(second[1][0].span, f"the process is declared in two forms ({first[0]} at line "
                     f"{first[1][0].span.line} and {second[0]} here); use one")
            return None
        form = used[0][0]
        if form == "recipe":
            return self.recipe(target)
        if beta is None or target is None:
            return None
        if form == "matrices":
            return self.explicit(beta, target, *self.matrices(beta), form)
        return self.explicit(beta, target, *self.equations(beta), form)

    def block(self, name, scope):
        """Q, D or drift from 'X = matrix' or 'X[a, b] = value' statements; None if absent."""
        K = self.K
        whole = self.assignments(name)
        entries = [s for s in self.of(S.EntryStmt) if s.target.name == name]
        if whole is not None and entries:
            self.err(entries[0].span, f"{name} is given whole at line {whole.span.line} and entry by entry here; use one")
            return None
        if whole is not None:
            value = self.value(whole.value, scope)
            if value is None:
                return None
            if not is_matrix(value) or value.shape != (K, K):
                self.err(whole.value.span, f"{name} must be a {K}x{K} matrix (one row and column per state variable), got a {shape_text(value)}")
                return None
            self.where(name, whole.value.span)
            self._entry_spans(name, whole.value)
            return value
        if not entries:
            return None
        out = sp.zeros(K, K)
        seen = {}
        for stmt in entries:
            idx = []
            for ident in (stmt.row, stmt.col):
                if ident.name not in self.variables:
                    self.err(ident.span, f"'{ident.name}' is not a state variable (state: {', '.join(self.variables)})")
                idx.append(self.variables.index(ident.name) if ident.name in self.variables else None)
            value = self.value(stmt.value, scope, expect="scalar")
            if None in idx or value is None:
                continue
            key = tuple(idx)
            if key in seen:
                self.err(stmt.span, f"{name}[{stmt.row.name}, {stmt.col.name}] is assigned twice (first at line {seen[key]})")
                continue
            seen[key] = stmt.span.line
            out[key] = value
            self.where((name,) + key, stmt.value.span)
        self.where(name, entries[0].span)
        return sp.ImmutableMatrix(out)

    def _entry_spans(self, name, node):
        if isinstance(node, S.Bracket) and all(isinstance(r, S.Bracket) for r in node.items):
            for i, row in enumerate(node.items):
                for j, item in enumerate(row.items):
                    self.where((name, i, j), item.span)

    def attempted(self, name) -> bool:
        """Was block `name` written at all (whole, entry by entry or learned)?"""
        return (self.assignments(name) is not None or any(s.target.name == name for s in self.of(S.EntryStmt))
                or any(s.block.name == name for s in self.of(S.LearnStmt)))

    def time_scope(self, beta, state=None):
        return Scope(constants=self.constants, params=self.params, state=state or {}, time=True, beta=beta, size=self.K)

    def warn_unused(self):
        used = set()
        for stmt in self.stmts:
            for node in S.walk(stmt):
                if isinstance(node, S.Name):
                    used.add(node.name)
        for name in self.constants:
            if name not in used:
                self.diags.append(warning(self.span_of(("const", name)), f"constant '{name}' is never used"))


def _names(stmt):
    return stmt.target.name if isinstance(stmt, (S.AssignStmt, S.EntryStmt)) else None


def build(statements, filename: str) -> tuple[Spec | None, list[Diagnostic]]:
    builder = Builder(statements, filename)
    spec = builder.build()
    return spec, builder.diags
