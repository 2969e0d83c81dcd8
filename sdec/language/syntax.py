"""Syntax nodes: what a statement says, with positions, before any meaning is given.

Produced by sdec.language.parse from Lark trees; no Lark type survives into these nodes.
Spans are excluded from equality, so two parses of equivalent text compare equal.
"""
from __future__ import annotations

import attrs

from .diagnostics import Span

_span = attrs.field(eq=False, default=None, repr=False)


@attrs.frozen
class Ident:
    name: str
    span: Span | None = _span


# ---- expressions -------------------------------------------------------------------

@attrs.frozen
class Number:
    text: str
    span: Span | None = _span


@attrs.frozen
class Name:
    name: str
    span: Span | None = _span


@attrs.frozen
class Call:
    func: Ident
    args: tuple
    span: Span | None = _span


@attrs.frozen
class Binary:
    op: str  # one of + - * / @ ^
    left: object
    right: object
    span: Span | None = _span


@attrs.frozen
class Unary:
    op: str  # + or -
    operand: object
    span: Span | None = _span


@attrs.frozen
class Bracket:
    """``[a, b, ...]``: a matrix literal when its items are brackets (rows)."""

    items: tuple
    span: Span | None = _span


# ---- statements --------------------------------------------------------------------

@attrs.frozen
class SdeStmt:
    name: Ident
    span: Span | None = _span


@attrs.frozen
class StateStmt:
    names: tuple  # of Ident
    span: Span | None = _span


@attrs.frozen
class ConstStmt:
    name: Ident
    value: object
    span: Span | None = _span


@attrs.frozen
class ParamStmt:
    name: Ident
    bound: Number | None  # `param g > 0 = ...`
    init: object
    span: Span | None = _span


@attrs.frozen
class InitStmt:
    variables: tuple  # of Ident
    mean: object
    cov: object
    span: Span | None = _span


@attrs.frozen
class TargetStmt:
    mean: object
    cov: object
    span: Span | None = _span


@attrs.frozen
class FuncStmt:
    name: Ident
    arg: Ident
    body: object
    span: Span | None = _span


@attrs.frozen
class AssignStmt:
    target: Ident
    value: object
    span: Span | None = _span


@attrs.frozen
class EntryStmt:
    target: Ident
    row: Ident
    col: Ident
    value: object
    span: Span | None = _span


@attrs.frozen
class Noise:
    sign: str
    coeff: object | None  # None for a bare '+ dW' (coefficient 1)
    wiener: Ident  # dW or dW_name
    span: Span | None = _span


@attrs.frozen
class EquationStmt:
    target: Ident  # dx
    drift: object
    noises: tuple  # of Noise
    span: Span | None = _span


@attrs.frozen
class LearnStmt:
    block: Ident
    kind: Ident
    rank: Number | None
    over: tuple | None  # of Ident
    mask: object | None
    init: object
    span: Span | None = _span


def walk(node):
    """Yield node and every syntax node below it (iterative, any depth)."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, tuple):
            stack.extend(item)
            continue
        if not attrs.has(type(item)):
            continue
        yield item
        for field in attrs.fields(type(item)):
            if field.name != "span":
                stack.append(getattr(item, field.name))
