"""Hypothesis strategies shared by the property tests.

Generated specs (test_roundtrip, test_kernel_properties): spec TEXT built from random exact
pieces, returned with those pieces as the independent truth, and damaged variants of it.
Fuzzing (test_fuzz): tokens of the grammar's vocabulary and mutations of the shipped specs.
Numbers (test_parse): number literals in every notation the grammar reads.
"""
import pathlib
from dataclasses import dataclass, field

import numpy as np
import sympy as sp
from hypothesis import assume
from hypothesis import strategies as st

import sdec

SPECS = sorted((pathlib.Path(__file__).resolve().parent.parent / "specs").glob("*.sde"))
SOURCES = [p.read_text(encoding="utf-8") for p in SPECS]


# ---- generated specs -----------------------------------------------------------------------------

R = sp.Rational
# Identifiers a user may pick, near-keywords included (the keywords themselves are reserved).
NAMES = ["x", "v", "w", "u", "z", "y2", "aux_1", "onset", "masks", "normals", "state2", "dt_", "e", "E", "dW"]
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
def specs(draw, forms=("recipe", "matrices", "equations", "learn"), max_K=5, min_K=1):
    K = draw(st.integers(min_K, max_K))
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


# ---- fuzzing: the grammar's vocabulary and mutations of the shipped specs ------------------------

KEYWORDS = ["sde", "state", "const", "param", "init", "target", "normal", "learn", "on", "mask", "dt",
            "beta", "T", "t_min", "Q", "D", "drift", "diffusion", "skew", "psd", "diagonal", "lowrank",
            "random", "t", "pi", "I", "diag", "eye", "zeros", "ones", "inv", "transpose", "sqrt", "exp",
            "log", "sin", "cos", "tanh", "x", "v", "w", "dx", "dv", "dW", "dW_a", "M", "Gamma"]
NUMBERS = ["0", "1", "2", "-1", "0.5", ".5", "5.", "1e-3", "1_000", "2.5E+2", "1e400", "9" * 70, "1e99999", "0.01"]
PUNCT = ["(", ")", "[", "]", ",", "=", "+", "-", "*", "/", "^", "**", "@", "~", ":", ">", ";", "#", "\n", "\n",
         " ", "\t", "[[", "]]", "$", "\x00", "é", "\ufeff", "\r"]
TOKENS = st.sampled_from(KEYWORDS + NUMBERS + PUNCT)


@st.composite
def mutated(draw):
    text = draw(st.sampled_from(SOURCES))
    for _ in range(draw(st.integers(1, 4))):
        if not text:
            break
        kind = draw(st.sampled_from(["delete", "insert", "truncate", "replace", "swap_lines", "duplicate_line"]))
        i = draw(st.integers(0, len(text)))
        if kind == "delete":
            j = draw(st.integers(i, min(len(text), i + 12)))
            text = text[:i] + text[j:]
        elif kind == "insert":
            text = text[:i] + draw(TOKENS) + text[i:]
        elif kind == "truncate":
            text = text[:i]
        elif kind == "replace" and i < len(text):
            text = text[:i] + draw(TOKENS) + text[i + 1:]
        else:
            lines = text.split("\n")
            a, b = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            if kind == "swap_lines":
                lines[a], lines[b] = lines[b], lines[a]
            else:
                lines.insert(b, lines[a])
            text = "\n".join(lines)
    return text


# ---- number literals ---------------------------------------------------------------------------

_digits = st.text("0123456789", min_size=1, max_size=12)


@st.composite
def number_texts(draw):
    whole = draw(_digits)
    frac = draw(st.one_of(st.none(), st.text("0123456789", max_size=12)))
    text = whole if frac is None else f"{whole}.{frac}"
    if draw(st.booleans()):
        text = "." + draw(_digits)
    if draw(st.booleans()):
        text += draw(st.sampled_from("eE")) + draw(st.sampled_from(["", "+", "-"])) + str(draw(st.integers(0, 40)))
    return text
