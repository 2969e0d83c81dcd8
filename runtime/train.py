"""`sdec train`: build or resume a run, loop over steps, and report the test BPD.

The loop, top to bottom: each step (step.py) → every ``log_every`` steps a metrics line (loss,
BPD terms, throughput, mixing at T, Q and D) → every ``eval_every`` steps the validation BPD of
the EMA model, ``ckpt-last.pt`` and, if it improved, ``ckpt-best.pt`` → every
``sample_every`` steps a sample grid. At the end: a last checkpoint, plots, and the test BPD
of the EMA model of the best checkpoint (``results.json`` and one final line).

Under torchrun every rank runs this loop on its own micro-batches (step.py) with the network
and the process wrapped together in DistributedDataParallel; validation and the test BPD are
split across the ranks and gathered (evaluate.py). Rank 0 alone writes: checkpoints, metrics,
config.json, plots, sample grids, results.json, the progress bar and the printed lines.
"""
from __future__ import annotations

import json
import math
import os
import time

import attrs
import torch

import sdec

from . import checkpoint as ckpt
from . import distributed, monitor, plots
from .bpd import from_model, prepare
from .data import load_dataset
from .config import TrainConfig, changed_on_resume, default_out, resolve
from .ema import EMA
from .evaluate import describe_evaluation, evaluate_elbo, plus_minus
from .setup import (RunError, build_model, check_disk_space, check_out_dir, checkpoint_bytes,
                    compile_spec, load_splits, param_groups, pick_device)
from .step import (MetricsLog, NonFiniteError, Objective, Run, Throughput, batch_change,
                   checkpoint_state, restore, seed_for, train_step)

GRID_SAMPLES = 64
PLOT_REFRESH_S = 60.0  # wall seconds between refreshes of training.png, process.png, blocks.png


def build_run(cfg: TrainConfig, explicit=frozenset(), warn=print) -> Run:
    """Resolve the configuration, compile the spec, load data, build net and optimizer; join
    the torchrun process group if there is one.
    With ``resume`` the checkpoint's configuration is the base and only the options named in
    ``explicit`` may override it (config.RESUMABLE)."""
    state = _resume_state(cfg, explicit) if cfg.resume else None
    if state is not None:
        given = {k: getattr(cfg, k) for k in explicit if k not in ("spec", "resume")}
        cfg = attrs.evolve(TrainConfig(**state["config"]), **given, spec=cfg.spec, resume=True)
    proc = compile_spec(cfg.spec)
    splits = load_splits(cfg)
    if cfg.objective == "eps" and any(p.requires_grad for p in proc.parameters()):
        raise RunError(f"--objective eps trains fixed processes only: {cfg.spec} has learnable "
                       "Q or D, which only the ELBO can train (use --objective elbo)")
    device = pick_device(cfg.device)
    ranks, device = distributed.start(device)
    torch.manual_seed(cfg.seed)
    net, preset = build_model(proc, splits.shape, cfg.net, cfg.dropout)
    cfg = resolve(cfg, preset)
    cfg = attrs.evolve(cfg, precision=resolve_precision(cfg.precision, device))
    micro = ranks.world * cfg.grad_accum
    if splits.train.shape[0] < micro:
        raise RunError(f"{cfg.data}: {splits.train.shape[0]} training examples cannot fill "
                       f"{micro} micro-batches (ranks x --grad-accum)")
    _check_out(cfg, ranks, checkpoint_bytes([net, proc]))
    proc, net = proc.to(device), net.to(device)
    optimizer = torch.optim.AdamW(param_groups(net, proc, cfg), lr=cfg.lr)
    run = Run(cfg, proc, net, optimizer, None, splits, device, ranks=ranks)
    run.ema = EMA(run.model, cfg.ema_decay)
    if state is not None:
        restore(run, state)
        change = batch_change(run, state)
        if change and ranks.is_main:
            warn(f"WARNING: {change}")
    fast = torch.compile(net) if cfg.compile else None
    amp = torch.bfloat16 if cfg.precision == "bf16" else None
    run.objective = Objective(net, proc, cfg, splits.levels, autocast=amp, fast_net=fast)
    if ranks.active:
        from torch.nn.parallel import DistributedDataParallel
        run.trainer = DistributedDataParallel(
            run.objective, device_ids=[device.index] if device.type == "cuda" else None)
    return run


def resolve_precision(precision: str, device: torch.device) -> str:
    """--precision auto: bf16 autocast of the network on CUDA, float32 on CPU."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def _check_out(cfg: TrainConfig, ranks, one_checkpoint: int) -> None:
    """Rank 0 checks that --out is writable and has room for the checkpoints; every rank
    stops if it cannot (with rank 0's message)."""
    problem = None
    if ranks.is_main:
        try:
            check_out_dir(cfg.out)
            check_disk_space(cfg.out, one_checkpoint, cfg.keep_checkpoints)
        except RunError as exc:
            problem = exc
    if not ranks.agree(problem is None):
        raise problem or RunError(f"--out {cfg.out}: rank 0 cannot use the run directory (see its message)")


def _resume_state(cfg: TrainConfig, explicit) -> dict:
    out = cfg.out or default_out(cfg.spec, cfg.data)
    state = ckpt.load_latest(out)
    path = os.path.join(out, ckpt.LAST)
    changed = changed_on_resume(state["config"], cfg, set(explicit))
    if changed:
        raise RunError(f"cannot resume {path}: {', '.join('--' + c.replace('_', '-') for c in changed)} "
                       "differ from the checkpoint's configuration (config.json); only the "
                       "step count, the learning rates, --grad-clip and the logging cadence "
                       "may change on resume")
    return state


def train(cfg: TrainConfig, explicit=frozenset(), echo=print) -> dict:
    """Run training to ``cfg.steps``; return the results dict (also in results.json)."""
    run = build_run(cfg, explicit, warn=echo)
    cfg = run.cfg
    main = run.ranks.is_main
    echo = echo if main else _quiet
    metrics = MetricsLog(os.path.join(cfg.out, "metrics.jsonl"), enabled=main)
    if cfg.resume:
        metrics.truncate_after(run.step)
    if main:
        with open(os.path.join(cfg.out, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(cfg.as_dict(), handle, indent=2)
    ranks = (f", {run.ranks.world} rank(s) x {cfg.grad_accum} micro-batch(es) of {run.micro_size} = "
             f"global batch {run.global_batch}" if run.micro_batches > 1 else "")
    echo(f"sdec train: {run.proc.spec_name} ({run.proc.K} variables: {', '.join(run.proc.names)}) on "
         f"{cfg.data} {tuple(run.splits.shape)}, net {cfg.net} "
         f"({sum(p.numel() for p in run.net.parameters()):,} parameters), {cfg.steps} steps, "
         f"device {run.device}{ranks}, run directory {cfg.out}"
         + (f", resumed at step {run.step}" if cfg.resume else ""))
    _loop(run, metrics, echo)
    return finish(run, echo)


def _quiet(*args, **kwargs):
    pass


def _loop(run: Run, metrics: MetricsLog, echo) -> None:
    cfg = run.cfg
    bar = _progress(run) if run.ranks.is_main else None
    speed = Throughput()
    run.plotted_at = time.monotonic()  # the first figures after PLOT_REFRESH_S (or at the end)
    try:
        while run.step < cfg.steps:
            numbers = train_step(run, run.step)
            run.step += 1
            speed.add(run.global_batch)
            if bar is not None:
                bar.update(1)
            if run.ranks.is_main and (run.step % cfg.log_every == 0 or run.step == cfg.steps):
                _log_train(run, numbers, speed.rate(), metrics, echo, bar)
            if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
                _validate(run, metrics, echo)
            if run.ranks.is_main and (run.step % cfg.sample_every == 0 or run.step == cfg.steps):
                write_samples(run, os.path.join(cfg.out, "samples", f"step-{run.step:07d}.png"))
    except NonFiniteError as err:
        raise NonFiniteError(f"{err}; stopped. The last good checkpoint is "
                             f"{os.path.join(cfg.out, ckpt.LAST)} (step "
                             f"{_saved_step(cfg.out)}); continue from it with --resume and a lower --lr") from None
    finally:
        if bar is not None:
            bar.close()


def _saved_step(out):
    try:
        return ckpt.load(os.path.join(out, ckpt.LAST))["step"]
    except ckpt.CheckpointError:
        return "none yet"


def _progress(run: Run):
    if not run.cfg.progress:
        return None
    from tqdm import tqdm
    return tqdm(total=run.cfg.steps, initial=run.step, desc="train", unit="step", dynamic_ncols=True)


def _log_train(run: Run, numbers: dict, rate: float, metrics: MetricsLog, echo, bar) -> None:
    record = {"kind": "train", "step": run.step, "examples_per_sec": rate, **numbers}
    if "total" in numbers:
        record["train_bpd"] = numbers["total"]
    record.update(monitor.mixing(run.proc))
    if any(p.requires_grad for p in run.proc.parameters()):
        record.update(monitor.blocks(run.proc))
    metrics.write(record)
    if bar is not None:
        bar.set_postfix(loss=f"{numbers['loss']:.3f}", bpd=f"{record.get('train_bpd', float('nan')):.3f}",
                        ex_s=f"{rate:.0f}")
    if not record["mixed"] and not run.mix_warned:
        run.mix_warned = True
        msg = (f"step {run.step}: the process no longer mixes by T: KL(q(y_T|x)‖π) = "
               f"{record['kl_T']:.3g} nats/dim > {sdec.MIX_TOL} (max|Φ(T)| = {record['phi_T_max']:.3g}); "
               "samples started from the prior will be off")
        echo(f"WARNING: {msg}")


def ema_models(run: Run):
    """Copies of (process, net) holding the EMA values, in eval mode."""
    model = run.ema.copy_into(run.model)
    return model["process"], model["net"]


def _validate(run: Run, metrics: MetricsLog, echo) -> None:
    cfg = run.cfg
    proc, net = ema_models(run)
    ev = evaluate_elbo(proc, net, run.splits.val, run.splits.levels, transform=cfg.transform,
                       time_samples=cfg.time_samples, seed=seed_for(cfg.seed, 0, "val"),
                       ranks=run.ranks, device=run.device)
    improved = ev.bpd < run.best_val
    if improved:
        run.best_val, run.best_step = ev.bpd, run.step
    if not run.ranks.is_main:
        return
    metrics.write({"kind": "val", "step": run.step, "val_bpd": ev.bpd, "val_bpd_stderr": ev.bpd_stderr,
                   "terms": ev.terms})
    state = checkpoint_state(run)
    ckpt.save_rolling(state, cfg.out, cfg.keep_checkpoints)
    if improved:
        ckpt.save(state, os.path.join(cfg.out, ckpt.BEST))
    # the figures take ~1-2 s to draw: refresh them at most once per PLOT_REFRESH_S of
    # validations, and always at the last step
    if run.step == cfg.steps or time.monotonic() - run.plotted_at >= PLOT_REFRESH_S:
        _plots(run)
        run.plotted_at = time.monotonic()


def write_samples(run: Run, path: str, n: int = GRID_SAMPLES) -> torch.Tensor:
    """A grid of n EMA samples (Euler–Maruyama, cfg.sample_steps steps)."""
    proc, net = ema_models(run)
    gen = torch.Generator(device=run.device).manual_seed(seed_for(run.cfg.seed, 0, "sample"))
    x = sdec.sample(proc, proc.score_from_eps(net), n, tuple(run.splits.shape), method="em",
                    steps=run.cfg.sample_steps, generator=gen, device=run.device)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if run.splits.levels is None:
        plots.save_points(x, path, reference=run.splits.val)
    else:
        plots.save_grid(from_model(x, run.cfg.transform), path)
    return x


def _plots(run: Run) -> None:
    out = run.cfg.out
    records = plots.read_metrics(os.path.join(out, "metrics.jsonl"))
    plots.plot_training(records, os.path.join(out, "training.png"))
    times = torch.logspace(math.log10(run.proc.t_min), math.log10(run.proc.T), 200).double()
    second = float(_model_second_moment(run))
    stds = {"trained": monitor.marginal_std(run.proc, second, times)}
    if any(p.requires_grad for p in run.proc.parameters()):
        initial = type(run.proc)().to(run.device)  # the generated class starts at the spec's init
        stds["initial"] = monitor.marginal_std(initial, second, times)
        plots.plot_blocks(records, run.proc.names, os.path.join(out, "blocks.png"))
    plots.plot_process(times.numpy(), stds, run.proc.names, os.path.join(out, "process.png"))


def _model_second_moment(run: Run):
    x = run.splits.val[:512]
    y, _ = prepare(x, run.splits.levels, run.cfg.transform, torch.Generator().manual_seed(0))
    return (y.double() ** 2).mean()


def finish(run: Run, echo) -> dict:
    """Last checkpoint, then the test BPD of the best checkpoint's EMA model (rank 0 reads the
    checkpoint and sends its EMA weights to the other ranks; the test split is shared out)."""
    cfg = run.cfg
    best_path = ckpt.resolve(cfg.out) if run.ranks.is_main else None  # the best (else the last)
    if run.ranks.is_main:
        state = ckpt.load(best_path, map_location=run.device)
        run.ema.load_state_dict(state["ema"])  # the run is over: reuse its EMA holder for the best
        info = torch.tensor([state["step"], state["best_val"]], dtype=torch.float64)
    else:
        info = torch.zeros(2, dtype=torch.float64)
    run.ranks.broadcast_([run.ema.shadow[k] for k in sorted(run.ema.shadow)] + [info])
    step, best_val = int(info[0]), float(info[1])
    proc, net = ema_models(run)
    test = load_dataset(cfg.data, "test", cfg.data_dir, cfg.image_size)
    ev = evaluate_elbo(proc, net, test.data, test.levels, transform=cfg.transform,
                       time_samples=cfg.time_samples, seed=seed_for(cfg.seed, 0, "test"),
                       ranks=run.ranks, device=run.device)
    results = {**ev.as_json(), "split": "test", "spec": proc.spec_name, "step": step,
               "checkpoint": best_path, "best_val_bpd": best_val, "data": cfg.data,
               "mixing": monitor.mixing(proc)}
    if run.ranks.is_main:
        with open(os.path.join(cfg.out, "results.json"), "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    echo(describe_evaluation(ev, test.levels))
    echo(f"test BPD {ev.bpd:.4f} {plus_minus(ev.bpd_stderr)} (ELBO, EMA weights of the best checkpoint, "
         f"step {step}; {cfg.data} test split, n = {ev.n}); samples in "
         f"{os.path.join(cfg.out, 'samples')}")
    return results
