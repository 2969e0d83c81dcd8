"""sdec: a compiler for multivariate linear diffusions (specs → checked PyTorch modules).

Front end (no torch needed): parse, parse_file, analyze, SpecError.
Backend (imports torch on first use): compile, compile_source, compile_text, and the
classes every compiled module raises and returns: CholeskyError, ELBOTerms, Perturbed.
Runtime algorithms over any compiled Diffusion (they live in sdec.runtime, which the
compiler never imports; these names are forwarded on first use): log_likelihood, sample.
"""
from .language.diagnostics import SpecError

__version__ = "0.1.0"
__all__ = ["parse", "parse_file", "analyze", "SpecError", "compile", "compile_source",
           "compile_text", "CholeskyError", "ELBOTerms", "Perturbed", "log_likelihood", "sample", "MIX_TOL", "__version__"]

# Every name but SpecError loads on first use: `import sdec.cli` (the `sdec` command) then
# costs milliseconds, so a Ctrl-C lands inside main's handler, not in the middle of
# importing sympy, and `sdec --help` does not wait for it.
_LAZY = {"parse": ".api", "parse_file": ".api", "analyze": ".api",
         "compile": ".backend.compiler", "compile_source": ".backend.compiler", "compile_text": ".backend.compiler",
         "CholeskyError": ".emit.kernel_base", "ELBOTerms": ".emit.kernel_base", "Perturbed": ".emit.kernel_base",
         "MIX_TOL": ".checks",
         "log_likelihood": ".runtime.likelihood", "sample": ".runtime.sampling"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'sdec' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
