"""Where and in what precision a model computes: the device, and ``"fp32"``, ``"bf16"``, ``"int8"`` or ``"auto"``.

``"auto"`` picks bfloat16 where the hardware multiplies it natively (CUDA GPUs with bf16
support; x86 CPUs with AMX-BF16 or AVX512-BF16, unless ``ONEDNN_MAX_CPU_ISA`` caps oneDNN below
them) and float32 elsewhere. Parameters always stay float32 (state dicts and training are
unaffected). ``"int8"`` (dynamic int8 matrix products, the rest float32) runs through
onnxruntime: :func:`w2v2.onnx.for_precision`.

bfloat16 reaches the model by two mechanisms, one per job:

- Inference (``transcribe``, ``align``, ``evaluate``): :meth:`Wav2Vec2.set_precision`
  (set for a run by :func:`precision_context`). The model computes on bfloat16 copies of its
  weights, made once and cached until the weights change, and chooses itself which steps
  accumulate in float32 (norms, softmax, logits). The weights are fixed, so the cast is paid
  once instead of on every call, and the oneDNN kernels see one dtype throughout.
- Training (``TrainConfig.precision``): ``torch.autocast`` around the loss function. The
  trainer runs any ``nn.Module`` and loss it is given, not only a :class:`Wav2Vec2`, and
  covers fp16 (with a GradScaler) by the same switch. Caching would buy nothing there: the
  weights change at every update and the cast must be part of the autograd graph, so the
  model's own bf16 path also casts on every call under autograd (``kernels.cached``). The
  oneDNN kernels step aside under autocast (``kernels.onednn_ok``), leaving autocast's
  per-operation rules (PyTorch's list of the operations kept in float32) in charge.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

from .fast import onednn

PRECISIONS = ("auto", "fp32", "bf16", "int8")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA, formerly DNNL_MAX_CPU_ISA) below AVX512_CORE_BF16: oneDNN then
# emulates bf16 products, several times slower than float32, whatever the CPU has
ONEDNN_CAPS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def check_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return name


@functools.cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """The bf16 matrix-multiply features this CPU reports in /proc/cpuinfo (empty when unknown)."""
    flags = onednn.cpu_info()[1]
    return tuple(f for f in CPU_BF16_FLAGS if f in flags)


def fast_bf16(device: torch.device | str) -> bool:
    """Whether bfloat16 matrix products run natively (and so faster than float32) on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
        return (bool(cpu_bf16_flags()) and cap.strip().upper() not in ONEDNN_CAPS_WITHOUT_BF16
                and torch.backends.mkldnn.is_available() and onednn.bf16_supported())
    return False


def resolve(name: str, device: torch.device | str) -> torch.dtype:
    """The compute dtype for precision ``name`` on ``device``."""
    check_precision(name)
    if name == "int8":
        raise ValueError("int8 runs through onnxruntime: load an ONNX export (w2v2 export MODEL DIR --onnx) "
                         "or convert the model with w2v2.onnx.for_precision(model, 'int8')")
    if name == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    return DTYPES[name]


def resolve_precision(device: torch.device | str, precision: str) -> str:
    """The precision name a run uses on ``device``: ``auto`` -> ``"bf16"`` or ``"fp32"``
    (as :func:`resolve` decides); ``fp32``, ``bf16`` and ``int8`` unchanged."""
    if precision == "int8":  # a precision of onnxruntime models (w2v2.onnx), no torch dtype
        return precision
    return "bf16" if resolve(precision, device) == torch.bfloat16 else "fp32"


@contextlib.contextmanager
def precision_context(model, precision: str) -> Iterator[None]:
    """The one place inference sets a model's precision (:meth:`Wav2Vec2.set_precision`, see the
    module docstring), restored when the block ends."""
    before = model.precision
    model.set_precision(precision)
    try:
        yield
    finally:
        model.set_precision(before)


def resolve_device(name: str | None, local_rank: int | None = None) -> torch.device:
    """The device of ``name``: ``None``/``"auto"``: CUDA when available, else the CPU; ``"cpu"``,
    ``"cuda"``, ``"cuda:N"`` as given. ``local_rank`` (a distributed run's process on this machine;
    default: torchrun's ``LOCAL_RANK`` when it started several processes) turns a plain ``"cuda"``
    into ``"cuda:<local_rank>"``, taken modulo the GPUs there are (more processes than GPUs share
    them). Asking for CUDA without a GPU is a ``ValueError`` here, not a failure deep inside the
    first forward pass."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name}: not a device (cpu, cuda, cuda:1, ... or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here (torch.cuda.is_available() is False)")
    if local_rank is None:
        from .distributed import dist_info

        info = dist_info()
        local_rank = info.local_rank if info.world_size > 1 else None
    if dev.type == "cuda" and dev.index is None and local_rank is not None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev
