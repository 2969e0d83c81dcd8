"""The public entry points of the front end: parse, parse_file, analyze."""
from __future__ import annotations

import math
import os
import stat
import sys

import attrs

from .language.build import build
from .checks import MIX_TOL, run_checks
from .language.diagnostics import Diagnostic, Span, SpecError, error
from .language.parse import MAX_FILE_BYTES, decode, normalize, parse_text


@attrs.frozen
class Analysis:
    """Everything `sdec check` shows: the spec (if it built), diagnostics, proofs."""

    spec: object
    diagnostics: tuple
    source: str | None

    @property
    def ok(self) -> bool:
        return self.spec is not None and not any(d.severity == "error" for d in self.diagnostics)


def analyze(text: str | bytes, filename: str | None = None, mix_tol: float = MIX_TOL) -> Analysis:
    """Run every stage that can run; never raises for a bad spec (a mix_tol that is not a
    finite number > 0 is a ValueError)."""
    try:
        tol = float(mix_tol)
    except (TypeError, ValueError):
        tol = math.nan
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"mix_tol must be a finite number > 0, got {mix_tol!r}")
    filename = filename or "<spec>"
    raw = text
    text, diags = decode(raw, filename) if isinstance(raw, bytes) else normalize(raw, filename)
    if text is None:  # show the bad line anyway, with replacement characters
        shown = raw.decode("utf-8", "replace") if isinstance(raw, bytes) and len(raw) <= MAX_FILE_BYTES else None
        return Analysis(None, tuple(diags), shown)
    if not text.strip():
        return Analysis(None, (error(None, f"{filename} is empty; a spec declares at least "
                                           "'sde', 'state', 'beta(t)', 'T', 'target' and the process"),), text)
    statements, diags = parse_text(text, filename)
    if any(d.severity == "error" for d in diags):
        return Analysis(None, tuple(diags), text)
    spec, more = build(statements, filename)
    diags = list(diags) + list(more)
    if spec is None:
        return Analysis(None, tuple(diags), text)
    report = run_checks(spec, mix_tol)
    spec = attrs.evolve(spec, source=text, report=report)
    for proof in report.proofs:
        if proof.verdict == "failed":
            diags.append(Diagnostic(proof.span, proof.detail if proof.detail[:1].isupper() or ":" in proof.detail
                                    else f"{proof.name}: {proof.detail}", "error"))
        elif proof.verdict == "warning":
            diags.append(Diagnostic(proof.span, proof.detail, "warning"))
    return Analysis(spec, tuple(diags), text)


def parse(text: str | bytes, filename: str | None = None):
    """Parse and check a spec; return the checked IR (sdec.language.ir.Spec) or raise SpecError."""
    result = analyze(text, filename)
    if not result.ok:
        raise SpecError([d for d in result.diagnostics if d.severity == "error"] or result.diagnostics, result.source)
    return result.spec


STDIN = "-"  # the spec path that means standard input


def spec_name(path) -> str:
    """The file name diagnostics show for a spec path ('<stdin>' for '-')."""
    path = os.fspath(path)
    return "<stdin>" if path == STDIN else path


def read_spec_bytes(path) -> bytes:
    """The bytes of a spec file ('-': standard input), read no further than MAX_FILE_BYTES + 1:
    a larger file, an endless device (/dev/zero) or a pipe that never ends is a SpecError,
    not unbounded work."""
    path = os.fspath(path)
    if path == STDIN:
        data = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
        if len(data) <= MAX_FILE_BYTES:
            return data
        raise SpecError([error(Span.point(spec_name(path), 1, 1), f"standard input is more than {MAX_FILE_BYTES} "
                               f"bytes (reading stopped there); specs are limited to {MAX_FILE_BYTES}")])
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
            if len(data) <= MAX_FILE_BYTES:
                return data
            size = os.fstat(handle.fileno())
    except FileNotFoundError:
        raise SpecError([error(None, f"{path}: no such file")]) from None
    except IsADirectoryError:
        raise SpecError([error(None, f"{path}: is a directory, not a .sde file")]) from None
    except OSError as exc:
        raise SpecError([error(None, f"{path}: cannot read ({exc.strerror})")]) from None
    what = (f"file is {size.st_size} bytes" if stat.S_ISREG(size.st_mode) and size.st_size > MAX_FILE_BYTES
            else f"file is more than {MAX_FILE_BYTES} bytes (reading stopped there)")
    raise SpecError([error(Span.point(path, 1, 1), f"{what}; specs are limited to {MAX_FILE_BYTES}")])


def parse_file(path):
    """Parse and check the spec in a file; raise SpecError naming the file on failure."""
    return parse(read_spec_bytes(path), spec_name(path))
