"""The language: .sde text → the checked IR's input (no torch, no proofs).

diagnostics (positions, errors) → parse (text → syntax nodes) → exact (expressions →
exact sympy values) → build with its process forms recipe, explicit and equations
(statements → ir.Spec); learn holds the learnable parameterizations, format prints a Spec
back as canonical .sde text. linalg is exact linear algebra over the spec's numbers, and
budget bounds the wall time of one symbolic step (every later stage uses it too).
"""
