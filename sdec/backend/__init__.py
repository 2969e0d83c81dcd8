"""The backend: a checked Spec → a kernel plan (lower, with learned and t_min) → the
generated module (sdec.emit) → an instance in process (compiler), and ``sdec verify``
(verify) against independent computations. Imports torch only where a module is run.
"""

MAX_SAMPLES = 1_000_000  # Euler–Maruyama paths of `sdec verify` (1000 steps each): bounds its time and memory
