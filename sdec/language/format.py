"""IR → .sde text (the inverse of parse + build, up to formatting).

``format_spec(spec)`` prints a canonical spec: constants as their values, matrices as
literals, learnable blocks as ``learn`` statements. parse(format_spec(spec)) == spec.
"""
from __future__ import annotations

import math
import re
from decimal import Context, Decimal, InvalidOperation

import sympy as sp
from sympy.printing.str import StrPrinter



class SdePrinter(StrPrinter):
    """sympy's str printer restricted to what the .sde grammar reads back."""

    def _print_Exp1(self, expr):
        return "exp(1)"

    def _print_Pi(self, expr):
        return "pi"

    def _print_Symbol(self, expr):
        return expr.name

    def _print_Float(self, expr):  # never in the IR; print exactly if it ever is
        return self._print(sp.Rational(expr))

    def emptyPrinter(self, expr):
        raise TypeError(f"cannot print {type(expr).__name__} as .sde syntax")

    def _print(self, expr, **kwargs):
        name = None
        if self.named and isinstance(expr, sp.Basic):
            name = self.named.get(expr)
        return name if name is not None else super()._print(expr, **kwargs)

    named: dict | None = None  # value -> constant name: print the name instead of the value


def expr_text(expr, named=None) -> str:
    """An IR expression as .sde text; `named` maps values to constant names to print instead."""
    printer = SdePrinter({"order": None})
    printer.named = named
    return printer.doprint(sp.Integer(expr) if isinstance(expr, int) else expr)


def number_text(value, digits: int = 6) -> str:
    """A number as a message shows it: exact when short (0, -1, 1/3, 50001/100000), else
    `digits` significant digits in the usual notation (1e-300, 0.0314159, -4.7e+10), never
    a 300-digit fraction. Takes sympy numbers, ints, floats and mpmath numbers."""
    if isinstance(value, sp.Basic):
        if value.is_Rational and len(str(value)) <= 12:
            return str(value)
        text = str(sp.N(value, digits + 5))
    elif isinstance(value, float) and not math.isfinite(value):
        return str(value)
    else:
        text = str(value)
    try:
        d = Context(prec=digits).plus(Decimal(text)).normalize()
    except InvalidOperation:
        return text
    if not d.is_finite():
        return text
    return format(d, "f") if -6 <= d.adjusted() < digits else format(d, "e")


def matrix_text(M, named=None, column: int = 4) -> str:
    """A matrix literal whose first row opens at `column` (0-based) of its line; each further
    row goes on its own line under the first."""
    if M.rows == 1 and M.cols == 1:
        return f"[[{expr_text(M[0, 0], named)}]]"
    rows = ["[" + ", ".join(expr_text(M[i, j], named) for j in range(M.cols)) + "]" for i in range(M.rows)]
    return "[" + (",\n" + " " * (column + 1)).join(rows) + "]"


def _with_matrix(prefix: str, M, named) -> str:
    """prefix followed by M's literal, its rows aligned under the first."""
    return prefix + matrix_text(M, named, len(prefix.rsplit("\n", 1)[-1]))


def hash_text(canonical: str) -> str:
    """The text the spec hash is taken over: the canonical text with every continuation row
    indented by 5 spaces, as the formatter wrote it before rows were aligned, so aligning
    them changed no hash (checkpoints record the hash of their spec)."""
    return re.sub(r"\n +\[", "\n     [", canonical)


def format_spec(spec) -> str:
    """The spec as canonical .sde text. A scalar constant whose value is an expression (not
    a plain number) is printed by name wherever its value occurs later, in the constants
    after it and in the rest of the spec: the text then nests no deeper than the spec did
    (60 chained 'const cI = sqrt(c(I-1) + I)' stay 60 short lines, not one expression 120
    levels deep), and parses back to the same values."""
    named = {}
    out = [f"sde {spec.name}", "state " + ", ".join(spec.variables)]
    for name, value in spec.constants:
        if isinstance(value, sp.MatrixBase):
            out.append(_with_matrix(f"const {name} = ", value, named))
            continue
        out.append(f"const {name} = {expr_text(value, named)}")
        if value.args and not value.is_Rational and value not in named:
            named[value] = name
    out += [f"param {p.name}{' > 0' if p.positive else ''} = {expr_text(p.init, named)}" for p in spec.params]
    out += _init_lines(spec, named)
    out.append(f"beta(t) = {expr_text(spec.beta, named)}")
    out.append(f"T = {expr_text(spec.T, named)}")
    out.append(f"t_min = {expr_text(spec.t_min, named)}")
    out.append(_with_matrix("target normal(0, ", spec.target, named) + ")")
    out += {"recipe": _recipe_lines, "matrices": _matrix_lines, "equations": _equation_lines}[spec.form](spec, named)
    return "\n".join(out) + "\n"


def _init_lines(spec, named):
    aux, S = spec.auxiliaries, spec.aux_init
    if not aux:
        return []
    if all(S[i, j] == 0 for i in range(S.rows) for j in range(S.cols) if i != j):
        return [f"init {v} ~ normal(0, {expr_text(S[i, i], named)})" for i, v in enumerate(aux)]
    return [_with_matrix(f"init ({', '.join(aux)}) ~ normal(0, ", S, named) + ")"]


def _recipe_lines(spec, named):
    learned = {b.block: b for b in spec.learned}
    lines = []
    for name, value in (("Q", spec.Q), ("D", spec.D)):
        if name in learned:
            lines.append(_learn_line(learned[name], spec.K, named))
        else:
            lines.append(_with_matrix(f"{name} = ", value, named))
    return lines


def _learn_line(block, K, named):
    kind = block.kind + (f"({block.rank})" if block.rank is not None else "")
    text = f"learn {block.block}: {kind}"
    if len(block.over) != K:
        text += f" on ({', '.join(block.over)})"
    if block.mask is not None:
        text = _with_matrix(text + " mask ", block.mask, named)
    if block.random is not None:
        std, seed = block.random
        return text + f" init random({expr_text(std, named)}, {seed})"
    return _with_matrix(text + " init ", block.init, named)


def _matrix_lines(spec, named):
    return [_with_matrix("drift = ", spec.drift, named), _with_matrix("diffusion = ", spec.diffusion, named)]


def _equation_lines(spec, named):
    lines = []
    for i, v in enumerate(spec.variables):
        terms = [f"({expr_text(spec.drift[i, j], named)})*{u}" for j, u in enumerate(spec.variables) if spec.drift[i, j] != 0]
        drift = " + ".join(terms) if terms else "0"
        noise = "".join(f" + ({expr_text(spec.diffusion[i, k], named)}) dW_{w}"
                        for k, w in enumerate(spec.wiener) if spec.diffusion[i, k] != 0)
        lines.append(f"d{v} = {drift} dt{noise}")
    return lines


__all__ = ["format_spec", "expr_text", "number_text"]
