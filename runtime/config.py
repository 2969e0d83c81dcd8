"""The training configuration: one frozen record, resolved once, saved with every run.

Fields left as None are resolved from the data and the network preset by :func:`resolve`
(steps, learning rate, network). The resolved record is written to ``config.json`` in the
run directory and into every checkpoint, so a run can be rebuilt and resumed from it alone.
"""
from __future__ import annotations

import os

import attrs

OBJECTIVES = ("elbo", "eps")
TIME_SAMPLERS = ("importance", "stratified", "uniform")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
# Knobs a resumed run may change (the step count, the learning rates and clipping, e.g. after
# a non-finite loss, and the logging cadence); everything else must match the checkpoint.
RESUMABLE = ("steps", "lr", "process_lr", "grad_clip", "eval_every", "sample_every", "log_every",
             "device", "progress", "resume", "out", "time_samples", "sample_steps",
             "keep_checkpoints", "grad_accum", "precision", "compile")

# Per-dataset defaults: steps sized so the default run on digits ends within 5 minutes on a
# 2-core CPU (measured, see the README), longer for the real image sets.
DEFAULT_STEPS = {"digits": 1500, "toy": 4000, "mnist": 100_000, "cifar10": 300_000,
                 "imagenet32": 300_000, "folder": 50_000}
DEFAULT_LR = {"tiny": 2e-3, "mlp": 1e-3, "mnist": 2e-4, "cifar": 2e-4}


@attrs.frozen
class TrainConfig:
    spec: str
    data: str = "digits"
    data_dir: str | None = None
    image_size: int = 32
    steps: int | None = None
    batch_size: int = 128           # per rank and per micro-batch
    grad_accum: int = 1             # micro-batches per rank per step
    lr: float | None = None
    process_lr: float | None = None
    weight_decay: float = 0.0
    warmup: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    out: str | None = None
    resume: bool = False
    net: str | None = None
    dropout: float | None = None
    objective: str = "elbo"
    time_sampler: str = "importance"
    transform: str = "center"
    eval_every: int = 500
    sample_every: int = 1000
    log_every: int = 50
    time_samples: int = 16
    val_fraction: float = 0.1
    keep_checkpoints: int = 3
    sample_steps: int = 200
    device: str = "auto"
    precision: str = "auto"         # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False
    progress: bool = True

    def as_dict(self) -> dict:
        return attrs.asdict(self)


def data_family(name: str) -> str:
    return name.split(":", 1)[0] if ":" in name else name


def default_out(spec: str, data: str) -> str:
    stem = os.path.splitext(os.path.basename(spec))[0]
    tag = data.replace(":", "-").replace(os.sep, "_").strip("-_.") or "data"
    return os.path.join("runs", f"{stem}-{tag}")


def resolve(cfg: TrainConfig, net_preset: str) -> TrainConfig:
    """Fill every None that has a default; validate ranges."""
    steps = cfg.steps if cfg.steps is not None else DEFAULT_STEPS.get(data_family(cfg.data), 10_000)
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR.get(net_preset, 2e-4)
    out = cfg.out or default_out(cfg.spec, cfg.data)
    resolved = attrs.evolve(cfg, steps=steps, lr=lr, net=net_preset, out=out,
                            process_lr=cfg.process_lr if cfg.process_lr is not None else lr)
    validate(resolved)
    return resolved


def validate(cfg: TrainConfig) -> None:
    positive = ("steps", "batch_size", "eval_every", "sample_every", "log_every", "time_samples",
                "sample_steps", "image_size", "keep_checkpoints", "grad_accum")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("lr", "process_lr", "grad_clip"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    if not 0.0 < cfg.val_fraction < 0.5:
        raise ValueError(f"--val-fraction must be in (0, 0.5), got {cfg.val_fraction}")
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {cfg.objective!r}; valid: {', '.join(OBJECTIVES)}")
    if cfg.time_sampler not in TIME_SAMPLERS:
        raise ValueError(f"unknown time sampler {cfg.time_sampler!r}; valid: {', '.join(TIME_SAMPLERS)}")
    if cfg.transform not in ("center", "logit"):
        raise ValueError(f"unknown transform {cfg.transform!r}; valid: center, logit")
    if cfg.device not in DEVICES:
        raise ValueError(f"unknown device {cfg.device!r}; valid: {', '.join(DEVICES)}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {cfg.precision!r}; valid: fp32, bf16 (default: bf16 on "
                         "CUDA, fp32 on CPU)")
    if cfg.warmup < 0 or cfg.weight_decay < 0:
        raise ValueError("--warmup and --weight-decay must be non-negative")


def changed_on_resume(saved: dict, cfg: TrainConfig, explicit: set) -> list:
    """Names the user set explicitly that differ from the checkpoint's configuration."""
    now = cfg.as_dict()
    return sorted(k for k in explicit if k not in RESUMABLE and k in saved and saved[k] != now[k])
