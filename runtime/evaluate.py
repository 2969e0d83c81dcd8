"""Bits per dimension of a trained model on a data split, with every term and an error bar.

Two methods, one result shape (:class:`Evaluation`):

- "elbo": the variational bound. Each example is evaluated ``time_samples`` times (fresh
  dequantization, auxiliary and kernel noise, and a time drawn from the process-adapted
  importance density), and its BPD is the mean of those draws. With one draw the per-example
  standard deviation is several BPD (the ELBO's score term at small t); averaging many draws
  per example makes the standard error of the mean small. The standard error printed is the
  standard deviation of the per-example figures over sqrt(n): it covers both the spread of
  the data and the Monte-Carlo noise.
- "ode": the probability-flow likelihood (``sdec.log_likelihood``), one dequantization per
  example. Examples whose ODE end state lies far outside the prior are counted, and the
  median is reported beside the mean (a score network that blows up on one input can send
  that example's log-likelihood to -1e20 and the mean with it).

Draws and ranks: with ``seed`` the examples are cut into fixed chunks (``batch_size //
time_samples`` examples for the ELBO, ``batch_size`` for the ODE) and chunk c draws from a
generator seeded by (seed, c), so every example's draws depend on its index alone. Under
torchrun (``ranks``) chunk c is computed by rank c mod world and the per-example figures are
gathered, in example order, on every rank: the BPD is over the whole split and is the same on
1 or N ranks. With ``generator`` instead (one stream for the whole split) there is one rank.
"""
from __future__ import annotations

import math

import attrs
import torch

import sdec

from .bpd import bits_per_dim, prepare

METHODS = ("elbo", "ode")
ELBO_TERMS = ("prior", "score", "score_norm", "divergence", "truncation", "aux_entropy")


@attrs.frozen
class Evaluation:
    method: str
    n: int
    bpd: float
    bpd_stderr: float
    terms: dict           # name → mean BPD contribution
    per_example: torch.Tensor
    extra: dict = attrs.field(factory=dict)

    def as_json(self) -> dict:
        return {"bpd": self.bpd, "bpd_stderr": self.bpd_stderr, "method": self.method,
                "n": self.n, "terms": dict(self.terms), **self.extra}


def chunk_seed(seed: int, chunk: int) -> int:
    return (seed * 1_000_003 + chunk * 15_485_863 + 7) % (2 ** 63 - 1)


def _chunks(x, size, generator, seed, ranks, device):
    """(chunk index, examples, generator) of this rank's chunks, in order."""
    world, rank = (ranks.world, ranks.rank) if ranks is not None else (1, 0)
    if seed is None and world > 1:
        raise ValueError("evaluation over several ranks needs a seed (per-chunk draws), not a generator")
    n_chunks = -(-x.shape[0] // size)
    for c in range(rank, n_chunks, world):
        gen = generator if seed is None else torch.Generator(device=device).manual_seed(chunk_seed(seed, c))
        yield c, x[c * size:(c + 1) * size], gen


def collect_chunks(rows: list, n: int, size: int, ranks, width: int,
                   dtype=torch.float64) -> torch.Tensor:
    """This rank's per-example rows (its chunks in order; each row ``width`` numbers) → every
    example's rows in example order, from all ranks."""
    local = torch.cat(rows) if rows else torch.zeros((0, width), dtype=dtype)
    if ranks is None or not ranks.active:
        return local
    full = ranks.gather_rows(local)
    n_chunks = -(-n // size)
    starts = [c * size for r in range(ranks.world) for c in range(r, n_chunks, ranks.world)]
    out = torch.empty_like(full)
    pos = 0
    for start in starts:
        m = min(size, n - start)
        out[start:start + m] = full[pos:pos + m]
        pos += m
    return out


def _summary(method, rows, names, extra):
    """rows: (n, 1 + len(names)) float64, the total first, then the terms."""
    n = rows.shape[0]
    per_example = rows[:, 0].contiguous()
    mean = float(per_example.mean())
    se = float(per_example.std() / math.sqrt(n)) if n > 1 else None  # JSON-safe
    terms = {k: float(rows[:, i + 1].sum()) / n for i, k in enumerate(names)}
    return Evaluation(method, n, mean, se, terms, per_example, extra)


def evaluate_elbo(proc, eps_net, x, levels, *, transform="center", time_samples=16,
                  batch_size=256, generator=None, seed=None, ranks=None, device="cpu",
                  dtype=torch.float32):
    """ELBO bits per dimension over the raw examples x (N, *shape)."""
    score_fn = proc.score_from_eps(eps_net)
    D = x[0].numel()
    rows, names = [], None
    per_batch = max(1, batch_size // time_samples)
    with torch.no_grad():
        for _, xb, gen in _chunks(x, per_batch, generator, seed, ranks, device):
            xb = xb.to(device).repeat_interleave(time_samples, 0)
            y, ldj = prepare(xb, levels, transform, gen, dtype)
            terms = proc.elbo(y, score_fn, time_sampler="importance", generator=gen)
            bpd = bits_per_dim({k: getattr(terms, k).double() for k in ELBO_TERMS}, ldj.double(), D, levels)
            names = [k for k in bpd if k != "total"]
            cols = [bpd["total"]] + [bpd[k] for k in names]
            rows.append(torch.stack([c.reshape(-1, time_samples).mean(1) for c in cols], 1).cpu())
    names = names or _elbo_names(levels)
    return _summary("elbo", collect_chunks(rows, x.shape[0], per_batch, ranks, 1 + len(names)), names,
                    {"time_samples": time_samples})


def _elbo_names(levels):
    return list(ELBO_TERMS) + (["transform", "dequantization"] if levels is not None else [])


def evaluate_ode(proc, eps_net, x, levels, *, transform="center", batch_size=64,
                 generator=None, seed=None, ranks=None, device="cpu", dtype=torch.float32,
                 rtol=1e-5, atol=1e-5):
    """Probability-flow ODE bits per dimension over the raw examples x (N, *shape)."""
    score_fn = proc.score_from_eps(eps_net)
    D = x[0].numel()
    rows, names = [], None
    for _, xb, gen in _chunks(x, batch_size, generator, seed, ranks, device):
        y, ldj = prepare(xb.to(device), levels, transform, gen, dtype)
        r = sdec.log_likelihood(proc, y, score_fn, rtol=rtol, atol=atol, generator=gen)
        bpd = bits_per_dim({"prior": r.prior.double(), "divergence": r.divergence.double(),
                            "truncation": r.truncation.double(),
                            "aux_log_prob": -r.aux_log_prob.double()}, ldj.double(), D, levels)
        names = [k for k in bpd if k != "total"]
        n = xb.shape[0]
        nfe = torch.zeros(n, dtype=torch.float64)
        nfe[0] = r.nfe  # one solve per chunk: counted once, on its first example
        cols = [bpd["total"]] + [bpd[k] for k in names]
        cols += [r.far_from_prior.double(), nfe.to(cols[0].device)]
        rows.append(torch.stack([c.detach().double() for c in cols], 1).cpu())
    names = names or (["prior", "divergence", "truncation", "aux_log_prob"]
                      + (["transform", "dequantization"] if levels is not None else []))
    full = collect_chunks(rows, x.shape[0], batch_size, ranks, 3 + len(names))
    far, nfe = int(full[:, -2].sum()), int(full[:, -1].sum())
    per = full[:, 0]
    extra = {"median_bpd": float(per.median()), "far_from_prior": far, "nfe": nfe,
             "rtol": rtol, "atol": atol}
    return _summary("ode", full[:, :-2], names, extra)


def evaluate(proc, eps_net, x, levels, *, method="elbo", **kw):
    if method not in METHODS:
        raise ValueError(f"unknown evaluation method {method!r}; valid: {', '.join(METHODS)}")
    fn = evaluate_elbo if method == "elbo" else evaluate_ode
    return fn(proc, eps_net, x, levels, **kw)


def plus_minus(stderr) -> str:
    return f"± {stderr:.4f}" if stderr is not None else "(one example: no standard error)"


def describe_evaluation(ev: Evaluation, levels) -> str:
    """Human-readable lines: every term, the total and its standard error."""
    unit = "bits/dim" if levels is not None else "bits/dim (continuous data: NLL, no dequantization)"
    lines = [f"method {ev.method}, n = {ev.n}" + (f", {ev.extra['time_samples']} time samples per "
                                                  "example (importance)" if ev.method == "elbo" else "")]
    for k, v in ev.terms.items():
        lines.append(f"  {k:<16} {v:+.4f}")
    lines.append(f"  {'total':<16} {ev.bpd:.4f} {plus_minus(ev.bpd_stderr)} {unit}")
    if levels is None:
        lines.append(f"  NLL {ev.bpd * math.log(2):.4f} nats/dim")
    if ev.method == "ode":
        lines.append(f"  median {ev.extra['median_bpd']:.4f}; NFE {ev.extra['nfe']}")
        if ev.extra["far_from_prior"]:
            lines.append(f"  WARNING: {ev.extra['far_from_prior']} of {ev.n} ODE solves ended far "
                         "outside the prior (their log-likelihood is unreliable; compare the "
                         "median with the mean)")
    return "\n".join(lines)
