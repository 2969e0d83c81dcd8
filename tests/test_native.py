"""The native K x K pipeline (sdec/emit/kernel_native.c) against the torch path and against
finite differences, its Cholesky failures, and its fallback when there is no C compiler."""
import math
import os
import sys
from unittest import mock

import pytest
import torch

import sdec
from sdec.emit import kernel_native

F64 = torch.float64
NATIVE_SPECS = ("alda", "malda", "learned2", "learned3")   # K > 1 without a closed-form Φ
SPECS = os.path.join(os.path.dirname(__file__), "..", "specs")


def compiled(name, monkeypatch, native):
    monkeypatch.setenv("SDEC_NATIVE", "1" if native else "0")
    proc = sdec.compile(os.path.join(SPECS, f"{name}.sde"))
    assert proc._native_ok() == native
    return proc


def own_scale(Sig_ref, err):
    L = torch.linalg.cholesky(Sig_ref)
    W = torch.linalg.solve_triangular(L, err, upper=False)
    return float(torch.linalg.solve_triangular(L, W.mT, upper=False).abs().max())


@pytest.mark.parametrize("name", NATIVE_SPECS)
@pytest.mark.parametrize("hybrid", [True, False])
def test_native_transition_matches_the_torch_path(name, hybrid, monkeypatch):
    t = torch.tensor([1e-3, 0.01, 0.1, 0.3, 0.5, 0.77, 1.0], dtype=F64)
    Phi_n, Sig_n = compiled(name, monkeypatch, True).transition(t, hybrid)
    Phi_t, Sig_t = compiled(name, monkeypatch, False).transition(t, hybrid)
    assert float((Phi_n - Phi_t).abs().max()) < 1e-14
    keep = t >= (1e-2 if name == "alda" else 1e-3)  # alda's Σ at 1e-3 is rounding-limited (kernel_base doc)
    assert own_scale(Sig_t[keep], (Sig_n - Sig_t)[keep]) < 1e-12


@pytest.mark.parametrize("name", ("learned2", "learned3"))
def test_native_elbo_and_gradients_match_the_torch_path(name, monkeypatch):
    x = torch.randn(16, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    results = []
    for native in (True, False):
        proc = compiled(name, monkeypatch, native)
        terms = proc.elbo(x, lambda y, t: -y, time_sampler="importance",
                          generator=torch.Generator().manual_seed(1))
        terms.total.mean().backward()
        grads = [p.grad.clone() for p in proc.parameters()]
        results.append((terms.as_dict(), grads))
    (a, ga), (b, gb) = results
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-11, atol=1e-11), key
    for u, v in zip(ga, gb):
        assert torch.allclose(u, v, rtol=1e-9, atol=1e-12)
        assert float(u.abs().max()) > 0


def test_native_adjoint_matches_central_differences(monkeypatch):
    """d/dA and d/dD (D = S Sᵀ kept symmetric) of a weighted sum of all five outputs, both
    branches (s below and above the series radius), against central differences."""
    proc = compiled("learned3", monkeypatch, True)
    c = proc._coeffs(True)
    A0, D0 = (m.detach() for m in proc._A_D())
    S_0 = torch.linalg.cholesky(D0)
    s = proc._B(torch.tensor([2e-3, 0.05, 0.4, 0.9, 1.0], dtype=F64))
    j = proc._squarings(s, c, None)
    assert j > 0 and bool((s.abs() <= c["radius"]).any()) and bool((s.abs() > c["radius"]).any())
    gen = torch.Generator().manual_seed(3)
    W = [torch.randn(5, 3, 3, dtype=F64, generator=gen) for _ in range(4)] + [torch.randn(5, dtype=F64, generator=gen)]

    def loss(A, S):
        out = kernel_native.NativeKernels.apply(A, S @ S.mT, c["S0"], s, j, c["radius"], c["norm"], 48)
        assert bool(out[5].all())
        return sum((w * o).sum() for w, o in zip(W, out[:5]))

    A = A0.clone().requires_grad_(True)
    S = S_0.clone().requires_grad_(True)
    loss(A, S).backward()
    h = 1e-6
    for var, grad in ((A0, A.grad), (S_0, S.grad)):
        for idx in [(0, 0), (1, 0), (2, 1), (1, 2), (2, 2)]:
            if var is S_0 and idx[1] > idx[0]:
                continue
            plus, minus = var.clone(), var.clone()
            plus[idx] += h
            minus[idx] -= h
            args = lambda v: (v, S_0) if var is A0 else (A0, v)  # noqa: E731
            with torch.no_grad():
                fd = (loss(*args(plus)) - loss(*args(minus))) / (2 * h)
            assert abs(float(fd) - float(grad[idx])) <= 1e-6 * max(1.0, abs(float(fd))), (idx, float(fd), float(grad[idx]))


def test_kept_squaring_chains_are_what_the_adjoint_would_recompute(monkeypatch):
    """The forward keeps each squaring element's chain for the backward: whatever the kept
    buffer held before (NaN here) never reaches an output, and the adjoint that reads the kept
    chains gives the same floats as the one that recomputes them (keep = None); a forward
    whose inputs need no gradient keeps none."""
    proc = compiled("learned3", monkeypatch, True)
    mod = sys.modules[type(proc).__module__]  # the generated module embeds kernel_native
    c = proc._coeffs(True)
    A, D = (m.detach() for m in proc._A_D())
    s = proc._B(torch.tensor([2e-3, 0.05, 0.4, 0.9, 1.0], dtype=F64))
    j = proc._squarings(s, c, None)
    above = s.abs() > c["radius"]
    assert j > 0 and bool(above.any()) and not bool(above.all())
    args = (A, D, c["S0"], s, j, c["radius"], c["norm"], 48)
    assert mod._chain_buffer(A, 5, j, False) is None
    clean_keep, dirty_keep = mod._chain_buffer(A, 5, j, True), torch.full((5, 2 * (j + 1), 3, 3), float("nan"), dtype=F64)
    clean, dirty = mod._kernels_forward(*args, clean_keep), mod._kernels_forward(*args, dirty_keep)
    assert all(torch.equal(a, b) for a, b in zip(clean, dirty))
    assert bool(dirty_keep[~above].isnan().all())
    for i in above.nonzero()[:, 0].tolist():  # each element writes the levels of its own doublings
        ji = max(0, math.ceil(math.log2(float(s[i]) / c["radius"])))
        assert 0 < ji <= j
        for part in (slice(0, ji + 1), slice(j + 1, j + 2 + ji)):
            assert torch.equal(clean_keep[i, part], dirty_keep[i, part])
        unused = torch.cat([dirty_keep[i, ji + 1:j + 1], dirty_keep[i, j + 2 + ji:]])
        assert bool(unused.isnan().all())
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(5, 3, 3, dtype=F64, generator=gen) for _ in range(4)] + [torch.randn(5, dtype=F64, generator=gen)]
    Phi, Sig, L, Li, hld, ok = dirty
    series = (j, c["radius"], c["norm"], 48)
    gA, gD = mod._kernels_backward((A, D, c["S0"], s, L, Li, dirty_keep), series, grads)
    rA, rD = mod._kernels_backward((A, D, c["S0"], s, L, Li, None), series, grads)
    assert float(rA.abs().max()) > 0 and float(rD.abs().max()) > 0
    assert torch.equal(gA, rA) and torch.equal(gD, rD)


STIFF3 = """sde stiff3
state x, v, w
init (v, w) ~ normal(0, [[1/100, -3/100], [-3/100, 1/10]])
beta(t) = 1 * exp(3 * t)
T = 3
target normal(0, [[1, -3, -3], [-3, 10, 6], [-3, 6, 19]])
Q = [[0, 3, 3], [-3, 0, 3], [-3, -3, 0]]
learn D: psd init [[19/2, 9, 9], [9, 19/2, 9], [9, 9, 19/2]]
"""


@pytest.mark.parametrize("native", [True, False])
def test_doublings_are_each_elements_own(native, monkeypatch, tmp_path):
    """A stiff process (||A||_2 = 2925, B(T) = 2700: 22 doublings at T) drawn by the property
    tests: each element takes the doublings its own s needs, not the batch's, so Φ and Σ at a
    time do not depend on what else is in the batch (bit for bit on the native path), and
    Σ(0.75) stays within 1e-11 in its own scale of a 60-digit Σ∞ - Φ Σ∞ Φᵀ (with the batch's
    22 doublings it was 5.8e-10 off), on the native and the torch path."""
    import mpmath
    path = tmp_path / "stiff3.sde"
    path.write_text(STIFF3)
    monkeypatch.setenv("SDEC_NATIVE", "1" if native else "0")
    proc = sdec.compile(str(path))
    assert proc._native_ok() == native
    t = torch.tensor([0.75, 3.0], dtype=F64)
    with torch.no_grad():
        Phi1, Sig1 = proc.transition(t[:1], hybrid=False)
        Phi2, Sig2 = proc.transition(t, hybrid=False)
        c = proc._coeffs(False)
        assert proc._squarings(proc.B(t), c, None) > proc._squarings(proc.B(t[:1]), c, None) + 5
        if native:  # the torch path's batched products may round differently per batch size
            assert torch.equal(Phi1[0], Phi2[0]) and torch.equal(Sig1[0], Sig2[0])
        assert own_scale(Sig1[0], Sig2[0] - Sig1[0]) < 1e-12
        A, S = proc._A_D()[0].double(), proc.stationary_cov.double()
        s = float(proc.B(t[:1])[0])
    mpmath.mp.dps = 60
    Am, Sm = mpmath.matrix(A.tolist()), mpmath.matrix(S.tolist())
    Ph = mpmath.expm(Am * s)
    ref = Sm - Ph * Sm * Ph.T
    ref = torch.tensor([[float(ref[i, k]) for k in range(3)] for i in range(3)], dtype=F64)
    assert own_scale(ref, Sig1[0] - ref) < 1e-11
    assert float((Phi1[0] - torch.tensor([[float(Ph[i, k]) for k in range(3)] for i in range(3)], dtype=F64)).abs().max()) < 1e-11


LARGE_NORM = """sde large_norm
state x, v, w, u
init (v, w, u) ~ normal(0, [[1/100, -3/100, -3/100], [-3/100, 1/10, 3/50], [-3/100, 3/50, 19/100]])
beta(t) = 1
T = 1/2
target normal(0, [[1, -3, -3, -3], [-3, 145/16, 33/4, 33/4], [-3, 33/4, 289/16, 69/4], [-3, 33/4, 69/4, 28]])
Q = [[0, 3, 3, 3], [-3, 0, 3, 3], [-3, -3, 0, 3], [-3, -3, -3, 0]]
D = [[9, 9, 9, 9], [9, 9, 9, 9], [9, 9, 9, 9], [9, 9, 9, 9]]
"""


def _mp_transition(A, S0, Sinf, s):
    """Φ = expm(s A) and Σ = Σ∞ + Φ (Σ0 - Σ∞) Φᵀ at 60 digits, rounded to float64 (Σ∞ a
    float64 tensor or an mpmath matrix)."""
    import mpmath
    K = A.shape[0]
    as_t = lambda M: torch.tensor([[float(M[i, k]) for k in range(K)] for i in range(K)], dtype=F64)  # noqa: E731
    with mpmath.workdps(60):  # not the global precision other tests see
        Sm = mpmath.matrix(Sinf.tolist() if torch.is_tensor(Sinf) else Sinf)
        Ph = mpmath.expm(mpmath.matrix(A.tolist()) * mpmath.mpf(s))
        Sig = Sm + Ph * (mpmath.matrix(S0.tolist()) - Sm) * Ph.T
        return as_t(Ph), as_t(Sig)


@pytest.mark.parametrize("native", [True, False])
def test_series_coefficients_do_not_overflow_at_a_large_norm(native, monkeypatch, tmp_path):
    """A K = 4 spec the property tests drew: Σ∞'s condition number is 1.4e7 and ||A||_2 =
    5.7e6 (eigenvalues -4.5e6 and -0.036), so the series coefficients A^k overflowed float64
    from k of about 45 and Σ was NaN at every t past the series branch.  They are formed from
    A / 2^e (exact): Φ and Σ are finite.  And it is E = Φ - I that doubles, not Φ: squaring
    Φ(h) ≈ I in the slow directions lost digits at every level (Σ(0.25) was 2.5e-10 off in its
    own scale after 19 doublings, Σ(0.01) 9e-12); the torch path's Φ and Σ are within 1e-13,
    8e-12, 1e-10 and 2e-10 of a 60-digit reference at t = 1e-4, 0.01, 0.25 and 0.5.  The
    native path runs the chains of those elements (15 to 20 doublings) again in double-double:
    within 1e-14 (it read 0, the reference's own rounding, at the last three)."""
    path = tmp_path / "large_norm.sde"
    path.write_text(LARGE_NORM)
    monkeypatch.setenv("SDEC_NATIVE", "1" if native else "0")
    proc = sdec.compile(str(path))
    assert proc._native_ok() == native
    t = torch.tensor([1e-4, 0.01, 0.25, 0.5], dtype=F64)
    with torch.no_grad():
        Phi, Sig = proc.transition(t)
        A = proc._A_D()[0]
        assert float(torch.linalg.matrix_norm(A, ord=2)) > 5e6
        S0 = proc._sigma0(True)
        s = proc.B(t)
    assert bool(torch.isfinite(Phi).all()) and bool(torch.isfinite(Sig).all())
    bounds = (1e-13, 1e-14, 1e-14, 1e-14) if native else (1e-13, 8e-12, 1e-10, 2e-10)
    for i, bound in enumerate(bounds):
        Ph_ref, Sig_ref = _mp_transition(A, S0, proc.stationary_cov, float(s[i]))
        assert float((Phi[i] - Ph_ref).abs().max()) < bound, i
        assert own_scale(Sig_ref, Sig[i] - Sig_ref) < bound, i


STIFF6 = """sde spec_1
state onset, y2, dW, E, normals, z
T = 3
Q = [[0, -3, -1/2, -1/2, -3/4, 1/2], [3, 0, -1/2, -3, -1, 1/4], [1/2, 1/2, 0, 1/2, 1, -1], [1/2, 3, -1/2, 0, -1/2, 3], [3/4, 1, -1, 1/2, 0, 3], [-1/2, -1/4, 1, -3, -3, 0]]
init normals ~ normal(0, 1/100)
init E ~ normal(0, 1/400)
target normal(0, [[4, 3, 1, 2, 0, 2], [3, 45/16, 0, 15/16, 0, 3], [1, 0, 9/4, 1/4, -3, -3/2], [2, 15/16, 1/4, 45/16, 23/8, -2], [0, 0, -3, 23/8, 181/16, -3/4], [2, 3, -3/2, -2, -3/4, 241/16]])
init y2 ~ normal(0, 3/400)
D = [[1/4, 0, 1/8, -3/2, 3/4, -1/8], [0, 0, 0, 0, 0, 0], [1/8, 0, 1/16, -3/4, 3/8, -1/16], [-3/2, 0, -3/4, 9, -9/2, 3/4], [3/4, 0, 3/8, -9/2, 9/4, -3/8], [-1/8, 0, -1/16, 3/4, -3/8, 1/16]]
beta(t) = 1/2 * exp(3/2 * t)
init dW ~ normal(0, 3/100)
init z ~ normal(0, 1/100)
"""


def _mp_own_process(A, D, S0, s):
    """_mp_transition with Σ∞ replaced by the X that solves A X + X Aᵀ + 2 D = 0 at 60 digits
    for these float64 A and D: the exact kernel of the float64 process.  (Σ∞ is stationary for
    the exact A only; where A's rounding moves the stationary law by more than the kernel's
    error, as on stiff specs (3e-9 in Σ∞'s own scale at K = 6), the float64 process is the
    reference.)"""
    import mpmath
    K = A.shape[0]
    with mpmath.workdps(60):
        Am, Dm = mpmath.matrix(A.tolist()), mpmath.matrix(D.tolist())
        M = mpmath.zeros(K * K, K * K)  # vec(A X + X Aᵀ), row-major
        for i in range(K):
            for j in range(K):
                for k in range(K):
                    M[i * K + j, k * K + j] += Am[i, k]
                    M[i * K + j, i * K + k] += Am[j, k]
        x = mpmath.lu_solve(M, mpmath.matrix([-2 * Dm[i, j] for i in range(K) for j in range(K)]))
        X = mpmath.matrix([[x[i * K + j] for j in range(K)] for i in range(K)])
    return _mp_transition(A, S0, X, s)


@pytest.mark.parametrize("native", [True, False])
def test_twenty_doublings_keep_phi_at_the_accuracy_of_its_float64_drift(native, monkeypatch):
    """A K = 6 spec the property strategies drew (||A||_2 = 6.0e4, B(T) = 29.7: 20 doublings).
    Every doubling doubles the error E(h) carries in the directions that barely decay, so in
    double the chain's rounding came out 2^20 times larger: Φ(T) was 1.5e-10 off a 60-digit
    expm of the same float64 A, and `sdec verify` failed its invariance check (1.06e-10
    against 1e-10).  The native chain measures that growth and runs again in double-double: Φ(T) is
    that expm rounded (1e-14), and invariance and semigroup read below 1e-11.  The torch path
    (double throughout) is the ruler that shows the test can fail."""
    from sdec.backend.verify import check_invariance, check_semigroup
    monkeypatch.setenv("SDEC_NATIVE", "1" if native else "0")
    proc = sdec.compile_text(STIFF6, "stiff6.sde")
    with torch.no_grad():
        A = proc._A_D()[0]
        T = torch.tensor([proc.T], dtype=F64)
        Phi, Sig = proc.transition(T, hybrid=False)
        Ph_ref, _ = _mp_transition(A, torch.zeros(6, 6, dtype=F64), proc.stationary_cov, float(proc.B(T)[0]))
        checks = check_invariance(proc) + check_semigroup(proc)
    assert float(torch.linalg.matrix_norm(A, ord=2)) > 5e4
    err = float((Phi[0] - Ph_ref).abs().max())
    if native:
        assert err < 1e-14, err
        assert max(c.error for c in checks) < 1e-11, checks
        _assert_sigma_exact(proc, torch.tensor([proc.t_min, 1.0, proc.T], dtype=F64))
    else:
        assert err > 1e-11, err


def _assert_sigma_exact(proc, t):
    """Σ(t), hybrid and given y0, within 1e-13 of the float64 process's 60-digit kernel in its
    own scale (they read 0: the reference rounded)."""
    with torch.no_grad():
        A, D = (v.detach() for v in proc._A_D())
        s = proc.B(t)
        for hybrid in (True, False):
            _, Sig = proc.transition(t, hybrid=hybrid)
            for i in range(t.shape[0]):
                _, Sig_ref = _mp_own_process(A, D, proc._sigma0(hybrid), float(s[i]))
                assert own_scale(Sig_ref, Sig[i] - Sig_ref) < 1e-13, (hybrid, float(t[i]))


NON_NORMAL = """sde spec_1
state dt_, E, e, w
init (E, e, w) ~ normal(0, [[9/1600, -9/800, -3/400], [-9/800, 13/400, 3/100], [-3/400, 3/100, 29/400]])
beta(t) = 2
T = 1
target normal(0, [[9, 9, -6, -3/4], [9, 145/16, -11/2, -5/4], [-6, -11/2, 129/16, -7/2], [-3/4, -5/4, -7/2, 129/16]])
drift = beta(t) * [[-710465/192, 6847/2, -416, 95/16], [-656521/192, 6327/2, -384, 87/16], [455947/96, -13183/3, 1600/3, -191/24], [-252459/128, 21901/12, -664/3, 317/96]]
diffusion = sqrt(2 * beta(t)) * [[0, 0, 0], [0, 0, 0], [0, 0, 0], [-3/4, 0, 1/2]]
"""


@pytest.mark.parametrize("native", [True, False])
def test_a_non_normal_drift_keeps_phi_at_the_accuracy_of_its_float64_drift(native, monkeypatch):
    """A K = 4 spec the property strategies drew: ||A||_2 = 9.8e3 but eigenvalues of modulus
    <= 48, so Φ grows on the way (entries up to 98).  A doubling carries an error d of E on
    as d Φ + Φ d, so 11 doublings in double put Φ(0.2) 1.5e-8 off a 60-digit expm of the same
    float64 A (the semigroup check failed at 6e-9), with no more doublings than the shipped
    specs' 2^j rule would flag.  The native chain measures that growth on its own levels and
    runs those elements again in double-double: within 1e-13 of the reference at every time.
    The torch path (double throughout) is the ruler that shows the test can fail."""
    monkeypatch.setenv("SDEC_NATIVE", "1" if native else "0")
    proc = sdec.compile_text(NON_NORMAL, "non_normal.sde")
    t = torch.tensor([proc.t_min, 0.2, 0.7, 1.0], dtype=F64)
    with torch.no_grad():
        A = proc._A_D()[0]
        Phi, _ = proc.transition(t, hybrid=False)
        s = proc.B(t)
    errors = []
    for i in range(t.shape[0]):
        Ph_ref, _ = _mp_transition(A, torch.zeros(4, 4, dtype=F64), proc.stationary_cov, float(s[i]))
        errors.append(float((Phi[i] - Ph_ref).abs().max()))
    if native:
        assert max(errors) < 1e-13, errors
        _assert_sigma_exact(proc, t)
    else:
        assert max(errors) > 1e-9, errors


def test_the_adjoint_of_a_double_double_chain_matches_central_differences():
    """The adjoint runs over the double-double chain's rounded levels: on the non-normal spec
    (its elements at t = 0.0184, 0.2, 0.7 all run in double-double) the gradient of a weighted
    sum of Φ and Σ along a random direction of (A, D) matches central differences (7e-8
    relative at step 1e-6, where the difference quotient's own error is about that)."""
    proc = sdec.compile_text(NON_NORMAL, "non_normal.sde")
    with torch.no_grad():
        c = dict(proc._coeffs(True))
        s = proc.B(torch.tensor([0.0184, 0.2, 0.7], dtype=F64))
        j = proc._squarings(s, c, None)
    gen = torch.Generator().manual_seed(0)
    W = [torch.randn(3, 4, 4, dtype=F64, generator=gen) for _ in range(2)]
    dA = torch.randn(4, 4, dtype=F64, generator=gen)
    dD = torch.randn(4, 4, dtype=F64, generator=gen)
    dD = dD + dD.mT

    def f(A, D):
        Phi, Sig = kernel_native.NativeKernels.apply(A, D, c["S0"], s, j, c["radius"], c["norm"], 48)[:2]
        return (W[0] * Phi).sum() + (W[1] * Sig).sum()
    A = c["A"].detach().clone().requires_grad_(True)
    D = c["D"].detach().clone().requires_grad_(True)
    f(A, D).backward()
    analytic = float((A.grad * dA).sum() + (0.5 * (D.grad + D.grad.mT) * dD).sum())
    with torch.no_grad():
        fd = float((f(A + 1e-6 * dA, D + 1e-6 * dD) - f(A - 1e-6 * dA, D - 1e-6 * dD)) / 2e-6)
    assert abs(analytic - fd) <= 1e-6 * abs(fd), (analytic, fd)


@pytest.mark.parametrize("spec", ["learned3", "large_norm", "non_normal"])
def test_the_adjoint_recomputes_the_chain_the_forward_kept_bit_for_bit(spec, tmp_path):
    """The backward reads the squaring chains the forward kept; without them (keep NULL) it
    recomputes them, in double or, where the double chain's error growth calls for it
    (large_norm: 15 to 20 doublings), in
    double-double as the forward did: the same gradients either way."""
    if spec in ("large_norm", "non_normal"):
        path = tmp_path / f"{spec}.sde"
        path.write_text(LARGE_NORM if spec == "large_norm" else NON_NORMAL)
        proc = sdec.compile(str(path))
    else:
        proc = sdec.compile(os.path.join(SPECS, f"{spec}.sde"))
    with torch.no_grad():
        c = dict(proc._coeffs(True))
        s = proc.B(torch.linspace(1e-3, proc.T, 7, dtype=F64))
        j = proc._squarings(s, c, None)
    A, D, S0 = c["A"].detach().contiguous(), c["D"].detach().contiguous(), c["S0"].contiguous()
    keep = kernel_native._chain_buffer(A, s.shape[0], j, True)
    Phi, Sig, L, Li, hld, ok = kernel_native._kernels_forward(A, D, S0, s, j, c["radius"], c["norm"], 48, keep)
    assert bool(ok.all())
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(v.shape, dtype=F64, generator=gen) for v in (Phi, Sig, L, Li, hld)]
    series = (j, c["radius"], c["norm"], 48)
    kept = kernel_native._kernels_backward((A, D, S0, s, L, Li, keep), series, grads)
    recomputed = kernel_native._kernels_backward((A, D, S0, s, L, Li, None), series, grads)
    assert all(torch.equal(a, b) for a, b in zip(kept, recomputed))
    assert float(kept[0].abs().max()) > 0


def test_large_norm_adjoint_matches_the_torch_paths_autograd(monkeypatch, tmp_path):
    """The native adjoint runs in the scaled coefficients' terms (gradients of A / 2^e and
    D / 2^e, scaled back): at ||A||_2 = 5.7e6 its gradient of a weighted sum of Φ and Σ (both
    branches) with respect to A and D equals autograd through the torch path's scaled series."""
    path = tmp_path / "large_norm.sde"
    path.write_text(LARGE_NORM)
    monkeypatch.setenv("SDEC_NATIVE", "0")
    proc = sdec.compile(str(path))  # the torch path's coefficients (c["native"] is False)
    with torch.no_grad():
        c = dict(proc._coeffs(True))
        s = proc.B(torch.tensor([1e-8, 1e-4, 0.3], dtype=F64))
        j = proc._squarings(s, c, None)
    monkeypatch.setenv("SDEC_NATIVE", "1")  # for NativeKernels below
    assert j > 10 and bool((s <= c["radius"]).any()) and bool((s > c["radius"]).any())
    gen = torch.Generator().manual_seed(5)
    W = [torch.randn(3, 4, 4, dtype=F64, generator=gen) for _ in range(2)]
    grads = []
    for native in (True, False):
        A = c["A"].detach().clone().requires_grad_(True)
        D = c["D"].detach().clone().requires_grad_(True)
        if native:
            Phi, Sig = kernel_native.NativeKernels.apply(A, D, c["S0"], s, j, c["radius"], c["norm"], 48)[:2]
        else:
            mine = dict(c, A=A, D=D)
            mine["stacks"] = proc._series_stacks(mine)
            monkeypatch.setattr(proc, "_coeffs", lambda hybrid: mine)
            Phi, Sig = proc._phi_sigma(s, True)
        assert bool(torch.isfinite(Sig).all())
        (W[0] * Phi).sum().add((W[1] * Sig).sum()).backward()
        grads.append((A.grad, 0.5 * (D.grad + D.grad.mT)))
    for g_native, g_torch in zip(*grads):
        assert bool(torch.isfinite(g_native).all()) and float(g_native.abs().max()) > 0
        assert float((g_native - g_torch).abs().max()) <= 1e-7 * float(g_torch.abs().max())


def test_native_cholesky_failure_names_t(monkeypatch):
    proc = compiled("learned3", monkeypatch, True)
    with pytest.raises(sdec.CholeskyError, match=r"t=0"):
        proc.perturb(torch.zeros(2, 4, dtype=F64), torch.tensor([0.5, 0.0], dtype=F64), hybrid=False)


def test_without_a_c_compiler_the_torch_path_runs_with_one_warning(monkeypatch, tmp_path):
    proc = sdec.compile(os.path.join(SPECS, "learned3.sde"))
    generated = sys.modules[type(proc).__module__]  # carries its own copy of kernel_native
    monkeypatch.setattr(generated, "_NATIVE_STATE", {})
    monkeypatch.setenv("SDEC_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "sdec-no-such-compiler")
    with pytest.warns(RuntimeWarning, match="native K x K pipeline could not be built"):
        assert not proc._native_ok()
    Phi, Sig = proc.transition(torch.tensor([0.5], dtype=F64))
    with monkeypatch.context() as m:
        m.setenv("SDEC_NATIVE", "0")
        Phi_t, Sig_t = sdec.compile(os.path.join(SPECS, "learned3.sde")).transition(torch.tensor([0.5], dtype=F64))
    assert torch.equal(Phi, Phi_t) and torch.equal(Sig, Sig_t)
    assert not any(p.name.startswith("sdec_native_") for p in tmp_path.iterdir())


def test_library_is_built_once_per_source(monkeypatch, tmp_path):
    monkeypatch.setattr(kernel_native, "_NATIVE_STATE", {})
    monkeypatch.setenv("SDEC_CACHE", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    lib = kernel_native.native_library()
    built = [p.name for p in tmp_path.iterdir()]
    assert lib is not None and len(built) == 1 and built[0].endswith(".so")
    monkeypatch.setattr(kernel_native, "_NATIVE_STATE", {})
    kernel_native.native_library()
    assert [p.name for p in tmp_path.iterdir()] == built


@pytest.mark.parametrize("K", [2, 3, 4, 5])
@pytest.mark.parametrize("tri", [None, "lower", "upper"])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_col", [True, False])
def test_native_apply_matches_a_float64_product(K, tri, batched, with_col):
    from sdec.emit.kernel_base import _apply
    gen = torch.Generator().manual_seed(K)
    B, shape = 5, (2, 3, 7)
    mat = torch.randn((B, K, K) if batched else (K, K), generator=gen)
    mat = mat.tril() if tri == "lower" else mat.triu() if tri == "upper" else mat
    y = torch.randn((B, K) + shape, generator=gen)
    col = torch.randn(B, K, generator=gen) if with_col else None
    x = torch.randn((B,) + shape, generator=gen) if with_col else None
    native = kernel_native.native_apply(mat, y, tri, col, x)
    out = _apply(mat, y, tri, col, x)  # the native pass for K <= 4, torch.matmul above
    assert float((native - out).abs().max()) < 1e-5 * max(1.0, float(out.abs().max()))
    ref = mat.double().expand(B, K, K) @ y.double().reshape(B, K, -1)
    if with_col:
        ref = ref + col.double()[:, :, None] * x.double().reshape(B, 1, -1)
    ref = ref.reshape(y.shape)
    assert out.dtype == torch.float32 and out.shape == y.shape
    assert float((out.double() - ref).abs().max()) < 1e-5 * max(1.0, float(ref.abs().max()))


def test_native_apply_declines_what_it_does_not_cover():
    y = torch.randn(3, 2, 4)
    assert kernel_native.native_apply(torch.randn(3, 2, 2, dtype=F64), y, None, None, None) is None
    assert kernel_native.native_apply(torch.randn(3, 2, 2), y.double(), None, None, None) is None
    assert kernel_native.native_apply(torch.randn(1, 2, 2), y, None, None, None) is None  # broadcast batch
    assert kernel_native.native_apply(torch.randn(3, 1, 1), torch.randn(3, 1, 4), None, None, None) is None  # K = 1


def test_apply_gradients_with_the_native_forward_match_float64_autograd():
    from sdec.emit.kernel_base import _apply
    gen = torch.Generator().manual_seed(6)
    B, K, shape = 6, 3, (2, 5)
    L = torch.randn(B, K, K, generator=gen).tril().requires_grad_(True)
    col = torch.randn(B, K, generator=gen, requires_grad=True)
    eps, x = torch.randn((B, K) + shape, generator=gen), torch.randn((B,) + shape, generator=gen)
    W = torch.randn(B, K, K, generator=gen)

    def loss(L, col, eps, x):
        d = _apply(L, eps, "lower", col, x)
        d = d.reshape(B, K, -1)
        return (W.to(d.dtype) * (d @ d.mT)).sum()
    loss(L, col, eps, x).backward()
    L64, col64 = L.detach().double().requires_grad_(True), col.detach().double().requires_grad_(True)
    loss(L64, col64, eps.double(), x.double()).backward()
    for got, ref in ((L.grad, L64.grad), (col.grad, col64.grad)):
        assert float((got.double() - ref).abs().max()) < 1e-4 * float(ref.abs().max())
        assert float(ref.abs().max()) > 0


@pytest.mark.parametrize("tri", [None, "lower", "upper"])
def test_native_gram_matches_a_float64_product(tri):
    gen = torch.Generator().manual_seed(7)
    a, c = torch.randn(4, 3, 2, 13, generator=gen), torch.randn(4, 2, 2, 13, generator=gen)
    ref = a.double().reshape(4, 3, -1) @ c.double().reshape(4, 2, -1).mT
    ref = ref.tril() if tri == "lower" else ref.triu() if tri == "upper" else ref
    got = kernel_native.native_gram(a, c, tri)
    assert got.dtype == torch.float32 and got.shape == (4, 3, 2)
    assert float((got.double() - ref).abs().max()) < 1e-5
    assert kernel_native.native_gram(a.double(), c.double()) is None




class _Transition(torch.nn.Module):
    def __init__(self, proc):
        super().__init__()
        self.proc = proc

    def forward(self):
        return self.proc.transition(torch.tensor([0.3, 0.9], dtype=F64))[1].sum()


def test_torch_func_transforms_get_a_clear_error_and_the_torch_path_works(monkeypatch):
    def grad_of(proc):
        theta = proc.theta_Q.detach().clone()
        return torch.func.grad(lambda th: torch.func.functional_call(_Transition(proc), {"proc.theta_Q": th}, ()))(theta)
    with pytest.raises(RuntimeError, match="SDEC_NATIVE=0"):
        grad_of(compiled("learned3", monkeypatch, True))
    g = grad_of(compiled("learned3", monkeypatch, False))
    assert bool(torch.isfinite(g).all()) and float(g.abs().max()) > 0


@pytest.mark.parametrize("name", ("learned2", "learned3"))
@pytest.mark.parametrize("read", ["both", "y", "score"])
def test_perturb_with_score_is_the_lazy_perturbation_bit_for_bit(name, read):
    """with_score=True runs y and the score in one native pass over eps (and their matrix
    gradients in one more): the same floats as the two separate applies, values and
    gradients into the parameters, whichever outputs the loss reads."""
    proc = sdec.compile(os.path.join(SPECS, f"{name}.sde"))
    leaves = list(proc.parameters())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, 5, generator=g)
    t = 1e-3 + (1 - 1e-3) * torch.rand(6, generator=g)
    eps = torch.randn(6, proc.K, 2, 5, generator=g)
    gy, gs = torch.randn(eps.shape, generator=g), torch.randn(eps.shape, generator=g)
    outs = []
    for with_score in (True, False):
        p = proc.perturb(x, t, eps=eps, with_score=with_score)
        assert callable(p._score) != with_score  # the fused pass ran, or the score is lazy
        pairs = {"both": [(p.y, gy), (p.score, gs)], "y": [(p.y, gy)], "score": [(p.score, gs)]}[read]
        grads = torch.autograd.grad([v for v, _ in pairs], leaves, [w for _, w in pairs], allow_unused=True)
        outs.append(([p.y.detach(), p.score.detach()], grads))
    (v1, g1), (v2, g2) = outs
    assert all(torch.equal(a, b) for a, b in zip(v1, v2))
    assert any(a is not None and float(a.abs().max()) > 0 for a in g1)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g1, g2))


def test_perturb_with_score_matches_a_float64_computation():
    proc = sdec.compile(os.path.join(SPECS, "learned3.sde"))
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(5, 7, generator=g), 1e-3 + (1 - 1e-3) * torch.rand(5, generator=g)
    eps = torch.randn(5, 3, 7, generator=g)
    with torch.no_grad():
        p = proc.perturb(x, t, eps=eps, with_score=True)
        Phi, L, LiT = proc._kernel_factors(t, True)
    y = Phi[:, :, :1] * x.double()[:, None] + L @ eps.double()
    score = -LiT @ eps.double()
    assert torch.allclose(p.y.double(), y, rtol=1e-5, atol=1e-5)
    assert torch.allclose(p.score.double(), score, rtol=1e-5, atol=1e-4 * float(score.abs().max()))
    assert p.y.dtype == p.score.dtype == torch.float32


def test_native_norm2_is_the_largest_singular_value():
    """‖A‖₂ (the series radius and term counts) by one-sided Jacobi in C, against a
    50-digit SVD on hard cases and LAPACK's on many: within 4e-15 relative (a few eps)."""
    mpmath = pytest.importorskip("mpmath")
    g = torch.Generator().manual_seed(0)
    cases = []
    for K in range(1, 9):
        for trial in range(40):
            A = torch.randn(K, K, dtype=F64, generator=g) * 10.0 ** (trial % 7 - 3)
            A = A - A.mT if trial % 3 == 0 else A @ A.mT if trial % 5 == 0 else A
            if trial % 4 == 0:
                A[:, 0] *= 1e-9  # nearly singular
            cases.append(A)
    worst = 0.0
    for A in cases:
        got, lapack = kernel_native.native_norm2(A), float(torch.linalg.matrix_norm(A, ord=2))
        worst = max(worst, abs(got - lapack) / lapack if lapack else got)
    assert worst < 4e-15
    with mpmath.workdps(50):
        for A in cases[::37]:
            ref = max(mpmath.svd_r(mpmath.matrix(A.tolist()), compute_uv=False))
            assert abs(kernel_native.native_norm2(A) - ref) <= 4e-15 * ref
    assert kernel_native.native_norm2(torch.zeros(3, 3, dtype=F64)) == 0.0


@pytest.mark.parametrize("shape, B", [((1,), 1), ((7,), 3), ((3, 5), 2), ((2, 3, 9), 4)])
def test_native_apply2_equals_two_applies_on_odd_shapes_and_strides(shape, B):
    """One pass for (L eps + col x, U eps) on data sizes that are no multiple of the vector
    width, one example, and non-contiguous inputs: bit-identical to two native_apply calls."""
    g = torch.Generator().manual_seed(B)
    for K in (2, 3, 4):
        L = torch.randn(B, K, K, generator=g).tril()
        U = torch.randn(B, K, K, generator=g).triu()
        col = torch.randn(K, B, generator=g).T  # non-contiguous
        x = torch.randn(B, *shape, generator=g)
        eps = torch.randn(K, B, *shape, generator=g).transpose(0, 1)  # non-contiguous
        assert kernel_native.native_apply2_ok(L, U, col, x, eps)
        y, s = kernel_native.native_apply2(L, U, col, x, eps)
        assert torch.equal(y, kernel_native.native_apply(L, eps, "lower", col, x))
        assert torch.equal(s, kernel_native.native_apply(U, eps, "upper", None, None))
        gy, gs = torch.randn(eps.shape, generator=g), torch.randn(eps.shape, generator=g)
        dL, dU = kernel_native.native_gram2(gy, gs, eps)
        assert torch.equal(dL, kernel_native.native_gram(gy, eps, "lower"))
        assert torch.equal(dU, kernel_native.native_gram(gs, eps, "upper"))
    assert not kernel_native.native_apply2_ok(L.double(), U, col, x, eps)  # float32 only
    assert not kernel_native.native_apply2_ok(L[:, :1, :1], U[:, :1, :1], col[:, :1], x, eps[:, :1])  # K = 1
    assert not kernel_native.native_apply2_ok(L, U, col, x, eps.detach().requires_grad_())  # a graph into eps


# ------------------------------------------------------- the fused ELBO node
FUSED_SPECS = ("cld", "alda", "malda", "learned2", "learned3")
TERMS = ("prior", "score", "score_norm", "divergence", "truncation", "total")


def _elbo_run(proc, x, score_fn, fused, weights, extra=()):
    """The ELBO terms and the gradients of Σ_k weights[k] mean(term_k) (as the runtime's bits
    per dimension weighs them) into the process's parameters and `extra`, with the fused
    node or with it switched off (the unfused native path: per-quantity ops and nodes).
    An instance attribute _fused_elbo_kernels (set by the caller or here) is removed after."""
    if not fused:
        proc._fused_elbo_kernels = lambda *args: None
    try:
        terms = proc.elbo(x, score_fn, time_sampler="importance", generator=torch.Generator().manual_seed(1))
    finally:
        proc.__dict__.pop("_fused_elbo_kernels", None)
    params = [p for p in (*proc.parameters(), *extra) if p.requires_grad]
    for p in params:
        p.grad = None
    if params:
        sum(w * getattr(terms, k).mean() for w, k in zip(weights, TERMS)).backward()
    return {k: v.detach() for k, v in terms.as_dict().items()}, [p.grad.clone() for p in params]


@pytest.mark.parametrize("name", FUSED_SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", [(0, 0, 0, 0, 0, 1), (1.5, -2.0, 0.25, 3.0, -0.5, 0.75)])
@pytest.mark.parametrize("model", ["linear", "zero"])
def test_fused_elbo_node_equals_the_unfused_path(name, dtype, weights, model, monkeypatch):
    """One graph node for the K x K side of elbo() (native_elbo_kernels, its C adjoint; with the
    perturbation in float32) and one for the terms (_Terms, in C for float32): the terms bit
    for bit (in float32 the sums in the prior and the score's quadratic form to rounding), the
    gradients of the total alone and of every term weighted apart to rounding; and the node
    did run."""
    proc = compiled(name, monkeypatch, True)
    calls = []
    fused_call = proc._fused_elbo_kernels

    def counted(*args):
        out = fused_call(*args)
        calls.append(None if out is None else out["y"] is not None)  # ran; and made the perturbation
        return out

    x = torch.randn(32, 2, 3, dtype=dtype, generator=torch.Generator().manual_seed(0))
    if model == "linear":
        score_fn = lambda y, t: -0.8 * y  # noqa: E731 - a graph through y into the process
    else:
        score_fn = lambda y, t: torch.zeros_like(y)  # noqa: E731 - only the target has a graph
    proc._fused_elbo_kernels = counted  # _elbo_run removes it after the call
    a, ga = _elbo_run(proc, x, score_fn, True, weights)
    # float32 data: the node made y and the score too (float64: perturb's own applies)
    assert calls == [dtype == torch.float32] and "_fused_elbo_kernels" not in proc.__dict__
    b, gb = _elbo_run(proc, x, score_fn, False, weights)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        if dtype == torch.float32 and key in ("prior", "score", "total"):  # C's sums of q and |x|², not torch's
            assert torch.allclose(a[key], b[key], rtol=1e-6, atol=1e-6 * float(b[key].abs().max())), key
        else:
            assert torch.equal(a[key], b[key]), key
    assert len(ga) == len(gb) and (len(ga) > 0) == name.startswith("learned")
    rtol = 1e-12 if dtype == F64 else 2e-6  # float32: the terms' gradients are summed in double in C
    for u, v in zip(ga, gb):
        assert float(v.abs().max()) > 0
        assert torch.allclose(u, v, rtol=rtol, atol=rtol * 1e-2 * float(v.abs().max()))


@pytest.mark.parametrize("name", ("cld", "learned3"))
def test_fused_elbo_with_a_network_score_matches_the_unfused_path(name, monkeypatch):
    """score_from_eps reads the fused node's -L⁻ᵀ: the same terms, and the same gradients into
    the network (float32) and the process."""
    proc = compiled(name, monkeypatch, True)
    torch.manual_seed(0)
    net = torch.nn.Conv1d(proc.K, proc.K, 3, padding=1)
    score_fn = proc.score_from_eps(lambda y, t: net(y.reshape(y.shape[0], proc.K, -1)).reshape(y.shape))
    x = torch.randn(16, 2, 4, generator=torch.Generator().manual_seed(0))
    weights = (1.0, 2.0, 0.5, 1.0, 1.0, 1.0)
    a, ga = _elbo_run(proc, x, score_fn, True, weights, extra=net.parameters())
    b, gb = _elbo_run(proc, x, score_fn, False, weights, extra=net.parameters())
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-6, atol=1e-6 * float(b[key].abs().max())), key
    for u, v in zip(ga, gb):
        assert torch.allclose(u, v, rtol=1e-5, atol=1e-6 * float(v.abs().max()))


def test_fused_elbo_falls_back_to_the_cholesky_error(monkeypatch):
    """A time whose Σ does not factor (hybrid ALDA at 1e-9, below its float64 floor) leaves the
    fused node's outputs unwritten; the unfused path then raises the CholeskyError naming t."""
    proc = compiled("alda", monkeypatch, True)
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.5, 1e-9, 0.2, 0.9], dtype=F64)
    with pytest.raises(sdec.CholeskyError, match="t=1e-09"):
        proc.elbo(x, lambda y, tt: -y, t=t)


@pytest.mark.parametrize("name", FUSED_SPECS)
def test_native_rate_table_matches_the_table_from_the_rate_integral(name, monkeypatch):
    """The importance table from one C call equals the one from the native kernels and torch's
    differences and sums (the same masses, summed in another order) to 1e-15."""
    proc = compiled(name, monkeypatch, True)
    with torch.no_grad():
        fast = proc._build_table(proc.t_min)
        module = sys.modules[type(proc).__module__]
        monkeypatch.setattr(module, "native_rate_table", lambda *args: None)
        slow = proc._build_table(proc.t_min)
    assert torch.equal(fast[0], slow[0])
    for u, v in zip(fast[1:], slow[1:]):
        assert torch.allclose(u, v, rtol=1e-15, atol=0)
        assert float(u.min()) > 0


def test_native_rate_table_declines_a_table_it_cannot_make(monkeypatch):
    """A bin edge whose Σ does not factor: native_rate_table returns None, and the table's own
    path raises the CholeskyError."""
    proc = compiled("alda", monkeypatch, True)
    with torch.no_grad():
        with pytest.raises(sdec.CholeskyError, match="t=1e-09"):
            proc._build_table(1e-9)
        c = proc._coeffs(True)
        edges, widths, B = proc._table_grid(1e-9)
        j = proc._squarings(B, c, c["s_T"])
        assert kernel_native.native_rate_table(c["A"], c["D"], c["S0"], B, j, c["radius"], c["norm"], 48,
                                               widths) is None


@pytest.mark.parametrize("K", [1, 2, 3, 5])
def test_gram_form_gradients_match_float64_autograd(K):
    """q = Σ_ij GG_ij <diff_i, diff_j> from the native Gram matrix and its one-call backward,
    against autograd through the float64 products."""
    from sdec.emit import kernel_base
    g = torch.Generator().manual_seed(K)
    diff = torch.randn(6, K, 2, 5, generator=g).requires_grad_()
    GG = torch.randn(6, K, K, generator=g).requires_grad_()
    w = torch.randn(6, generator=g)
    q = kernel_base._gram_form(diff.reshape(6, K, -1), GG)
    assert q.grad_fn is not None and "GramForm" in type(q.grad_fn).__name__
    (w * q).sum().backward()
    d64, G64 = diff.detach().double().requires_grad_(), GG.detach().double().requires_grad_()
    flat = d64.reshape(6, K, -1)
    q64 = ((flat @ flat.mT) * G64).sum((1, 2))
    (w.double() * q64).sum().backward()
    assert torch.allclose(q.double(), q64, rtol=1e-5, atol=1e-5)
    assert torch.allclose(diff.grad.double(), d64.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(GG.grad.double(), G64.grad, rtol=1e-5, atol=1e-5)


def test_elbo_gradient_into_the_data_takes_the_unfused_path(monkeypatch):
    """The fused nodes treat x as a constant, so data with a gradient takes the other path:
    the gradient into x equals central differences of the total."""
    proc = compiled("learned3", monkeypatch, True)
    x = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    t = torch.tensor([0.2, 0.5, 0.9], dtype=F64)
    eps = torch.randn(3, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(2))

    def total(data):  # the same eps in every call: elbo's one randn returns it
        with mock.patch.object(torch, "randn", lambda *a, **k: eps.clone()):
            return proc.elbo(data, lambda y, tt: -y, t=t).total.sum()

    total(x).backward()
    h = 1e-6
    for i in range(3):
        for j in range(4):
            up, down = x.detach().clone(), x.detach().clone()
            up[i, j] += h
            down[i, j] -= h
            fd = (total(up).item() - total(down).item()) / (2 * h)
            assert abs(float(x.grad[i, j]) - fd) <= 1e-6 * max(1.0, abs(fd))


def test_fused_elbo_node_sees_an_in_place_change_of_its_data(monkeypatch):
    """The node that made the perturbation keeps x and eps for its backward as saved tensors:
    changing x in place between elbo() and backward is an error, not a silently wrong
    gradient (as with _PairApply before it)."""
    proc = compiled("learned3", monkeypatch, True)
    x = torch.randn(8, 2, 3, generator=torch.Generator().manual_seed(0))
    terms = proc.elbo(x, lambda y, t: -0.5 * y, time_sampler="importance", generator=torch.Generator().manual_seed(1))
    x.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        terms.total.mean().backward()


def test_fused_elbo_node_takes_non_contiguous_data(monkeypatch):
    """The fused node's two C calls read x and eps through data pointers: data that is a strided
    view (every other column of a larger batch) gives the same terms and parameter gradients,
    to the last bit, as its contiguous copy, with a score that reads y (so the backward's
    d col = gy xᵀ product reads x too)."""
    proc = compiled("learned3", monkeypatch, True)
    big = torch.randn(16, 2, 6, generator=torch.Generator().manual_seed(3))
    views = {"strided": big[:, :, ::2], "contiguous": big[:, :, ::2].contiguous()}
    assert not views["strided"].is_contiguous()
    out = {}
    for name, x in views.items():
        terms = proc.elbo(x, lambda y, t: -0.5 * y, time_sampler="importance",
                          generator=torch.Generator().manual_seed(1))
        params = [p for p in proc.parameters() if p.requires_grad]
        grads = torch.autograd.grad(terms.total.mean(), params)
        out[name] = (terms.total.detach(), grads)
    assert torch.equal(out["strided"][0], out["contiguous"][0])
    for a, b in zip(out["strided"][1], out["contiguous"][1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ("cld", "learned3"))
def test_fused_elbo_terms_are_tensors_of_their_own(name, monkeypatch):
    """The fused path's terms are separate tensors, not views of one buffer: a caller may scale
    one in place (a view returned by a custom Function may not be), and the gradient through
    the others is unchanged."""
    proc = compiled(name, monkeypatch, True)
    x = torch.randn(8, 2, 3, generator=torch.Generator().manual_seed(0))
    e = proc.elbo(x, lambda y, t: -0.5 * y, time_sampler="importance", generator=torch.Generator().manual_seed(1))
    before = e.prior.detach().clone()
    e.total.mul_(2.0)
    e.score.add_(1.0)
    assert torch.equal(e.prior.detach(), before)
    if name.startswith("learned"):
        e.prior.sum().backward()
        assert all(p.grad is not None for p in proc.parameters())
