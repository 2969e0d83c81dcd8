"""Source positions, diagnostics and the one user-facing error type, SpecError.

A diagnostic is data (span, severity, message, hint); rendering it as
``file:line:col: error: message`` plus the source line and a caret is separate.
"""
from __future__ import annotations

import bisect

import attrs


@attrs.frozen
class Span:
    """A region of a source file; lines and columns count from 1."""

    file: str
    line: int
    column: int
    end_line: int
    end_column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"

    @classmethod
    def point(cls, file: str, line: int, column: int) -> "Span":
        return cls(file, line, column, line, column + 1)


@attrs.frozen
class Diagnostic:
    span: Span | None
    message: str
    severity: str = "error"  # "error" | "warning" | "note"
    hint: str | None = None

    def render(self, source: str | None = None) -> str:
        where = f"{self.span}: " if self.span is not None else ""
        out = [f"{where}{self.severity}: {self.message}"]
        out.extend(_context_lines(self.span, source))
        if self.hint:
            out.append(f"  hint: {self.hint}")
        return "\n".join(out)


def _context_lines(span: Span | None, source: str | None) -> list[str]:
    if span is None or source is None:
        return []
    lines = source.split("\n")
    if not 1 <= span.line <= len(lines):
        return []
    shown = [_printable(c) for c in lines[span.line - 1]]  # one piece per source character
    starts = [0]
    for piece in shown:
        starts.append(starts[-1] + len(piece))

    def at(column: int) -> int:  # source column (from 1) -> offset in the shown text
        i = max(0, column - 1)
        return starts[i] if i < len(starts) else starts[-1] + i - len(shown)

    text = "".join(shown)
    caret = at(span.column)
    end = at(span.end_column) if span.end_line == span.line else caret + 1
    if len(text) > 200:  # keep context readable for absurdly long lines
        start = starts[bisect.bisect_right(starts, max(0, caret - 99)) - 1]  # a whole character
        text, caret, end = text[start:start + 200], caret - start, end - start
    width = max(1, min(end - caret, len(text) - caret + 1))
    return [f"    {text}", "    " + " " * caret + "^" + "~" * (width - 1)]


def _printable(c: str) -> str:
    """A source character as it may be shown on a terminal: tabs as a space, and control
    and other unprintable characters (NUL, ESC, ...) escaped as \\xNN, \\uNNNN or \\UNNNNNNNN."""
    if c == "\t":
        return " "
    if c.isprintable():
        return c
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class SpecError(ValueError):
    """A spec that cannot be compiled. Carries every diagnostic found, first one first.

    ``filename``, ``line``, ``column`` and ``message`` describe the first error.
    """

    def __init__(self, diagnostics, source: str | None = None):
        diags = tuple(diagnostics)
        if not diags:
            raise ValueError("SpecError needs at least one diagnostic")
        self.diagnostics = diags
        self.source = source
        first = next((d for d in diags if d.severity == "error"), diags[0])
        self.message = first.message
        span = first.span
        self.filename = span.file if span else None
        self.line = span.line if span else None
        self.column = span.column if span else None
        super().__init__(self.render())

    @property
    def errors(self):
        return tuple(d for d in self.diagnostics if d.severity == "error")

    def render(self) -> str:
        return "\n".join(d.render(self.source) for d in self.diagnostics)


def error(span: Span | None, message: str, hint: str | None = None) -> Diagnostic:
    return Diagnostic(span, message, "error", hint)


def warning(span: Span | None, message: str, hint: str | None = None) -> Diagnostic:
    return Diagnostic(span, message, "warning", hint)
