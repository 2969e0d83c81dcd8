"""sympy scalar expressions → torch source text, for the generated module.

Strict: symbols must be mapped explicitly (t, s, parameters); any sympy node the torch
printer does not know raises. Constant sub-expressions that are not rationals (sqrt(2),
pi, exp(1), ...) are evaluated at 30 digits and printed as float literals, so the
generated code never calls torch on a Python number.
"""
from __future__ import annotations

import functools
import math

import sympy as sp


@functools.cache
def _printer_class():
    """KernelPrinter, built on first use: sympy.printing.pytorch imports torch (seconds),
    which neither the checks nor the lowering need."""
    from sympy.printing.pytorch import TorchPrinter

    class KernelPrinter(TorchPrinter):
        def __init__(self, names: dict):
            super().__init__({"strict": True, "fully_qualified_modules": True})
            self.names = names  # Symbol -> python identifier

        def _print_Symbol(self, expr):
            if expr not in self.names:
                raise ValueError(f"symbol {expr} has no name in the generated code")
            return self.names[expr]

        def _print_Float(self, expr):
            return _literal(float(expr))

        def _print_Rational(self, expr):  # torch_expr turns them into Floats first
            return _literal(_to_float(expr))

        def _print_Integer(self, expr):
            return _literal(_to_float(expr))

        def _print_expm1(self, expr):
            return f"torch.expm1({self._print(expr.args[0])})"

        def _print_log1p(self, expr):
            return f"torch.log1p({self._print(expr.args[0])})"

    return KernelPrinter


def _to_float(r) -> float:
    """p/q in Python is the correctly rounded quotient: the double a literal would give."""
    try:
        return r.p / r.q
    except OverflowError:
        return math.inf if r.p > 0 else -math.inf


def _literal(value: float) -> str:
    if math.isnan(value):
        return "math.nan"
    if math.isinf(value):
        return "math.inf" if value > 0 else "(-math.inf)"
    return repr(value)  # sympy's precedence rules parenthesize negative numbers where needed


def _rationals_as_floats(expr):
    """Non-integer rationals as the double they round to, printed as plain literals
    (9.9*t, not ((99/10))*t); integers stay exact (exponents print as t**2)."""
    found = {r for r in expr.atoms(sp.Rational) if not r.is_Integer}
    return expr.xreplace({r: sp.Float(_to_float(r), 17) for r in found}) if found else expr


def fold_constants(expr):
    """Replace maximal numeric, non-rational sub-expressions by 30-digit floats (what the
    generated code computes with; the lowering's accuracy checks evaluate the same)."""
    if expr.is_number:
        return expr if expr.is_Rational else sp.Float(sp.N(expr, 30), 30)
    if not expr.args:
        return expr
    return expr.func(*[fold_constants(a) for a in expr.args])


def torch_expr(expr, names: dict) -> str:
    if isinstance(expr, int):
        expr = sp.Integer(expr)
    if not isinstance(expr, sp.Basic):
        raise TypeError(f"expected a sympy expression, got {type(expr).__name__}")
    return _printer_class()(names).doprint(_rationals_as_floats(fold_constants(expr)))
