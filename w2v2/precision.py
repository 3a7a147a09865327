"""Numeric precision of a model's computation: ``"fp32"``, ``"bf16"``, ``"int8"`` or ``"auto"``.

``"auto"`` picks bfloat16 where the hardware multiplies it natively (CUDA GPUs with bf16
support; x86 CPUs with AMX-BF16 or AVX512-BF16, unless ``ONEDNN_MAX_CPU_ISA`` caps oneDNN below
them) and float32 elsewhere. Parameters always stay
float32 (state dicts and training are unaffected); in bfloat16 mode the model computes on
bfloat16 copies of its weights, cached until the weights change. ``"int8"`` (dynamic int8 matrix
products, the rest float32) runs through onnxruntime: :func:`w2v2.onnx.for_precision`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

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
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
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
