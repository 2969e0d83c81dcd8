"""Hypothesis: generated specs (spec TEXT built from random exact pieces) round-trip through
format_spec, pass every proof, and each kind of damage is rejected at the right place."""
import hashlib
import pathlib
import re

import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import sdec
from sdec.checks.stationarity import residual
from sdec.language.format import format_spec, hash_text
from strategies import damaged_d, damaged_drift, damaged_q, isolated_variable, kalman_rank, parsed, specs

SPECS = pathlib.Path(__file__).resolve().parent.parent / "specs"
FAST = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEAVY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- round trip -----------------------------------------------------------------------------------

def check_roundtrip(g):
    spec = parsed(g)
    text = format_spec(spec)
    again = sdec.parse(text, "printed.sde")
    assert again == spec, text
    assert format_spec(again) == text  # printing is canonical
    return spec


@FAST
@given(specs())
def test_generated_specs_round_trip(g):
    check_roundtrip(g)


@pytest.mark.slow
@HEAVY
@given(specs())
def test_generated_specs_round_trip_heavy(g):
    check_roundtrip(g)


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.sde")), ids=lambda p: p.stem)
def test_shipped_specs_round_trip(path):
    spec = sdec.parse_file(path)
    assert sdec.parse(format_spec(spec)) == spec


MATRIX_SPEC = """sde mk
state x, v, w
init (v, w) ~ normal(0, [[0.01, 0.005], [0.005, 0.01]])
const S = [[1, 0, 0], [0, 2, 0], [0, 0, 3]]
beta(t) = 1
T = 1
target normal(0, S)
learn Q: skew mask [[0, 1, 1], [1, 0, 0], [1, 0, 0]] init [[0, -1, -1], [1, 0, 0], [1, 0, 0]]
learn D: psd on (v, w) init [[1, 0], [0, 1]]
"""


def test_formatted_matrix_rows_align_under_the_first_and_keep_the_hash():
    text = format_spec(sdec.parse(MATRIX_SPEC))
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(" "):  # a continuation row sits under the row above's last "[["'s inner "["
            above = lines[i - 1]
            opener = above.rfind("[[") + 1 if "[[" in above else len(above) - len(above.lstrip())
            assert len(line) - len(line.lstrip()) == opener and line.lstrip().startswith("["), (lines[i - 1], line)
    assert "target normal(0, [[1, 0, 0],\n                  [0, 2, 0]," in text
    assert "learn Q: skew mask [[0, 1, 1],\n                    [1, 0, 0],\n                    [1, 0, 0]] init [[0, -1, -1],\n" \
           "                                     [1, 0, 0]," in text
    assert sdec.parse(text) == sdec.parse(MATRIX_SPEC)
    # the hash is taken over the rows indented as before alignment (5 spaces): unchanged
    old_style = re.sub(r"\n +\[", "\n     [", text)
    assert hash_text(text) == old_style
    assert sdec.compile_text(MATRIX_SPEC).spec_hash == hashlib.sha256(old_style.encode()).hexdigest()[:16]


# ---- generated stationary specs pass every proof -------------------------------------------------

def check_proofs_hold(g):
    spec = parsed(g)
    assert spec.report.ok
    verdicts = {p.name.split(" (")[0]: p.verdict for p in spec.report.proofs}
    assert verdicts["N(0, Σ∞) is stationary"] == "proved"
    assert verdicts["Σ∞"] == "proved"
    assert verdicts["beta(t) > 0 on [0, T]"] == "proved"
    assert all(v != "failed" for v in verdicts.values())
    K = len(g.names)
    # the IR is the process the text describes (at the initial parameter values)
    Q0, D0 = spec.at_init()
    if g.Q is not None:
        assert Q0 == g.Q
    if g.D is not None:
        assert D0 == g.D
    assert spec.target == g.target
    # eigenvalues reported = numpy's eigenvalues of the drift built from the pieces
    if g.Q is not None and g.D is not None:
        A = np.array(g.A.evalf(), dtype=float)
        data = dict(next(p for p in spec.report.proofs if p.name.startswith("eigenvalues")).data)["eigenvalues"]
        got = [complex(a, b) for a, b in data]
        want = list(np.linalg.eigvals(A))
        assert len(got) == K and max(z.real for z in want) < 0
        for z in got:  # each reported eigenvalue matches a distinct numpy one
            i = int(np.argmin([abs(z - w) for w in want]))
            assert abs(z - want.pop(i)) < 1e-6 * max(1.0, np.abs(A).max())


@FAST
@given(specs())
def test_generated_stationary_specs_pass_every_proof(g):
    check_proofs_hold(g)


@pytest.mark.slow
@HEAVY
@given(specs())
def test_generated_stationary_specs_pass_every_proof_heavy(g):
    check_proofs_hold(g)


# ---- damage: each kind rejected with the right message at the right place ----------------------

def column_of_entry(line, i, j):
    """Column (1-based) of entry [i][j] in a one-line matrix literal 'X = [[a, b], [c, d]]'."""
    row = list(re.finditer(r"\[([^\[\]]*)\]", line))[i]
    cells = row.group(1).split(", ")
    return row.start(1) + sum(len(c) + 2 for c in cells[:j]) + 1


def test_column_of_entry_helper():
    line = "Q = [[0, -1/2], [1/2, 0]]"
    assert line[column_of_entry(line, 0, 1) - 1:].startswith("-1/2")
    assert line[column_of_entry(line, 1, 0) - 1:].startswith("1/2")


@FAST
@given(damaged_q())
def test_broken_skew_symmetry_points_at_the_entry(case):
    text, names, Q = case
    S = Q + Q.T
    K = len(names)
    i, j = next((i, j) for i in range(K) for j in range(K) if S[i, j] != 0)  # first offending, row major
    with pytest.raises(sdec.SpecError) as info:
        sdec.parse(text, "bad.sde")
    exc = info.value
    if i == j:
        assert exc.message == f"Q is not skew-symmetric: Q[{names[i]}, {names[i]}] = {Q[i, i]} (the diagonal must be 0)"
    else:
        assert exc.message == (f"Q is not skew-symmetric: Q[{names[i]}, {names[j]}] = {Q[i, j]} but "
                               f"Q[{names[j]}, {names[i]}] = {Q[j, i]} (must be {-Q[i, j]})")
    q_line = text.split("\n").index(next(ln for ln in text.split("\n") if ln.startswith("Q = "))) + 1
    line = text.split("\n")[q_line - 1]
    assert (exc.line, exc.column) == (q_line, column_of_entry(line, i, j))


@FAST
@given(damaged_d())
def test_broken_psd_is_reported_with_the_eigenvalue(case):
    text, D = case
    with pytest.raises(sdec.SpecError) as info:
        sdec.parse(text, "bad.sde")
    exc = info.value
    low = np.linalg.eigvalsh(np.array(D.evalf(), dtype=float)).min()
    assert exc.message == f"D is not positive semi-definite (eigenvalue {low:.6g})"
    assert (exc.line, exc.column) == (text.count("\n"), 5)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damaged_drift())
def test_non_stationary_drift_prints_its_residual(case):
    g, text, A2, line_no = case
    result = sdec.analyze(text, "bad.sde")
    errors = [d for d in result.diagnostics if d.severity == "error"]
    assert not result.ok and len(errors) == 1
    exc = sdec.SpecError(errors, result.source)
    assert exc.message.startswith("the process is not stationary for the declared target: F Σ∞ + Σ∞ Fᵀ + G Gᵀ = [")
    # the residual, from the pieces: F Σ∞ + Σ∞ Fᵀ + G Gᵀ = beta (A2 Σ∞ + Σ∞ A2ᵀ + 2 D)
    spec = result.spec
    R = residual(spec)
    want = (A2 * g.target + g.target * A2.T + 2 * g.D) * spec.beta
    assert sp.simplify(R - want) == sp.zeros(len(g.names)) and R != sp.zeros(len(g.names))
    rows = "; ".join("[" + ", ".join(str(R[i, j]) for j in range(R.cols)) + "]" for i in range(R.rows))
    assert exc.message.endswith(f"= [{rows}] ≠ 0")
    assert (exc.line, exc.column) == (line_no, 9)


@FAST
@given(isolated_variable())
def test_noise_not_reaching_a_variable_is_rejected(case):
    text, names, Q, D, k = case
    A = -(Q + D)
    rank = kalman_rank(A, D)
    with pytest.raises(sdec.SpecError) as info:
        sdec.parse(text, "bad.sde")
    exc = info.value
    assert exc.message.startswith(f"rank {rank} < K = {len(names)} (exact): the noise never reaches ")
    assert re.search(rf"\b{names[k]}\b", exc.message.split("never reaches ")[1])
    assert (exc.line, exc.column) == (text.count("\n"), 5)


# ---- fmt output always checks again: chained constants near the depth limit ------------------

# each step uses the previous constant once (twice would double the value's size per step)
STEPS = st.sampled_from(["sqrt({prev} + {k})", "({prev} + {k}) / {k}", "sin({prev}) + {k}", "{k} * sqrt({prev})"])


@st.composite
def chained_constants(draw):
    n = draw(st.integers(1, 12))  # 60-long chains take sympy minutes to build: see the sixty-chain test
    lines = ["sde chain", "state x", "const c0 = 1"]
    for k in range(1, n + 1):
        lines.append("const c%d = %s" % (k, draw(STEPS).format(prev=f"c{k - 1}", k=k)))
    lines += [f"beta(t) = 1 + t * exp(-c{n} * c{n})", "T = 1", "target normal(0, [[c1 * c1]])", "D = [[c1 * c1]]"]
    return "\n".join(lines) + "\n"


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chained_constants())
def test_fmt_output_parses_and_checks_whenever_the_input_does(text):
    first = sdec.analyze(text, "chain.sde")
    assume(first.spec is not None)  # e.g. a constant past the number limits is rejected in both
    again = sdec.analyze(format_spec(first.spec), "chain_fmt.sde")
    assert [d.message for d in again.diagnostics if d.severity == "error"] == \
        [d.message for d in first.diagnostics if d.severity == "error"]
    assert again.spec == first.spec


def test_chained_constants_are_printed_by_name():
    text = ("sde chain\nstate x\nconst a = sqrt(2)\nconst b = sqrt(a + 1)\nconst m = [[b, 0], [0, a]]\n"
            "beta(t) = 1 + b * t\nT = 1\ntarget normal(0, [[a + 1]])\nD = [[b]]\n")
    spec = sdec.parse(text, "chain.sde")
    formatted = format_spec(spec)
    for line in ("const b = sqrt(1 + a)", "const m = [[b, 0],", "beta(t) = t*b + 1", "D = [[b]]"):
        assert line in formatted, formatted
    assert sdec.parse(formatted, "fmt.sde") == spec


@pytest.mark.slow  # 60 nested radicals take sympy about 10 s to build, twice
def test_sixty_chained_square_roots_format_to_text_that_checks():
    lines = ["sde chain", "state x", "const c0 = 1"] + [f"const c{i} = sqrt(c{i - 1} + {i})" for i in range(1, 61)]
    text = "\n".join(lines + ["beta(t) = c60", "T = 1", "target normal(0, I)", "D = I"]) + "\n"
    spec = sdec.parse(text, "chain.sde")
    formatted = format_spec(spec)
    assert "const c60 = sqrt(c59 + 60)" in formatted and "beta(t) = c60" in formatted
    assert sdec.parse(formatted, "fmt.sde") == spec
