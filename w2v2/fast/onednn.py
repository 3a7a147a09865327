"""CPU kernels of the fast path: oneDNN products and convolutions, and a cheaper dropout mask.

On x86 CPUs PyTorch runs float32 ``F.linear``/``torch.mm`` through MKL, which takes a slower
generic code path on some processors (docs/performance.md); oneDNN (``torch.ops.mkldnn``) does not,
and fuses GELU or a residual add into a product. Convolutions over time run channels-last: a
``(batch, channels, 1, time)`` view of ``(batch, time, channels)`` memory, oneDNN's native layout,
so no transpose is needed (:func:`channels_last`).

The oneDNN entry points are private PyTorch operators. Each one is probed once, at first use
(:func:`probe`): it must exist and give the plain operator's result on a tiny input with exact
values. Where a probe fails (a PyTorch release renamed or changed the operator) a warning says so
once and the public operator runs instead, slower but with the same result. Every function here
returns what its ``torch.nn.functional`` counterpart returns, to float rounding.

``PRIVATE_OPS = False`` keeps the private operators out entirely: the fast path then issues the
public operators it issues on a GPU (benchmarks/overhead.py measures their host cost on a CPU).
"""

from __future__ import annotations

import functools
import math
import platform
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


PRIVATE_OPS = True


def onednn_platform(machine: str | None = None) -> bool:
    """Whether this CPU architecture gets the oneDNN kernels: x86 only, where they were measured
    against PyTorch's own ops. ARM CPUs (Apple silicon, Graviton) run PyTorch's own ops, which
    use other libraries there (Accelerate, Arm Compute Library)."""
    return (machine or platform.machine()).lower() in ("x86_64", "amd64")


@functools.cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """(vendor id, feature flags) of this CPU from /proc/cpuinfo; ("", empty) where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", frozenset()
    vendor, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id":
            vendor = value.strip()
        elif key.strip() == "flags":
            flags.update(value.split())
    return vendor, frozenset(flags)


@functools.cache  # asked by every attention call: the answer is the machine's
def mkl_optimized() -> bool:
    """Whether PyTorch's CPU kernels that call MKL (the flash attention kernel's float32 and
    bf16 products among them) get MKL's optimized code: on Intel CPUs. Elsewhere MKL takes a
    slower generic code path (docs/performance.md)."""
    return torch.backends.mkl.is_available() and cpu_info()[0] == "GenuineIntel"


# --------------------------------------------------------------------------- probes
def _exact(*shape: int, dtype=torch.float32, seed: int = 0) -> Tensor:
    """Small integers in [-2, 2]: products and sums of a few of them are exact in bfloat16 too."""
    return torch.randint(-2, 3, shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _linear_probe(dtype) -> bool:
    x, w, b = _exact(5, 8, dtype=dtype), _exact(4, 8, dtype=dtype, seed=1), _exact(4, dtype=dtype, seed=2)
    return torch.equal(torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [None], ""), F.linear(x, w, b))


def _close(got: Tensor, want: Tensor) -> bool:
    """Equal to the rounding of ``got``'s dtype (``want`` computed in float32 from the same inputs)."""
    tol = 1e-5 if got.dtype == torch.float32 else 1e-2
    return torch.allclose(got.float(), want, rtol=tol, atol=tol)


def _linear_gelu_probe(dtype) -> bool:
    x, w, b = _exact(5, 8, dtype=dtype), _exact(4, 8, dtype=dtype, seed=1), _exact(4, dtype=dtype, seed=2)
    got = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [None], "none")
    return _close(got, F.gelu(F.linear(x, w, b).float()))


def _linear_add_probe(dtype) -> bool:
    x, w, b, r = (_exact(*s, dtype=dtype, seed=i) for i, s in enumerate([(5, 8), (4, 8), (4,), (5, 4)]))
    return torch.equal(torch.ops.mkldnn._linear_pointwise.binary(x, r, w, b, "add"), F.linear(x, w, b) + r)


def _conv_inputs(dtype) -> tuple[Tensor, Tensor, Tensor]:
    """A grouped, strided, padded convolution over time as :func:`conv_time` issues it."""
    x = _exact(2, 4, 1, 9, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = _exact(6, 2, 1, 3, dtype=dtype, seed=1).contiguous(memory_format=torch.channels_last)
    return x, w, _exact(6, dtype=dtype, seed=2)


def _conv_probe(dtype) -> bool:
    x, w, b = _conv_inputs(dtype)
    got = torch.ops.mkldnn._convolution_pointwise(x, w, b, [0, 1], [1, 2], [1, 1], 2, "none", [None], "")
    return torch.equal(got, F.conv2d(x, w, b, stride=(1, 2), padding=(0, 1), groups=2))


def _conv_gelu_probe(dtype) -> bool:
    x, w, b = _conv_inputs(dtype)
    got = torch.ops.mkldnn._convolution_pointwise(x, w, b, [0, 1], [1, 2], [1, 1], 2, "gelu", [None], "none")
    return _close(got, F.gelu(F.conv2d(x, w, b, stride=(1, 2), padding=(0, 1), groups=2).float()))


def _softmax_backward_probe(dtype) -> bool:
    p = torch.softmax(_exact(3, 5).float(), -1).to(dtype)
    dp = _exact(3, 5, dtype=dtype, seed=1)
    return _close(torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype), _softmax_backward_plain(dp, p))


def _gelu_backward_probe(dtype) -> bool:
    g, x = _exact(3, 5, dtype=dtype), _exact(3, 5, dtype=dtype, seed=1) / 2
    return _close(torch.ops.aten.gelu_backward(g, x), _gelu_backward_plain(g, x))


def _gelu_inplace_probe(dtype) -> bool:
    x = _exact(3, 5, dtype=dtype) / 2
    return torch.equal(torch.ops.aten.gelu_(x.clone()), F.gelu(x))


PROBES: dict[str, Callable[[torch.dtype], bool]] = {
    "linear": _linear_probe, "linear_gelu": _linear_gelu_probe, "linear_add": _linear_add_probe,
    "conv": _conv_probe, "conv_gelu": _conv_gelu_probe, "softmax_backward": _softmax_backward_probe,
    "gelu_backward": _gelu_backward_probe, "gelu_": _gelu_inplace_probe,
}


@functools.cache
def probe(name: str, dtype: torch.dtype = torch.float32) -> bool:
    """Whether private operator ``name`` (a key of :data:`PROBES`) exists and gives the plain
    result in ``dtype`` on a tiny input; run once per process. False warns once: the callers then
    run the public operator."""
    try:
        with torch.inference_mode(False), torch.no_grad(), torch.autocast("cpu", enabled=False):
            if dtype == torch.bfloat16 and not bf16_supported():
                return False
            ok, why = PROBES[name](dtype), "gives a different result"
    except Exception as e:  # any failure of a private operator means: take the public path
        ok, why = False, f"is unavailable ({type(e).__name__}: {e})"
    if not ok:
        warnings.warn(f"w2v2: PyTorch's private operator for {name!r} ({str(dtype).removeprefix('torch.')}) {why}; "
                      "running the public operator instead (same results, slower)", RuntimeWarning, stacklevel=2)
    return ok


@functools.cache
def bf16_supported() -> bool:
    """Whether oneDNN has bfloat16 kernels for this CPU (False where the query itself is missing)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def ok(op: str, *tensors: Tensor | None) -> bool:
    """Whether oneDNN's ``op`` runs on these tensors: CPU tensors of one dtype (float32, or bfloat16
    where supported) on x86, outside ``torch.compile`` and autocast, and ``op`` passed its probe."""
    t0 = tensors[0]
    if t0.device.type != "cpu" or t0.dtype not in (torch.float32, torch.bfloat16) or t0.numel() == 0:
        return False
    if any(t is not None and t.dtype != t0.dtype for t in tensors):
        return False
    if not PRIVATE_OPS or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu") or not _platform_ready():
        return False
    return probe(op, t0.dtype)


@functools.cache
def _platform_ready() -> bool:
    return onednn_platform() and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def channels_last(device: torch.device) -> bool:
    """Whether convolutions over time on ``device`` run channels-last (height-1 NHWC images: x86
    CPUs with oneDNN's convolution); elsewhere (CUDA, MPS, ARM) channels first, cuDNN's native
    layout and the one transformers uses."""
    return device.type == "cpu" and PRIVATE_OPS and _platform_ready() and probe("conv")


# --------------------------------------------------------------------------- public fallbacks
def _softmax_backward_plain(dp: Tensor, p: Tensor) -> Tensor:
    """float32: s's gradient is p * (dp - sum(dp * p)), computed in float32 as the fused kernel does."""
    dp, p = dp.float(), p.float()
    return p * (dp - (dp * p).sum(-1, keepdim=True))


def _gelu_backward_plain(g: Tensor, x: Tensor) -> Tensor:
    """float32: g * (Phi(x) + x phi(x)) for the exact (erf) GELU."""
    g, x = g.float(), x.float()
    cdf = 0.5 * (1 + torch.erf(x * 0.5 ** 0.5))
    return g * (cdf + x * torch.exp(-0.5 * x * x) * (2 * math.pi) ** -0.5)


def softmax_backward(dp: Tensor, p: Tensor) -> Tensor:
    """The gradient of the scores from that of the probabilities ``p = softmax(s, -1)``."""
    if probe("softmax_backward", p.dtype):
        return torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype)
    return _softmax_backward_plain(dp, p).to(p.dtype)


def gelu_backward(g: Tensor, x: Tensor) -> Tensor:
    """The gradient of ``gelu(x)`` given the output gradient ``g``."""
    if probe("gelu_backward", x.dtype):
        return torch.ops.aten.gelu_backward(g, x)
    return _gelu_backward_plain(g, x).to(x.dtype)


def gelu_(x: Tensor) -> Tensor:
    """GELU in place when nothing needs the input for a gradient."""
    if needs_grad(x) or not probe("gelu_", x.dtype):
        return F.gelu(x)
    return torch.ops.aten.gelu_(x)


# --------------------------------------------------------------------------- linear
def _dense(t: Tensor) -> Tensor:
    """oneDNN falls back to slow reference kernels on unusual strides: plain or transposed only."""
    if t.is_contiguous() or (t.dim() == 2 and t.t().is_contiguous()):
        return t
    return t.contiguous()


def mm(x: Tensor, w: Tensor, b: Tensor | None = None, act: str = "none") -> Tensor:
    """``x @ w.T + b`` (then GELU for ``act="gelu"``) by oneDNN where its probe passed, else by
    ``F.linear``. For callers that already checked :func:`ok` for the dtype and device."""
    if act == "gelu":
        if probe("linear_gelu", x.dtype):
            return torch.ops.mkldnn._linear_pointwise(_dense(x), _dense(w), b, "gelu", [None], "none")
        return F.gelu(mm(x, w, b))
    if probe("linear", x.dtype):
        return torch.ops.mkldnn._linear_pointwise(_dense(x), _dense(w), b, "none", [None], "")
    return F.linear(x, w, b)


class _OneDNNLinear(torch.autograd.Function):
    """x @ w.T + b with oneDNN in both directions (the backward products as linears on transposed views)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return mm(x, w, b)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])  # (rows, out)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = mm(g2, w.t()).view(x.shape)  # (rows, in)
        if ctx.needs_input_grad[1]:  # (out, in); oneDNN copies a transposed left operand first:
            x2 = x.reshape(-1, x.shape[-1])  # transpose whichever side costs less to copy
            rows, (n_out, n_in) = x2.shape[0], w.shape
            if rows * n_out <= rows * n_in + n_out * n_in:
                gw = mm(g2.t(), x2.t())  # g^T x
            else:
                gw = mm(x2.t(), g2.t()).t().contiguous()  # (x^T g)^T
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)  # bf16 sums accumulate in float32 on CPUs; dtype=float32 would first copy g2 to float32
        return gx, gw, gb


def linear(x: Tensor, w: Tensor, b: Tensor | None = None, *, gelu: bool = False,
           residual: Tensor | None = None) -> Tensor:
    """``gelu(x @ w.T + b)`` or ``x @ w.T + b + residual``; x: (..., in), w: (out, in)."""
    if gelu and residual is not None:
        raise ValueError("linear() fuses either gelu or a residual add, not both")
    if not ok("linear", x, w, b, residual):
        y = F.linear(x, w, b)
    elif needs_grad(x, w, b):
        y = _OneDNNLinear.apply(x, w, b)
    elif gelu:
        return mm(x, w, b, "gelu")
    elif residual is not None and residual.shape == x.shape[:-1] + (w.shape[0],) and probe("linear_add", x.dtype):
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual.contiguous(), w, b, "add")
    else:
        y = mm(x, w, b)
    if gelu:
        return F.gelu(y)
    return y if residual is None else y + residual


# --------------------------------------------------------------------------- dropout
def keep_mask(shape, p: float, device) -> tuple[Tensor, float]:
    """(bool mask of kept elements, 1 / keep probability) for dropout with probability ``p``.

    16 random bits per element, four from each random int64: PyTorch's ``bernoulli_`` costs an
    order of magnitude more on CPUs. The drop probability is round(p * 2**16) / 2**16 (within
    1e-5 of p) and the scale matches it exactly."""
    threshold = round(p * 65536)
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None)
    return (bits.view(torch.int16)[:n] >= threshold - 32768).view(shape), 65536 / (65536 - threshold)


def masked(x: Tensor, keep: Tensor) -> Tensor:
    """``x`` where ``keep`` (bool), else 0: a product with the mask's bytes as 0/1, several times
    faster on CPUs than elementwise ops reading a bool tensor (``where``, ``native_dropout_backward``)."""
    return torch.mul(x, keep.view(torch.uint8))


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        mask, ctx.scale = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(mask)
        return masked(x, mask).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        return masked(grad, mask).mul_(ctx.scale), None


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout`` with a cheaper mask on CPUs (same semantics, different random stream); plain
    ``F.dropout`` on other devices and under ``torch.compile``."""
    if not training or p == 0:
        return x
    if p >= 1 or x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, training)
    return _Dropout.apply(x, p)


# --------------------------------------------------------------------------- convolution
def amx_unsafe(x: Tensor, in_per_group: int) -> bool:
    """Whether a bf16 CPU convolution with ``in_per_group`` input channels per group must run in
    float32 instead: oneDNN's AMX bf16 convolution (oneDNN 3.12, PyTorch 2.13) returns wrong sums
    (errors of the order of the outputs themselves) for an even number of input channels per group
    below 16 with 64 or more products per output (tests/test_fast_paths.py checks the shapes). Such
    convolutions are small, so float32 costs little; the result is rounded back to bfloat16."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and in_per_group < 16


def conv_time(x: Tensor, w: Tensor, b: Tensor | None, *, stride: int = 1, padding: int = 0,
              groups: int = 1, gelu: bool = False) -> Tensor:
    """1-D convolution over time of channels-last data, x: (batch, time, channels) -> contiguous
    (batch, time', out_channels), with ``w`` from :func:`conv_weight`: (out, in/groups, 1, kernel)
    in channels-last memory runs as a 2-D convolution of height 1 without any transpose (oneDNN on
    the CPU); (out, in/groups, kernel) runs as a channels-first ``conv1d`` between two transposes."""
    if amx_unsafe(x, w.shape[1]):
        y = conv_time(x.float(), w.float(), None if b is None else b.float(), stride=stride, padding=padding,
                      groups=groups, gelu=gelu)
        return y.to(x.dtype)
    if w.dim() == 3:
        y = F.conv1d(x.transpose(1, 2).contiguous(), w, b, stride=stride, padding=padding, groups=groups)
        return (F.gelu(y) if gelu else y).transpose(1, 2).contiguous()
    x4 = x.transpose(1, 2).unsqueeze(2)  # (batch, channels, 1, time): channels-last strides, no copy
    if not needs_grad(x, w, b) and ok("conv_gelu" if gelu else "conv", x, w, b):
        y = torch.ops.mkldnn._convolution_pointwise(
            x4, w, b, [0, padding], [1, stride], [1, 1], groups, "gelu" if gelu else "none", [None],
            "none" if gelu else "")
    else:
        y = F.conv2d(x4, w, b, stride=(1, stride), padding=(0, padding), groups=groups)
        if gelu:
            y = F.gelu(y)
    return y.squeeze(2).transpose(1, 2).contiguous()  # a no-op when the output is channels-last


def conv_weight(w: Tensor) -> Tensor:
    """(out, in, kernel) in the layout :func:`conv_time` takes on w's device: (out, in, 1, kernel)
    in channels-last memory where :func:`channels_last`, else contiguous."""
    if channels_last(w.device):
        return w.unsqueeze(2).contiguous(memory_format=torch.channels_last)
    return w.contiguous()
