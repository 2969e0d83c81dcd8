"""Every proof and every diagnostic points at a line and a column: the shipped specs, specs
generated in every form (recipe, matrices, equations, learned), and damaged ones."""
import pathlib

import pytest

from hypothesis import HealthCheck, given, settings

import sdec
from strategies import damaged_d, damaged_drift, damaged_q, isolated_variable, specs

SPECS = sorted((pathlib.Path(__file__).resolve().parent.parent / "specs").glob("*.sde"))
FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def unlocated(text, filename="gen.sde"):
    """What in the analysis of `text` has no line and column, as readable strings."""
    result = sdec.analyze(text, filename)
    missing = [f"diagnostic: {d.message}" for d in result.diagnostics
               if d.span is None or not d.span.line or not d.span.column]
    if result.spec is not None:
        missing += [f"proof: {p.name}" for p in result.spec.report.proofs
                    if p.span is None or not p.span.line or not p.span.column]
    return missing


def test_every_shipped_proof_and_diagnostic_is_located():
    for path in SPECS:
        assert unlocated(path.read_text(encoding="utf-8"), str(path)) == [], path.name


def test_explicit_rank_error_is_located_at_the_diffusion():
    text = ("sde e\nstate x, v\ninit v ~ normal(0, 1)\nbeta(t) = 1\nT = 1\ntarget normal(0, I)\n"
            "drift = [[0, 0], [0, -1]]\ndiffusion = [[0], [sqrt(2)]]\n")
    result = sdec.analyze(text, "e.sde")
    rank = [d for d in result.diagnostics if "rank" in d.message]
    assert rank and all((d.span.line, d.span.column) == (8, 13) for d in rank)
    psd = [p for p in result.spec.report.proofs if p.name.startswith("D is positive")]
    assert psd[0].span.line == 8


@FAST
@given(specs())
def test_generated_specs_are_located(g):
    assert unlocated(g.text) == []


@pytest.mark.parametrize("strategy, text_at", [(damaged_q, 0), (damaged_d, 0), (damaged_drift, 1),
                                              (isolated_variable, 0)])
def test_damaged_specs_are_located(strategy, text_at):
    @FAST
    @given(strategy())
    def check(case):
        assert unlocated(case[text_at]) == []
    check()
