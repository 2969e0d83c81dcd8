"""sdec: a compiler for multivariate linear diffusions (specs → checked PyTorch modules)."""
from .api import analyze, parse, parse_file
from .diagnostics import SpecError

__version__ = "0.1.0"
__all__ = ["parse", "parse_file", "analyze", "SpecError", "__version__"]
