"""Cost of the compiled transition kernels against the memory floor and hand-written code.

Run on demand (not a test):  python bench/kernels.py [--reps N] [--quick] [--threads N]

Everything is measured in one process with interleaved repeats: times are medians, and a
ratio is the median over repeats of the time over the baseline's time in the same repeat
(paired), so a shared machine slows numerator and denominator alike.

1. Forward noising (``perturb``), B = 128, data 3x32x32, float32, one t per example uniform
   in [t_min, 1] (seed 0), as a ratio to the memory-bound floor of the same K:
   ``z = randn(B, K, 3, 32, 32); z *= b; z += a * x``.  Beside sdec: the MDM code's generic
   kernel written from its formulas (float32 matrix exponential, Σ from the stationary
   identity Σ∞ + Φ (Σ0 - Σ∞) Φᵀ, Cholesky with a jitter fallback, batched matmul applies),
   score_sde's VP ``marginal_prob`` and CLD-SGM's closed-form mean and covariance (both
   written here from the formulas).
2. The K x K work per batch (Φ, L, L⁻ᵀ for 128 times) in ms.
3. learned3 forward + backward into Q, D: y and the score target, then backward from fixed
   random upstream gradients of both (the kernel's own backward, no loss); the ratio is to
   the forward floor.
4. Compile time per spec: parse, proofs, lowering, emit, import, warm in this process (the
   second compile of each spec) and cold (``sdec compile SPEC -o FILE`` in a new process).
5. ELBO machinery per training step of each process (through ``proc.elbo`` with a zero
   score, importance times, batch 128 on 1x8x8 data, backward, an SGD step on Q, D; each
   step starts from the spec's initial Q, D, so the process does not drift with the number
   of steps run), in three regimes: interleaved per call like the rest; each call right
   after an untimed Adam step of the tiny U-Net (``between``), as a training loop runs it
   between the network's passes; and 50 consecutive steps of one process at a time
   (``consecutive``), with nothing else in the caches.  They differ: vpsde's step took
   0.42, 0.91 and 0.29 ms, learned3's 0.79, 1.65 and 0.75 ms (learned3/vpsde 1.9x, 1.8x
   and 2.6x): with its caches to itself the small vpsde step gains most.  With
   --baseline-kernel, its rows ("before") run in an interleaved loop of their own beside
   today's vpsde and learned3 (ratios to that loop's vpsde): run in the six processes'
   loop, the baseline's learned3 (3.5x vpsde) slowed what ran after it more than vpsde,
   and learned3's ratio to vpsde read 2.02x in two runs, against 1.90x and 1.96x with the
   same code and no baseline in the loop.
6. A full training step (Adam) of one fixed small network (the ``tiny`` U-Net) with the
   compiled ELBO against the same network with a hand-written VP noise-prediction loss.

Writes bench/results/kernels.json and kernels.md (machine and load included).

Page faults: with glibc's default thresholds every call frees its multi-megabyte buffers back
to the kernel and faults them in again, a cost (1,700-2,300 faults, ~15% of a learned3 forward
+ backward) that depends on each function's neighbours in the interleaved order rather than
on its own code. The script therefore re-executes itself once with MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ raised (buffers stay mapped), and records the median minor page faults
per call of every function ("faults:" keys), which should then be ~0.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
SPECS = REPO / "specs"
RESULTS = REPO / "bench" / "results"
NAMES = ("vpsde", "cld", "alda", "malda", "learned2", "learned3")
B, SHAPE = 128, (3, 32, 32)


# ------------------------------------------------------------------ timing
def interleaved(fns: dict, reps: int, warmup: int = 2) -> dict:
    """Median seconds of each fn, the fns called in turn in every repeat; "a/base" keys hold
    paired ratios to the first fn, and "cpu:" keys the same from this thread's CPU time
    (with one torch thread the work runs on the calling thread), which a busy machine
    disturbs less than wall time.  Each repeat calls the fns in a new random order (seeded),
    so every fn follows every other about equally often: a fn's time depends on the one run
    before it (with a fixed order the fn right after the floor ran 0.04-0.05x of the floor
    slower than the same code placed after another: vpsde's perturb, swapped with the same
    code of the previous round, 1.19-1.21x vs 1.15-1.17x), and rotating a fixed order keeps
    every fn's predecessor."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    faults = {k: [] for k in fns}
    items, order = list(fns.items()), random.Random(20261127)
    for _ in range(reps):
        order.shuffle(items)
        for k, fn in items:
            f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.thread_time() - c0)
            faults[k].append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0)
    out = {k: statistics.median(v) for k, v in wall.items()}
    out.update({f"cpu:{k}": statistics.median(v) for k, v in cpu.items()})
    out.update({f"faults:{k}": statistics.median(v) for k, v in faults.items()})
    base = next(iter(fns))
    for k in fns:  # paired: each repeat's time over the baseline's time in the same repeat
        out[f"{k}/{base}"] = statistics.median(a / b for a, b in zip(wall[k], wall[base]))
        out[f"cpu:{k}/{base}"] = statistics.median(a / max(b, 1e-9) for a, b in zip(cpu[k], cpu[base]))
    return out


def consecutive(fns: dict, rounds: int, block: int, warmup: int = 5) -> dict:
    """Median seconds per call of each fn called `block` times in a row (after `warmup`
    calls), as a training loop calls one step after another: its code and data stay in the
    caches, which a per-call interleaved loop denies it.  The blocks run in a new seeded
    random order every round; "a/base" keys hold paired ratios (per round) to the first fn."""
    per = {k: [] for k in fns}
    items, order = list(fns.items()), random.Random(20261128)
    for _ in range(rounds):
        order.shuffle(items)
        for k, fn in items:
            for _ in range(warmup):
                fn()
            t0 = time.perf_counter()
            for _ in range(block):
                fn()
            per[k].append((time.perf_counter() - t0) / block)
    return _paired(per)


def between(fns: dict, rounds: int, per: int, other) -> dict:
    """Median seconds per call of each fn when every call follows one untimed call of
    `other`, as a training loop calls the ELBO between the network's passes (which leave
    the caches to the network); per calls in a row of each fn, in a new seeded random order
    every round; "a/base" keys: paired ratios per round to the first fn."""
    per_fn = {k: [] for k in fns}
    items, order = list(fns.items()), random.Random(20261129)
    for _ in range(rounds):
        order.shuffle(items)
        for k, fn in items:
            times = []
            for _ in range(per):
                other()
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            per_fn[k].append(statistics.median(times))
    return _paired(per_fn)


def _paired(samples: dict) -> dict:
    """Medians of each key's per-round times, and "a/base" keys: the median over rounds of
    each round's time over the first key's time in that round."""
    out = {k: statistics.median(v) for k, v in samples.items()}
    base = next(iter(samples))
    for k, v in samples.items():
        out[f"{k}/{base}"] = statistics.median(a / b for a, b in zip(v, samples[base]))
    return out


def load() -> list:
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------- reference code
def floor_fn(K, x, a, b):
    """The memory-bound floor: one normal draw and one multiply-add per state element."""
    shape = (x.shape[0], K) + tuple(x.shape[1:])
    bb = b.reshape((-1,) + (1,) * (len(shape) - 1))
    aa = a.reshape((-1,) + (1,) * (len(shape) - 1))
    xx = x[:, None]

    def run():
        z = torch.randn(shape)
        z *= bb
        z += aa * xx
        return z
    return run


def mdm_generic(proc, x, t, score=False):
    """The MDM code's generic kernel from its formulas, float32 throughout: Φ = expm(B(t) A),
    Σ = Σ∞ + Φ (Σ0 - Σ∞) Φᵀ, L = chol Σ (jitter 1e-5 I on failure), y = Φ y0 + L ε with
    batched matmuls; with score=True also the score target -L⁻ᵀ ε."""
    K = proc.K
    f32 = torch.float32

    def run():
        Q, D = (m.to(f32) for m in proc._blocks())
        Sinf = proc._sigma_inf.to(f32)
        A = -(Q + D) @ torch.linalg.inv(Sinf)
        S0 = torch.zeros(K, K, dtype=f32)
        if K > 1:
            S0[1:, 1:] = proc._aux_init_cov.to(f32)
        s = proc._B(t.to(torch.float64)).to(f32)
        Phi = torch.linalg.matrix_exp(s[:, None, None] * A)
        Sig = Sinf + Phi @ (S0 - Sinf) @ Phi.mT
        L, info = torch.linalg.cholesky_ex(Sig)
        if bool(info.any()):
            L = torch.linalg.cholesky(Sig + 1e-5 * torch.eye(K, dtype=f32))
        n = x.shape[0]
        eps = torch.randn((n, K) + tuple(x.shape[1:]))
        flat = eps.reshape(n, K, -1)
        mean = Phi[:, :, :1] * x.reshape(n, 1, -1)
        y = (mean + torch.matmul(L, flat)).reshape(eps.shape)
        if not score:
            return y
        Linv = torch.linalg.solve_triangular(L, torch.eye(K, dtype=f32).expand_as(L), upper=False)
        return y, -torch.matmul(Linv.mT, flat).reshape(eps.shape)
    return run


def vp_marginal_prob(x, t, beta_min=0.1, beta_max=10.0):
    """score_sde's VPSDE.marginal_prob and the perturbation of its loss."""
    def run():
        lmc = -0.25 * t ** 2 * (beta_max - beta_min) - 0.5 * t * beta_min
        mean = torch.exp(lmc)[:, None, None, None] * x
        std = torch.sqrt(1.0 - torch.exp(2.0 * lmc))
        z = torch.randn_like(x)
        return mean + std[:, None, None, None] * z
    return run


def cld_closed_form(x, t, beta=4.0, gamma=1.0, M=0.25, v_var=0.01):
    """CLD-SGM's closed-form mean and covariance (critical damping Γ² = 4M, constant beta,
    x0 given, v0 ~ N(0, v_var)), float32, y = mean + L ε with the 2x2 Cholesky by hand.
    With s = beta t, g = 2 s / Γ: Φ = e^{-g} [[1 + g, s/M], [-s, 1 - g]] and
    Σ = diag(1, M) + Φ diag(-1, v_var - M) Φᵀ, written out entry by entry."""
    c = v_var - M

    def run():
        s = beta * t
        g = 2.0 * s / gamma
        e = torch.exp(-g)
        e2 = e * e
        mx, mv = (1.0 + g) * e, -s * e
        sxx = 1.0 + e2 * (-(1.0 + g) ** 2 + c * (s / M) ** 2)
        sxv = e2 * ((1.0 + g) * s + c * (s / M) * (1.0 - g))
        svv = M + e2 * (-s * s + c * (1.0 - g) ** 2)
        l11 = torch.sqrt(sxx)
        l21 = sxv / l11
        l22 = torch.sqrt(svv - l21 * l21)
        z = torch.randn((x.shape[0], 2) + tuple(x.shape[1:]))
        r = (-1,) + (1,) * (x.dim() - 1)
        yx = mx.reshape(r) * x + l11.reshape(r) * z[:, 0]
        yv = mv.reshape(r) * x + l21.reshape(r) * z[:, 0] + l22.reshape(r) * z[:, 1]
        return torch.stack([yx, yv], 1)
    return run


# ------------------------------------------------------------------ sections
def compiled(name):
    import sdec
    return sdec.compile(str(SPECS / f"{name}.sde"))


BASELINE = None  # text of an earlier kernel_base.py (--baseline-kernel), measured in-process


def baseline(name):
    """The spec compiled with today's generator but the kernel base of BASELINE: the earlier
    numerics in the same process, so before and after share the machine's load."""
    import sdec
    from sdec.backend.lower import lower
    from sdec.emit.module import base_source, generate_source
    source = generate_source(lower(sdec.parse_file(str(SPECS / f"{name}.sde"))))
    current = base_source().strip("\n")
    if current not in source:
        raise RuntimeError("generated source does not carry kernel_base.py verbatim")
    old = "\n".join(ln for ln in BASELINE.splitlines()  # as sdec.emit.module embeds it
                    if ln.strip() not in ("import math", "import torch") and "# package only" not in ln)
    namespace = {"__name__": f"baseline_{name}"}
    exec(compile(source.replace(current, old), f"<baseline {name}>", "exec"), namespace)  # noqa: S102
    return namespace["Diffusion"]()


def inputs(proc, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((B,) + SHAPE, generator=g)
    t = proc.t_min + (1.0 - proc.t_min) * torch.rand(B, generator=g)
    return x, t


def kk_work(proc, t):
    """The batch's K x K work as perturb does it (Φ, L, L⁻ᵀ for B times)."""
    t64 = t.to(torch.float64)
    return lambda: proc._kernel_factors(t64, True)


def perturb_table(reps):
    rows = {}
    for name in NAMES:
        proc = compiled(name)
        x, t = inputs(proc)
        a, b = torch.rand(B), torch.rand(B)
        fns = {"floor": floor_fn(proc.K, x, a, b),
               "sdec": lambda p=proc: p.perturb(x, t).y,
               "mdm": mdm_generic(proc, x, t)}
        if BASELINE is not None:
            old = baseline(name)
            fns["before"] = lambda p=old: p.perturb(x, t).y
        if name == "vpsde":
            fns["vp_hand"] = vp_marginal_prob(x, t)
        if name == "cld":
            fns["cld_hand"] = cld_closed_form(x, t)
        with torch.no_grad():
            med = interleaved(fns, reps)
            kk = interleaved({"kk": kk_work(proc, t)}, reps)["kk"]
        rows[name] = {"K": proc.K, "floor_ms": 1e3 * med["floor"],
                      **{f"{k}_ratio": med[f"{k}/floor"] for k in fns if k != "floor"},
                      **{f"{k}_cpu_ratio": med[f"cpu:{k}/floor"] for k in fns if k != "floor"},
                      "sdec_ms": 1e3 * med["sdec"], "kk_ms": 1e3 * kk, "load": load(),
                      "faults_per_call": max(med[f"faults:{k}"] for k in fns)}
        print(f"  {name:9s} " + "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in rows[name].items()), flush=True)
    return rows


def backward_table(reps, name="learned3"):
    proc = compiled(name)
    x, t = inputs(proc)
    a, b = torch.rand(B), torch.rand(B)

    g = torch.Generator().manual_seed(5)
    shape = (B, proc.K) + SHAPE
    gy, gs = torch.randn(shape, generator=g), torch.randn(shape, generator=g)

    def sdec_fb():  # fixed upstream gradients: the kernel's own backward, no loss computation
        proc.zero_grad(set_to_none=True)
        p = proc.perturb(x, t, with_score=True)  # y and score both read: one pass over eps
        torch.autograd.backward([p.y, p.score], [gy, gs])

    mdm = mdm_generic(proc, x, t, score=True)

    def mdm_fb():
        proc.zero_grad(set_to_none=True)
        y, score = mdm()
        torch.autograd.backward([y, score], [gy, gs])

    fns = {"floor": floor_fn(proc.K, x, a, b), "sdec": sdec_fb, "mdm": mdm_fb}
    if BASELINE is not None:
        old = baseline(name)

        def before_fb():
            old.zero_grad(set_to_none=True)
            p = old.perturb(x, t)
            torch.autograd.backward([p.y, p.score], [gy, gs])
        fns["before"] = before_fb
    med = interleaved(fns, reps)
    extra = {} if BASELINE is None else {"before_ratio": med["before/floor"], "before_cpu_ratio": med["cpu:before/floor"]}
    return {"spec": name, **extra, "floor_ms": 1e3 * med["floor"], "sdec_ratio": med["sdec/floor"],
            "mdm_ratio": med["mdm/floor"], "sdec_cpu_ratio": med["cpu:sdec/floor"],
            "mdm_cpu_ratio": med["cpu:mdm/floor"], "sdec_ms": 1e3 * med["sdec"], "load": load()}


def compile_stages(name):
    """Seconds per stage of one in-process compile (parse, proofs, lowering, emit, import)."""
    from sdec.checks import MIX_TOL, run_checks
    from sdec.emit.module import generate_source
    from sdec.backend.lower import lower
    from sdec.language.build import build
    from sdec.language.parse import parse_text
    import attrs
    text = (SPECS / f"{name}.sde").read_text()
    out, t0 = {}, time.perf_counter()
    statements, _ = parse_text(text, f"{name}.sde")
    spec, _ = build(statements, f"{name}.sde")
    out["parse"], t0 = time.perf_counter() - t0, time.perf_counter()
    spec = attrs.evolve(spec, source=text, report=run_checks(spec, MIX_TOL))
    out["proofs"], t0 = time.perf_counter() - t0, time.perf_counter()
    plan = lower(spec)
    out["lowering"], t0 = time.perf_counter() - t0, time.perf_counter()
    source = generate_source(plan)
    out["emit"], t0 = time.perf_counter() - t0, time.perf_counter()
    namespace = {"__name__": f"bench_{name}"}
    exec(compile(source, f"<{name}>", "exec"), namespace)  # noqa: S102 - our own generated code
    namespace["Diffusion"]()
    out["import"] = time.perf_counter() - t0
    out["total"] = sum(out.values())
    return out


def compile_table():
    rows = {}
    for name in NAMES:
        compile_stages(name)  # first compile in this process (sympy caches cold)
        warm = compile_stages(name)
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, SDEC_CACHE=tmp, OMP_NUM_THREADS="1")
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "sdec", "compile", str(SPECS / f"{name}.sde"),
                            "-o", os.path.join(tmp, "out.py")], check=True, env=env,
                           capture_output=True)
            cold = time.perf_counter() - t0
        rows[name] = {"warm_s": warm, "cold_cli_s": cold, "load": load()}
        print(f"  {name:9s} warm {warm['total']:.3f} s ({', '.join(f'{k} {v:.3f}' for k, v in warm.items() if k != 'total')}), cold CLI {cold:.2f} s", flush=True)
    return rows


def elbo_table(reps):
    """ms per training step of the ELBO machinery alone: zero score, batch 128, 1x8x8 data,
    importance times, backward, and an SGD step on the process's parameters (if any)."""
    x = torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    fns = _elbo_steps([(name, name) for name in NAMES], x)
    out = _per_call(fns, interleaved(fns, reps))
    steady = consecutive(fns, max(8, reps // 5), 50)
    training = between(fns, max(8, reps // 5), 20, _network_step())
    for k in fns:
        out[k] |= {"steady_ms": 1e3 * steady[k], "steady_ratio_to_vpsde": steady[f"{k}/vpsde"],
                   "between_ms": 1e3 * training[k], "between_ratio_to_vpsde": training[f"{k}/vpsde"]}
    if BASELINE is not None:  # a loop of its own: see the module doc (5.)
        fns = _elbo_steps([(key, name) for name in ("vpsde", "learned3") for key in (name, f"{name} before")], x)
        out |= {k: v for k, v in _per_call(fns, interleaved(fns, reps)).items() if k.endswith(" before")}
    return out | {"load": load()}


def _vp_network(seed):
    """The tiny U-Net for one-variable 1x8x8 data (initialised from seed 0), its Adam and a
    generator seeded with seed."""
    from sdec.runtime.nets import build_net
    torch.manual_seed(0)
    net = build_net("tiny", K=1, data_shape=(1, 8, 8))
    return net, torch.optim.Adam(net.parameters(), lr=1e-4), torch.Generator().manual_seed(seed)


def _network_step():
    """One Adam step of the tiny U-Net on random 1x8x8 data, batch 128 (the network of the
    training-step table): the work a training loop does between two ELBO evaluations."""
    net, opt, gen = _vp_network(2)

    def step():
        opt.zero_grad(set_to_none=True)
        y, t = torch.randn(B, 1, 1, 8, 8, generator=gen), torch.rand(B, generator=gen)
        net(y, t).square().mean().backward()
        opt.step()
    return step


def _per_call(fns, med):
    return {k: {"ms": 1e3 * med[k], "ratio_to_vpsde": med[f"{k}/vpsde"], "cpu_ms": 1e3 * med[f"cpu:{k}"],
                "cpu_ratio_to_vpsde": med[f"cpu:{k}/vpsde"]} for k in fns}


def _elbo_steps(runs, x):
    """elbo_table's step functions for (key, spec) runs; the first is the ratios' base."""
    return {key: elbo_step(compiled(name) if key == name else baseline(name), x) for key, name in runs}


def elbo_step(proc, x):
    """One training step of proc's ELBO machinery (elbo_table's): zero score, importance
    times, backward and an SGD step on the parameters (if any)."""
    params = [p for p in proc.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4) if params else None
    gen = torch.Generator().manual_seed(1)
    start = [p.detach().clone() for p in params]
    count = [0]

    def step():
        # every step from (nearly) the initial process: with a zero score the SGD steps
        # would grow D (and the squarings) the longer the benchmark ran; the offset makes
        # each step's parameters new values, as in training (the importance table and the
        # cached values are rebuilt, as after an optimizer step)
        count[0] += 1
        if params:  # two foreach ops for all parameters (the reset is the harness's, not the ELBO's)
            with torch.no_grad():
                torch._foreach_copy_(params, start)
                torch._foreach_add_(params, 1e-9 * count[0])
        terms = proc.elbo(x, lambda y, t: torch.zeros_like(y), time_sampler="importance",
                          generator=gen)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            terms.total.mean().backward()
            opt.step()
    return step


def train_step_table(reps):
    """Full Adam step of the tiny U-Net on 1x8x8 data, batch 128: compiled ELBO (importance
    times) vs a hand-written VP noise-prediction loss with the same network."""
    from sdec.runtime.nets import build_net
    x = torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    fns = {}
    for name in ("vpsde", "cld", "learned3"):
        proc = compiled(name)
        torch.manual_seed(0)
        net = build_net("tiny", K=proc.K, data_shape=(1, 8, 8))
        opt = torch.optim.Adam(list(net.parameters()) + list(proc.parameters()), lr=1e-4)
        gen = torch.Generator().manual_seed(1)

        def step(proc=proc, net=net, opt=opt, gen=gen):
            opt.zero_grad(set_to_none=True)
            terms = proc.elbo(x, proc.score_from_eps(net), time_sampler="importance", generator=gen)
            terms.total.mean().backward()
            opt.step()
        fns[name] = step
    net, opt, gen = _vp_network(1)

    def vp_hand():
        opt.zero_grad(set_to_none=True)
        t = 1e-3 + (1.0 - 1e-3) * torch.rand(B, generator=gen)
        lmc = -0.25 * t ** 2 * 9.9 - 0.5 * t * 0.1
        mean = torch.exp(lmc)[:, None, None, None] * x
        std = torch.sqrt(1.0 - torch.exp(2.0 * lmc))[:, None, None, None]
        z = torch.randn(x.shape, generator=gen)
        y = (mean + std * z)[:, None]
        loss = (net(y, t)[:, 0] - z).square().mean()
        loss.backward()
        opt.step()
    fns = {"vp_hand": vp_hand, **fns}
    med = interleaved(fns, reps)
    return {k: {"ms": 1e3 * med[k], "ratio_to_vp_hand": med[f"{k}/vp_hand"],
                "cpu_ratio_to_vp_hand": med[f"cpu:{k}/vp_hand"]} for k in fns} | {"load": load()}


# ------------------------------------------------------------------ reporting
def machine():
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "loadavg_start": load(),
            "malloc": {k: os.environ.get(k) for k in MALLOC}}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                        capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return info


def markdown(res):
    p, out = res["perturb"], []
    m = res["machine"]
    if res.get("label"):
        out.append(f"{res['label']}")
        out.append("")
    out.append(f"Machine: {m.get('cpu', '?')}, {m['cpus']} cores, torch {m['torch']}, "
               f"{m['threads']} thread(s), commit {m.get('commit', '?')}, {res['date']}; "
               f"load average at start {m['loadavg_start']}, at end {res['loadavg_end']}.")
    faults = [r["faults_per_call"] for r in p.values() if "faults_per_call" in r]
    if m.get("malloc"):
        out.append("")
        out.append("glibc buffers kept mapped (" + ", ".join(f"{k}={v}" for k, v in m["malloc"].items())
                   + ")" + (f"; median minor page faults per call, worst function: {max(faults):g}." if faults else "."))
    out.append("")
    out.append("Ratios: wall time, and in brackets thread CPU time (paired interleaved medians).")
    out.append("")
    out.append("| forward noising (`perturb`), ratio to the floor | sdec | sdec before (baseline kernel) | MDM generic kernel | "
               "hand-written VP | CLD-SGM closed form | goal | floor (ms) | K x K work (ms) |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    goal = {"vpsde": "≤ 1.15x"}
    for name, r in p.items():
        def both(k):
            return f"{r[k + '_ratio']:.2f}x ({r[k + '_cpu_ratio']:.2f}x)" if k + "_ratio" in r else "–"
        out.append(f"| {name} | {both('sdec')} | {both('before')} | {both('mdm')} | {both('vp_hand')} | {both('cld_hand')} | "
                   f"{goal.get(name, '≤ 1.2x')} | {r['floor_ms']:.2f} | {r['kk_ms']:.2f} |")
    if "backward" in res:
        bw = res["backward"]
        before = f"{bw['before_ratio']:.2f}x ({bw['before_cpu_ratio']:.2f}x)" if "before_ratio" in bw else "–"
        out.append(f"| {bw['spec']} forward + backward into Q, D | {bw['sdec_ratio']:.2f}x ({bw['sdec_cpu_ratio']:.2f}x) | "
                   f"{before} | {bw['mdm_ratio']:.2f}x ({bw['mdm_cpu_ratio']:.2f}x) | – | – | ≤ 1.8x | {bw['floor_ms']:.2f} | |")
    if "compile" in res:
        out.append("")
        out.append("| compile time | parse | proofs | lowering | emit | import | total, warm | cold `sdec compile` |")
        out.append("|---|---|---|---|---|---|---|---|")
        for name, r in res["compile"].items():
            w = r["warm_s"]
            out.append(f"| {name} | " + " | ".join(f"{w[k]:.3f} s" for k in ("parse", "proofs", "lowering", "emit", "import", "total"))
                       + f" | {r['cold_cli_s']:.2f} s |")
    if "elbo" in res:
        out.append("")
        out.append("| ELBO machinery per step (zero score, batch 128, 8x8, backward + SGD step) | ms, interleaved per call "
                   "| ratio to vpsde | ms, after a network step | ratio to vpsde | ms, 50 consecutive steps | ratio to vpsde | goal |")
        out.append("|---|---|---|---|---|---|---|---|")
        for name, r in res["elbo"].items():
            if name == "load":
                continue
            cols = [f"{r[k + '_ms']:.3f} | {r[k + '_ratio_to_vpsde']:.2f}x" if k + "_ms" in r else "– | –"
                    for k in ("between", "steady")]
            out.append(f"| {name} | {r['ms']:.3f} | {r['ratio_to_vpsde']:.2f}x ({r['cpu_ratio_to_vpsde']:.2f}x) | "
                       f"{cols[0]} | {cols[1]} | {'≤ 2x' if name == 'learned3' else ''} |")
    if "train_step" in res:
        _ratio_table(out, res["train_step"], "full training step, tiny U-Net, batch 128, 8x8 (Adam)",
                     "vp_hand", "ms", 1, 3, {"vpsde": "≤ 1.05x"}, base_text="hand-written VP loss")
    return "\n".join(out) + "\n"


def _ratio_table(out, rows, title, base, unit, ms_digits, ratio_digits, goals, base_text=None):
    """Append a Markdown table of (name, time, wall ratio to base (CPU ratio)) rows."""
    out.append("")
    out.append(f"| {title} | {unit} | ratio to {base_text or base} | goal |")
    out.append("|---|---|---|---|")
    for name, r in rows.items():
        if name == "load":
            continue
        cpu_key = f"cpu_ratio_to_{base}"
        cpu = f" ({r[cpu_key]:.{ratio_digits}f}x)" if cpu_key in r else ""
        out.append(f"| {name} | {r['ms']:.{ms_digits}f} | {r[f'ratio_to_{base}']:.{ratio_digits}f}x{cpu} | {goals.get(name, '')} |")


MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def keep_buffers_mapped(script: str) -> None:
    """Re-execute `script` (with this process's arguments) once with glibc's thresholds
    raised (see the module doc)."""
    if all(os.environ.get(k) == v for k, v in MALLOC.items()) or os.environ.get("SDEC_BENCH_MALLOC") == "default":
        return
    os.execve(sys.executable, [sys.executable, os.path.abspath(script), *sys.argv[1:]],
              {**os.environ, **MALLOC})


def main(argv=None):
    if argv is None:
        keep_buffers_mapped(__file__)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=40, help="interleaved repeats per measurement")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--quick", action="store_true", help="perturb table only, few repeats, no files")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: backward,compile,elbo,train")
    ap.add_argument("--out", default=str(RESULTS / "kernels"), help="results path without suffix")
    ap.add_argument("--label", default="", help="a note stored with the results (e.g. which code ran)")
    ap.add_argument("--baseline-kernel", default=None,
                    help="an earlier sdec/emit/kernel_base.py (e.g. from git show), measured beside today's in the same process")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global BASELINE
    if args.baseline_kernel:
        BASELINE = pathlib.Path(args.baseline_kernel).read_text(encoding="utf-8")
    skip = set(filter(None, args.skip.split(",")))
    reps = 8 if args.quick else args.reps
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
           "settings": {"B": B, "shape": SHAPE, "reps": reps, "dtype": "float32"}, "label": args.label}
    print("forward noising (perturb), ratio to the floor", flush=True)
    res["perturb"] = perturb_table(reps)
    if not args.quick:
        if "backward" not in skip:
            res["backward"] = backward_table(reps)
            print("  learned3 forward + backward:", res["backward"], flush=True)
        if "elbo" not in skip:
            res["elbo"] = elbo_table(reps)
            print("  ELBO machinery:", res["elbo"], flush=True)
        if "train" not in skip:
            res["train_step"] = train_step_table(max(5, reps // 4))
            print("  training step:", res["train_step"], flush=True)
        if "compile" not in skip:
            print("compile time", flush=True)
            res["compile"] = compile_table()
    res["loadavg_end"] = load()
    md = markdown(res)
    print(md)
    if not args.quick:
        out = pathlib.Path(args.out)
        out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
        out.with_suffix(".md").write_text(md)
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
