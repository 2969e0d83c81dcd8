"""sdec.runtime: training, evaluation and data readers over compiled Diffusion modules.

Installed as ``sdec.runtime`` (the folder is the top-level ``runtime/`` of the repository).
It depends only on the public interface of a compiled module and on sdec's public API.
"""
