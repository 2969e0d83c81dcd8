"""Spec text never reaches an evaluator, and the front end does not depend on the backend."""
import ast
import io
import pathlib
import subprocess
import sys
import tokenize

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
CODE = sorted([*(REPO / "sdec").rglob("*.py"), *(REPO / "runtime").rglob("*.py")])

# sympify / parse_expr turn strings into code; builtin eval / exec run it. Any call is flagged,
# through any module (sp.sympify( too); only a method call such as model.eval() is not the builtin.
FORBIDDEN_ANYWHERE = {"sympify", "parse_expr"}
FORBIDDEN_BUILTINS = {"eval", "exec"}


def forbidden_calls(source: str):
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)]
    for before, tok, after in zip([None] + tokens[:-1], tokens, tokens[1:] + [None]):
        if tok.type != tokenize.NAME or after is None or after.string != "(":
            continue
        attribute = before is not None and before.string == "."
        if tok.string in FORBIDDEN_ANYWHERE or (tok.string in FORBIDDEN_BUILTINS and not attribute):
            yield tok.start[0], tok.string


def test_the_scanner_finds_what_it_should():
    found = list(forbidden_calls("a = sp.sympify(x)\nb = eval ('1')\nmodel.eval()\n# sympify(x)\ns = 'exec(1)'\n"
                                 "exec(code)\nparse_expr(s)\n"))
    assert found == [(1, "sympify"), (2, "eval"), (6, "exec"), (7, "parse_expr")]


@pytest.mark.parametrize("path", CODE, ids=lambda p: str(p.relative_to(REPO)))
def test_no_string_evaluation(path):
    found = list(forbidden_calls(path.read_text(encoding="utf-8")))
    assert found == [], f"{path.relative_to(REPO)}: forbidden calls {found}"


def test_no_sympy_parser_imports():
    for path in CODE:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("sympy.parsing"), path
                assert not any(a.name in ("sympify", "parse_expr") for a in node.names), path
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("sympy.parsing") for a in node.names), path


# ---- import direction ----------------------------------------------------------------------------

FRONT_END = ["api", "check_report"] + sorted(
    f"{folder}.{p.stem}" for folder in ("language", "checks") for p in (REPO / "sdec" / folder).glob("*.py"))
LATER = ("torch", "sdec.emit", "sdec.backend", "sdec.runtime", "runtime")


def imported_modules(path: pathlib.Path, package: str):
    """Absolute names of every module the file imports, at any depth (function-level imports too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            yield prefix
            yield from (f"{prefix}.{a.name}" for a in node.names)


def test_relative_import_resolution():
    src = REPO / "sdec" / "checks" / "mixing.py"
    names = set(imported_modules(src, "sdec.checks"))
    assert "sdec.language.ir" in names and "sdec.checks.proofs" in names


@pytest.mark.parametrize("module", FRONT_END)
def test_front_end_does_not_import_the_backend(module):
    path = REPO / "sdec" / (module.replace(".", "/") + ".py")
    package = ".".join(["sdec"] + module.split(".")[:-1])
    bad = [m for m in imported_modules(path, package) if m.startswith(LATER)]
    assert bad == [], f"sdec/{module}: imports {bad}"


LANGUAGE = sorted(f"language.{p.stem}" for p in (REPO / "sdec" / "language").glob("*.py"))


@pytest.mark.parametrize("module", LANGUAGE)
def test_the_language_does_not_import_the_proofs(module):
    """text → IR comes before the proofs: sdec/language/ imports nothing of sdec/checks/ (the
    symbolic time budget, which both use, lives in the language)."""
    path = REPO / "sdec" / (module.replace(".", "/") + ".py")
    bad = [m for m in imported_modules(path, "sdec.language") if m.startswith("sdec.checks")]
    assert bad == [], f"sdec/{module}: imports {bad}"


def test_importing_the_front_end_loads_no_torch():
    modules = ", ".join(f"sdec.{m}".removesuffix(".__init__") for m in FRONT_END)
    code = (f"import sys, sdec, {modules}\n"
            "sdec.parse(open('specs/cld.sde').read())\n"
            f"bad = sorted(m for m in sys.modules if m.startswith({LATER!r}))\n"
            "print(bad)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
