"""Checkpoints: one dict of named parts, written atomically, loaded without unpickling code.

A checkpoint holds the network, the process parameters, their EMA, the optimizer, the step,
the RNG states, the spec text and hash, and the resolved configuration. Only tensors, numbers,
strings, lists and dicts: ``torch.load(..., weights_only=True)`` loads it, and refuses any
file that asks to run code.

Writing: to ``NAME.tmp`` in the same directory, flushed and fsynced, then ``os.replace`` onto
NAME, so a kill mid-write leaves the previous checkpoint intact. The run directory holds
``ckpt-last.pt`` (the latest step), ``ckpt-best.pt`` (best validation BPD) and the few most
recent ``ckpt-step-NNNNNNN.pt`` (``keep`` of them; ``ckpt-last.pt`` is a hard link to the
newest, or a copy where links are not supported). Resuming reads ``ckpt-last.pt`` and, if it
is unreadable (truncated, overwritten, not a checkpoint), says so and falls back to the newest
readable step file.
"""
from __future__ import annotations

import os
import re
import shutil
import sys

import torch

FORMAT = "sdec-checkpoint"
VERSION = 1
LAST, BEST = "ckpt-last.pt", "ckpt-best.pt"
_STEP_FILE = re.compile(r"^ckpt-step-(\d{7,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not belong to this run."""


def save(state: dict, path: str) -> None:
    """Atomic write: temporary file, fsync, rename."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as handle:
        torch.save({"format": FORMAT, "version": VERSION, **state}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load(path: str, map_location="cpu") -> dict:
    """Load a checkpoint (weights_only); CheckpointError naming the path if it is not one."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or asks for code
        raise CheckpointError(f"{path}: not a readable sdec checkpoint "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an sdec checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')}, this sdec "
                              f"reads version {VERSION}")
    return state


def step_name(step: int) -> str:
    return f"ckpt-step-{step:07d}.pt"


def step_files(out: str) -> list:
    """The run's step checkpoints, newest first."""
    names = os.listdir(out) if os.path.isdir(out) else []
    found = [(int(m.group(1)), n) for n in names if (m := _STEP_FILE.match(n))]
    return [os.path.join(out, n) for _, n in sorted(found, reverse=True)]


def save_rolling(state: dict, out: str, keep: int) -> str:
    """Write the step checkpoint, point ckpt-last.pt at it (atomically), keep the newest
    ``keep`` step files. Returns the step file's path."""
    path = os.path.join(out, step_name(state["step"]))
    save(state, path)
    tmp = os.path.join(out, LAST + ".tmp")
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(path, tmp)
    except OSError:  # no hard links here: copy
        shutil.copyfile(path, tmp)
    os.replace(tmp, os.path.join(out, LAST))
    for old in step_files(out)[keep:]:
        os.remove(old)
    return path


def load_latest(out: str, map_location="cpu", warn=None) -> dict:
    """The newest readable checkpoint of a run: ckpt-last.pt, else the newest good step file.
    Each unreadable file is reported (path and reason) and skipped."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    candidates = [os.path.join(out, LAST)] + step_files(out)
    errors = []
    for path in candidates:
        if not os.path.isfile(path):
            continue
        try:
            state = load(path, map_location)
        except CheckpointError as exc:
            errors.append(str(exc))
            warn(f"WARNING: skipping {exc}")
            continue
        return state
    last = os.path.join(out, LAST)
    raise CheckpointError(f"no readable checkpoint to resume from in {out}: "
                          + ("; ".join(errors) if errors else f"{last}: no such checkpoint"))


def resolve(run_or_checkpoint: str, prefer=BEST) -> str:
    """A checkpoint file, or a run directory (its best checkpoint, else its last)."""
    if os.path.isdir(run_or_checkpoint):
        for name in (prefer, LAST, BEST):
            path = os.path.join(run_or_checkpoint, name)
            if os.path.isfile(path):
                return path
        raise CheckpointError(f"{run_or_checkpoint}: no {BEST} or {LAST} in this run directory")
    if not os.path.exists(run_or_checkpoint):
        raise CheckpointError(f"{run_or_checkpoint}: no such run directory or checkpoint file")
    return run_or_checkpoint


def rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))
