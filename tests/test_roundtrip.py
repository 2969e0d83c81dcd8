"""Hypothesis: generated specs (spec TEXT built from random exact pieces) round-trip through
format_spec, pass every proof, and each kind of damage is rejected at the right place."""
import pathlib
import re
from dataclasses import dataclass, field

import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import sdec
from sdec.checks.stationarity import residual
from sdec.language.format import format_spec

R = sp.Rational
SPECS = pathlib.Path(__file__).resolve().parent.parent / "specs"
FAST = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEAVY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Identifiers a user may pick, keywords of the grammar included (they are names outside their statement).
NAMES = ["x", "v", "w", "u", "z", "y2", "aux_1", "on", "mask", "normal", "state", "dt", "e", "E", "dW"]
SMALL = [R(n, d) for n in range(-3, 4) for d in (1, 2, 4)]
POSITIVE = [R(n, d) for n in (1, 2, 3) for d in (1, 2, 4)]


def text_of(value) -> str:
    return str(sp.Rational(value))


def matrix_literal(M) -> str:
    return "[" + ", ".join("[" + ", ".join(text_of(M[i, j]) for j in range(M.cols)) + "]" for i in range(M.rows)) + "]"


def kalman_rank(A, D) -> int:
    K = A.rows
    blocks, P = [], sp.eye(K)
    for _ in range(K):
        blocks.append(P * D)
        P = P * A
    return sp.Matrix.hstack(*blocks).rank()


@dataclass
class Generated:
    """A spec's text and the exact pieces it was built from (the independent truth)."""

    text: str
    names: tuple
    Q: sp.Matrix       # at the initial parameter values
    D: sp.Matrix
    target: sp.Matrix
    form: str
    lines: dict = field(default_factory=dict)  # statement key -> (line number, text of the line)

    @property
    def A(self):
        return -(self.Q + self.D) * self.target.inv()


@st.composite
def small_matrices(draw, rows, cols, values=SMALL):
    return sp.Matrix(rows, cols, lambda i, j: draw(st.sampled_from(values)))


@st.composite
def skew_matrices(draw, K):
    W = draw(small_matrices(K, K))
    return sp.Matrix(K, K, lambda i, j: W[i, j] if i > j else (-W[j, i] if i < j else 0))


@st.composite
def psd_matrices(draw, K, zero_rows=True):
    """B Bᵀ with a small rational B; some rows of B zero (no noise on those variables)."""
    r = draw(st.integers(1, K))
    B = draw(small_matrices(K, r))
    if zero_rows:
        for i in draw(st.sets(st.integers(0, K - 1), max_size=K - 1)):
            B[i, :] = sp.zeros(1, r)
    return B * B.T, B


@st.composite
def spd_matrices(draw, K):
    L = draw(small_matrices(K, K))
    L = sp.Matrix(K, K, lambda i, j: L[i, j] if i > j else (draw(st.sampled_from(POSITIVE)) if i == j else 0))
    return L * L.T


SCHEDULES = st.one_of(
    st.builds(lambda c: text_of(c), st.sampled_from(POSITIVE)),
    st.builds(lambda a, b: f"{text_of(a)} + {text_of(b)} * t", st.sampled_from(POSITIVE), st.sampled_from(POSITIVE)),
    st.builds(lambda a, b, c: f"{text_of(a)} + {text_of(b)} * t + {text_of(c)} * t^2",
              st.sampled_from(POSITIVE), st.sampled_from([0] + POSITIVE), st.sampled_from(POSITIVE)),
    st.builds(lambda a, b: f"{text_of(a)} * exp({text_of(b)} * t)", st.sampled_from(POSITIVE), st.sampled_from(POSITIVE)),
)


@st.composite
def specs(draw, forms=("recipe", "matrices", "equations", "learn"), max_K=5):
    K = draw(st.integers(1, max_K))
    names = tuple(draw(st.lists(st.sampled_from(NAMES), min_size=K, max_size=K, unique=True)))
    form = draw(st.sampled_from(forms))
    if form == "learn" and K > 4:
        form = "recipe"
    target = draw(spd_matrices(K)) if draw(st.booleans()) else sp.diag(*[draw(st.sampled_from(POSITIVE)) for _ in range(K)])
    Q = draw(skew_matrices(K))
    D, B = draw(psd_matrices(K, zero_rows=form != "learn"))
    if form == "learn":
        D = D + sp.eye(K) / 2  # learned psd/diagonal inits must be positive definite
    if form in ("recipe", "matrices", "equations"):
        assume(kalman_rank(-(Q + D) * target.inv(), D) == K)
    beta = draw(SCHEDULES)
    T = draw(st.sampled_from([R(1, 2), R(1), R(2), R(3)]))
    lines = [f"sde {draw(st.sampled_from(['gen', 'spec_1', 'M']))}", "state " + ", ".join(names)]
    aux = names[1:]
    if aux:
        if draw(st.booleans()):
            lines += [f"init {a} ~ normal(0, {text_of(draw(st.sampled_from(POSITIVE)) / 100)})" for a in aux]
        else:
            S0 = draw(spd_matrices(len(aux))) / 100
            lines.append(f"init ({', '.join(aux)}) ~ normal(0, {matrix_literal(S0)})")
    lines += [f"beta(t) = {beta}", f"T = {text_of(T)}"]
    if draw(st.booleans()):
        lines.append(f"t_min = {draw(st.sampled_from(['1e-3', '1e-4', '0.01', '5e-5']))}")
    lines.append(f"target normal(0, {matrix_literal(target)})")
    keys = {}
    if form == "recipe":
        lines += draw(recipe_lines(names, Q, D))
    elif form == "matrices":
        A = -(Q + D) * target.inv()
        keys["drift"] = len(lines) + 1
        lines.append(f"drift = beta(t) * {matrix_literal(A)}")
        lines.append(f"diffusion = sqrt(2 * beta(t)) * {matrix_literal(B)}")
    elif form == "equations":
        keys["eq"] = len(lines) + 1
        lines += equation_lines(names, -(Q + D) * target.inv(), B)
    else:
        learned, Q, D = draw(learn_lines(names, Q, D))
        lines += learned
    order = draw(st.permutations(range(2, len(lines))))  # statement order is free after sde, state
    ordered = lines[:2] + [lines[i] for i in order]
    where = {k: (ordered.index(lines[n - 1]) + 1, lines[n - 1]) for k, n in keys.items()}
    return Generated("\n".join(ordered) + "\n", names, Q, D, target, form, where)


@st.composite
def recipe_lines(draw, names, Q, D):
    K = len(names)
    out = []
    style = draw(st.sampled_from(["whole", "entries", "params"]))
    if style == "entries":
        out += [f"Q[{names[i]}, {names[j]}] = {text_of(Q[i, j])}" for i in range(K) for j in range(K) if Q[i, j] != 0]
        out += [f"D[{names[i]}, {names[j]}] = {text_of(D[i, j])}" for i in range(K) for j in range(K) if D[i, j] != 0]
        return out
    if style == "params" and K > 1:
        i, j = draw(st.sampled_from([(i, j) for i in range(K) for j in range(i)]))
        cells = [[text_of(Q[a, b]) for b in range(K)] for a in range(K)]
        cells[i][j], cells[j][i] = "q", "-q"
        out.append(f"param q = {text_of(Q[i, j])}")
        out.append("Q = [" + ", ".join("[" + ", ".join(r) + "]" for r in cells) + "]")
        out.append("param g > 0 = 1")
        out.append(f"D = g * {matrix_literal(D)}")
        return out
    out.append(f"Q = {matrix_literal(Q)}")
    out.append(f"D = {matrix_literal(D)}")
    return out


@st.composite
def learn_lines(draw, names, Q, D):
    """learn statements; returns (lines, Q at init, D at init) where the init is known exactly."""
    K = len(names)
    out = []
    q_style = draw(st.sampled_from(["fixed", "init", "mask", "random"]))
    if q_style == "fixed" or K == 1:
        out.append(f"Q = {matrix_literal(Q)}")
    elif q_style == "init":
        out.append(f"learn Q: skew init {matrix_literal(Q)}")
    elif q_style == "mask":
        mask = sp.Matrix(K, K, lambda i, j: 1 if Q[i, j] != 0 else 0)
        out.append(f"learn Q: skew mask {matrix_literal(mask)} init {matrix_literal(Q)}")
    else:
        std, seed = draw(st.sampled_from(POSITIVE)), draw(st.integers(0, 2 ** 32 - 1))
        out.append(f"learn Q: skew init random({text_of(std)}, {seed})")
        Q = None
    # with a random Q the init is not known here, so D must make convergence hold by structure
    kinds = ["psd", "diagonal", "random"] if Q is None else ["psd", "diagonal", "lowrank", "psd_on", "random"]
    kind = draw(st.sampled_from(kinds))
    if kind == "psd":
        out.append(f"learn D: psd init {matrix_literal(D)}")
    elif kind == "diagonal":
        D = sp.diag(*[draw(st.sampled_from(POSITIVE)) for _ in range(K)])
        out.append(f"learn D: diagonal init {matrix_literal(D)}")
    elif kind == "lowrank":
        r = draw(st.integers(1, K))
        B = draw(small_matrices(K, r))
        D = B * B.T
        out.append(f"learn D: lowrank({r}) init {matrix_literal(D)}")
    elif kind == "psd_on":
        keep = sorted(draw(st.sets(st.integers(0, K - 1), min_size=1)))
        D = sp.Matrix(K, K, lambda i, j: D[i, j] if i in keep and j in keep else 0)
        listed = draw(st.permutations([names[i] for i in keep]))
        out.append(f"learn D: psd on ({', '.join(listed)}) init {matrix_literal(D)}")
    else:
        out.append(f"learn D: {draw(st.sampled_from(['psd', 'diagonal']))} init random(1/2, {draw(st.integers(0, 99))})")
        D = None
    return out, Q, D


def equation_lines(names, A, B):
    out = []
    for i, v in enumerate(names):
        drift = " + ".join(f"({text_of(A[i, j])}) * {u}" for j, u in enumerate(names) if A[i, j] != 0) or "0"
        noise = "".join(f" + sqrt(2 * beta(t)) * ({text_of(B[i, k])}) dW_n{k}" for k in range(B.cols) if B[i, k] != 0)
        out.append(f"d{v} = beta(t) * ({drift}) dt{noise}")
    return out


def parsed(g):
    if g.form == "learn" and g.Q is not None and g.D is not None:
        assume(kalman_rank(g.A, g.D) == len(g.names))
    return sdec.parse(g.text, "gen.sde")


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


@st.composite
def damaged_q(draw):
    K = draw(st.integers(2, 4))
    names = ("x", "v", "w", "u")[:K]
    Q = draw(skew_matrices(K))
    i, j = draw(st.sampled_from([(i, j) for i in range(K) for j in range(K)]))
    Q[i, j] = Q[i, j] + draw(st.sampled_from(POSITIVE))  # no longer -Q[j, i] (or no longer 0 on the diagonal)
    head = f"sde bad\nstate {', '.join(names)}\n" + "".join(f"init {a} ~ normal(0, 0.01)\n" for a in names[1:])
    text = head + "beta(t) = 1\nT = 1\ntarget normal(0, I)\n" + f"Q = {matrix_literal(Q)}\nD = I\n"
    return text, names, Q


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


@st.composite
def damaged_d(draw):
    K = draw(st.integers(1, 4))
    names = ("x", "v", "w", "u")[:K]
    D, _ = draw(psd_matrices(K))
    k = draw(st.integers(0, K - 1))
    D[k, k] = D[k, k] - draw(st.sampled_from(POSITIVE))  # may push an eigenvalue below 0
    assume(np.linalg.eigvalsh(np.array(D.evalf(), dtype=float)).min() < -1e-9)
    head = f"sde bad\nstate {', '.join(names)}\n" + "".join(f"init {a} ~ normal(0, 0.01)\n" for a in names[1:])
    text = head + "beta(t) = 1\nT = 1\ntarget normal(0, I)\n" + f"D = {matrix_literal(D)}\n"
    return text, D


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


@st.composite
def damaged_drift(draw):
    g = draw(specs(forms=("matrices",), max_K=3))
    K = len(g.names)
    i = draw(st.integers(0, K - 1))
    delta = draw(st.sampled_from(POSITIVE))
    A = g.A
    A2 = sp.Matrix(A)
    A2[i, i] -= delta  # extra damping on one variable breaks F Σ∞ + Σ∞ Fᵀ + G Gᵀ = 0
    line_no, line = g.lines["drift"]
    text = g.text.replace(line, f"drift = beta(t) * {matrix_literal(A2)}")
    return g, text, A2, line_no


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


@st.composite
def isolated_variable(draw):
    K = draw(st.integers(2, 4))
    names = ("x", "v", "w", "u")[:K]
    Q = draw(skew_matrices(K))
    D, _ = draw(psd_matrices(K))
    k = draw(st.integers(0, K - 1))
    for m in range(K):  # cut variable k off: no drift coupling, no noise
        Q[k, m] = Q[m, k] = 0
        D[k, m] = D[m, k] = 0
    head = f"sde bad\nstate {', '.join(names)}\n" + "".join(f"init {a} ~ normal(0, 0.01)\n" for a in names[1:])
    text = head + "beta(t) = 1\nT = 1\ntarget normal(0, I)\n" + f"Q = {matrix_literal(Q)}\nD = {matrix_literal(D)}\n"
    return text, names, Q, D, k


@FAST
@given(isolated_variable())
def test_noise_not_reaching_a_variable_is_rejected(case):
    text, names, Q, D, k = case
    A = -(Q + D)
    rank = kalman_rank(A, D)
    with pytest.raises(sdec.SpecError) as info:
        sdec.parse(text, "bad.sde")
    exc = info.value
    assert exc.message.startswith(f"rank {rank} < K = {len(names)}: the noise never reaches ")
    assert names[k] in exc.message.split("never reaches ")[1].split(", ")
    assert (exc.line, exc.column) == (text.count("\n"), 5)
