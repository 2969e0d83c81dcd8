"""Rendering of `sdec check` results as text and as JSON."""
from __future__ import annotations

from .language.format import expr_text, number_text

_MARK = {"proved": "proved ", "checked": "checked", "warning": "WARNING",
         "failed": "FAILED ", "info": "info   "}


def _cell(e) -> str:
    """An entry as the report shows it: a number readably (a random initial value is the
    exact rational of a float, 19 digits over 18, shown to 6 significant digits), an
    expression as the formatter prints it."""
    if getattr(e, "is_Number", False):
        return number_text(e)
    return expr_text(e)


def matrix_lines(M, names=None, indent="    ") -> list:
    cells = [[_cell(M[i, j]) for j in range(M.cols)] for i in range(M.rows)]
    width = max((len(c) for row in cells for c in row), default=1)
    label = max((len(n) for n in names), default=0) if names else 0
    lines = []
    if names and M.cols == len(names):
        lines.append(indent + " " * (label + 3) + "  ".join(n.rjust(width) for n in names))
    for i, row in enumerate(cells):
        head = (names[i].ljust(label) + " ") if names and M.rows == len(names) else ""
        lines.append(f"{indent}{head}[ " + "  ".join(c.rjust(width) for c in row) + " ]")
    return lines


def check_text(result, path: str = "SPEC") -> str:
    """The report `sdec check` prints on stdout: the spec, the proofs, the verdict and what to
    do next. The diagnostics themselves (diagnostics_text) go to stderr, between the two."""
    return "\n\n".join(part for part in check_sections(result, path) if part)


def check_sections(result, path: str = "SPEC") -> tuple:
    """(the spec and its proofs, the verdict and what to do next) as text."""
    spec = result.spec
    return ("\n".join(_spec_lines(spec)) if spec is not None else "", _verdict(result, path))


def _verdict(result, path) -> str:
    out = []
    errors = [d for d in result.diagnostics if d.severity == "error"]
    warnings = [d for d in result.diagnostics if d.severity == "warning"]
    if errors:
        out.append(f"FAILED: {len(errors)} error(s), {len(warnings)} warning(s)")
        out.append(f"next: fix the errors (on stderr, each at file:line:column), then run `sdec check {path}` again")
    else:
        out.append(f"OK: every proof holds ({len(warnings)} warning(s))")
        if warnings:
            out.append("      warnings do not stop compilation; each says what was not proved or what to change")
        out.append(f"next: `sdec compile {path} -o MODULE.py` writes the torch module, `sdec verify {path}` "
                   f"tests its kernels, `sdec train {path}` trains a model on it")
    return "\n".join(out)


def diagnostics_text(result) -> str:
    """Every diagnostic, rendered with its location and source line (for stderr)."""
    return "\n".join(d.render(result.source) for d in result.diagnostics)


_NOTATION = {  # learnable symbols as the matrices above print them (sdec.language.learn)
    "skew": "{b}{{i,j}}: entry (i, j) of W, strictly lower triangular, {b} = W - Wᵀ",
    "psd": "L{b}{{i,j}}: entry (i, j) of L, lower triangular with a positive diagonal, {b} = L Lᵀ",
    "diagonal": "d{b}{{i}}: the positive diagonal entry of {b} = diag(d) for variable i",
    "lowrank": "B{b}{{i,k}}: entry (i, k) of the factor B, {b} = B Bᵀ",
}


def _spec_lines(spec) -> list:
    r = spec.report
    v = spec.variables
    out = [f"{spec.filename}: sde {spec.name} ({spec.form} form)",
           f"state: {v[0]} (data)" + "".join(f", {a} (auxiliary)" for a in v[1:]) + f"   K = {spec.K}"]
    if spec.K > 1:
        out.append("q(v0 | x) = N(0, Σ_v0), Σ_v0 =")
        out += matrix_lines(spec.aux_init, list(v[1:]))
    B = r.fact("B")
    out.append(f"time: beta(t) = {expr_text(spec.beta)};  B(t) = {B if B else '(quadrature)'};  "
               f"T = {number_text(spec.T)};  t_min = {number_text(spec.t_min)}")
    for title, M in (("Q (skew part)", spec.Q), ("D (noise)", spec.D), ("Σ∞ (target covariance)", spec.target),
                     ("F(t) = -beta(t) (Q + D) Σ∞⁻¹", None), ("G Gᵀ(t) = 2 beta(t) D", spec.GGT)):
        if M is None:
            if r.fact("F") is None:
                continue  # Σ∞ is singular or not symmetric: F does not exist
            M = spec.F
        out.append(f"{title} =")
        out += matrix_lines(M, list(v))
    if spec.symbols:
        Q0, D0 = spec.at_init()
        for title, M in (("Q at the initial parameter values", Q0), ("D at the initial parameter values", D0)):
            out.append(f"{title} =")
            out += matrix_lines(M, list(v))
    out.append("")
    out.append("proofs:")
    for p in r.proofs:
        out.append(f"  [{_MARK[p.verdict]}] {p.name}: {p.detail}")
    out.append("")
    noised = r.fact("noised_directly") or []
    misses = r.fact("noise_misses") or []
    reached = r.fact("noise_reaches")
    reaches = (", ".join(reached) or "none") if reached is not None else "not decided (a check above failed)"
    out.append(f"noised directly: {', '.join(noised) or 'none'};  noise reaches: {reaches}"
               + (f", but never the combination{'s' if len(misses) > 1 else ''} {'; '.join(misses)}" if misses else ""))
    out.append(f"the score network must predict noise for: {', '.join(noised) or 'none'}")
    syms = r.fact("learnable_symbols") or []
    out.append(f"learnable parameters: {spec.parameter_count}" + (f" ({', '.join(syms)})" if syms else ""))
    if spec.learned:
        out.append("notation: learned blocks appear in the matrices above as their free entries;")
        out += [f"  {_NOTATION[b.kind].format(b=b.block)}, over ({', '.join(b.over)})" for b in spec.learned]
    return out


def check_json(result) -> dict:
    spec = result.spec
    doc = {"ok": result.ok, "diagnostics": [
        {"severity": d.severity, "message": d.message, "hint": d.hint,
         "file": d.span.file if d.span else None, "line": d.span.line if d.span else None,
         "column": d.span.column if d.span else None} for d in result.diagnostics]}
    if spec is not None:
        doc["spec"] = dict(spec.report.facts)
        doc["proofs"] = [{"name": p.name, "verdict": p.verdict, "detail": p.detail,
                          "line": p.span.line if p.span else None, "column": p.span.column if p.span else None,
                          **({"data": dict(p.data)} if p.data else {})} for p in spec.report.proofs]
    return doc
