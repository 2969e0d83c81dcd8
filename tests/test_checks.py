"""The proofs: verdicts on the shipped specs (against independent numpy/scipy computations), and
each failure with its message at the construct at fault."""
import functools
import pathlib

import numpy as np
import pytest
import sympy as sp
from scipy.linalg import expm

import sdec
from sdec.check_report import check_text
from sdec.checks.mixing import mixing_numbers
from sdec.checks.schedule import integrated_beta
from sdec.language.ir import T_SYMBOL as t

SPECS = pathlib.Path(__file__).resolve().parent.parent / "specs"
SHIPPED = sorted(p.stem for p in SPECS.glob("*.sde"))
MDM_B1 = 0.1 + 9.9 / 2  # B(1) for beta(t) = 0.1 + 9.9 t


@functools.lru_cache(maxsize=None)
def shipped(name):
    return sdec.parse_file(SPECS / f"{name}.sde")


def proofs(spec):
    return {p.name.split(" (")[0]: p for p in spec.report.proofs}


def proof(spec, prefix):
    found = [p for p in spec.report.proofs if p.name.startswith(prefix)]
    assert len(found) == 1, [p.name for p in spec.report.proofs]
    return found[0]


def error_of(text, filename="bad.sde"):
    with pytest.raises(sdec.SpecError) as info:
        sdec.parse(text, filename)
    return info.value


def eigenvalues_reported(spec):
    data = dict(proof(spec, "eigenvalues of A").data)["eigenvalues"]
    return [complex(re, im) for re, im in data]


def same_multiset(a, b, tol):
    """Each value of a matched to a distinct value of b within tol."""
    rest = list(b)
    for z in a:
        i = int(np.argmin([abs(z - w) for w in rest]))
        if abs(z - rest[i]) > tol:
            return False
        rest.pop(i)
    return not rest


def kalman_rank(A, D):
    blocks, P = [], np.eye(len(A))
    for _ in range(len(A)):
        blocks.append(P @ D)
        P = P @ A
    return np.linalg.matrix_rank(np.hstack(blocks))


# Hand-written from docs/math.md §8, not read from the specs.
S = np.sqrt
HAND = {
    "vpsde": dict(Q=[[0]], D=[[0.5]], target=[[1]], B1=MDM_B1),
    "cld": dict(Q=[[0, -1], [1, 0]], D=[[0, 0], [0, 1]], target=[[1, 0], [0, 0.25]], B1=4.0),
    "alda": dict(Q=[[0, -1, 0], [1, 0, -1], [0, 1, 0]], D=np.diag([0, 0, 1.0]), target=np.eye(3), B1=MDM_B1),
    "malda": dict(Q=[[0, -1, -1], [1, 0, -1], [1, 1, 0]], D=np.diag([0, 2.0, 2.0]), target=np.eye(3), B1=MDM_B1),
    "learned2": dict(Q=[[0, -1], [1, 0]], D=np.diag([0.1, 1.0]), target=np.eye(2), B1=MDM_B1),
    "learned3": dict(Q=[[0, -1, -1], [1, 0, -1], [1, 1, 0]], D=np.diag([0.1, 2.0, 2.0]), target=np.eye(3), B1=MDM_B1),
}


def hand_A(name):
    h = HAND[name]
    return -(np.array(h["Q"], float) + np.array(h["D"], float)) @ np.linalg.inv(np.array(h["target"], float))


def test_every_shipped_spec_is_covered():
    assert set(SHIPPED) == set(HAND)


# ---- verdicts on the shipped specs ---------------------------------------------------------------

@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spec_proofs_hold(name):
    spec = shipped(name)
    assert spec.report.ok
    p = proofs(spec)
    fixed = not spec.learned
    assert p["Σ∞"].verdict == "proved"
    assert p["beta(t) > 0 on [0, T]"].verdict == "proved"
    assert p["Q is skew-symmetric"].verdict == "proved"
    assert p["D is positive semi-definite"].verdict == "proved"
    assert p["N(0, Σ∞) is stationary"].verdict == "proved"
    conv = proof(spec, "converges to N(0, Σ∞)")
    assert conv.verdict == "proved"
    if fixed:
        assert proof(spec, "noise reaches every variable").detail == f"rank {spec.K} = K (exact)"
    else:  # learned2/3 learn a full psd D: positive definite for every parameter value
        assert "for every parameter value" in proof(spec, "noise reaches every variable").detail
        assert "Lyapunov" in conv.detail


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_eigenvalues_and_kalman_rank_match_numpy(name):
    spec = shipped(name)
    A = hand_A(name)
    assert same_multiset(eigenvalues_reported(spec), np.linalg.eigvals(A), 1e-9)
    assert np.all(np.linalg.eigvals(A).real < 0)
    assert kalman_rank(A, np.array(HAND[name]["D"], float)) == spec.K


def test_malda_eigenvalues_from_the_paper():
    eig = eigenvalues_reported(shipped("malda"))
    assert same_multiset(eig, [-1.5 - 1.3229j, -1.5 + 1.3229j, -1.0], 1e-4)
    assert "-1.5-1.32288i, -1.5+1.32288i, -1" in proof(shipped("malda"), "eigenvalues of A").detail


def test_cld_eigenvalue_minus_two_is_double():
    eig = eigenvalues_reported(shipped("cld"))
    assert same_multiset(eig, [-2, -2], 1e-6)
    # exactly: the characteristic polynomial of A = [[0, 4], [-1, -4]] is (λ + 2)²
    A = shipped("cld").A
    lam = sp.Symbol("lam")
    assert sp.factor(A.charpoly(lam).as_expr()) == (lam + 2) ** 2


def test_vpsde_eigenvalue():
    assert same_multiset(eigenvalues_reported(shipped("vpsde")), [-0.5], 1e-12)


@pytest.mark.parametrize("name", SHIPPED)
def test_mixing_numbers_match_scipy(name):
    spec = shipped(name)
    A = hand_A(name)
    B1 = HAND[name]["B1"]
    Phi = expm(B1 * A)
    K = spec.K
    St = np.array(HAND[name]["target"], float)
    S0 = np.zeros((K, K))
    S0[1:, 1:] = 0.01 * np.eye(K - 1)
    ST = St + Phi @ (S0 - St) @ Phi.T
    Si = np.linalg.inv(St)
    kl = 0.5 * (np.trace(Si @ ST) - K + np.log(np.linalg.det(St)) - np.log(np.linalg.det(ST)))
    mean = 0.5 * Phi[:, 0] @ Si @ Phi[:, 0]
    data = dict(proof(spec, "mixed by T").data)
    assert data["B_T"] == pytest.approx(B1, rel=1e-12)
    assert np.allclose(data["phi_T"], Phi, atol=1e-10)
    assert data["phi_T_max"] == pytest.approx(np.abs(Phi).max(), rel=1e-9)
    assert data["kl_x0"] == pytest.approx(kl, rel=1e-6, abs=1e-14)
    assert data["mean_term_unit_x"] == pytest.approx(mean, rel=1e-9)


def test_alda_has_not_mixed_and_says_so():
    spec = shipped("alda")
    mixing = proof(spec, "mixed by T")
    assert mixing.verdict == "warning" and spec.report.ok
    assert dict(mixing.data)["phi_T_max"] == pytest.approx(0.37, abs=0.005)  # docs/math.md §8
    assert "has NOT reached its target by T" in mixing.detail
    assert (mixing.span.line, mixing.span.column) == (14, 5)  # points at T = 1
    result = sdec.analyze((SPECS / "alda.sde").read_bytes(), "specs/alda.sde")
    assert result.ok and [d.severity for d in result.diagnostics] == ["warning"]


@pytest.mark.parametrize("name", ["vpsde", "cld", "malda", "learned2", "learned3"])
def test_other_shipped_specs_have_mixed(name):
    assert proof(shipped(name), "mixed by T").verdict == "checked"


def test_cld_kernel_anchor_from_the_reference():
    """docs/math.md §2: M⁻¹ = 4, Γ = 1, B = 1.2, Σ0 = diag(0, 0.01) gives this Σ; the KL reported
    for a spec with B(T) = 1.2 must be the KL of that Σ against Σ∞ = diag(1, 1/4)."""
    spec = sdec.parse((SPECS / "cld.sde").read_text().replace("beta(t) = 4", "beta(t) = 1.2"))
    Sigma = np.array([[0.859357, 0.04685], [0.04685, 0.234278]])
    St = np.diag([1.0, 0.25])
    kl = 0.5 * (np.trace(np.linalg.inv(St) @ Sigma) - 2 + np.log(np.linalg.det(St)) - np.log(np.linalg.det(Sigma)))
    numbers = mixing_numbers(spec, integrated_beta(spec.beta))
    assert numbers["kl_x0"] == pytest.approx(kl, rel=2e-4)
    # the mean of x after B = 1.2 with g = 1/Γ = 1: e^{-2B}(2B + 1) (docs/math.md §2)
    assert numbers["phi_T"][0][0] == pytest.approx(np.exp(-2.4) * 3.4, rel=1e-12)


def test_noised_variables_facts():
    assert shipped("cld").report.fact("noised_directly") == ["v"]
    assert shipped("malda").report.fact("noised_directly") == ["v", "w"]
    assert shipped("alda").report.fact("noise_reaches") == ["x", "v", "w"]
    assert shipped("learned2").report.fact("noised_directly") == ["x", "v"]


# ---- B(t) ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta,B", [
    ("0.1 + 9.9 * t", sp.Rational(1, 10) * t + sp.Rational(99, 20) * t ** 2),
    ("4", 4 * t), ("exp(t)", sp.exp(t) - 1), ("1 + t^3", t + t ** 4 / 4), ("1/(t + 1)", sp.log(t + 1)),
    ("2 + sin(10 * t)", 2 * t + (1 - sp.cos(10 * t)) / 10),
])
def test_closed_form_b_is_the_integral_of_beta(beta, B):
    spec = sdec.parse((SPECS / "malda.sde").read_text().replace("beta(t) = 0.1 + 9.9 * t", f"beta(t) = {beta}"))
    closed = integrated_beta(spec.beta)
    assert sp.simplify(closed - B) == 0
    assert "closed form B(t) =" in proof(spec, "B(t)").detail
    # and numerically, against a trapezoid rule on beta itself
    f = sp.lambdify(t, spec.beta, "numpy")
    grid = np.linspace(0, 1, 20001)
    assert float(closed.subs(t, 1)) == pytest.approx(np.trapezoid(f(grid) + 0 * grid, grid), rel=1e-6)


def test_b_without_closed_form_falls_back_to_quadrature():
    spec = sdec.parse((SPECS / "malda.sde").read_text().replace("beta(t) = 0.1 + 9.9 * t", "beta(t) = t^t + 1"))
    assert proof(spec, "B(t)").detail.startswith("no closed form found")
    assert dict(proof(spec, "mixed by T").data)["B_T"] == pytest.approx(1.7834305107121, rel=1e-9)  # 1 + ∫ t^t


# ---- failures: message and position ------------------------------------------------------------------

HEAD = """sde bad
state x, v
init v ~ normal(0, 0.01)
beta(t) = 0.1 + 9.9 * t
T = 1
target normal(0, I)
"""


def test_non_skew_q_points_at_the_offending_entry():
    exc = error_of(HEAD + "Q = [[0, -1],\n     [2, 0]]\nD = diag(0, 1)\n")
    assert exc.message == "Q is not skew-symmetric: Q[x, v] = -1 but Q[v, x] = 2 (must be 1)"
    assert (exc.line, exc.column) == (7, 10)
    exc = error_of(HEAD + "Q[x, v] = -1\nQ[v, x] = 1\nQ[v, v] = 3\nD = diag(0, 1)\n")
    assert exc.message == "Q is not skew-symmetric: Q[v, v] = 3 (the diagonal must be 0)"
    assert (exc.line, exc.column) == (9, 11)


def test_non_psd_d_message_has_the_eigenvalue():
    exc = error_of(HEAD + "Q = [[0, -1], [1, 0]]\nD = [[1/2, 0], [0, -1/2]]\n", "specs/bad.sde")
    assert exc.render().split("\n")[0] == \
        "specs/bad.sde:8:5: error: D is not positive semi-definite (eigenvalue -0.5)"
    exc = error_of(HEAD + "Q = [[0, -1], [1, 0]]\nD = [[1, 2], [2, 1]]\n")
    assert exc.message == f"D is not positive semi-definite (eigenvalue {np.linalg.eigvalsh([[1, 2], [2, 1]]).min():.6g})"
    assert "not symmetric" in error_of(HEAD + "Q = [[0, -1], [1, 0]]\nD = [[1, 1], [0, 1]]\n").message


def test_non_psd_d_with_parameters_is_checked_at_the_initial_values():
    exc = error_of(HEAD + "param g = -2\nQ = [[0, -1], [1, 0]]\nD = diag(0, g)\n")
    assert exc.message == "D is not positive semi-definite at the initial values (eigenvalue -2)"
    assert (exc.line, exc.column) == (9, 5)
    spec = sdec.parse(HEAD + "param g = 2\nQ = [[0, -1], [1, 0]]\nD = [[g, 1], [1, g]]\n")
    psd = proof(spec, "D is positive semi-definite")
    assert psd.verdict == "checked" and "not proved for every value" in psd.detail


@pytest.mark.parametrize("cov,fragment", [
    ("diag(1, -1)", "not positive definite (eigenvalue -1)"),
    ("[[1, 2], [2, 1]]", "not positive definite (eigenvalue -1)"),
    ("diag(1, 0)", "not positive definite (eigenvalue 0)"),
    ("[[1, 2], [0, 1]]", "not symmetric"),
])
def test_target_must_be_spd(cov, fragment):
    exc = error_of(HEAD.replace("normal(0, I)", f"normal(0, {cov})") + "Q = [[0, -1], [1, 0]]\nD = diag(0, 1)\n")
    assert exc.message.startswith("The target covariance Σ∞ is") and fragment in exc.message
    assert (exc.line, exc.column) == (6, 18) and len(exc.errors) == 1


@pytest.mark.parametrize("cov,fragment", [("-0.01", "(eigenvalue -0.01)"), ("0", "(eigenvalue 0)")])
def test_initial_covariance_must_be_pd(cov, fragment):
    exc = error_of(HEAD.replace("normal(0, 0.01)", f"normal(0, {cov})") + "Q = [[0, -1], [1, 0]]\nD = diag(0, 1)\n")
    assert exc.message.startswith("The initial covariance of the auxiliaries is not positive definite")
    assert fragment in exc.message and (exc.line, exc.column) == (3, 20)


def test_grouped_initial_covariance_must_be_pd():
    text = ("sde bad\nstate x, v, w\ninit (v, w) ~ normal(0, [[1, 2], [2, 1]])\nbeta(t) = 1\nT = 1\n"
            "target normal(0, I)\nQ = zeros(3)\nD = I\n")
    exc = error_of(text)
    assert "(eigenvalue -1)" in exc.message and (exc.line, exc.column) == (3, 25)


def residual_matrix(F, G, Sigma):
    F, G, Sigma = (np.array(m, dtype=float) for m in (F, G, Sigma))
    return F @ Sigma + Sigma @ F.T + G @ G.T


def test_non_stationary_explicit_drift_prints_the_residual():
    exc = error_of(HEAD.replace("beta(t) = 0.1 + 9.9 * t", "beta(t) = 1")
                   + "drift = [[0, 1], [-1, -2]]\ndiffusion = [[0], [sqrt(2)]]\n")
    R = residual_matrix([[0, 1], [-1, -2]], [[0], [np.sqrt(2)]], np.eye(2))
    assert np.allclose(R, [[0, 0], [0, -2]])
    assert exc.message == ("the process is not stationary for the declared target: "
                           "F Σ∞ + Σ∞ Fᵀ + G Gᵀ = [[0, 0]; [0, -2]] ≠ 0")
    assert (exc.line, exc.column) == (7, 9)


def test_non_stationary_equations_with_time_dependence_print_the_residual():
    exc = error_of(HEAD + "dx = beta(t) * v dt\ndv = beta(t) * (-x - v) dt + sqrt(beta(t)) dW\n")
    # residual = F + Fᵀ + G Gᵀ with F = beta [[0, 1], [-1, -1]], G Gᵀ = diag(0, beta): [[0, 0], [0, -beta]]
    assert exc.message.endswith("= [[0, 0]; [0, -99*t/10 - 1/10]] ≠ 0")
    assert (exc.line, exc.column) == (7, 1)
    residual = dict(sdec.analyze(HEAD + "dx = beta(t) * v dt\ndv = beta(t) * (-x - v) dt + sqrt(beta(t)) dW\n")
                    .spec.report.proofs[-1].data)["residual"]
    assert residual == [["0", "0"], ["0", "-99*t/10 - 1/10"]]


def test_noise_that_never_reaches_a_variable():
    text = ("sde bad\nstate x, v, w\ninit (v, w) ~ normal(0, 0.01)\nbeta(t) = 1\nT = 1\ntarget normal(0, I)\n"
            "Q = [[0, -1, 0], [1, 0, 0], [0, 0, 0]]\nD = diag(0, 1, 0)\n")
    A = -(np.array([[0, -1, 0], [1, 0, 0], [0, 0, 0]]) + np.diag([0, 1, 0]))
    assert kalman_rank(A, np.diag([0, 1, 0])) == 2 and np.isclose(np.linalg.eigvals(A).real.max(), 0)
    exc = error_of(text)
    assert exc.message == "rank 2 < K = 3 (exact): the noise never reaches the variable w"
    assert (exc.line, exc.column) == (8, 5)
    assert "does not forget its start" in exc.errors[1].message


def test_equations_rank_error_points_at_the_equation_of_the_variable_never_reached():
    text = ("sde bad\nstate x, v, w\ninit (v, w) ~ normal(0, 0.01)\nbeta(t) = 1\nT = 1\ntarget normal(0, I)\n"
            "dx = beta(t) * v dt\ndv = beta(t) * (-x - v) dt + sqrt(2 * beta(t)) dW\ndw = 0 dt\n")
    exc = error_of(text)
    assert exc.message == "rank 2 < K = 3 (exact): the noise never reaches the variable w"
    assert (exc.line, exc.column) == (9, 1)  # dw = 0 dt
    assert (exc.errors[1].span.line, exc.errors[1].span.column) == (9, 1)
    # a missed combination has no one equation: the first noised equation, as before
    combo = text.replace("dx = beta(t) * v dt", "dx = beta(t) * (v + w) dt").replace(
        "(-x - v) dt + sqrt(2 * beta(t)) dW", "(-x - v - w) dt + sqrt(2 * beta(t)) dW_a").replace(
        "dw = 0 dt", "dw = beta(t) * (-x - v - w) dt + sqrt(2 * beta(t)) dW_a")
    exc = error_of(combo)
    assert "never reaches the combination v - w" in exc.message and (exc.line, exc.column) == (8, 1)


def test_no_skew_coupling_means_x_is_never_noised():
    exc = error_of(HEAD + "D = diag(0, 1)\n")
    assert exc.message == "rank 1 < K = 2 (exact): the noise never reaches the variable x" and (exc.line, exc.column) == (7, 5)


def test_learned_block_convergence_checked_at_init_and_said_so():
    text = ("sde l\nstate x, v, w\ninit (v, w) ~ normal(0, 0.01)\nbeta(t) = 0.1 + 9.9 * t\nT = 1\ntarget normal(0, I)\n"
            "learn Q: skew init [[0, -1, 0], [1, 0, 0], [0, 0, 0]]\nD = diag(0, 1, 0)\n")
    exc = error_of(text)
    assert exc.message == "rank 2 < K = 3 (exact at the initial parameter values): the noise never reaches the variable w"
    ok = sdec.parse(text.replace("[[0, -1, 0], [1, 0, 0], [0, 0, 0]]", "[[0, -1, -1], [1, 0, -1], [1, 1, 0]]"))
    reach = proof(ok, "noise reaches every variable")
    assert reach.verdict == "checked" and "at the initial parameter values" in reach.detail
    assert "at the initial parameter values" in proof(ok, "eigenvalues of A").detail


def test_learned_psd_on_a_sub_block_is_not_proved_by_structure():
    spec = sdec.parse("sde l\nstate x, v\ninit v ~ normal(0, 0.01)\nbeta(t) = 0.1 + 9.9 * t\nT = 1\n"
                      "target normal(0, I)\nlearn Q: skew init [[0, -1], [1, 0]]\nlearn D: psd on (v) init diag(0, 1)\n")
    assert proof(spec, "noise reaches every variable").verdict == "checked"
    assert proof(spec, "converges to N(0, Σ∞)").verdict == "checked"


@pytest.mark.parametrize("beta,fragment", [
    ("1 - t", "beta(1) = 0; the time change must stay positive"),
    ("t", "beta(0) = 0"),
    ("-1", "beta(0) = -1"),
    ("cos(3 * t)", "the time change must stay positive"),
    ("cos(100000 * t) + 0.5", "the time change must stay positive"),
    ("1/(t - 1/2)^2", "not a finite real number at t = 0.5"),
    ("1/(t - 0.50001)^2", "not finite at t = 50001/100000 (a pole on [0, 1])"),
    ("1/(t - 1/pi)^2", "not finite at t = 1/pi ≈ 0.31831"),
    ("log(t) + 5", "not a finite real number at t = 0"),
    ("sqrt(t - 1/2) + 1", "not a finite real number at t = 0"),
    ("exp(710 * t)", "= 1.15887e+30 is out of range; beta must stay at most 1e30 on [0, T]"),
    ("1e399", "beta(0) = 1e+399 overflows float64"),
    ("exp(exp(exp(10) * t))", "beta(0.0005) = 2.46192e+26349 overflows float64"),
    ("(t - 0.50001)^2", "beta(t) = 0 exactly at t = 50001/100000; the time change must stay positive on [0, 1]"),
    ("1 + cos(100 * t)", "beta(t) = 0 exactly at t = pi/100 ≈ 0.0314159"),
    ("1 + cos(100 * t + 1/3)", "beta(t) = 0 exactly at t = -1/300 + pi/100 ≈ 0.0280826"),
    ("(t - 1/2)^2 - 1/16", "beta(t) is smallest at t = 0.5, where beta(0.5) = -0.0625"),
    ("(t - 0.3)^2 - 1/16", "beta(t) is smallest at t = 0.3, where beta(0.3) = -0.0625"),
])
def test_beta_must_stay_positive_and_finite(beta, fragment):
    exc = error_of(HEAD.replace("0.1 + 9.9 * t", beta) + "Q = [[0, -1], [1, 0]]\nD = diag(0, 1)\n")
    assert fragment in exc.message and exc.message.startswith("beta(t) > 0 on [0, T]: ")
    assert (exc.line, exc.column) == (4, 11) and len(exc.errors) == 1


def test_high_frequency_beta_is_proved_by_interval_arithmetic():
    spec = sdec.parse(HEAD.replace("0.1 + 9.9 * t", "cos(100000 * t) + 1.5") + "Q = [[0, -1], [1, 0]]\nD = diag(0, 1)\n")
    positive = proof(spec, "beta(t) > 0")
    assert positive.verdict == "proved" and "interval arithmetic" in positive.detail and "beta(t) ≥ 0.5" in positive.detail


def test_beta_that_interval_bisection_cannot_decide_is_a_warning_saying_so():
    # exp(2t) - 4 exp(t) + 4 = (exp(t) - 2)^2 >= 0: positive by 1e-12 at t = log 2, where interval
    # bounds of the expanded form cannot resolve it and no closed-form point makes it <= 0
    result = sdec.analyze(HEAD.replace("0.1 + 9.9 * t", "exp(2*t) - 4*exp(t) + 4 + 1e-12") +
                          "Q = [[0, -1], [1, 0]]\nD = diag(0, 1)\n", "w.sde")
    positive = proof(result.spec, "beta(t) > 0")
    assert positive.verdict == "warning" and positive.detail.startswith("not proved: interval arithmetic")
    assert "near t = 0.69" in positive.detail
    assert any(d.severity == "warning" and d.span.line == 4 for d in result.diagnostics)


def test_beta_minimum_value_and_place_agree_with_mpmath():
    import mpmath as mp
    spec_text = HEAD.replace("0.1 + 9.9 * t", "2 + 3*sin(5*t + 1)") + "Q = [[0, -1], [1, 0]]\nD = diag(0, 1)\n"
    exc = error_of(spec_text)
    t_star = (3 * mp.pi / 2 - 1) / 5  # sin = -1 there: beta = -1
    assert f"smallest at t = {float(t_star):.6g}" in exc.message and "= -1;" in exc.message


@pytest.mark.parametrize("line,fragment,where", [
    ("D = diag(0, 1e399)", "D[v, v] = 1e+399 is out of range", (8, 5)),
    ("D = diag(0, 1e-35)", "D[v, v] = 1e-35 is out of range", (8, 5)),
    ("D = diag(0, 2^1000)", "D[v, v] = 1.07151e+301 is out of range", (8, 5)),
    ("D = diag(0, exp(700)^3)", "is out of range", (8, 5)),
])
def test_absurd_magnitudes_are_errors_not_float_overflows(line, fragment, where):
    exc = error_of(HEAD + "Q = [[0, -1], [1, 0]]\n" + line + "\n")
    assert fragment in exc.message and (exc.line, exc.column) == where and len(exc.errors) == 1


def test_absurd_time_horizon():
    exc = error_of(HEAD.replace("T = 1", "T = 1e40") + "Q = [[0, -1], [1, 0]]\nD = diag(0, 1)\n")
    assert exc.message.startswith("T = 1e+40 is out of range") and (exc.line, exc.column) == (5, 5)


def test_stiff_but_convergent_drift_is_a_warning():
    spec = sdec.parse(HEAD + "Q = [[0, -1], [1, 0]]\nD = diag(0, 1e20)\n")
    assert proof(spec, "converges to N(0, Σ∞)").verdict == "proved"
    assert proof(spec, "float64 eigenvalues agree").verdict == "warning"


def test_failed_proofs_stop_the_proofs_that_build_on_them():
    spec = sdec.analyze(HEAD.replace("normal(0, I)", "normal(0, diag(1, 0))") + "Q = [[0, -1], [1, 0]]\nD = diag(0, 1)\n").spec
    names = [p.name for p in spec.report.proofs]
    assert not any(n.startswith(("N(0, Σ∞) is stationary", "converges", "mixed")) for n in names)
    assert spec.report.fact("F") is None


def test_non_skew_q_or_non_symmetric_d_gives_no_follow_on_stationarity_error():
    for blocks in ("Q = [[0, -1], [2, 0]]\nD = diag(0, 1)\n", "Q = [[0, -1], [1, 0]]\nD = [[1, 1], [0, 1]]\n"):
        result = sdec.analyze(HEAD + blocks, "b.sde")
        errors = [d.message for d in result.diagnostics if d.severity == "error"]
        assert len(errors) == 1 and "stationary" not in errors[0], errors


def test_noise_missing_a_combination_names_it_exactly():
    # v and w are coupled to x alike and noised only through v + w: v - w is never reached
    text = ("sde m\nstate x, v, w\ninit (v, w) ~ normal(0, 0.01)\nbeta(t) = 1\nT = 1\ntarget normal(0, I)\n"
            "Q = [[0, -1, -1], [1, 0, 0], [1, 0, 0]]\nD = [[0, 0, 0], [0, 1, 1], [0, 1, 1]]\n")
    result = sdec.analyze(text, "m.sde")
    errors = [d.message for d in result.diagnostics if d.severity == "error"]
    assert errors[0] == "rank 2 < K = 3 (exact): the noise never reaches the combination v - w of the variables"
    assert "real part exactly 0" in errors[1] and "max Re" not in errors[1]
    text_out = check_text(result)
    assert "noise reaches: x, v, w, but never the combination v - w" in text_out


def test_non_symmetric_d_names_the_entries_at_the_statement_that_set_the_second():
    exc = error_of(HEAD + "Q = [[0, -1], [1, 0]]\nD[v, v] = 1\nD[x, v] = 1\nD[v, x] = 2\nD[x, x] = 4\n")
    assert exc.message == "D is not symmetric: D[x, v] = 1 but D[v, x] = 2" and exc.line == 10
    exc = error_of(HEAD + "Q = [[0, -1], [1, 0]]\nD = [[1, 1/2],\n     [1/3, 1]]\n")
    assert exc.message == "D is not symmetric: D[x, v] = 1/2 but D[v, x] = 1/3" and (exc.line, exc.column) == (9, 7)


def test_report_prints_small_times_readably():
    text = HEAD.replace("T = 1", "T = 1e-25\nt_min = 1e-26") + "Q = [[0, -1], [1, 0]]\nD = diag(0, 1)\n"
    out = check_text(sdec.analyze(text, "s.sde"))
    assert "T = 1e-25;  t_min = 1e-26" in out and "mixed by T = 1e-25 " in out
    assert "0000000000" not in out


def test_report_prints_random_initial_values_readably():
    """A random initial value is the exact rational of a float (19 digits over 18): the report's
    matrices at the initial parameter values show it to 6 significant digits."""
    text = ("sde r\nstate x, v\ninit v ~ normal(0, 0.01)\nbeta(t) = 1\nT = 1\ntarget normal(0, I)\n"
            "learn Q: skew init random(0.1, 0)\nD = diag(0, 1)\n")
    spec = sdec.parse(text)
    q = spec.at_init()[0][1, 0]
    assert q.is_Rational and len(str(q)) > 20  # what would otherwise be printed
    out = check_text(sdec.analyze(text, "r.sde"))
    block = out[out.index("Q at the initial parameter values"):out.index("proofs:")]
    assert str(q) not in block and str(abs(q)) not in block
    assert f"{float(q):.6g}" in block and f"{-float(q):.6g}" in block


@pytest.mark.parametrize("beta, shown", [("4", "4"), ("1/3", "1/3"), ("sqrt(2) - 1", "-1 + sqrt(2)")])
def test_constant_beta_is_proved_by_its_exact_value(beta, shown):
    """A constant beta needs no interval bound (which would print 3.99999 for 4)."""
    spec = sdec.parse(HEAD.replace("0.1 + 9.9 * t", beta) + "Q = [[0, -1], [1, 0]]\nD = diag(0, 1)\n")
    positive = proof(spec, "beta(t) > 0")
    assert positive.verdict == "proved" and positive.detail == f"exact: beta(t) = {shown} > 0 (constant)"
    exc = error_of(HEAD.replace("0.1 + 9.9 * t", f"-({beta})") + "Q = [[0, -1], [1, 0]]\nD = diag(0, 1)\n")
    assert exc.message.startswith("beta(t) > 0 on [0, T]: ") and (exc.line, exc.column) == (4, 11)


def test_report_says_reach_was_not_decided_when_an_earlier_check_failed():
    text = HEAD.replace("0.1 + 9.9 * t", "1 + cos(100 * t)") + "Q = [[0, -1], [1, 0]]\nD = diag(0, 1)\n"
    out = check_text(sdec.analyze(text, "s.sde"))
    assert "noise reaches: not decided (a check above failed)" in out and "noise reaches: ?" not in out
