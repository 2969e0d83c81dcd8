"""The K x K cache never serves numbers from old parameter or buffer values.

Every test writes new values into a compiled process by one route, then compares every
public method against a freshly compiled process given the same values (bit for bit).
The process's caches are warmed first, so a stale entry would show.

Routes the old cache key (data_ptr, _version) missed, because they change a tensor's
values without bumping its version counter: writes through ``.data`` or a numpy view, a
reused buffer assigned to ``.data``, an EMA swap of ``.data``, ``vector_to_parameters``
with a reused vector, fused optimizer steps.  The other routes (``copy_`` under no_grad,
``load_state_dict``, for-loop and foreach optimizer steps, a replaced attribute, a dtype
round trip) bump the version or allocate new storage; their tests guard the semantics.
"""
import math
import os

import pytest
import torch

import sdec

F64 = torch.float64
SPECS = os.path.join(os.path.dirname(__file__), "..", "specs")
LEARNED = ["learned2", "learned3"]
ALL = LEARNED + ["cld"]
T = torch.tensor([1e-3, 0.02, 0.3, 0.9], dtype=F64)

# New buffer values that keep a valid process: Σ∞ PD, aux covariance PSD, and
# _D_sqrt_fixed² = _D_fixed (so the noise factor stays consistent with D).
BUFFER_SCALE = {"_sigma_inf": 1.5, "_aux_init_cov": 2.0, "_Q_fixed": 1.3, "_D_fixed": 2.25,
                "_D_sqrt_fixed": 1.5}


def compiled(name):
    return sdec.compile(os.path.join(SPECS, f"{name}.sde"))


def targets(proc):
    """The tensors a route writes: the parameters of a learned spec, else the buffers."""
    return [n for n, _ in proc.named_parameters()] or [n for n, _ in proc.named_buffers()]


def new_values(proc, names, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        v = getattr(proc, n).detach()
        if n in BUFFER_SCALE:
            out[n] = v * BUFFER_SCALE[n]
        else:
            out[n] = v + 0.2 * torch.randn(v.shape, generator=g, dtype=F64).to(v.dtype)
    return out


# ------------------------------------------------------------ every public method
def _public_outputs(proc):
    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    K = proc.K
    x = torch.randn(4, 3, generator=g(0), dtype=F64)
    y = torch.randn(4, K, 3, generator=g(1), dtype=F64)
    eps = torch.randn(4, K, 3, generator=g(2), dtype=F64)
    out = {"K": torch.tensor(K), "Q": proc.Q, "D": proc.D,
           "stationary_cov": proc.stationary_cov, "aux_init_cov": proc.aux_init_cov,
           "drift": proc.drift(T), "noise_cov": proc.noise_cov(T), "diffusion": proc.diffusion(T),
           "drift_scalar": proc.drift(0.4)}
    for hybrid in (True, False):
        out[f"transition({hybrid})"] = proc.transition(T, hybrid=hybrid)
        p = proc.perturb(x if hybrid else y, T, hybrid=hybrid, eps=eps)
        out[f"perturb({hybrid})"] = (p.y, p.eps, p.mean, p.chol, p.score)
        out[f"perturb_sampled({hybrid})"] = proc.perturb(x if hybrid else y, T, hybrid=hybrid,
                                                         generator=g(3)).y
        out[f"score_from_eps({hybrid})"] = proc.score_from_eps(
            lambda yy, tt: 0.5 * yy + tt[:, None, None], hybrid=hybrid)(y, T)
    for sampler in ("uniform", "importance"):
        e = proc.elbo(x, lambda yy, tt: -yy, time_sampler=sampler, generator=g(4))
        out[f"elbo({sampler})"] = tuple(e.as_dict().values())
        e = proc.elbo(x, lambda yy, tt: -0.7 * yy, t=T, time_sampler=sampler, t_min=2e-3,
                      generator=g(5))
        out[f"elbo_t({sampler})"] = tuple(e.as_dict().values())
    out["time_density"] = proc.time_density(T)
    out["time_density_tmin"] = proc.time_density(T, t_min=2e-3)
    out["sample_time"] = proc.sample_time(64, generator=g(6), dtype=F64)
    out["prior_sample"] = proc.prior_sample(4, 3, generator=g(7), dtype=F64)
    out["prior_log_prob"] = proc.prior_log_prob(y)
    out["aux_sample"] = proc.aux_sample(x, generator=g(8))
    out["aux_log_prob"] = proc.aux_log_prob(y[:, 1:])
    return out


def outputs(proc):
    """Every public method at fixed inputs and seeds, without and with autograd (learned
    modules rebuild per call while a graph is needed; the time table is cached in both)."""
    with torch.no_grad():
        a = _public_outputs(proc)
    with torch.enable_grad():
        b = _public_outputs(proc)
    flat = {}
    for prefix, d in (("no_grad", a), ("grad", b)):
        for key, val in d.items():
            for i, v in enumerate(val if isinstance(val, tuple) else (val,)):
                flat[f"{prefix}:{key}[{i}]"] = v.detach()
    return flat


def fresh_copy(name, proc):
    """A freshly compiled process given proc's current values (and dtype)."""
    fresh = compiled(name).to(proc._sigma_inf.dtype)
    fresh.load_state_dict({k: v.detach().clone() for k, v in proc.state_dict().items()})
    return fresh


def assert_matches_fresh(name, proc, before=None):
    """Every output of proc equals a fresh process's, bit for bit; and (given the outputs
    before the write) the write did change the process."""
    got, want = outputs(proc), outputs(fresh_copy(name, proc))
    assert got.keys() == want.keys()
    stale = [k for k in got if not (got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]))]
    assert not stale, f"differs from a fresh process: {stale}"
    if before is not None:
        assert not torch.equal(got["no_grad:transition(True)[1]"],
                               before["no_grad:transition(True)[1]"]), "the write changed nothing"
    return got


# ------------------------------------------------------------------------ routes
@pytest.mark.parametrize("name", ALL)
def test_write_through_data_copy(name):
    proc = compiled(name)
    before = outputs(proc)
    for n, v in new_values(proc, targets(proc), 0).items():
        getattr(proc, n).data.copy_(v)
    assert_matches_fresh(name, proc, before)


@pytest.mark.parametrize("name", ALL)
def test_assign_data(name):
    """p.data = tensor, twice with the same (reused, rewritten) tensor."""
    proc = compiled(name)
    before = outputs(proc)
    names = targets(proc)
    scratch = {n: v.clone() for n, v in new_values(proc, names, 0).items()}
    for n in names:
        getattr(proc, n).data = scratch[n]
    before = assert_matches_fresh(name, proc, before)
    for n, v in new_values(proc, names, 1).items():
        scratch[n].copy_(v)
        getattr(proc, n).data = scratch[n]
    assert_matches_fresh(name, proc, before)


@pytest.mark.parametrize("name", ALL)
def test_copy_and_inplace_ops_under_no_grad(name):
    proc = compiled(name)
    before = outputs(proc)
    with torch.no_grad():
        for n, v in new_values(proc, targets(proc), 0).items():
            getattr(proc, n).copy_(v)
    before = assert_matches_fresh(name, proc, before)
    with torch.no_grad():
        for n, v in new_values(proc, targets(proc), 1).items():
            t = getattr(proc, n)
            t.add_(v - t)
    assert_matches_fresh(name, proc, before)


@pytest.mark.parametrize("name", ALL)
def test_write_through_numpy_view(name):
    """numpy shares the storage and knows nothing of version counters (scipy interop)."""
    proc = compiled(name)
    before = outputs(proc)
    for n, v in new_values(proc, targets(proc), 0).items():
        getattr(proc, n).detach().numpy()[...] = v.numpy()
    assert_matches_fresh(name, proc, before)


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("name", ALL)
def test_load_state_dict(name, assign):
    proc = compiled(name)
    before = outputs(proc)
    sd = {k: v.clone() for k, v in proc.state_dict().items()}
    sd.update(new_values(proc, targets(proc), 0))
    sd["_aux_init_cov"] = sd["_aux_init_cov"] * 3.0
    proc.load_state_dict(sd, assign=assign)
    assert_matches_fresh(name, proc, before)


@pytest.mark.parametrize("name", ALL)
def test_ema_swap_of_data(name):
    """Evaluate with EMA weights by swapping .data with the shadow tensors and back; update
    the EMA in place (the live weights unchanged, e.g. a skipped step); evaluate the EMA
    again: the new EMA values sit in the same storage as the old ones."""
    proc = compiled(name)
    before = outputs(proc)
    names = targets(proc)
    shadow = {n: v.clone() for n, v in new_values(proc, names, 0).items()}

    def swap():
        for n in names:
            p = getattr(proc, n)
            p.data, shadow[n].data = shadow[n].data, p.data

    swap()
    ema = assert_matches_fresh(name, proc, before)
    swap()
    with torch.no_grad():
        for n in names:
            shadow[n].lerp_(getattr(proc, n), 0.5)
    swap()
    assert_matches_fresh(name, proc, ema)
    swap()
    live = assert_matches_fresh(name, proc)
    assert all(torch.equal(live[k], before[k]) for k in live)


@pytest.mark.parametrize("impl", ["for-loop", "foreach", "fused"])
@pytest.mark.parametrize("name", LEARNED)
def test_optimizer_step(name, impl):
    proc = compiled(name)
    before = outputs(proc)
    opt = torch.optim.Adam(proc.parameters(), lr=0.05, foreach=impl == "foreach",
                           fused=True if impl == "fused" else None)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(9), dtype=F64)
    for _ in range(2):
        opt.zero_grad()
        loss = -proc.elbo(x, lambda y, t: -0.5 * y, generator=torch.Generator().manual_seed(10)).total.mean()
        loss.backward()
        opt.step()
        before = assert_matches_fresh(name, proc, before)


@pytest.mark.parametrize("name", LEARNED)
def test_vector_to_parameters(name):
    """A fresh vector, then the same vector rewritten and loaded again."""
    proc = compiled(name)
    before = outputs(proc)
    names = targets(proc)
    utils = torch.nn.utils
    vec = utils.parameters_to_vector(new_values(proc, names, 0).values())
    utils.vector_to_parameters(vec, proc.parameters())
    before = assert_matches_fresh(name, proc, before)
    vec.copy_(utils.parameters_to_vector(new_values(proc, names, 1).values()))
    utils.vector_to_parameters(vec, proc.parameters())
    assert_matches_fresh(name, proc, before)


@pytest.mark.parametrize("name", ALL)
def test_buffer_write_through_data(name):
    proc = compiled(name)
    before = outputs(proc)
    names = [n for n, _ in proc.named_buffers()]
    for n, v in new_values(proc, names, 0).items():
        getattr(proc, n).data.copy_(v)
    assert_matches_fresh(name, proc, before)


@pytest.mark.parametrize("name", ALL)
def test_replace_parameter_or_buffer_attribute(name):
    proc = compiled(name)
    before = outputs(proc)
    learned = bool(list(proc.parameters()))
    for n, v in new_values(proc, targets(proc), 0).items():
        setattr(proc, n, torch.nn.Parameter(v.clone()) if learned else v.clone())
    assert_matches_fresh(name, proc, before)


@pytest.mark.parametrize("name", ALL)
def test_float_double_round_trip(name):
    """float32 storage rounds the values: a process cast back to float64 holds new values."""
    proc = compiled(name)
    before = outputs(proc)
    proc.float()
    half = assert_matches_fresh(name, proc)
    proc.double()
    after = assert_matches_fresh(name, proc, before)
    assert torch.equal(half["no_grad:transition(True)[1]"], after["no_grad:transition(True)[1]"])


def _write_buffers(proc, route, values):
    for n, v in values.items():
        if route == "data":
            getattr(proc, n).data.copy_(v)
        elif route == "copy_":
            with torch.no_grad():
                getattr(proc, n).copy_(v)
        elif route == "numpy":
            getattr(proc, n).numpy()[...] = v.numpy()
        elif route == "replace":
            setattr(proc, n, v.clone())
    if route == "load_state_dict":
        proc.load_state_dict(proc.state_dict() | values)


@pytest.mark.parametrize("route", ["data", "copy_", "numpy", "replace", "load_state_dict"])
@pytest.mark.parametrize("name", LEARNED)
def test_buffer_routes_while_parameters_stay(name, route):
    """Σ∞⁻¹, log det Σ∞ and the aux entropy are held across parameter versions (_constants),
    keyed on the buffers alone: each way of writing Σ∞ and Σ_aux of a learned process, its
    parameters untouched, is seen (warmed with and without a graph first)."""
    proc = compiled(name)
    before = outputs(proc)
    names = ["_sigma_inf", "_aux_init_cov"]
    _write_buffers(proc, route, new_values(proc, names, 0))
    assert_matches_fresh(name, proc, before)


# ------------------------------------------------------------------ cache behaviour
def test_cache_is_reused_while_nothing_changes():
    proc = compiled("learned3")
    with torch.no_grad():
        c = proc._coeffs(True)
        assert proc._coeffs(True) is c
        proc.theta_Q.data.add_(0.1)
        assert proc._coeffs(True) is not c
    table = proc._time_table(proc.t_min)
    assert proc._time_table(proc.t_min) is table  # no graph: cached with grad enabled too
    Phi, _ = proc.transition(T)
    assert Phi.requires_grad  # a graph is needed: built fresh


def test_nan_parameter_is_never_served_from_the_cache():
    proc = compiled("learned2")
    with torch.no_grad():
        proc.theta_Q.data.fill_(float("nan"))
        A = proc._A_D()
        assert proc._A_D() is not A and torch.isnan(A[0]).any()
        proc.theta_Q.data.fill_(1.0)
        assert torch.equal(proc.transition(T)[1], fresh_copy("learned2", proc).transition(T)[1])


def test_changed_horizon_rebuilds_the_time_table():
    proc = compiled("cld")
    edges = proc._time_table(proc.t_min)[0]
    proc.T = 0.5
    assert float(proc._time_table(proc.t_min)[0][-1]) == 0.5 != float(edges[-1])


# ------------------------------------------- the training-time importance table (staleness)
def _training_table(proc):
    """The table a training elbo() uses: gradient enabled and parameters requiring it."""
    with torch.enable_grad():
        return proc._time_table(proc.t_min)


def _change(proc, route, step):
    """One new parameter version of learned2 by one route."""
    if route == "data":
        proc.theta_Q.data.add_(0.01)
    elif route == "load_state_dict":
        sd = {k: v.clone() for k, v in proc.state_dict().items()}
        sd["theta_D_diag"] = sd["theta_D_diag"] + 0.01
        proc.load_state_dict(sd)
    else:
        opt = torch.optim.SGD(proc.parameters(), lr=0.01)
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(step), dtype=F64)
        opt.zero_grad()
        (-proc.elbo(x, lambda y, t: -0.5 * y, generator=torch.Generator().manual_seed(1)).total.mean()).backward()
        opt.step()


@pytest.mark.parametrize("route", ["optimizer step", "load_state_dict", "data"])
def test_training_table_is_rebuilt_every_table_refresh_versions(route):
    """With table_refresh = 3, a training-time table serves the version it was built at and
    the next two; the third change rebuilds it, equal to a fresh process's table."""
    proc = compiled("learned2")
    proc.table_refresh = 3
    table = _training_table(proc)
    for step in range(1, 7):
        _change(proc, route, step)
        now = _training_table(proc)
        if step % 3:
            assert now is table, step
        else:
            assert now is not table, step
            with torch.no_grad():
                fresh = fresh_copy("learned2", proc)._build_table(proc.t_min)
            assert all(torch.equal(a, b) for a, b in zip(now, fresh)), step
            assert not torch.equal(now[2], table[2])
            table = now


def test_evaluation_and_horizon_never_use_a_stale_table():
    """No gradient needed: the current parameters' table, even while a stale one is held for
    training; after it, training takes that exact table. A changed T rebuilds at once."""
    proc = compiled("learned2")
    proc.table_refresh = 100
    stale = _training_table(proc)
    _change(proc, "data", 0)
    assert _training_table(proc) is stale
    with torch.no_grad():
        exact = proc._time_table(proc.t_min)
        fresh = fresh_copy("learned2", proc)._build_table(proc.t_min)
        assert all(torch.equal(a, b) for a, b in zip(exact, fresh)) and not torch.equal(exact[2], stale[2])
        assert torch.equal(proc.time_density(T), fresh[2][torch.searchsorted(fresh[0], T, right=True) - 1])
    assert _training_table(proc) is exact
    proc.T = 0.5
    assert float(_training_table(proc)[0][-1]) == 0.5


def test_table_refresh_one_rebuilds_after_every_change():
    proc = compiled("learned2")
    proc.table_refresh = 1
    table = _training_table(proc)
    _change(proc, "data", 0)
    assert _training_table(proc) is not table


def _held_table_then_moved(name, delta):
    """learned2 holding its training table for 100 versions, then parameter `name` moved by
    delta: (proc, the held table)."""
    proc = compiled("learned2")
    proc.table_refresh = 100
    held = _training_table(proc)
    with torch.no_grad():
        getattr(proc, name).add_(delta)
    return proc, held


def test_stale_table_draws_and_weights_come_from_the_same_table():
    """Training-time draws t and weights w = 1 / p(t) both from the held (stale) table, in
    sample_time and in elbo(), not from the current parameters' table."""
    proc, stale = _held_table_then_moved("theta_Q", 0.5)
    g = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        t, w = proc.sample_time(2000, generator=g, dtype=F64)
        assert _training_table(proc) is stale
        assert torch.allclose(w, 1.0 / proc.time_density(t), rtol=1e-14, atol=0)
        terms = proc.elbo(torch.randn(64, 3, generator=g, dtype=F64), lambda y, tt: -y,
                          time_sampler="importance", generator=g)
        assert torch.allclose(terms.weight, 1.0 / proc.time_density(terms.t), rtol=1e-14, atol=0)
    with torch.no_grad():
        exact = 1.0 / proc.time_density(t)
    assert (exact / w - 1).abs().max() > 1e-3  # the table really is stale


def test_stale_table_keeps_the_estimator_unbiased():
    """A table built for parameters far from the current ones (D's diagonal raw values +3):
    the training-mode importance estimate of the score term (score -y, 20,000 draws) matches
    the uniform-time estimate within 4 standard errors; weighting the same draws by the
    current table instead (draws and weights from different tables) misses by > 10."""
    proc, stale = _held_table_then_moved("theta_D_diag", 3.0)
    g = torch.Generator().manual_seed(4)
    n = 20_000
    x = 0.5 * torch.randn(n, 1, generator=g, dtype=F64)
    score = lambda y, t: -y  # noqa: E731
    with torch.enable_grad():
        imp = proc.elbo(x, score, time_sampler="importance", generator=g)
        assert _training_table(proc) is stale
        uni = proc.elbo(x, score, time_sampler="uniform", generator=g)
    with torch.no_grad():
        mixed = imp.score.detach() / (imp.weight * proc.time_density(imp.t))
    u = uni.score.detach()

    def z(v):
        se = math.hypot(float(v.std()), float(u.std())) / math.sqrt(n)
        return (float(v.mean()) - float(u.mean())) / se

    assert abs(z(imp.score.detach())) < 4
    assert abs(z(mixed)) > 10
