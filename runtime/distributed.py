"""Many processes: the ranks of a torchrun launch, and the few collectives the runtime uses.

``torchrun --nproc_per_node N [--nnodes M --rdzv-endpoint HOST:PORT] -m sdec train ...`` sets
WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in every process; :func:`start`
reads them and joins the process group (nccl on CUDA, gloo on CPU). Without them (a plain
``sdec train``) there is one rank and every collective below is the identity, so the single
process and the many-process runs take the same code path.

What the runtime exchanges between ranks:

- :meth:`Ranks.gather_rows`: every rank's (n_r, F) rows, concatenated in rank order (the
  per-micro-batch loss terms, the per-example evaluation figures);
- :meth:`Ranks.broadcast_`: rank 0's tensors into every rank's (the best checkpoint's EMA
  weights at the end of training);
- :meth:`Ranks.agree`: whether every rank succeeded at something only rank 0 did (checking
  the run directory).

Gradients are averaged by DistributedDataParallel itself (train.py wraps the network and the
process together).
"""
from __future__ import annotations

import datetime
import os
import sys

import attrs
import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(minutes=30)
_joined = False  # this process joined a process group (start() did): it ends through leave()


@attrs.define
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """All ranks' (n_r, F) tensors stacked in rank order; n_r may differ between ranks."""
        if not self.active:
            return rows
        device = _comm_device(self, rows)
        local = rows.to(device)
        counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self.world)]
        dist.all_gather(counts, torch.tensor([rows.shape[0]], dtype=torch.int64, device=device))
        counts = [int(c) for c in counts]
        width = max(counts)
        padded = torch.zeros((width,) + tuple(rows.shape[1:]), dtype=rows.dtype, device=device)
        padded[: rows.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(rows.device)

    def broadcast_(self, tensors) -> None:
        """Overwrite every rank's tensors (in the given order) with rank 0's, in place."""
        if not self.active:
            return
        for t in tensors:
            device = _comm_device(self, t)
            buf = t.to(device)
            dist.broadcast(buf, src=0)
            if buf is not t:
                t.copy_(buf)

    def agree(self, ok: bool) -> bool:
        """True on every rank iff ``ok`` is true on every rank."""
        if not self.active:
            return ok
        flag = torch.tensor([0 if ok else 1], dtype=torch.int64,
                            device=_comm_device(self, torch.zeros(())))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag) == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def _comm_device(ranks: Ranks, like: torch.Tensor) -> torch.device:
    """nccl moves CUDA tensors only; gloo takes CPU tensors."""
    if ranks.backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def start(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun describes (if any); returns the ranks and this rank's
    device (``cuda:LOCAL_RANK`` on CUDA)."""
    world = env_world()
    if world <= 1:
        return Ranks(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT)
    global _joined
    _joined = True
    return Ranks(rank, world, local, backend), device


def stop() -> None:
    """Leave the process group (at the end of a command, whatever its outcome)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def joined() -> bool:
    """Whether this process joined a process group (and so must end through leave())."""
    return _joined


def leave(code: int) -> None:
    """End a process that joined a process group with exit status ``code``, skipping the
    interpreter's finalization; a no-op in a process that never joined one.

    Why: gloo's worker threads drop their references to a finished collective's tensors a
    moment after the caller has seen it finish. If that moment falls inside interpreter
    finalization, the drop needs the GIL, the thread is torn down, and the rank dies with
    SIGABRT ("terminate called without an active exception") after all its work succeeded.
    destroy_process_group() cannot join those threads while DistributedDataParallel keeps
    the group alive (it does, even after the module is freed). So once the command has
    finished (the group left with stop(), every file closed, every message printed), the
    rank flushes its standard streams and exits with os._exit: nothing of the run is lost,
    and no C++ thread outlives a half-finalized interpreter."""
    if not _joined:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: the exit status still says it
            pass
    os._exit(code)


def env_rank() -> int:
    """This process's rank from torchrun's environment (0 without torchrun)."""
    return int(os.environ.get("RANK", "0") or 0)
