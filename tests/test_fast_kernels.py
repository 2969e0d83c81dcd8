"""The fast paths of the kernel base (issue 8) against the plain computations they replace.

Per-entry K x K applies against torch.matmul; the doubling series coefficients against the
sequential recurrence; scaling and squaring against torch.linalg.matrix_exp; the entrywise
Cholesky against LAPACK; the K = 1 closed form against mpmath; the lazy score of perturb;
and the per-call sharing inside elbo (built once, never leaking to the next call).
"""
import os

import mpmath as mp
import pytest
import torch

import sdec
from sdec.emit import kernel_base as kb

F64 = torch.float64
SPECS = os.path.join(os.path.dirname(__file__), "..", "specs")


def compiled(name):
    return sdec.compile(os.path.join(SPECS, f"{name}.sde"))


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("tri", [None, "lower", "upper"])
@pytest.mark.parametrize("grad", [False, True])
def test_per_entry_apply_equals_matmul(K, tri, grad):
    n = 6
    mat = torch.randn(n, K, K, generator=gen(0), dtype=F64)
    if tri == "lower":
        mat = mat.tril()
    elif tri == "upper":
        mat = mat.triu()
    y = torch.randn(n, K, 2, 3, generator=gen(1), dtype=F64)
    col, x = torch.randn(n, K, generator=gen(2), dtype=F64), torch.randn(n, 2, 3, generator=gen(3), dtype=F64)
    ref = torch.matmul(mat, y.reshape(n, K, -1)).reshape(y.shape) + col[:, :, None, None] * x[:, None]
    if grad:
        mat.requires_grad_(True)
    got = kb._apply(mat, y, tri, col, x)
    assert torch.allclose(got, ref, rtol=1e-14, atol=1e-14)
    assert torch.allclose(kb._apply(mat, y, tri), ref - col[:, :, None, None] * x[:, None], rtol=1e-14, atol=1e-14)
    # an unbatched (K, K) matrix broadcasts over the batch
    assert torch.allclose(kb._apply(mat[0], y, tri), torch.matmul(mat[0], y.reshape(n, K, -1)).reshape(y.shape),
                          rtol=1e-14, atol=1e-14)
    if grad:
        assert got.requires_grad
        (g,) = torch.autograd.grad(got.square().sum(), mat)
        m2 = mat.detach().clone().requires_grad_(True)
        ref2 = torch.matmul(m2, y.reshape(n, K, -1)).reshape(y.shape) + col[:, :, None, None] * x[:, None]
        (g2,) = torch.autograd.grad(ref2.square().sum(), m2)
        mask = {"lower": torch.ones(K, K, dtype=F64).tril(), "upper": torch.ones(K, K, dtype=F64).triu()}
        keep = mask[tri] if tri else torch.ones(K, K, dtype=F64)  # the triangle's entries
        assert torch.allclose(g * keep, g2 * keep, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", ["cld", "alda", "learned3"])
def test_doubling_coefficients_match_the_sequential_recurrence(name):
    proc = compiled(name)
    with torch.no_grad():
        A, D = proc._A_D()
        S0 = proc._sigma0(True)
        powers, moments = kb._series_coefficients(A, D, S0, kb._SERIES_TERMS)
    P, N = torch.eye(proc.K, dtype=F64), S0
    AS0 = A @ S0
    nxt = AS0 + AS0.mT + 2.0 * D
    for k in range(kb._SERIES_TERMS):
        scale = max(float(P.abs().max()), 1e-300)
        assert (powers[k] - P).abs().max() <= 1e-13 * scale, k
        nscale = max(float(N.abs().max()), 1e-300)
        assert (moments[k] - N).abs().max() <= 1e-13 * nscale, k
        assert torch.equal(moments[k] == 0, N == 0), k   # structural zeros stay exactly zero
        P, N = A @ P, nxt
        AN = A @ nxt
        nxt = AN + AN.mT


@pytest.mark.parametrize("name", ["alda", "malda", "learned2", "learned3"])
def test_scaling_and_squaring_matches_matrix_exp(name):
    proc = compiled(name)
    with torch.no_grad():
        c = proc._coeffs(True)
        s = torch.linspace(0.01, 12.0, 50, dtype=F64)
        ref = torch.linalg.matrix_exp(s[:, None, None] * c["A"])
        got = proc._phi_sigma(s, False)[0]
    assert (got - ref).abs().max() < 1e-13


def test_entrywise_cholesky_and_inverse():
    n, K = 40, 4
    B = torch.randn(n, K, K, generator=gen(0), dtype=F64)
    S = B @ B.mT + 0.1 * torch.eye(K, dtype=F64)
    for k in (2, 3, 4):
        L, ok = kb._cholesky_small(S[:, :k, :k])
        assert ok.all()
        ref = torch.linalg.cholesky(S[:, :k, :k])
        assert torch.allclose(L, ref, rtol=1e-13, atol=1e-13)
        M = kb._tri_inverse_small(L)
        assert torch.allclose(M @ L, torch.eye(k, dtype=F64).expand(n, k, k), atol=1e-12)
    bad = S.clone()
    bad[3] = -bad[3]
    _, ok = kb._cholesky_small(bad)
    assert not ok[3] and ok[torch.arange(n) != 3].all()


def test_cholesky_failure_is_still_a_located_error():
    proc = compiled("learned3")
    with torch.no_grad():
        Sig = torch.eye(3, dtype=F64).repeat(2, 1, 1)
        Sig[1, 2, 2] = -1.0
        with pytest.raises(RuntimeError, match="Cholesky of Sigma_t failed at t=0.5") as info:
            proc._cholesky(Sig, torch.tensor([0.1, 0.5], dtype=F64))
    assert type(info.value).__name__ == "CholeskyError"


def test_scalar_closed_form_against_mpmath():
    """VP: Σ = 1 - e^{-B(t)} to full relative accuracy down to t = 1e-7."""
    proc = compiled("vpsde")
    t = torch.tensor([1e-7, 1e-5, 1e-3, 0.1, 0.5, 1.0], dtype=F64)
    with torch.no_grad():
        Phi, Sig = proc.transition(t)
    with mp.workdps(40):
        for i, tv in enumerate(t.tolist()):
            s = mp.mpf(tv) * mp.mpf("0.1") + mp.mpf("4.95") * mp.mpf(tv) ** 2
            assert abs(float(Sig[i, 0, 0]) / float(1 - mp.exp(-s)) - 1) < 4e-16
            assert abs(float(Phi[i, 0, 0]) / float(mp.exp(-s / 2)) - 1) < 4e-16


@pytest.mark.parametrize("name", ["vpsde", "cld", "learned3"])
def test_lazy_score_and_mean_equal_their_definitions(name):
    proc = compiled(name)
    x = torch.randn(5, 2, 3, generator=gen(0), dtype=F64)
    t = torch.tensor([1e-3, 0.01, 0.2, 0.6, 1.0], dtype=F64)
    p = proc.perturb(x, t, generator=gen(1))
    assert callable(p._score) and callable(p._mean)  # not computed until asked for
    Phi, L, LinvT = proc._kernel_factors(t, True)
    K = proc.K
    eps = p.eps.reshape(5, K, -1)
    mean = (Phi[:, :, :1] * x.reshape(5, 1, -1)).reshape(p.y.shape)
    assert torch.allclose(p.mean, mean, rtol=1e-14, atol=1e-15)
    assert torch.allclose(p.y, mean + (L @ eps).reshape(p.y.shape), rtol=1e-13, atol=1e-14)
    assert torch.allclose(p.score, -(LinvT @ eps).reshape(p.y.shape), rtol=1e-13, atol=1e-13)
    assert p.score is p.score  # computed once


@pytest.mark.parametrize("fused", [True, False])
def test_elbo_builds_each_kernel_quantity_once_and_forgets_it_after_the_call(monkeypatch, fused):
    proc = compiled("learned3")
    # without the native library (SDEC_NATIVE=0, no C compiler) the fused path must decline
    takes_fused = fused and proc._native_ok()
    counts = {"coeffs": 0, "phi_sigma": 0, "cholesky": 0, "fused": 0}
    build, phi_sigma, cholesky, fused_call = (proc._build_coeffs, proc._phi_sigma, proc._cholesky,
                                              proc._fused_elbo_kernels)

    def counted_build(hybrid):
        counts["coeffs"] += 1
        return build(hybrid)

    def counted_phi_sigma(s, hybrid, *bound):
        counts["phi_sigma"] += 1
        assert s.shape == (4 + 2,)  # the batch's times, t_min and T in one call
        return phi_sigma(s, hybrid, *bound)

    def counted_cholesky(Sig, t64):
        counts["cholesky"] += 1
        return cholesky(Sig, t64)

    def counted_fused(t, t64, B, s_max, like, eps, c=None):
        out = fused_call(t, t64, B, s_max, like, eps, c) if fused else None
        if out is not None:
            assert B.shape == (4 + 2,)  # the batch's times, t_min and T in one call
            counts["fused"] += 1
        return out

    monkeypatch.setattr(proc, "_build_coeffs", counted_build)
    monkeypatch.setattr(proc, "_phi_sigma", counted_phi_sigma)
    monkeypatch.setattr(proc, "_cholesky", counted_cholesky)
    monkeypatch.setattr(proc, "_fused_elbo_kernels", counted_fused)
    x = torch.randn(4, 6, generator=gen(0), dtype=F64)
    score_fn = proc.score_from_eps(lambda y, t: 0.5 * y)
    e = proc.elbo(x, score_fn, generator=gen(1))
    # one coefficient build; one Φ/Σ and one Cholesky for the batch's times (shared by
    # perturb and score_fn), the score norm's t_min and T, and the prior at T: in one native
    # call where the fused path runs
    if takes_fused:
        assert counts == {"coeffs": 1, "phi_sigma": 0, "cholesky": 0, "fused": 1}
    else:
        assert counts == {"coeffs": 1, "phi_sigma": 1, "cholesky": 1, "fused": 0}
    assert proc._call_memo is None
    e.total.sum().backward()
    with torch.no_grad():
        proc.theta_Q.add_(0.05)
    e2 = proc.elbo(x, score_fn, generator=gen(1))
    fresh = compiled("learned3")
    fresh.load_state_dict(proc.state_dict())
    if not fused:
        monkeypatch.setattr(fresh, "_fused_elbo_kernels", lambda *args: None)
    e3 = fresh.elbo(x, fresh.score_from_eps(lambda y, t: 0.5 * y), generator=gen(1))
    for k in kb.ELBOTerms.TERMS:
        assert torch.equal(getattr(e2, k), getattr(e3, k)), k


def test_importance_table_inside_elbo_reuses_the_calls_coefficients(monkeypatch):
    """With importance times the table (no grad) is rebuilt after every parameter change; inside
    elbo() (here without _prepare's one call) it reads the coefficients the call built with
    their graph (passed in, no detached copy), and equals a table built on its own."""
    proc = compiled("learned3")
    monkeypatch.setattr(proc, "_prepare", lambda t_min: False)
    counts = {"coeffs": 0}
    build, build_table, tables = proc._build_coeffs, proc._build_table, []

    def counted_build(hybrid):
        counts["coeffs"] += 1
        return build(hybrid)

    def recorded_table(t_min, c=None):
        tables.append(build_table(t_min, c))
        return tables[-1]

    monkeypatch.setattr(proc, "_build_coeffs", counted_build)
    monkeypatch.setattr(proc, "_build_table", recorded_table)
    x = torch.randn(4, 6, generator=gen(0), dtype=F64)
    with torch.no_grad():
        proc.theta_Q.add_(0.05)
    e = proc.elbo(x, lambda y, t: -y, time_sampler="importance", generator=gen(1))
    assert counts["coeffs"] == 1 and e.total.requires_grad and len(tables) == 1
    inside = tables[0]
    fresh = compiled("learned3")
    fresh.load_state_dict(proc.state_dict())
    with torch.no_grad():
        alone = fresh._build_table(fresh.t_min)
    for a, b in zip(inside, alone):  # the series coefficients' graph and no-grad paths round apart
        assert not a.requires_grad and torch.allclose(a, b, rtol=1e-12, atol=0)


def _training_step(proc, x, sampler="importance"):
    proc.zero_grad(set_to_none=True)
    e = proc.elbo(x, lambda y, t: -0.5 * y, time_sampler=sampler, generator=gen(1))
    e.total.mean().backward()
    return [e.as_dict()[k].detach() for k in ("total", "t", "weight")], [p.grad for p in proc.parameters()]


@pytest.mark.parametrize("name", ["learned2", "learned3"])
@pytest.mark.parametrize("sampler", ["importance", "stratified"])
def test_training_step_prepares_coefficients_and_table_in_one_call_bit_for_bit(name, sampler, monkeypatch):
    """A training step with importance times gets its coefficients and its importance table
    from one C call (_prepare, native_prepare) instead of _build_coeffs and _build_table: the
    same times, weights, terms and parameter gradients bit for bit, in float32 and float64."""
    import sys
    proc = compiled(name)
    with torch.no_grad():
        for p in proc.parameters():
            p.add_(0.03)
    module = sys.modules[type(proc).__module__]
    calls = {"prepare": 0, "coeffs": 0, "table": 0}
    prepare, build, build_table = module.native_prepare, proc._build_coeffs, proc._build_table

    def counted(key, f):
        def g(*args):
            calls[key] += 1
            return f(*args)
        return g
    monkeypatch.setattr(module, "native_prepare", counted("prepare", prepare))
    monkeypatch.setattr(proc, "_build_coeffs", counted("coeffs", build))
    monkeypatch.setattr(proc, "_build_table", counted("table", build_table))
    for dtype in (torch.float32, F64):
        x = torch.randn(32, 6, generator=gen(0), dtype=dtype)
        calls.update(prepare=0, coeffs=0, table=0)
        one = _training_step(proc, x, sampler)
        assert calls == {"prepare": 1, "coeffs": 0, "table": 0}
        proc._prepare = lambda t_min: False  # the separate builds
        apart = _training_step(proc, x, sampler)
        del proc._prepare
        assert calls == {"prepare": 1, "coeffs": 1, "table": 1}
        for u, v in zip(one[0] + one[1], apart[0] + apart[1]):
            assert torch.equal(u, v)
        assert all(float(g.abs().max()) > 0 for g in one[1])


def test_prepare_runs_only_where_a_training_step_draws_importance_times(monkeypatch):
    """No one-call setup for uniform times (no table), without a gradient (the cached table),
    with a table held across steps (table_refresh > 1) or for a spec without a native map;
    where native_prepare declines (a NaN parameter) the separate builds run and raise as before."""
    import sys
    proc = compiled("learned3")
    module = sys.modules[type(proc).__module__]
    seen = []
    prepare = module.native_prepare
    monkeypatch.setattr(module, "native_prepare", lambda *args: seen.append(prepare(*args)) or seen[-1])
    x = torch.randn(8, 6, generator=gen(0), dtype=F64)
    _training_step(proc, x, "uniform")
    with torch.no_grad():
        proc.elbo(x, lambda y, t: -y, time_sampler="importance", generator=gen(1))
    proc.table_refresh = 5
    _training_step(proc, x)
    assert seen == []
    proc.table_refresh = 1
    _training_step(proc, x)
    assert len(seen) == 1 and seen[0] is not None
    with torch.no_grad():
        proc.theta_Q[0] = float("nan")
    with pytest.raises(sdec.CholeskyError, match="not finite"):
        _training_step(proc, x)
    assert len(seen) == 2 and seen[1] is None
    unmapped = compiled("learned3")  # the same generated module, its blocks through torch ops
    assert type(unmapped).__module__ == type(proc).__module__  # so native_prepare is the counted one
    unmapped._param_map = None
    _training_step(unmapped, x)
    assert len(seen) == 2


def test_elbo_clears_its_memo_when_the_score_function_raises():
    proc = compiled("learned2")
    x = torch.randn(3, 4, generator=gen(0), dtype=F64)

    def broken(y, t):
        raise RuntimeError("network failed")

    with pytest.raises(RuntimeError, match="network failed"):
        proc.elbo(x, broken, generator=gen(1))
    assert proc._call_memo is None


@pytest.mark.parametrize("tri", [None, "lower", "upper"])
@pytest.mark.parametrize("batched", [True, False])
def test_apply_backward_passes_gradcheck(tri, batched):
    """The batched-product backward of the unrolled apply, for every input at once."""
    K, n = 3, 2
    mat = torch.randn(*((n,) if batched else ()), K, K, generator=gen(0), dtype=F64, requires_grad=True)
    y = torch.randn(n, K, 2, generator=gen(1), dtype=F64, requires_grad=True)
    col = torch.randn(n, K, generator=gen(2), dtype=F64, requires_grad=True)
    x = torch.randn(n, 2, generator=gen(3), dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, a, c, b: kb._apply(m, a, tri, c, b), (mat, y, col, x))
    assert torch.autograd.gradcheck(lambda m, a: kb._apply(m, a, tri), (mat, y))


K1_LEARNED = """sde k1
state x
beta(t) = 1 + t
T = 5
target normal(0, 1)
Q = 0
learn D: diagonal init [[0.5]]
"""


def test_one_variable_kernel_closed_form_gradient_and_singular_t():
    """K = 1 takes its own Cholesky (L = sqrt Σ): Σ equals Σ∞ (1 - e^{2as}) with a = -d/Σ∞,
    the ELBO's gradient into a learned D matches central differences, and Σ = 0 at t = 0 is
    a CholeskyError, not a NaN."""
    proc = sdec.compile_text(K1_LEARNED)
    t = torch.tensor([1e-3, 0.1, 1.0, 4.0], dtype=F64)
    d = float(proc.D[0, 0])
    s = t + t * t / 2
    Phi, Sig = proc.transition(t)
    assert torch.allclose(Sig[:, 0, 0], -torch.expm1(-2 * d * s), rtol=1e-14, atol=0)
    assert torch.allclose(Phi[:, 0, 0], torch.exp(-d * s), rtol=1e-14, atol=0)
    x = torch.randn(4, 3, dtype=F64, generator=gen(0))

    def total():
        return proc.elbo(x, lambda y, tt: -0.7 * y, t=t, generator=gen(1)).total.sum()

    total().backward()
    grad, h = float(proc.theta_D.grad[0]), 1e-6
    with torch.no_grad():
        proc.theta_D += h
        up = float(total())
        proc.theta_D -= 2 * h
        down = float(total())
    assert abs(grad - (up - down) / (2 * h)) < 1e-6 * abs(grad)
    with pytest.raises(kb.CholeskyError, match="t=0"):
        proc._kernel_factors(torch.zeros(1, dtype=F64), True)


def test_cholesky_error_on_a_non_finite_sigma_names_the_time():
    """A diverged process (here a NaN entry) gets a CholeskyError naming t, not a LinAlgError
    from inside the error path's own eigenvalue call."""
    proc = compiled("learned3")
    with torch.no_grad():
        Sig = torch.eye(3, dtype=F64).repeat(2, 1, 1)
        Sig[1, 0, 0] = float("nan")
        with pytest.raises(kb.CholeskyError, match="not finite at t=0.5.*a diverged optimisation"):
            proc._cholesky(Sig, torch.tensor([0.1, 0.5], dtype=F64))


@pytest.mark.parametrize("name", ["cld", "learned3"])
def test_lapack_and_entrywise_factor_paths_agree(name, monkeypatch):
    """Up to _LAPACK_MAX_N times the Cholesky factor and L⁻ᵀ come from LAPACK, above it entry
    by entry: same values and gradients (float64) on the same Σ_t; perturb builds L⁻ᵀ only
    once the score is read."""
    proc = compiled(name)
    n = kb._LAPACK_MAX_N + 44
    t = torch.exp(torch.linspace(-6.9, 0.0, n, dtype=F64))
    with torch.no_grad():
        Sig0 = proc._phi_sigma(proc._B(t), True)[1]
    w = torch.randn(n, proc.K, proc.K, generator=gen(0), dtype=F64)

    def factors(lo, hi):
        Sig = Sig0[lo:hi].clone().requires_grad_(True)
        L = proc._cholesky(Sig, t[lo:hi])
        LinvT = proc._factors_with_inverse([None, L, None])[2]
        (g,) = torch.autograd.grad(((L + LinvT) * w[lo:hi]).sum(), Sig)
        # Σ is symmetric: only g_ij + g_ji is defined (LAPACK's backward splits it evenly,
        # the entrywise one puts it in the lower triangle)
        return L.detach(), LinvT.detach(), g + g.mT

    whole = factors(0, n)                                       # entrywise
    half = n // 2                                               # LAPACK, two calls
    assert half <= kb._LAPACK_MAX_N < n
    parts = [torch.cat(v) for v in zip(factors(0, half), factors(half, n))]
    for a, b in zip(whole, parts):
        scale = b.abs().amax((-2, -1), keepdim=True)
        assert ((a - b).abs() <= 1e-12 * scale).all()
    calls = []
    build = proc._factors_with_inverse
    monkeypatch.setattr(proc, "_factors_with_inverse", lambda e: calls.append(1) or build(e))
    x = torch.randn(3, 4, generator=gen(1), dtype=F64)
    p = proc.perturb(x, t[:3], generator=gen(2))
    assert not calls
    LinvT = build(proc._factor_entry(t[:3], True))[2]
    assert torch.allclose(p.score, -(LinvT @ p.eps).reshape(p.eps.shape), rtol=1e-13, atol=1e-13)
    assert len(calls) == 1
