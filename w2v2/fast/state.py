"""The fast path's state: its on/off switch, the precision it computes in, and the cache of weights
derived from parameters (a bfloat16 copy, the stacked q/k/v matrix, a weight-normed kernel)."""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .onednn import needs_grad

_ENABLED = os.environ.get("W2V2_FAST", "1").strip() != "0"


def enabled() -> bool:
    """Whether the fast forwards run: ``W2V2_FAST=0`` in the environment or ``set_enabled(False)``
    turns them off, and every model computes with the plain forwards of ``w2v2/modules.py``."""
    return _ENABLED


def set_enabled(flag: bool) -> None:
    global _ENABLED
    _ENABLED = bool(flag)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """The plain forwards inside the block; the switch restored after."""
    before = _ENABLED
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(before)


def compute_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype a fast forward computes in for input ``x``, or None where the plain forward runs:
    switched off, inside ``torch.compile`` (whose compiler fuses the plain ops itself), or under an
    autocast other than bfloat16. Under bfloat16 autocast (how a model in ``bf16`` precision and the
    trainer ask for bf16) it is bfloat16, else ``x``'s dtype."""
    if not _ENABLED or torch.compiler.is_compiling():
        return None
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.bfloat16 if torch.get_autocast_dtype(device) == torch.bfloat16 else None
    return x.dtype if x.dtype in (torch.float32, torch.bfloat16) else None


def autocast_off(x: Tensor):
    """A fast forward's body runs outside autocast: it casts its weights itself (once, cached) and
    keeps statistics in float32/float64, which autocast would recast op by op."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- derived weights
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def cached(owner: nn.Module, key, params: tuple[Tensor, ...], make: Callable[[], Tensor]) -> Tensor:
    """``make()``, remembered on ``owner`` until one of ``params`` changes (in place, or moved).

    Under autograd (a parameter requires grad and grad mode is on) ``make()`` runs every call so
    that its result is part of the graph."""
    if needs_grad(*params):
        return make()
    # runs for every weight of every layer on every call: kept cheap (host time bounds short GPU calls)
    stamp = [(p._version, p.data_ptr(), p.dtype, p.device) for p in params]
    slots = _CACHE.get(owner)
    if slots is None:
        slots = _CACHE[owner] = {}
    hit = slots.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable outside inference mode
        value = make()
    slots[key] = (stamp, value)
    return value


def clear_cache(module: nn.Module) -> None:
    """Forget every derived weight of ``module`` and its children (frees their memory)."""
    for m in module.modules():
        _CACHE.pop(m, None)


def weight_as(owner: nn.Module, name: str, dtype: torch.dtype) -> Tensor | None:
    """``owner.<name>`` cast to ``dtype`` (cached when no gradient is needed)."""
    p = getattr(owner, name)
    if p is None or p.dtype == dtype:
        return p
    return cached(owner, (name, dtype), (p,), lambda: p.to(dtype))
