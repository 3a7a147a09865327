"""Processes launched by torchrun: who this process is, and the process group.

torchrun (PyTorch's own launcher, one machine or many) sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; every job reads them through :func:`dist_info`, so training, inference sharding
and the commands agree on who is rank 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .safeload import first_line

@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank and world size from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or one process."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: torch.device, timeout: timedelta | None = None) -> DistInfo:
    """Start the process group when launched by torchrun (gloo on CPU, nccl on GPU); ``timeout``:
    how long a collective waits for the other ranks (None: PyTorch's default)."""
    info = dist_info()
    if info.world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return dist_info()


def restart_hint() -> str:
    """Words to add to "already holds a run" when torchrun restarted the job (``--max-restarts``):
    the first attempt wrote the run, so every restart without ``--resume`` fails the same way."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0) or 0) > 0:
        return ("; torchrun restarted this job, whose first attempt started the run: launch it with --resume, "
                "so that a restart continues from the last checkpoint")
    return ""


# Text of the errors a collective raises when another process of the job died or hung up: the
# survivors fail in their next collective, and that is not a bug of theirs.
_PEER_LOST_MARKS = ("gloo", "nccl", "connection closed by peer", "connection reset by peer", "broken pipe")


def peer_failure(error: BaseException) -> str | None:
    """A one-line account of ``error`` when it says another process of the job failed, else None."""
    text = first_line(error) or type(error).__name__
    if isinstance(error, dist.DistError) or (
            isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _PEER_LOST_MARKS)):
        return (f"another process of the distributed job failed or was lost ({type(error).__name__}: {text[:200]}); "
                "torchrun restarts the job when launched with --max-restarts")
    return None
