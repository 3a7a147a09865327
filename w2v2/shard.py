"""Inference across processes and machines: which inputs this process runs, and one job summary.

Under ``torchrun`` every process (rank) lists the same inputs and computes the same split, so no
process hands work to another and the work itself needs no process group:

    share = my_share(inputs, seconds_of)      # this rank's indices, balanced by audio length
    ... run and write the outputs of ``inputs[i] for i in share`` ...
    parts = gather(what_this_rank_found)      # every rank's, in rank order (one process: [it])

The split (:func:`balance`) is greedy longest-first: inputs in order of decreasing length go one
by one to the rank with the least audio so far, so ranks finish together even when a few files
are much longer than the rest (round-robin over files would not). It depends only on the inputs
and their lengths, never on what is already on disk, so after a restart every rank gets the same
inputs again and ``--skip-existing`` leaves out those it had finished.

The process group is started only for :func:`gather`, at the end: gloo on every machine, since it
carries a few Python objects (counts, scores), not tensors. A rank that finished waits there for
the others at most ``W2V2_GATHER_TIMEOUT`` seconds (default two hours), then fails with one line
instead of hanging; a rank that dies makes torchrun stop the others (and restart the job when
``--max-restarts`` allows).
"""

from __future__ import annotations

import datetime
import heapq
import math
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

from .distributed import DistInfo, dist_info
from .errors import UserError
from .safeload import first_line

T = TypeVar("T")

GATHER_TIMEOUT_ENV = "W2V2_GATHER_TIMEOUT"
GATHER_TIMEOUT_SECONDS = 2 * 3600.0


def balance(weights: Sequence[float], parts: int) -> list[list[int]]:
    """Split indices ``0..len(weights)-1`` into ``parts`` lists of near-equal total weight.

    Greedy longest-first: indices by decreasing weight (equal weights: lower index first) go one
    by one to the part with the least total so far (equal totals: the lower part). Each list is
    in increasing index order. Deterministic: the same weights give the same split everywhere.
    A weight that is not a finite positive number (a manifest's ``nan``) counts as 0.
    """
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    weights = [w if math.isfinite(w) and w > 0 else 0.0 for w in weights]
    loads = [(0.0, p) for p in range(parts)]  # a heap of (total weight, part)
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, p = heapq.heappop(loads)
        out[p].append(i)
        heapq.heappush(loads, (load + weights[i], p))
    return [sorted(part) for part in out]


def my_share(items: Sequence[T], seconds: Callable[[T], float], info: DistInfo | None = None) -> list[int]:
    """The indices of ``items`` this rank runs (all of them in a single process; ``seconds`` is then
    not called). ``seconds(item)``: its audio length, the weight :func:`balance` splits by."""
    info = info or dist_info()
    if info.world_size == 1:
        return list(range(len(items)))
    return balance([seconds(item) for item in items], info.world_size)[info.rank]


def header_seconds(path: str) -> float | None:
    """Audio length from the file's header (no decoding); None when the header does not record
    it, 0 when the file is unreadable (it fails with its own message when its turn comes)."""
    from .audio import audio_duration

    try:
        return audio_duration(path)
    except Exception:
        return 0.0


def probe_seconds(path: str) -> float:
    """:func:`header_seconds`, 0 when unknown: a weight for :func:`balance`."""
    return header_seconds(path) or 0.0


def gather_timeout() -> float:
    """Seconds a finished rank waits for the others (``W2V2_GATHER_TIMEOUT``)."""
    text = os.environ.get(GATHER_TIMEOUT_ENV, "")
    try:
        value = float(text) if text else GATHER_TIMEOUT_SECONDS
    except ValueError:
        raise ValueError(f"{GATHER_TIMEOUT_ENV}={text!r}: expected a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{GATHER_TIMEOUT_ENV}={text!r}: expected a positive number of seconds")
    return value


class GatherTimeout(UserError):
    """The other ranks did not reach the end of the job in time (one of them hangs or died)."""


def gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in a single process): once per
    command, at its end, by every rank. ``GatherTimeout`` when the others do not come within
    :func:`gather_timeout` seconds."""
    import torch
    import torch.distributed as dist

    from .distributed import init_distributed

    info = dist_info()
    if info.world_size == 1:
        return [obj]
    timeout = gather_timeout()
    try:
        init_distributed(torch.device("cpu"), timeout=datetime.timedelta(seconds=timeout))  # gloo: Python objects
        out: list = [None] * info.world_size
        dist.all_gather_object(out, obj)
    except (RuntimeError, dist.DistError) as e:
        raise GatherTimeout(f"rank {info.rank}: the other processes did not all finish within {timeout:g} s "
                            f"({GATHER_TIMEOUT_ENV}); one of them hangs or was stopped ({first_line(e) or type(e).__name__})") from e
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return out
