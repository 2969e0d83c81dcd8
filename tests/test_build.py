"""Syntax → IR: every statement kind, the three process forms, learn blocks, params, and the
builder's errors (message and exact position)."""
import numpy as np
import pytest
import sympy as sp

import sdec
from sdec.language.ir import T_SYMBOL as t
from sdec.language.ir import Param

BASE = """sde s
state x, v
init v ~ normal(0, 0.01)
beta(t) = 1
T = 1
target normal(0, I)
"""
P = "Q = [[0, -1], [1, 0]]\nD = diag(0, 1)\n"
BASE3 = """sde s3
state x, v, w
init (v, w) ~ normal(0, 0.01)
beta(t) = 0.1 + 9.9 * t
T = 1
target normal(0, I)
"""
R = sp.Rational


def error_of(text, filename="f.sde"):
    with pytest.raises(sdec.SpecError) as info:
        sdec.parse(text, filename)
    return info.value


# ---- statements --------------------------------------------------------------------------

def test_every_recipe_statement_reaches_the_ir():
    spec = sdec.parse("""sde demo   # name
state x, v, w
const M = 1/4
const Gamma = 2 * sqrt(M)
param a = 0.5
param g > 0 = 2
init v ~ normal(0, 0.02)
init w ~ normal(0, 0.03)
beta(t) = 0.1 + 9.9 * t
T = 2
t_min = 1e-5
target normal(0, diag(1, M, 1))
Q[x, v] = -a
Q[v, x] = a
Q[v, w] = -1; Q[w, v] = 1
D[v, v] = Gamma
D[w, w] = g
""", "demo.sde")
    assert spec.name == "demo" and spec.variables == ("x", "v", "w") and spec.K == 3
    assert spec.data == "x" and spec.auxiliaries == ("v", "w")
    assert dict(spec.constants) == {"M": R(1, 4), "Gamma": 1}
    a, g = sp.Symbol("a", real=True), sp.Symbol("g", positive=True)
    assert spec.params == (Param("a", False, R(1, 2)), Param("g", True, 2))
    assert spec.T == 2 and spec.t_min == R(1, 100000)
    assert spec.beta == R(1, 10) + R(99, 10) * t
    assert spec.target == sp.diag(1, R(1, 4), 1)
    assert spec.aux_init == sp.diag(R(2, 100), R(3, 100))
    assert spec.form == "recipe" and spec.learned == ()
    assert spec.Q == sp.Matrix([[0, -a, 0], [a, 0, -1], [0, 1, 0]])
    assert spec.D == sp.diag(0, 1, g)
    assert spec.parameter_count == 2 and [s.name for s in spec.symbols] == ["a", "g"]
    Q0, D0 = spec.at_init()
    assert Q0 == sp.Matrix([[0, -R(1, 2), 0], [R(1, 2), 0, -1], [0, 1, 0]]) and D0 == sp.diag(0, 1, 2)
    assert spec.filename == "demo.sde" and spec.report.ok


def test_defaults_and_derived_matrices():
    spec = sdec.parse(BASE + P)
    assert spec.t_min == R(1, 1000)
    assert spec.A == sp.Matrix([[0, 1], [-1, -1]])  # -(Q + D) Σ∞⁻¹ by hand
    assert spec.F == spec.A and spec.GGT == sp.diag(0, 2)
    assert spec.noised == (False, True)


def test_grouped_init_gives_a_full_covariance():
    spec = sdec.parse(BASE3.replace("init (v, w) ~ normal(0, 0.01)",
                                    "init (w, v) ~ normal(0, [[0.04, 0.01], [0.01, 0.02]])") + "Q = zeros(3)\nD = I\n")
    # the statement lists (w, v); the IR is ordered like the state (v, w)
    assert spec.aux_init == sp.Matrix([[R(2, 100), R(1, 100)], [R(1, 100), R(4, 100)]])


def test_scalar_covariance_means_a_multiple_of_the_identity():
    spec = sdec.parse(BASE3 + "Q = zeros(3)\nD = I\n")
    assert spec.aux_init == sp.eye(2) / 100 and spec.target == sp.eye(3)


def test_identity_constants_and_matrix_constants():
    spec = sdec.parse(BASE + "const S = [[0, -1], [1, 0]]\nconst c = 3\nQ = c * S\nD = diag(0, c) @ I\n")
    assert spec.Q == sp.Matrix([[0, -3], [3, 0]]) and spec.D == sp.diag(0, 3)
    assert dict(spec.constants)["S"] == sp.Matrix([[0, -1], [1, 0]])


def test_statement_order_does_not_matter_except_for_constants():
    lines = (BASE + P).strip().split("\n")
    assert sdec.parse("\n".join(reversed(lines))) == sdec.parse(BASE + P)


def test_unused_constant_is_a_warning_not_an_error():
    result = sdec.analyze(BASE + "const unused = 3\n" + P, "f.sde")
    assert result.ok
    warnings = [d for d in result.diagnostics if d.severity == "warning" and "constant" in d.message]
    assert [d.message for d in warnings] == ["constant 'unused' is never used"]
    assert (warnings[0].span.line, warnings[0].span.column) == (7, 1)


# ---- the three forms agree ---------------------------------------------------------------

CLD_HEAD = """sde cld
state x, v
const M = 1/4
const Gamma = 2 * sqrt(M)
init v ~ normal(0, 0.01)
beta(t) = 4
T = 1
target normal(0, diag(1, M))
"""
CLD_FORMS = {
    "recipe": "Q = [[0, -1], [1, 0]]\nD[v, v] = Gamma\n",
    "matrices": "drift = beta(t) * [[0, 1/M], [-1, -Gamma/M]]\ndiffusion = [[0], [sqrt(2 * Gamma * beta(t))]]\n",
    "equations": "dx = beta(t) * v / M dt\ndv = beta(t) * (-x - Gamma * v / M) dt + sqrt(2 * Gamma * beta(t)) dW\n",
}


@pytest.mark.parametrize("form", sorted(CLD_FORMS))
def test_cld_in_every_form(form):
    spec = sdec.parse(CLD_HEAD + CLD_FORMS[form])
    assert spec.form == form
    # CLD (docs/math.md §8): Q = [[0, -1], [1, 0]], D = diag(0, Γ), Γ = 2√M = 1, Σ∞ = diag(1, M)
    assert spec.Q == sp.Matrix([[0, -1], [1, 0]]) and spec.D == sp.diag(0, 1)
    assert spec.F == sp.Matrix([[0, 16], [-4, -16]])  # beta A with A = [[0, 1/M], [-1, -Γ/M]]
    assert spec.GGT == sp.diag(0, 8)
    if form != "recipe":
        assert spec.drift == spec.F and spec.diffusion * spec.diffusion.T == spec.GGT


def test_drift_given_entry_by_entry():
    spec = sdec.parse(BASE + "drift[x, v] = 1\ndrift[v, x] = -1\ndrift[v, v] = -1\ndiffusion = [[0], [sqrt(2)]]\n")
    assert spec.form == "matrices" and spec.drift == sp.Matrix([[0, 1], [-1, -1]])
    assert spec.Q == sp.Matrix([[0, -1], [1, 0]]) and spec.D == sp.diag(0, 1)


def test_entries_default_to_zero():
    spec = sdec.parse(BASE + "D[v, v] = 1\nQ[v, x] = 1\nQ[x, v] = -1\n")
    assert spec.Q == sp.Matrix([[0, -1], [1, 0]]) and spec.D == sp.diag(0, 1)


def test_q_may_be_omitted():
    spec = sdec.parse(BASE.replace("state x, v", "state x").replace("init v ~ normal(0, 0.01)\n", "")
                      .replace("normal(0, I)", "normal(0, 1)") + "D = [[1/2]]\n")
    assert spec.Q == sp.zeros(1, 1)


# ---- equations form ------------------------------------------------------------------------

def test_equation_linear_extraction_with_constants_params_and_time():
    spec = sdec.parse(BASE.replace("beta(t) = 1", "beta(t) = 2 + t") + """const k = 3
param a = 1
dx = beta(t) * (a * v) dt
dv = -beta(t) * a * x - k * beta(t) * v + beta(t) * (2 * v - 2 * v) dt + sqrt(2 * k * beta(t)) dW
""")
    a = sp.Symbol("a", real=True)
    b = 2 + t
    assert sp.simplify(spec.drift - sp.Matrix([[0, a * b], [-a * b, -3 * b]])) == sp.zeros(2, 2)
    assert sp.simplify(spec.Q - sp.Matrix([[0, -a], [a, 0]])) == sp.zeros(2, 2)
    assert spec.D == sp.diag(0, 3)


def test_shared_and_private_noises():
    # Σ∞ = I, G Gᵀ = [[1, 1], [1, 2]] = 2D, Q = [[0, -1], [1, 0]]: F = -(Q + D)
    spec = sdec.parse(BASE + """dx = -x/2 - 3*v/2 dt + dW_s
dv = x/2 - v dt + dW_s + dW
""")
    assert spec.wiener == ("s", "v")  # the plain dW of dv is private to v; columns are sorted
    assert spec.diffusion == sp.Matrix([[1, 0], [1, 1]])
    assert spec.GGT == spec.diffusion * spec.diffusion.T == sp.Matrix([[1, 1], [1, 2]])
    assert spec.D == sp.Matrix([[R(1, 2), R(1, 2)], [R(1, 2), 1]])


def test_noise_column_order_does_not_depend_on_statement_order():
    one = sdec.parse(BASE + "dx = -x/2 - 3*v/2 dt + dW_b\ndv = x/2 - v dt + dW_a + dW_b\n")
    two = sdec.parse(BASE + "dv = x/2 - v dt + dW_b + dW_a\ndx = -x/2 - 3*v/2 dt + dW_b\n")
    assert one == two and one.wiener == ("a", "b")


def test_noise_terms_add_up_and_zero_columns_are_dropped():
    spec = sdec.parse(BASE + "dx = v dt + 0 dW_z\ndv = -x - v dt + dW_a - dW_b + dW_b + (sqrt(2) - 1) dW_a\n")
    assert spec.wiener == ("a",) and spec.diffusion == sp.Matrix([[0], [sp.sqrt(2)]])


def test_bare_noise_means_coefficient_one():
    assert sdec.parse(BASE + "dx = v dt\ndv = -x - v dt + sqrt(2) dW\n").D == \
        sdec.parse(BASE + "dx = v dt\ndv = -x - v dt + dW_a + dW_b\n").D


@pytest.mark.parametrize("equation,column", [("dx = v*v dt", 6), ("dx = sin(x) dt", 6), ("dx = v + 1 dt", 6),
                                             ("dx = exp(v) dt", 6), ("dx = x*v dt", 6), ("dx = 1/v dt", 6)])
def test_nonlinear_drift_is_rejected(equation, column):
    exc = error_of(BASE + equation + "\ndv = -x - v dt + sqrt(2) dW\n")
    assert "the drift of dx is not linear in the state" in exc.message
    assert (exc.line, exc.column) == (7, column) and len(exc.errors) == 1


@pytest.mark.parametrize("noise,column", [("x dW", 18), ("sqrt(2) dW_a + v dW_b", 33), ("(1 + x*t) dW", 19)])
def test_multiplicative_noise_is_rejected(noise, column):
    exc = error_of(BASE + "dx = v dt\ndv = -x - v dt + " + noise + "\n")
    assert exc.message == "the noise coefficient depends on the state; sdec handles additive noise only"
    assert (exc.line, exc.column) == (8, column) and len(exc.errors) == 1


# ---- learn blocks ----------------------------------------------------------------------------

def random_values(symbols, seed):
    rng = np.random.default_rng(seed)
    return {s: sp.Rational(float(abs(rng.normal()) + 0.1 if s.is_positive else rng.normal())) for s in symbols}


def numeric(M):
    return np.array(M.evalf().tolist(), dtype=float)


@pytest.mark.parametrize("line,count,check", [
    ("learn D: psd init I", 3, "psd"),
    ("learn D: diagonal init diag(1, 2)", 2, "diagonal"),
    ("learn D: lowrank(1) init [[1, 2], [2, 4]]", 2, "rank1"),
    ("learn D: lowrank(2) init I", 4, "psd"),
    ("learn D: psd on (v) init diag(0, 3)", 1, "only_v"),
])
def test_learned_d_keeps_its_constraint_for_every_parameter_value(line, count, check):
    spec = sdec.parse(BASE + "Q = [[0, -1], [1, 0]]\n" + line + "\n")
    (block,) = spec.learned
    assert block.block == "D" and block.parameter_count == count == spec.parameter_count
    assert len(spec.D.free_symbols) == count
    for seed in range(5):
        D = numeric(spec.D.subs(random_values(spec.D.free_symbols, seed)))
        assert np.allclose(D, D.T) and np.linalg.eigvalsh(D).min() > -1e-12
        if check == "diagonal":
            assert D[0, 1] == 0 and D[1, 0] == 0 and np.all(np.diag(D) > 0)
        if check == "rank1":
            assert np.linalg.matrix_rank(D) == 1
        if check == "only_v":
            assert D[0, 0] == D[0, 1] == D[1, 0] == 0 and D[1, 1] > 0
    report = {p.name: p for p in spec.report.proofs}
    assert report["D is positive semi-definite"].verdict == "proved"
    assert "by parameterization" in report["D is positive semi-definite"].detail


def test_learned_skew_q_with_on_and_mask():
    spec = sdec.parse(BASE3 + "learn Q: skew on (w, x) init [[0, 0, -2], [0, 0, 0], [2, 0, 0]]\nD = diag(0, 1, 1)\n")
    (block,) = spec.learned
    assert block.over == ("x", "w")  # state order, whatever the statement's order
    assert block.parameter_count == 1 and (spec.Q + spec.Q.T) == sp.zeros(3, 3)
    assert all(spec.Q[i, j] == 0 for i in range(3) for j in range(3) if 1 in (i, j))
    assert spec.at_init()[0] == sp.Matrix([[0, 0, -2], [0, 0, 0], [2, 0, 0]])
    masked = sdec.parse(BASE3 + "learn Q: skew mask [[0, 1, 0], [1, 0, 1], [0, 1, 0]] init zeros(3)\n"
                        "D = diag(1, 1, 1)\n")
    (block,) = masked.learned
    assert block.parameter_count == 2 and masked.Q[0, 2] == 0 and masked.Q[2, 0] == 0
    assert masked.Q[0, 1] != 0 and masked.Q[1, 2] != 0 and (masked.Q + masked.Q.T) == sp.zeros(3, 3)


Q3 = "Q = [[0, -1, 0], [1, 0, -1], [0, 1, 0]]\n"


@pytest.mark.parametrize("block_sized,full", [
    ("learn D: diagonal on (v, w) init diag(1, 2)", "learn D: diagonal on (v, w) init diag(0, 1, 2)"),
    ("learn D: psd on (x, w) init [[2, 1], [1, 3]]", "learn D: psd on (x, w) init [[2, 0, 1], [0, 0, 0], [1, 0, 3]]"),
    ("learn D: lowrank(1) on (v, w) init [[1], [2]]", "learn D: lowrank(1) on (v, w) init [[0, 0, 0], [0, 1, 2], [0, 2, 4]]"),
    ("learn D: lowrank(2) init [[1, 0], [1, 1], [0, 2]]", "learn D: lowrank(2) init [[1, 1, 0], [1, 2, 2], [0, 2, 4]]"),
    ("learn D: lowrank(2) on (v, w) init [[1, 2], [2, 5]]", "learn D: lowrank(2) on (v, w) init diag(0, 1, 1) @ [[0, 0, 0], [0, 1, 2], [0, 2, 5]]"),
])
def test_learned_init_block_sized_or_factor_equals_the_full_form(block_sized, full):
    a, b = sdec.parse(BASE3 + Q3 + block_sized + "\n"), sdec.parse(BASE3 + Q3 + full + "\n")
    assert a.learned[0].init == b.learned[0].init and a.at_init() == b.at_init()
    assert a.learned[0].over == b.learned[0].over


def test_learned_init_of_the_wrong_size_lists_the_accepted_forms():
    err = error_of(BASE3 + Q3 + "learn D: lowrank(1) on (v, w) init [[1, 2]]\n")
    assert "must be a 3x3 matrix, the 2x2 block on (v, w) or the 2x1 factor B of D = B Bᵀ, got a 1x2 matrix" in err.message
    assert (err.line, err.column) == (8, 36)
    err = error_of(BASE3 + Q3 + "learn D: psd init diag(1, 2)\n")
    assert "must be a 3x3 matrix, got a 2x2 matrix" in err.message


def _draw(kind, n, rank, std, seed):
    """The documented random(std, seed) recipes of sdec.language.learn, written out again."""
    rng = np.random.default_rng(seed)
    if kind == "skew":
        W = np.tril(rng.normal(0.0, std, (n, n)), -1)
        return W - W.T
    if kind == "psd":
        L = np.eye(n) + np.tril(rng.normal(0.0, std, (n, n)), -1)
        return L @ L.T
    if kind == "diagonal":
        return np.diag(np.exp(rng.normal(0.0, std, n)))
    B = rng.normal(0.0, std, (n, rank))
    return B @ B.T


@pytest.mark.parametrize("line,kind,rank", [("learn D: psd init random(0.5, 3)", "psd", None),
                                            ("learn D: diagonal init random(1, 0)", "diagonal", None),
                                            ("learn D: lowrank(2) init random(2, 7)", "lowrank", 2)])
def test_random_init_is_reproducible_and_documented(line, kind, rank):
    spec = sdec.parse(BASE3 + "learn Q: skew init random(0.3, 11)\n" + line + "\n")
    blocks = {b.block: b for b in spec.learned}
    assert np.allclose(numeric(blocks["Q"].init), _draw("skew", 3, None, 0.3, 11), rtol=0, atol=1e-15)
    std, seed = blocks["D"].random
    assert np.allclose(numeric(blocks["D"].init), _draw(kind, 3, rank, float(std), seed), rtol=0, atol=1e-12)
    assert blocks["Q"].random == (R(3, 10), 11)
    assert all(isinstance(x, sp.Rational) for x in blocks["D"].init)  # exact binary rationals
    assert sdec.parse(BASE3 + "learn Q: skew init random(0.3, 11)\n" + line + "\n") == spec
    other = sdec.parse(BASE3 + "learn Q: skew init random(0.3, 12)\n" + line + "\n")
    assert other.learned != spec.learned


def test_random_init_on_a_sub_block_is_embedded():
    spec = sdec.parse(BASE3 + "Q[x, v] = -1\nQ[v, x] = 1\nQ[v, w] = -1\nQ[w, v] = 1\n"
                      "learn D: psd on (v, w) init random(0.5, 1)\n")
    D0 = numeric(spec.at_init()[1])
    assert np.all(D0[0] == 0) and np.all(D0[:, 0] == 0)
    assert np.allclose(D0[1:, 1:], _draw("psd", 2, None, 0.5, 1), rtol=0, atol=1e-12)


def test_learned_block_symbols_cannot_collide_with_spec_names():
    spec = sdec.parse(BASE + "const LD = 1\nQ = [[0, -LD], [LD, 0]]\nlearn D: psd init I\n")
    names = {s.name for s in spec.symbols}
    assert "LD" not in names and len(names) == 3


# ---- params ------------------------------------------------------------------------------

def test_params_tie_and_fix_entries():
    spec = sdec.parse(BASE3 + "param q > 0 = 1\nparam d > 0 = 0.5\n"
                      "Q = [[0, -q, -q], [q, 0, -q], [q, q, 0]]\nD = diag(0, d, d)\n")
    q, d = sp.Symbol("q", positive=True), sp.Symbol("d", positive=True)
    assert spec.Q.free_symbols == {q} and spec.D == sp.diag(0, d, d)
    assert spec.parameter_count == 2 and spec.learned == ()
    proofs = {p.name: p for p in spec.report.proofs}
    assert proofs["D is positive semi-definite"].verdict == "proved"  # diag of positive symbols
    assert proofs["Q is skew-symmetric"].detail == "symbolically, for every parameter value"


def test_param_bounds_accept_zero_in_any_notation():
    for bound in ["0", "0.0", "0_0", ".0"]:
        spec = sdec.parse(BASE + f"param g > {bound} = 2\nQ = [[0, -1], [1, 0]]\nD = diag(0, g)\n")
        assert spec.params[0].positive


# ---- errors: a table with positions ---------------------------------------------------------

ERRORS = [
    (BASE.replace("sde s\n", "") + P, "missing the spec name", 1, 1),
    (BASE.replace("sde s\n", "sde a\nsde b\n") + P, "the spec name ('sde NAME') is declared twice (first at line 1)", 2, 1),
    (BASE.replace("state x, v\n", "") + P, "missing the state declaration", 1, 1),
    (BASE.replace("state x, v\n", "state x, v\nstate x, v\n") + P, "the state is declared twice (first at line 2)", 3, 1),
    (BASE.replace("state x, v", "state x, x") + P, "state variable 'x' is declared twice", 2, 10),
    (BASE.replace("state x, v", "state x, t") + P, "'t' is reserved and cannot name a state variable", 2, 10),
    (BASE.replace("state x, v", "state x, Q") + P, "'Q' is reserved and cannot name a state variable", 2, 10),
    (BASE.replace("state x, v", "state a, b, c, d, e, f, g, h, i") + P, "9 state variables; sdec handles at most 8", 2, 1),
    (BASE.replace("target normal(0, I)\n", "") + P, "missing the target distribution", 1, 1),
    (BASE.replace("target normal(0, I)", "target normal(0, I)\ntarget normal(0, I)") + P,
     "the target distribution is declared twice (first at line 6)", 7, 1),
    (BASE.replace("target normal(0, I)", "target normal(1, I)") + P, "only zero-mean normal laws are supported", 6, 15),
    (BASE.replace("target normal(0, I)", "target normal(0, diag(1, 1, 1))") + P,
     "the target covariance must be 2x2, got a 3x3 matrix", 6, 18),
    (BASE.replace("target normal(0, I)", "target normal(0, [[1, t], [t, 1]])") + P, "'t' is only available in time-dependent", 6, 23),
    (BASE.replace("T = 1\n", "") + P, "missing the time horizon", 1, 1),
    (BASE.replace("T = 1", "T = 1\nT = 2") + P, "T is assigned twice (first at line 5)", 6, 1),
    (BASE.replace("T = 1", "T = 0") + P, "T must be a positive number, got 0", 5, 5),
    (BASE.replace("T = 1", "T = I") + P, "expected a scalar, got a 2x2 matrix", 5, 5),
    (BASE.replace("T = 1", "T = 1\nt_min = 2") + P, "t_min = 2 must be smaller than T = 1", 6, 9),
    (BASE.replace("T = 1", "T = 1/10000") + P, "t_min = 1/1000 must be smaller than T = 1/10000", 5, 5),
    (BASE.replace("T = 1", "T = 1\nt_min = -1") + P, "t_min must be a positive number, got -1", 6, 9),
    (BASE.replace("beta(t) = 1\n", "") + P, "missing the time change beta(t)", 1, 1),
    (BASE.replace("beta(t) = 1", "beta(s) = 1") + P, "write the time change as beta(t)", 4, 6),
    (BASE.replace("beta(t) = 1", "alpha(t) = 1") + P, "only beta(t) can be defined, not alpha()", 4, 1),
    (BASE.replace("beta(t) = 1", "beta(t) = 1\nbeta(t) = 2") + P, "beta(t) is defined twice (first at line 4)", 5, 1),
    (BASE.replace("beta(t) = 1", "beta(t) = 1 + x") + P, "'x' is a state variable; beta(t) may use only t and constants", 4, 15),
    (BASE.replace("beta(t) = 1", "beta(t) = I") + P, "expected a scalar, got a 2x2 matrix", 4, 11),
    (BASE.replace("init v ~ normal(0, 0.01)\n", "") + P, "auxiliary variable 'v' has no initial law", 2, 10),
    (BASE.replace("init v", "init x") + P, "'x' is the data variable; its initial law is the data", 3, 6),
    (BASE.replace("init v", "init y") + P, "'y' is not an auxiliary state variable", 3, 6),
    (BASE.replace("init v ~ normal(0, 0.01)", "init v ~ normal(0, 0.01)\ninit v ~ normal(0, 0.02)") + P,
     "initial law of 'v' is given twice", 4, 6),
    (BASE.replace("normal(0, 0.01)", "normal(0, [[1, 0], [0, 1]])") + P,
     "the initial covariance must be 1x1, got a 2x2 matrix", 3, 20),
    (BASE.replace("normal(0, 0.01)", "normal(1, 0.01)") + P, "only zero-mean normal laws are supported", 3, 17),
    (BASE + "const a = 1\nconst a = 2\n" + P, "'a' is defined twice", 8, 7),
    (BASE + "const Q = 1\n" + P, "'Q' is reserved and cannot be redefined", 7, 7),
    (BASE + "const x = 1\n" + P, "'x' is already a state variable", 7, 7),
    (BASE + "const a = b\n" + P, "unknown name 'b'", 7, 11),
    (BASE + "const a = t\n" + P, "'t' is only available in time-dependent expressions", 7, 11),
    (BASE + "const a = beta\n" + P, "'beta' is a function; call it as beta(...)", 7, 11),
    (BASE + "const a = foo(1)\n" + P, "unknown function 'foo'", 7, 11),
    (BASE + "const a = sqrt(1, 2)\n" + P, "sqrt() takes 1 argument(s), got 2", 7, 11),
    (BASE + "const a = random(1, 2)\n" + P, "random(std, seed) is only allowed as the init of a learn statement", 7, 11),
    (BASE + "const a = [[1, 2], [3]]\n" + P, "row has 1 entries; the first row has 2", 7, 20),
    (BASE + "const a = [1, 2]\n" + P, "a matrix literal is a list of rows", 7, 11),
    (BASE + "const a = I + 1\n" + P, "cannot add a 2x2 matrix and a scalar", 7, 11),
    (BASE + "const a = I * I\n" + P, "'*' between two matrices is ambiguous", 7, 11),
    (BASE + "const a = 1 @ I\n" + P, "'@' needs two matrices, got a scalar and a 2x2 matrix", 7, 11),
    (BASE + "const a = I @ [[1, 2, 3]]\n" + P, "cannot multiply a 2x2 matrix by a 1x3 matrix", 7, 11),
    (BASE + "const a = 1 / I\n" + P, "cannot divide by a matrix", 7, 11),
    (BASE + "const a = I ^ 2\n" + P, "'^' applies to scalars only", 7, 11),
    (BASE + "const a = inv([[1, 1], [1, 1]])\n" + P, "inv() of a singular matrix", 7, 11),
    (BASE + "const a = eye(17)\n" + P, "eye() sizes must be whole numbers from 1 to 16", 7, 11),
    (BASE + "param a = 1\nparam a = 2\n" + P, "'a' is defined twice", 8, 7),
    (BASE + "param g > 1 = 2\n" + P, "a parameter bound must be '> 0'", 7, 11),
    (BASE + "param g > 0 = -2\nQ = [[0, -1], [1, 0]]\nD = diag(0, g)\n", "parameter 'g' is declared > 0 but starts at -2", 7, 15),
    (BASE + "param a = I\n" + P, "expected a scalar, got a 2x2 matrix", 7, 11),
    (BASE + "param a = 1\nconst b = a\n" + P, "'a' is a learnable parameter; parameters can be used in Q, D", 8, 11),
    (BASE.replace("beta(t) = 1", "beta(t) = g") + "param g > 0 = 1\n" + P, "'g' is a learnable parameter", 4, 11),
    (BASE + "foo = 3\n" + P, "cannot assign to 'foo'", 7, 1),
    (BASE + "foo[x, v] = 3\n" + P, "entries can be assigned in Q, D or drift, not 'foo'", 7, 1),
    (BASE + "Q = [[0, -1], [1, 0]]\nQ = [[0, -1], [1, 0]]\nD = diag(0, 1)\n", "Q is assigned twice (first at line 7)", 8, 1),
    (BASE + P + "Q[x, v] = 1\n", "Q is given whole at line 7 and entry by entry here; use one", 9, 1),
    (BASE + "Q[x, v] = -1\nQ[x, v] = 2\nD[v, v] = 1\n", "Q[x, v] is assigned twice (first at line 7)", 8, 1),
    (BASE + "Q[x, y] = -1\nD[v, v] = 1\n", "'y' is not a state variable (state: x, v)", 7, 6),
    (BASE + "Q = [[0, -1], [1, 0]]\nD = diag(0, 1, 1)\n", "D must be a 2x2 matrix (one row and column per state variable), got a 3x3", 8, 5),
    (BASE + "Q = [[0, -1], [1, 0]]\nD = 1\n", "D must be a 2x2 matrix", 8, 5),
    (BASE + "Q = [[0, -1], [1, 0]]\n", "D is not given; without noise nothing diffuses", 1, 1),
    (BASE, "the process is not declared", 1, 1),
    (BASE + P + "drift = I\ndiffusion = I\n", "the process is declared in two forms (recipe at line 7 and matrices here)", 9, 1),
    (BASE + P + "dx = v dt\ndv = -x dt + dW\n", "the process is declared in two forms (recipe at line 7 and equations here)", 9, 1),
    (BASE + "drift = [[0, 1], [-1, -1]]\n", "the diffusion matrix is missing", 7, 9),
    (BASE + "diffusion = [[0], [1]]\n", "the drift matrix is missing", 7, 1),
    (BASE + "drift = [[0, 1], [-1, -1]]\ndiffusion = [[0], [1], [1]]\n", "diffusion must have 2 rows", 8, 13),
    (BASE + "drift = [[0, 1], [-1, -1]] * t\ndiffusion = [[0], [sqrt(2)]]\n",
     "the drift is not beta(t) times a constant matrix: entry [x, v] divided by beta(t) is t", 7, 9),
    (BASE + "drift = [[0, 1], [-1, -1]]\ndiffusion = [[0], [sqrt(2) * t]]\n",
     "G Gᵀ(t) is not 2 beta(t) times a constant matrix", 8, 13),
    (BASE + "drift = 1\ndiffusion = [[0], [1]]\n", "drift must be a 2x2 matrix", 7, 9),
    (BASE + "dx = v dt\n", "state variable 'v' has no equation", 2, 10),
    (BASE + "dx = v dt\ndx = v dt\ndv = -x - v dt + sqrt(2) dW\n", "dx has two equations (first at line 7)", 8, 1),
    (BASE + "dy = v dt\ndv = -x - v dt + sqrt(2) dW\n", "'dy' does not name the differential of a state variable", 7, 1),
    (BASE + "dx = v dt\ndv = -x dt\n", "no equation has a noise term", 1, 1),
    (BASE + "dx = v dt\ndv = -x - v dt + 0 dW\n", "every noise coefficient is zero; nothing diffuses", 7, 1),
    (BASE + "dx = t * v dt\ndv = -x - v dt + sqrt(2) dW\n", "the drift is not beta(t) times a constant matrix", 7, 1),
    (BASE + "learn R: psd init I\nQ = [[0, -1], [1, 0]]\n", "only Q and D can be learned, not 'R'", 7, 7),
    (BASE + "learn Q: psd init I\nD = diag(0, 1)\n", "Q cannot be learned as 'psd'; choose skew", 7, 10),
    (BASE + "learn D: skew init I\n", "D cannot be learned as 'skew'; choose psd or diagonal or lowrank", 7, 10),
    (BASE + "learn D: lowrank init I\n", "lowrank needs a rank, e.g. lowrank(1)", 7, 10),
    (BASE + "learn D: lowrank(3) init I\n", "rank must be a whole number from 1 to 2", 7, 18),
    (BASE + "learn D: lowrank(0) init I\n", "rank must be a whole number from 1 to 2", 7, 18),
    (BASE + "learn D: psd(1) init I\n", "'psd' takes no rank", 7, 14),
    (BASE + "learn D: psd on (x, y) init I\n", "'y' is not a state variable", 7, 21),
    (BASE + "learn D: psd on (v, v) init I\n", "a variable is listed twice", 7, 18),
    (BASE + "learn D: psd on (v) init I\n", "initial value is nonzero at [x, x], outside the learned variables", 7, 26),
    (BASE + "learn D: psd mask I init I\n", "masks apply to skew blocks", 7, 19),
    (BASE + "learn D: psd init diag(0, 1)\n", "initial value must be positive definite for D = L Lᵀ", 7, 19),
    (BASE + "learn D: psd init [[1, 2], [2, 1]]\n", "(smallest eigenvalue -1)", 7, 19),
    (BASE + "learn D: psd init [[1, 2], [0, 1]]\n", "initial value must be symmetric", 7, 19),
    (BASE + "learn D: diagonal init [[1, 1], [1, 1]]\n", "initial value of a diagonal block must be diagonal", 7, 24),
    (BASE + "learn D: diagonal init diag(1, -1)\n", "diagonal entries must be positive", 7, 24),
    (BASE + "learn D: lowrank(1) init I\n", "initial value has rank 2, more than lowrank(1)", 7, 26),
    (BASE + "learn D: lowrank(1) init -[[1, 1], [1, 1]]\n", "initial value is not positive semi-definite (eigenvalue -2)", 7, 26),
    (BASE + "learn D: psd init 1\n", "the initial value must be a 2x2 matrix, got a scalar", 7, 19),
    (BASE + "learn Q: skew init I\nD = I\n", "initial value of a skew block must be skew-symmetric", 7, 20),
    (BASE + "learn Q: skew mask [[0, 1], [0, 0]] init zeros(2)\nD = I\n", "a skew block's mask must be symmetric", 7, 20),
    (BASE + "learn Q: skew mask [[0, 2], [2, 0]] init zeros(2)\nD = I\n", "the mask must be a 2x2 matrix of 0s and 1s", 7, 20),
    (BASE + "learn Q: skew mask [[0, 0], [0, 0]] init [[0, -1], [1, 0]]\nD = I\n",
     "initial value is nonzero where the mask fixes the entry to zero", 7, 42),
    (BASE + "learn Q: skew init random(0, 1)\nD = I\n", "random(std, seed) needs std > 0", 7, 20),
    (BASE + "learn Q: skew init random(1, -1)\nD = I\n", "random(std, seed) needs std > 0 and a whole seed", 7, 20),
    (BASE + "learn Q: skew init random(1, 1.5)\nD = I\n", "random(std, seed) needs std > 0 and a whole seed", 7, 20),
    (BASE + "learn Q: skew init random(1, 2^32)\nD = I\n", "a whole seed in [0, 2^32)", 7, 20),
    (BASE + "learn Q: skew init random(1)\nD = I\n", "write random(std, seed)", 7, 20),
    (BASE + "learn Q: skew init random(I, 1)\nD = I\n", "expected a scalar, got a 2x2 matrix", 7, 27),
    (BASE + "learn Q: skew init [[0, -1], [1, 0]]\nlearn Q: skew init [[0, -1], [1, 0]]\nD = I\n", "Q is learned twice", 8, 1),
    (BASE + "learn Q: skew init [[0, -1], [1, 0]]\nQ = [[0, -1], [1, 0]]\nD = I\n", "Q is both given and learned", 7, 1),
]


@pytest.mark.parametrize("text,fragment,line,column", ERRORS)
def test_build_error_message_and_position(text, fragment, line, column):
    exc = error_of(text)
    assert fragment in exc.message
    assert (exc.filename, exc.line, exc.column) == ("f.sde", line, column)
    assert exc.render().startswith(f"f.sde:{line}:{column}: error: ")


# Errors that follow from an earlier one are not reported again.
ONE_ERROR = [
    BASE + "const a = foo\nconst b = a + 1\nQ = [[0, -1], [1, 0]]\nD = diag(0, b)\n",
    BASE + "param g > 0 = -2\nQ = [[0, -1], [1, 0]]\nD = diag(0, g)\n",
    BASE.replace("normal(0, 0.01)", "normal(0, [[1, 0], [0, 1]])") + P,
    BASE + "dx = v*v dt\ndv = -x - v dt + sqrt(2) dW\n",
    BASE + "dx = v dt\ndv = -x - v dt + x dW\n",
    BASE + "learn Q: skew init random(0.5, 3)\nlearn D: lowrank init random(1, 0)\n",
    BASE + "learn D: psd init diag(0, 1)\nQ = [[0, -1], [1, 0]]\n",
    BASE + "drift = 1\ndiffusion = [[0], [1]]\n",
    BASE + "learn Q: skew init random(I, 1)\nD = I\n",
]


@pytest.mark.parametrize("text", ONE_ERROR)
def test_no_cascading_errors(text):
    assert len(error_of(text).errors) == 1


def test_several_build_errors_in_one_run():
    text = BASE + "const a = foo\nconst b = 1 / 0\nlearn Q: skew init I\nD = diag(0, bar)\n"
    exc = error_of(text)
    got = [(d.message, d.span.line, d.span.column) for d in exc.errors]
    assert got == [("unknown name 'foo'", 7, 11), ("division by zero", 8, 11),
                   ("initial value of a skew block must be skew-symmetric", 9, 20), ("unknown name 'bar'", 10, 13)]
    assert exc.message == "unknown name 'foo'" and (exc.line, exc.column) == (7, 11)


def test_spec_error_is_a_value_error_with_fields():
    exc = error_of(BASE + "const a = foo\n" + P, "my.sde")
    assert isinstance(exc, ValueError)
    assert (exc.filename, exc.line, exc.column, exc.message) == ("my.sde", 7, 11, "unknown name 'foo'")
    assert str(exc) == exc.render()
    assert exc.render().split("\n")[1:3] == ["    const a = foo", "              ^~~"]


def test_default_filename():
    exc = error_of(BASE.replace("T = 1", "T = 0") + P, None)
    assert exc.filename == "<spec>" and exc.render().startswith("<spec>:5:5: error:")


@pytest.mark.parametrize("text,name,line,column", [
    ("sde state\nstate x\n", "state", 1, 5),
    ("sde s\nstate x, on\n", "on", 2, 10),
    ("sde s\nstate x\nconst normal = 2\n", "normal", 3, 7),
    ("sde s\nstate x\nparam mask = 2\n", "mask", 3, 7),
    ("sde s\nstate x, dt\n", "dt", 2, 10),
])
def test_reserved_words_cannot_be_names(text, name, line, column):
    result = sdec.analyze(text + "beta(t) = 1\nT = 1\ntarget normal(0, I)\nD = I\n", "r.sde")
    found = [d for d in result.diagnostics if f"'{name}' is reserved" in d.message]
    assert found and (found[0].span.line, found[0].span.column) == (line, column)


def test_state_variable_in_beta_is_named_as_such():
    err = error_of(BASE.replace("beta(t) = 1", "beta(t) = 1 + x") + "Q = [[0, -1], [1, 0]]\nD = diag(0, 1)\n")
    assert err.message == "'x' is a state variable; beta(t) may use only t and constants"


def test_missing_statement_points_at_the_sde_line_or_the_end_never_a_comment():
    err = error_of("# a comment\n\nsde s\nstate x\nbeta(t) = 1\ntarget normal(0, I)\nD = I\n# end\n")
    assert err.message == "missing the time horizon" and (err.line, err.column) == (3, 1)
    err = error_of("# a comment\nstate x\nbeta(t) = 1\nT = 1\ntarget normal(0, I)\nD = I\n# end\n")
    assert err.message == "missing the spec name" and (err.line, err.column) == (2, 1)


def test_explicit_diffusion_not_proportional_to_beta_names_the_entry():
    err = error_of(BASE.replace("beta(t) = 1", "beta(t) = 2 + t") +
                   "drift = beta(t) * [[0, 1], [-1, -1]]\ndiffusion = [[0], [sqrt(2)]]\n")
    assert "entry [v, v] of G Gᵀ(t) / (2 beta(t)) is 1/(t + 2), which depends on t" in err.message
    assert (err.line, err.column) == (8, 13)


def test_numbers_in_messages_are_readable():
    err = error_of(BASE.replace("T = 1", "T = 1e-300") + "Q = [[0, -1], [1, 0]]\nD = diag(0, 1)\n")
    assert err.message == "t_min = 1/1000 must be smaller than T = 1e-300"


K1 = "sde s\nstate x\nbeta(t) = 1 + t\nT = 5\ntarget normal(0, 1)\n"


@pytest.mark.parametrize("scalar, matrix", [
    ("Q = 0\nD = 1/2\n", "Q = [[0]]\nD = [[1/2]]\n"),
    ("Q[x, x] = 0\nD = 1/2\n", "Q = [[0]]\nD = [[1/2]]\n"),
    ("drift = -beta(t)/2\ndiffusion = sqrt(beta(t))\n", "drift = [[-beta(t)/2]]\ndiffusion = [[sqrt(beta(t))]]\n"),
])
def test_with_one_state_variable_a_scalar_is_its_1x1_matrix(scalar, matrix):
    a, b = sdec.parse(K1 + scalar), sdec.parse(K1 + matrix)
    assert (a.Q, a.D) == (b.Q, b.D) and a.Q.shape == (1, 1)


def test_a_scalar_is_still_rejected_where_the_state_has_two_variables():
    err = error_of(BASE + "Q = [[0, -1], [1, 0]]\nD = 1/2\n")
    assert "D must be a 2x2 matrix" in err.message and "got a scalar" in err.message
