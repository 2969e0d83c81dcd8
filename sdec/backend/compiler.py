"""sdec.compile: spec → an instance of the generated Diffusion class, in process.

The source is the same text that ``sdec compile SPEC -o FILE`` writes; it is written to a
cache file named by its hash and imported from there with importlib, so the in-process
module and the standalone file are the same code and give bit-identical numbers.
``compile_text`` rebuilds a process from spec text, e.g. the ``spec_text`` of a checkpoint.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile

from ..api import parse, parse_file
from ..emit import kernel_base
from ..emit.module import generate_source
from .lower import lower
from ..language.format import format_spec


def _cache_dir() -> str:
    path = os.environ.get("SDEC_CACHE") or os.path.join(tempfile.gettempdir(), f"sdec-cache-{os.getuid() if hasattr(os, 'getuid') else 'user'}")
    os.makedirs(path, exist_ok=True)
    return path


def load_source(source: str):
    """Import generated source as a module (cached by content hash); return the module.

    The module runs with ``_SDEC_SHARED`` preset to sdec's own CholeskyError, Perturbed and
    ELBOTerms (from sdec.emit.kernel_base), which the shared core then uses instead of its
    own copies: every module compiled in one process raises and returns the same classes."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    name = f"sdec_generated_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(_cache_dir(), name + ".py")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    module._SDEC_SHARED = (kernel_base.CholeskyError, kernel_base.Perturbed, kernel_base.ELBOTerms)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _spec(spec_or_path):
    return spec_or_path if hasattr(spec_or_path, "variables") else parse_file(spec_or_path)


def compile_source(spec_or_path) -> str:
    """The standalone module source for a Spec or a path to a .sde file."""
    return generate_source(lower(_spec(spec_or_path)))


def compile(spec_or_path):  # noqa: A001 - the public verb is sdec.compile
    """Return a fresh instance of the generated ``Diffusion`` (a torch.nn.Module).

    The instance carries ``spec_text``, the spec's source text (a file's decoded text, or
    ``spec.source``; the canonical form when a Spec has none), and ``spec_hash``, the
    canonical hash of the spec (a class attribute of the generated code).  The text is set
    as an attribute here, never spliced into the generated source.
    """
    spec = _spec(spec_or_path)
    proc = load_source(generate_source(lower(spec))).Diffusion()
    proc.spec_text = spec.source if spec.source is not None else format_spec(spec)
    return proc


def compile_text(text: str, filename: str = "<spec>"):
    """Parse spec text (e.g. the ``spec_text`` stored in a checkpoint) and compile it."""
    return compile(parse(text, filename))
