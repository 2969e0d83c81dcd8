"""Text → syntax nodes.

The file is split into statements at newlines (and ';') outside brackets; each statement
is parsed on its own with the Lark grammar in grammars/sde.lark, so one run reports a
syntax error per broken statement. Every failure becomes a Diagnostic with a span; no
Lark type or exception escapes this module.
"""
from __future__ import annotations

import functools
import re
from importlib import resources

import attrs
import lark
from lark import Lark, Token, Tree

from . import syntax as S
from .diagnostics import Diagnostic, Span, error

MAX_FILE_BYTES = 1_000_000
MAX_BRACKET_DEPTH = 64
MAX_EXPR_DEPTH = 100
MAX_STATEMENTS = 5_000
_OPEN = {"(": ")", "[": "]"}
_COMMENT = re.compile(r"#[^\n]*")
_CLOSE = {")": "(", "]": "["}


@functools.lru_cache(maxsize=1)
def grammar_text() -> str:
    return resources.files("sdec.grammars").joinpath("sde.lark").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(grammar_text(), parser="lalr", propagate_positions=True,
                maybe_placeholders=True, start="start")


@attrs.frozen
class Statement:
    """The text of one statement and where it starts in the file."""

    text: str
    line: int
    column: int


def decode(data: bytes, filename: str) -> tuple[str | None, list[Diagnostic]]:
    """Bytes → text, or a diagnostic naming the first bad byte."""
    if len(data) > MAX_FILE_BYTES:
        return None, [error(Span.point(filename, 1, 1),
                            f"file is {len(data)} bytes; specs are limited to {MAX_FILE_BYTES}")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, col = _position(data[:exc.start].decode("utf-8", "replace"))
        return None, [error(Span.point(filename, line, col),
                            f"file is not valid UTF-8 text (byte 0x{data[exc.start]:02x})")]
    return normalize(text, filename)


def normalize(text: str, filename: str) -> tuple[str | None, list[Diagnostic]]:
    """Drop a byte-order mark, reject NUL, and make every line end in '\n'."""
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\x00" in text:
        line, col = _position(text[:text.index("\x00")])
        return None, [error(Span.point(filename, line, col), "file contains a NUL byte; is it a binary file?")]
    return text.replace("\r\n", "\n").replace("\r", "\n"), []


def _position(prefix: str) -> tuple[int, int]:
    line = prefix.count("\n") + 1
    return line, len(prefix) - (prefix.rfind("\n") + 1) + 1


def split_statements(text: str, filename: str) -> tuple[list[Statement], list[Diagnostic]]:
    """Split at newlines and ';' outside brackets; report unbalanced brackets."""
    statements, diags = [], []
    stack: list[tuple[str, int, int]] = []
    start, start_line, start_col = 0, 1, 1
    line, col, i, broken = 1, 1, 0, False

    def close(end):
        nonlocal broken
        piece = text[start:end]
        if _COMMENT.sub("", piece).strip() and not broken:
            lead = len(piece) - len(piece.lstrip(" \t"))
            statements.append(Statement(piece[lead:], start_line, start_col + lead))
        broken = False

    while i < len(text):
        ch = text[i]
        if ch == "#":
            j = text.find("\n", i)
            j = len(text) if j < 0 else j
            col += j - i
            i = j
            continue
        if ch in _OPEN:
            stack.append((ch, line, col))
            if len(stack) > MAX_BRACKET_DEPTH and not broken:
                diags.append(error(Span.point(filename, line, col),
                                   f"brackets nested too deeply (more than {MAX_BRACKET_DEPTH} levels)"))
                broken = True
        elif ch in _CLOSE:
            if not stack or stack[-1][0] != _CLOSE[ch]:
                if not broken:
                    what = f"'{ch}' does not match '{stack[-1][0]}' opened at line {stack[-1][1]} column {stack[-1][2]}" \
                        if stack else f"unmatched '{ch}'"
                    diags.append(error(Span.point(filename, line, col), what))
                broken = True
                stack.clear()
            else:
                stack.pop()
        elif (ch == "\n" or ch == ";") and not stack:
            close(i)
            start = i + 1
            if ch == "\n":
                line, col = line + 1, 0
            start_line, start_col = line, col + 1
        elif ch == "\n":
            line, col = line + 1, 0
        i += 1
        col += 1
    if stack and not broken:
        opener, oline, ocol = stack[0]
        diags.append(error(Span.point(filename, oline, ocol), f"'{opener}' is never closed"))
        broken = True
    close(len(text))
    if len(statements) > MAX_STATEMENTS:
        diags.append(error(Span.point(filename, 1, 1),
                           f"file has {len(statements)} statements; the limit is {MAX_STATEMENTS}"))
        statements = []
    return statements, diags


def parse_text(text: str, filename: str = "<spec>") -> tuple[list, list[Diagnostic]]:
    """Parse every statement; return (syntax statements, diagnostics)."""
    statements, diags = split_statements(text, filename)
    nodes = []
    for stmt in statements:
        node, problems = parse_statement(stmt, filename)
        diags.extend(problems)
        if node is not None:
            nodes.append(node)
    return nodes, diags


def parse_statement(stmt: Statement, filename: str):
    try:
        tree = _parser().parse(stmt.text)
    except lark.exceptions.UnexpectedInput as exc:
        return None, [_syntax_error(exc, stmt, filename)]
    where = _Locator(stmt, filename)
    depth = _depth(tree)
    if depth > MAX_EXPR_DEPTH:
        return None, [error(where.span(tree), f"expression nested too deeply ({depth} levels; the limit is {MAX_EXPR_DEPTH})")]
    return _Builder(where).stmt(tree), []


def _depth(tree) -> int:
    best, stack = 0, [(tree, 1)]
    while stack:
        node, d = stack.pop()
        best = max(best, d)
        if isinstance(node, Tree):
            stack.extend((c, d + 1) for c in node.children)
    return best


# ---- syntax errors -----------------------------------------------------------------

_TERMINAL_NAMES = {"NAME": "a name", "NUMBER": "a number", "DW": "dW", "SIGN": "'+' or '-'",
                   "POW": "'^'", "$END": "end of statement", "<END-OF-FILE>": "end of statement"}


def _describe_expected(expected) -> str:
    terminals = {t.name: t for t in _parser().terminals}
    words = set()
    for name in expected:
        if name in _TERMINAL_NAMES:
            words.add(_TERMINAL_NAMES[name])
        elif name in terminals and isinstance(terminals[name].pattern, lark.lexer.PatternStr):
            words.add(repr(terminals[name].pattern.value))
    words = sorted(words)
    if len(words) > 8:
        words = words[:8] + ["..."]
    return ", ".join(words)


def _token_text(token) -> str:
    value = str(token)
    return "end of statement" if token.type == "$END" else repr(value if len(value) < 30 else value[:27] + "...")


def _syntax_error(exc, stmt: Statement, filename: str) -> Diagnostic:
    line = getattr(exc, "line", None)
    col = getattr(exc, "column", None)
    if not isinstance(line, int) or line < 1:
        line, col = _position(stmt.text.rstrip())
        col += 1
    span = _shift(filename, stmt, line, col, line, col + 1)
    hint = None
    if isinstance(exc, lark.exceptions.UnexpectedCharacters):
        ch = stmt.text[exc.pos_in_stream] if exc.pos_in_stream < len(stmt.text) else "?"
        return error(span, f"unexpected character {ch!r}")
    if isinstance(exc, lark.exceptions.UnexpectedToken):
        token = exc.token
        if token.type != "$END":
            span = _shift(filename, stmt, token.line, token.column, token.end_line, token.end_column)
        elif isinstance(token.end_line, int):  # $END borrows the last token's place: point just past it
            span = _shift(filename, stmt, token.end_line, token.end_column, token.end_line, token.end_column + 1)
        message = f"unexpected {_token_text(token)}; expected {_describe_expected(exc.expected)}"
        if token.line == 1 and token.column == 1 and str(token) in ("+", "-"):
            hint = "a statement cannot start with an operator; to continue an expression on the next line, wrap it in parentheses"
        elif token.type in ("NAME", "NUMBER", "LPAR") and "STAR" in exc.expected:
            hint = "sdec does not multiply by juxtaposition; write a * b"
        return error(span, message, hint)
    expected = getattr(exc, "expected", None) or ()
    return error(span, f"statement ends too early; expected {_describe_expected(expected)}")


def _shift(filename, stmt, line, col, end_line, end_col) -> Span:
    def move(ln, c):
        return ln + stmt.line - 1, c + (stmt.column - 1 if ln == 1 else 0)
    a, b = move(line, col)
    c, d = move(end_line, end_col)
    return Span(filename, a, b, c, d)


class _Locator:
    def __init__(self, stmt: Statement, filename: str):
        self.stmt, self.filename = stmt, filename

    def span(self, item) -> Span | None:
        if isinstance(item, Token):
            return _shift(self.filename, self.stmt, item.line, item.column, item.end_line, item.end_column)
        meta = item.meta
        if getattr(meta, "empty", True):
            return None
        return _shift(self.filename, self.stmt, meta.line, meta.column, meta.end_line, meta.end_column)


# ---- trees → syntax nodes ----------------------------------------------------------

_BINARY = {"add": "+", "sub": "-", "mul": "*", "div": "/", "matmul": "@"}


class _Builder:
    """One method per grammar rule alias; depth was bounded before we recurse."""

    def __init__(self, where: _Locator):
        self.where = where

    def ident(self, token) -> S.Ident:
        return S.Ident(str(token), self.where.span(token))

    def number(self, token) -> S.Number:
        return S.Number(str(token), self.where.span(token))

    def names(self, tree) -> tuple:
        return tuple(self.ident(t) for t in tree.children)

    def stmt(self, tree):
        return getattr(self, "_" + tree.data)(tree, *tree.children)

    def _sde_stmt(self, t, name):
        return S.SdeStmt(self.ident(name), self.where.span(t))

    def _state_stmt(self, t, names):
        return S.StateStmt(self.names(names), self.where.span(t))

    def _const_stmt(self, t, name, value):
        return S.ConstStmt(self.ident(name), self.expr(value), self.where.span(t))

    def _param_stmt(self, t, name, bound, value):
        return S.ParamStmt(self.ident(name), self.number(bound) if bound is not None else None,
                           self.expr(value), self.where.span(t))

    def _init_stmt(self, t, group, mean, cov):
        variables = (self.ident(group.children[0]),) if group.data == "one_var" else self.names(group.children[0])
        return S.InitStmt(variables, self.expr(mean), self.expr(cov), self.where.span(t))

    def _target_stmt(self, t, mean, cov):
        return S.TargetStmt(self.expr(mean), self.expr(cov), self.where.span(t))

    def _func_stmt(self, t, name, arg, body):
        return S.FuncStmt(self.ident(name), self.ident(arg), self.expr(body), self.where.span(t))

    def _assign_stmt(self, t, name, value):
        return S.AssignStmt(self.ident(name), self.expr(value), self.where.span(t))

    def _entry_stmt(self, t, name, row, col, value):
        return S.EntryStmt(self.ident(name), self.ident(row), self.ident(col), self.expr(value), self.where.span(t))

    def _equation_stmt(self, t, name, drift, *noises):
        return S.EquationStmt(self.ident(name), self.expr(drift), tuple(self._noise(n) for n in noises),
                              self.where.span(t))

    def _noise(self, tree):
        sign, coeff, wiener = tree.children
        return S.Noise(str(sign), self.expr(coeff) if coeff is not None else None, self.ident(wiener),
                       self.where.span(tree))

    def _learn_stmt(self, t, block, kind, rank, *rest):
        *options, init = rest
        over = mask = None
        for opt in options:
            if opt.data == "on_option":
                over = self.names(opt.children[0])
            else:
                mask = self.expr(opt.children[0])
        return S.LearnStmt(self.ident(block), self.ident(kind), self.number(rank) if rank is not None else None,
                           over, mask, self.expr(init), self.where.span(t))

    def expr(self, tree):
        span = self.where.span(tree)
        kind = tree.data
        if kind == "number":
            return S.Number(str(tree.children[0]), span)
        if kind == "name":
            return S.Name(str(tree.children[0]), span)
        if kind == "call":
            args = tuple(self.expr(c) for c in tree.children[1:] if c is not None)
            return S.Call(self.ident(tree.children[0]), args, span)
        if kind == "bracket":
            return S.Bracket(tuple(self.expr(c) for c in tree.children), span)
        if kind in _BINARY:
            return S.Binary(_BINARY[kind], self.expr(tree.children[0]), self.expr(tree.children[1]), span)
        if kind == "pow":
            return S.Binary("^", self.expr(tree.children[0]), self.expr(tree.children[2]), span)
        if kind in ("neg", "pos"):
            return S.Unary("-" if kind == "neg" else "+", self.expr(tree.children[0]), span)
        raise AssertionError(f"grammar rule {kind!r} has no syntax node")  # a bug, not a user error
