"""The emitted module reads like a hand-written one and shares sdec's classes in process."""
import ast
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import sdec
from sdec.backend.compiler import compile_text
from sdec.cli import main as cli_main
from sdec.language.format import format_spec

SPECS = os.path.join(os.path.dirname(__file__), "..", "specs")
SHIPPED = ("vpsde", "cld", "alda", "malda", "learned2", "learned3")

PARAMS = """sde withparams
state x, v
param a = 1/2
param g > 0 = 2
param lambda = 1/4
init v ~ normal(0, 0.01)
beta(t) = 0.1 + 9.9 * t
T = 1
target normal(0, I)
Q = [[0, -a - lambda], [a + lambda, 0]]
D = [[0, 0], [0, g]]
"""


def _source(name):
    return sdec.compile_source(os.path.join(SPECS, f"{name}.sde"))


def _functions(source, cls="Diffusion"):
    tree = ast.parse(source)
    (klass,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
    return [n for n in klass.body if isinstance(n, ast.FunctionDef)]


@pytest.mark.parametrize("name", SHIPPED)
def test_docstring_carries_the_sde_and_the_canonical_spec(name):
    spec = sdec.parse_file(os.path.join(SPECS, f"{name}.sde"))
    source = sdec.compile_source(spec)
    doc = ast.get_docstring(ast.parse(source), clean=False)
    for needle in ("F(t) = beta(t) A", "G(t) G(t)ᵀ = 2 beta(t) D", "A = -(Q + D) Σ∞⁻¹", "Σ∞ = ",
                   "initial law: x = the data", "t_min = 1/1000", "T = 1", "beta(t) = "):
        assert needle in doc, needle
    canonical = "\n".join("    " + ln for ln in format_spec(spec).splitlines())
    assert canonical in doc


@pytest.mark.parametrize("name", SHIPPED)
def test_one_docstring_and_a_banner_before_the_shared_core(name):
    source = _source(name)
    tree = ast.parse(source)
    strings = [n for n in tree.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)]
    assert len(strings) == 1 and tree.body[0] is strings[0]
    lines = source.splitlines()
    native = next(i for i, ln in enumerate(lines) if "native K x K pipeline" in ln and ln.startswith("# ==="))
    banner = next(i for i, ln in enumerate(lines) if "shared numerical core" in ln and ln.startswith("# ==="))
    first_def = next(i for i, ln in enumerate(lines) if ln.startswith(("class ", "def ", "_NATIVE_STATE")))
    core_first = next(i for i, ln in enumerate(lines) if ln.startswith("_SERIES_TAU"))
    assert native < first_def < banner < core_first


@pytest.mark.parametrize("name", SHIPPED + ("withparams",))
def test_generated_class_has_no_noise(name):
    source = _source(name) if name != "withparams" else sdec.compile_source(sdec.parse(PARAMS, "p.sde"))
    klass = source[source.index("class Diffusion("):]
    for bad in ("+ (0.0)", "zeros_like(t) +", "p_0"):
        assert bad not in klass, bad
    assert not re.search(r"\(\d+/\d+\)", klass)  # rationals print as float literals: 9.9*t, not ((99/10))*t
    for fn in _functions(source):
        stored = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        loaded = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        assert stored <= loaded, (fn.name, stored - loaded)


def test_parameters_are_named_after_the_spec():
    source = sdec.compile_source(sdec.parse(PARAMS, "p.sde"))
    blocks = next(ast.get_source_segment(source, f) for f in _functions(source) if f.name == "_blocks")
    assert "a = self.p_a.double()" in blocks
    assert "g = torch.nn.functional.softplus(self.p_g.double())" in blocks
    assert "param_lambda = self.p_lambda.double()" in blocks  # a Python keyword gets a prefix
    proc = compile_text(PARAMS, "p.sde")
    # the state_dict keys (what checkpoints store) are unchanged: p_<name>
    assert {"p_a", "p_g", "p_lambda"} <= set(proc.state_dict())
    Q, D = proc.Q, proc.D
    assert float(Q[1, 0]) == pytest.approx(0.75) and float(D[1, 1]) == pytest.approx(2.0)


def test_public_beta_and_B():
    proc = sdec.compile(os.path.join(SPECS, "vpsde.sde"))
    t = torch.tensor([[0.0, 0.5], [0.25, 1.0]])
    assert proc.beta(t).shape == t.shape and proc.beta(t).dtype == torch.float32
    assert float(proc.beta(0.5)) == pytest.approx(0.1 + 9.9 * 0.5, rel=1e-6)
    B = proc.B(torch.tensor([0.5], dtype=torch.float64))
    assert float(B) == pytest.approx(0.1 * 0.5 + 4.95 * 0.25, rel=1e-15)


def test_result_and_error_classes_are_sdecs_own_in_every_compiled_module():
    cld, vp = (sdec.compile(os.path.join(SPECS, f"{n}.sde")) for n in ("cld", "vpsde"))
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.6], dtype=torch.float64)
    terms = [p.elbo(x, lambda y, tt: -y, t=t) for p in (cld, vp)]
    assert all(type(e) is sdec.ELBOTerms for e in terms)
    assert type(cld.perturb(x, t)) is sdec.Perturbed
    for proc in (cld, vp):
        with pytest.raises(sdec.CholeskyError):  # Σ_0 = 0 from a fixed y0: not factorable
            proc.perturb(torch.zeros(2, proc.K, 3, dtype=torch.float64), 0.0, hybrid=False)


def test_standalone_file_runs_with_torch_alone(tmp_path):
    out = tmp_path / "cld_module.py"
    assert cli_main(["compile", os.path.join(SPECS, "cld.sde"), "-o", str(out)]) == 0
    script = textwrap.dedent(f"""
        import importlib.util, sys
        sys.modules["sdec"] = None           # any import of sdec now raises ImportError
        try:
            import sdec
        except ImportError:
            pass
        else:
            raise SystemExit("sdec importable")
        spec = importlib.util.spec_from_file_location("cld_module", {str(out)!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        import torch
        torch.set_num_threads({torch.get_num_threads()})  # the same BLAS rounding as this process
        proc = mod.Diffusion()
        Phi, Sigma = proc.transition(torch.tensor([0.5], dtype=torch.float64))
        assert mod.CholeskyError.__module__ == "cld_module"
        try:
            proc.perturb(torch.zeros(1, 2, 3, dtype=torch.float64), 0.0, hybrid=False)
        except mod.CholeskyError:
            print("caught")
        print(sorted(m for m in sys.modules if m.split(".")[0] == "sdec" and sys.modules[m] is not None))
        print(float(Sigma[0, 0, 0]).hex())
    """)
    run = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.split("\n")
    assert lines[0] == "caught" and lines[1] == "[]"
    proc = sdec.compile(os.path.join(SPECS, "cld.sde"))
    assert lines[2] == float(proc.transition(torch.tensor([0.5], dtype=torch.float64))[1][0, 0, 0]).hex()
