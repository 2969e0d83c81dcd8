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


def _batches(x, batch_size):
    for i in range(0, x.shape[0], batch_size):
        yield x[i:i + batch_size]


def _summary(method, per_example, term_sums, n, extra):
    mean = float(per_example.mean())
    se = float(per_example.std() / math.sqrt(n)) if n > 1 else None  # JSON-safe
    terms = {k: float(v) / n for k, v in term_sums.items()}
    return Evaluation(method, n, mean, se, terms, per_example, extra)


def evaluate_elbo(proc, eps_net, x, levels, *, transform="center", time_samples=16,
                  batch_size=256, generator=None, device="cpu", dtype=torch.float32):
    """ELBO bits per dimension over the raw examples x (N, *shape)."""
    score_fn = proc.score_from_eps(eps_net)
    D = x[0].numel()
    per, sums = [], {}
    per_batch = max(1, batch_size // time_samples)
    with torch.no_grad():
        for xb in _batches(x, per_batch):
            xb = xb.to(device).repeat_interleave(time_samples, 0)
            y, ldj = prepare(xb, levels, transform, generator, dtype)
            terms = proc.elbo(y, score_fn, time_sampler="importance", generator=generator)
            bpd = bits_per_dim({k: getattr(terms, k).double() for k in ELBO_TERMS}, ldj.double(), D, levels)
            for k, v in bpd.items():
                if k != "total":
                    sums[k] = sums.get(k, 0.0) + float(v.sum()) / time_samples
            per.append(bpd["total"].reshape(-1, time_samples).mean(1).cpu())
    per = torch.cat(per).double()
    return _summary("elbo", per, sums, per.numel(), {"time_samples": time_samples})


def evaluate_ode(proc, eps_net, x, levels, *, transform="center", batch_size=64,
                 generator=None, device="cpu", dtype=torch.float32, rtol=1e-5, atol=1e-5):
    """Probability-flow ODE bits per dimension over the raw examples x (N, *shape)."""
    score_fn = proc.score_from_eps(eps_net)
    D = x[0].numel()
    per, sums, far, nfe = [], {}, 0, 0
    for xb in _batches(x, batch_size):
        y, ldj = prepare(xb.to(device), levels, transform, generator, dtype)
        r = sdec.log_likelihood(proc, y, score_fn, rtol=rtol, atol=atol, generator=generator)
        bpd = bits_per_dim({"prior": r.prior.double(), "divergence": r.divergence.double(),
                            "truncation": r.truncation.double(),
                            "aux_log_prob": -r.aux_log_prob.double()}, ldj.double(), D, levels)
        for k, v in bpd.items():
            if k != "total":
                sums[k] = sums.get(k, 0.0) + float(v.sum())
        per.append(bpd["total"].detach().cpu())
        far += int(r.far_from_prior.sum())
        nfe += r.nfe
    per = torch.cat(per).double()
    extra = {"median_bpd": float(per.median()), "far_from_prior": far, "nfe": nfe,
             "rtol": rtol, "atol": atol}
    return _summary("ode", per, sums, per.numel(), extra)


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
