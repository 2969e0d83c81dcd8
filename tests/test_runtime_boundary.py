"""The two wings meet at one interface: the compiler never imports the runtime, and the
runtime uses only public sdec names and the compiled Diffusion interface."""
import ast
import pathlib

import pytest
import torch

import sdec
from sdec.runtime.interface import Diffusion, InterfaceError, check_process

REPO = pathlib.Path(__file__).resolve().parent.parent
SPECS = sorted((REPO / "specs").glob("*.sde"))
# The CLI dispatches the runtime's subcommands, and sdec/__init__ forwards two names lazily.
DISPATCH = {"sdec/cli.py", "sdec/__init__.py"}


def imports(path, package):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            for a in node.names:
                yield mod, a.name


def compiler_files():
    return [p for p in (REPO / "sdec").rglob("*.py") if str(p.relative_to(REPO)) not in DISPATCH]


def runtime_files():
    return sorted((REPO / "runtime").rglob("*.py"))


@pytest.mark.parametrize("path", compiler_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_compiler_never_imports_the_runtime(path):
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    bad = [m for m, _ in imports(path, package) if m and (m.startswith(("sdec.runtime", "runtime")))]
    assert bad == [], f"{path.relative_to(REPO)} imports the runtime: {bad}"


@pytest.mark.parametrize("path", runtime_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_runtime_uses_only_public_sdec_names(path):
    rel = path.relative_to(REPO / "runtime").with_suffix("").parts
    package = ".".join(("sdec", "runtime") + rel[:-1])
    bad = []
    for mod, name in imports(path, package):
        if not mod or not mod.startswith("sdec") or mod.startswith("sdec.runtime"):
            continue
        if mod == "sdec" and (name is None or name in sdec.__all__):
            continue
        bad.append(f"{mod}.{name}" if name else mod)
    assert bad == [], f"runtime/{'/'.join(rel)}.py uses private compiler names: {bad}"


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_every_compiled_spec_satisfies_the_interface(spec):
    proc = sdec.compile(spec)
    assert isinstance(proc, Diffusion)
    check_process(proc)


def test_check_process_names_what_is_missing_or_wrong():
    with pytest.raises(InterfaceError, match="missing"):
        check_process(torch.nn.Linear(2, 2))
    proc = sdec.compile(REPO / "specs" / "cld.sde")
    proc.noised = (True,)  # instance attribute shadows the class's
    with pytest.raises(InterfaceError, match="K = 2"):
        check_process(proc)


@pytest.mark.parametrize("path", runtime_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_runtime_keeps_no_copy_of_the_kernel_algebra(path):
    """One PSD square root and one K x K apply: the runtime takes G(t) from proc.diffusion(t)
    and applies K x K matrices with proc.apply_kk, instead of its own eigh and einsum."""
    calls = {n.func.attr for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert not calls & {"eigh", "einsum"}, f"{path.relative_to(REPO)} calls {sorted(calls & {'eigh', 'einsum'})}"
