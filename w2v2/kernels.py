"""Fast primitives for the model's hot path, each with a plain-PyTorch fallback.

On x86 CPUs PyTorch runs float32 ``F.linear``/``torch.mm`` through MKL, which on AMD processors
takes a slower code path; oneDNN (``torch.ops.mkldnn``) runs the same products about twice as
fast, forward and backward, and fuses GELU or a residual add into the GEMM. Convolutions on the
CPU run channels-last (``(batch, channels, 1, time)`` views of ``(batch, time, channels)`` memory),
which oneDNN handles without reordering, so the feature encoder never transposes; on other devices
they run channels first, cuDNN's native layout (see :data:`CHANNELS_LAST`).

Every function here returns what its ``torch.nn.functional`` counterpart returns, to float
rounding; set ``W2V2_DISABLE_ONEDNN=1`` to use the plain PyTorch ops instead (for debugging).
Weights derived from parameters (a dtype cast, the stacked q/k/v matrix, a weight-normed kernel)
are cached per module and rebuilt when a parameter changes (see :func:`cached`); under autograd
they are recomputed on every call, so gradients reach the parameters.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ENABLED = os.environ.get("W2V2_DISABLE_ONEDNN", "") in ("", "0")  # False: plain PyTorch ops only


def onednn_platform(machine: str | None = None) -> bool:
    """Whether this CPU architecture gets the oneDNN kernels: x86 only, where they were chosen and
    measured against PyTorch's own ops. On ARM CPUs (Apple silicon, Graviton) PyTorch's own ops
    run, as in transformers: there they use other libraries (Accelerate, Arm Compute Library) that
    these kernels were never measured against."""
    return (machine or platform.machine()).lower() in ("x86_64", "amd64")


_HAS_OPS = onednn_platform() and hasattr(torch.ops, "mkldnn") and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# Device types whose convolutions over time run as channels-last images of height 1 (oneDNN's fast
# layout: x86 CPUs). Elsewhere (CUDA, MPS, ARM CPUs) they run as channels-first ``conv1d``, as
# transformers runs them. On an H200, our first bf16 call in a process cost ~1.8 s more than
# transformers' with the channels-last layout (cuDNN may build kernels at run time for such
# unusual shapes: the suspect, not yet measured apart; see benchmarks/cuda_check.py --parts cold).
CHANNELS_LAST = {"cpu"} if _HAS_OPS else set()


def onednn_ok(*tensors: Tensor) -> bool:
    """Whether oneDNN kernels apply: CPU tensors of one dtype (float32, or bfloat16 where supported),
    outside ``torch.compile`` (whose compiler fuses the plain ops itself)."""
    if torch.compiler.is_compiling() or not ENABLED or not _HAS_OPS or not torch.backends.mkldnn.is_available() or not torch.backends.mkldnn.enabled:
        return False
    t0 = tensors[0]
    if t0.device.type != "cpu" or t0.dtype not in (torch.float32, torch.bfloat16) or t0.numel() == 0:
        return False
    if torch.is_autocast_enabled("cpu"):  # autocast rewrites F.* ops only; let it do its job
        return False
    if any(t is not None and t.dtype != t0.dtype for t in tensors):
        return False
    return t0.dtype == torch.float32 or _bf16_kernels()


@functools.cache
def _bf16_kernels() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------- derived weights
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def cached(owner: nn.Module, key, params: tuple[Tensor, ...], make: Callable[[], Tensor]) -> Tensor:
    """``make()``, remembered on ``owner`` until one of ``params`` changes (in place, or moved).

    Under autograd (a parameter requires grad and grad mode is on) ``make()`` runs every call so
    that its result is part of the graph, and under ``torch.compile``, whose graph computes it."""
    if needs_grad(*params) or torch.compiler.is_compiling():
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


# --------------------------------------------------------------------------- linear
def _dense(t: Tensor) -> Tensor:
    """oneDNN falls back to slow reference kernels on unusual strides: plain or transposed only."""
    if t.is_contiguous() or (t.dim() == 2 and t.t().is_contiguous()):
        return t
    return t.contiguous()


def _lp(x: Tensor, w: Tensor, b: Tensor | None, act: str = "none") -> Tensor:
    x, w = _dense(x), _dense(w)
    if act == "gelu":
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [None], "none")
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [None], "")


class _OneDNNLinear(torch.autograd.Function):
    """x @ w.T + b with oneDNN in both directions (the backward products as linears on transposed views)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _lp(x, w, b)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])  # (rows, out)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _lp(g2, w.t(), None).view(x.shape)  # (rows, in)
        if ctx.needs_input_grad[1]:  # (out, in); oneDNN copies a transposed left operand first:
            x2 = x.reshape(-1, x.shape[-1])  # transpose whichever side costs less to copy
            rows, (n_out, n_in) = x2.shape[0], w.shape
            if rows * n_out <= rows * n_in + n_out * n_in:
                gw = _lp(g2.t(), x2.t(), None)  # g^T x
            else:
                gw = _lp(x2.t(), g2.t(), None).t().contiguous()  # (x^T g)^T
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)  # bf16 sums accumulate in float32 on CPUs; dtype=float32 would first copy g2 to float32
        return gx, gw, gb


def linear(x: Tensor, w: Tensor, b: Tensor | None = None, *, gelu: bool = False,
           residual: Tensor | None = None) -> Tensor:
    """``gelu(x @ w.T + b)`` or ``x @ w.T + b + residual``; x: (..., in), w: (out, in)."""
    if gelu and residual is not None:
        raise ValueError("linear() fuses either gelu or a residual add, not both")
    if not onednn_ok(x, w, b, residual):
        y = F.linear(x, w, b)
    elif needs_grad(x, w, b):
        y = _OneDNNLinear.apply(x, w, b)
    elif gelu:
        return _lp(x, w, b, "gelu")
    elif residual is not None and residual.shape == x.shape[:-1] + (w.shape[0],):
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual.contiguous(), w, b, "add")
    else:
        y = _lp(x, w, b)
    if gelu:
        return F.gelu(y)
    return y if residual is None else y + residual


# --------------------------------------------------------------------------- dropout
def keep_mask(shape, p: float, device) -> tuple[Tensor, float]:
    """(bool mask of kept elements, 1 / keep probability) for dropout with probability ``p``.

    16 random bits per element, four from each random int64: PyTorch's bernoulli_ costs 10x more
    on CPUs. The drop probability is round(p * 2**16) / 2**16 (within 1e-5 of p) and the scale
    matches it exactly."""
    threshold = round(p * 65536)
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None)
    return (bits.view(torch.int16)[:n] >= threshold - 32768).view(shape), 65536 / (65536 - threshold)


def masked(x: Tensor, keep: Tensor) -> Tensor:
    """``x`` where ``keep`` (bool), else 0: a product with the mask's bytes as 0/1, 3-4x faster
    on CPUs than any elementwise op reading a bool tensor (``where``, ``native_dropout_backward``)."""
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
    """``F.dropout`` with a faster mask on CPUs (same semantics, different random stream); plain
    ``F.dropout`` on other devices and under ``torch.compile``."""
    if not training or p == 0:
        return x
    if p >= 1 or x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, training)
    return _Dropout.apply(x, p)


class Dropout(nn.Dropout):
    """``nn.Dropout`` through :func:`dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


# --------------------------------------------------------------------------- attention
def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, dropout_p: float = 0.0,
              block: int = 512, per_head_from: int = 1024) -> Tensor:
    """softmax(q k^T / sqrt(head_dim)) v; q, k, v: (batch, heads, time, head_dim) -> (batch, time, heads * head_dim).

    key_mask: (batch, 1, 1, time) bool, True where attending is allowed. Without autograd on a
    CPU this is plain products and a softmax over blocks of ``block`` queries, in q's dtype with
    the softmax accumulating in float32: all heads at once up to ``per_head_from`` frames (few,
    large operations: robust when other processes compete for the cores), head by head with
    oneDNN beyond, where a block of all heads' scores would spill out of cache (2.5-3x faster at
    60 s). Both beat PyTorch's CPU flash attention, whose bf16 kernel is no faster than its float32
    one without AMX. With autograd: :class:`_AttentionTrain`; elsewhere SDPA."""
    b, h, t, d = q.shape
    if needs_grad(q, k, v) and onednn_ok(q, k, v):
        return _AttentionTrain.apply(q, k, v, key_mask, dropout_p)
    if dropout_p > 0 or needs_grad(q, k, v) or not onednn_ok(q, k, v):
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)
        return y.transpose(1, 2).reshape(b, t, h * d)
    out = torch.empty(b, t, h, d, dtype=q.dtype, device=q.device)
    blocked = None if key_mask is None else ~key_mask  # (batch, 1, 1, time)
    q = q * d ** -0.5
    if t < per_head_from:
        kt = k.transpose(-1, -2)
        for s0 in range(0, t, block):
            s = torch.matmul(q[:, :, s0: s0 + block], kt)  # (batch, heads, queries, keys)
            if blocked is not None:
                s.masked_fill_(blocked, float("-inf"))
            out[:, s0: s0 + block] = torch.matmul(torch.softmax(s, -1), v).transpose(1, 2)
        return out.view(b, t, h * d)
    q, k, vt = q.contiguous(), k.contiguous(), v.transpose(-1, -2).contiguous()  # vt: (batch, heads, d, time)
    for i in range(b):
        for j in range(h):
            for s0 in range(0, t, block):
                s = _lp(q[i, j, s0: s0 + block], k[i, j], None)  # (queries, keys)
                if blocked is not None:
                    s.masked_fill_(blocked[i, 0], float("-inf"))
                out[i, s0: s0 + block, j] = _lp(torch.softmax(s, -1), vt[i, j], None)
    return out.view(b, t, h * d)


class _AttentionTrain(torch.autograd.Function):
    """Attention with dropout on the probabilities, head by head with oneDNN products in both
    directions (PyTorch's CPU SDPA falls back to MKL batched products and bernoulli_ here).
    Saves q, k, v, the probabilities and the dropout mask, as SDPA's math path does.

    The (time x time) matrices only ever enter a product as oneDNN's right operand (plain or
    transposed, no copy): products with a (time x time) left factor are computed transposed (a
    transposed left operand is copied first, 3x the product's time at 500 frames). The dropout
    mask multiplies through :func:`masked`; its 1/(1-p) scale goes onto the small
    (time x head_dim) results, so bf16 never rounds the scale itself."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, dropout_p: float) -> Tensor:
        b, h, t, d = q.shape
        probs = torch.empty(b, h, t, t, dtype=q.dtype, device=q.device)
        keep, ctx.drop_scale = keep_mask((b, h, t, t), dropout_p, q.device) if dropout_p > 0 else (None, 1.0)
        out = torch.empty(b, t, h, d, dtype=q.dtype, device=q.device)
        for i in range(b):
            blocked = None if key_mask is None else ~key_mask[i, 0]  # (1, time)
            for j in range(h):
                s = _lp(q[i, j] * d ** -0.5, k[i, j], None)  # (queries, keys)
                if blocked is not None:
                    s.masked_fill_(blocked, float("-inf"))
                p = probs[i, j]
                torch.softmax(s, -1, out=p) if s.dtype == p.dtype else p.copy_(torch.softmax(s, -1))
                if keep is None:
                    out[i, :, j] = _lp(p, v[i, j].t(), None)
                else:
                    out[i, :, j] = _lp(masked(p, keep[i, j]), v[i, j].t(), None).mul_(ctx.drop_scale)
        ctx.save_for_backward(q, k, v, probs, keep)
        return out.view(b, t, h * d)

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, probs, keep = ctx.saved_tensors
        b, h, t, d = q.shape
        grad = grad.view(b, t, h, d)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for i in range(b):
            for j in range(h):
                dy = grad[i, :, j].contiguous()  # (queries, head_dim)
                p = probs[i, j]
                dp = _lp(dy, v[i, j], None)  # dy v^T: (queries, keys)
                if keep is None:
                    dv[i, j] = _lp(dy.t(), p.t(), None).t()  # (dy^T p)^T = p^T dy
                else:
                    dv[i, j] = _lp(dy.t(), masked(p, keep[i, j]).t(), None).t().mul_(ctx.drop_scale)
                    dp = masked(dp, keep[i, j])  # the scale goes with d^-0.5 below (softmax backward is linear in dp)
                ds = torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype).mul_(ctx.drop_scale * d ** -0.5)
                dq[i, j] = _lp(ds, k[i, j].t(), None)  # ds k
                dk[i, j] = _lp(q[i, j].t(), ds.t(), None).t()  # (q^T ds)^T = ds^T q
        return dq, dk, dv, None, None


# --------------------------------------------------------------------------- convolution
def _amx_unsafe(x: Tensor, in_per_group: int) -> bool:
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
    if _amx_unsafe(x, w.shape[1]):
        y = conv_time(x.float(), w.float(), None if b is None else b.float(), stride=stride, padding=padding,
                      groups=groups, gelu=gelu)
        return y.to(x.dtype)
    if w.dim() == 3:
        y = F.conv1d(x.transpose(1, 2).contiguous(), w, b, stride=stride, padding=padding, groups=groups)
        return (F.gelu(y) if gelu else y).transpose(1, 2).contiguous()
    x4 = x.transpose(1, 2).unsqueeze(2)  # (batch, channels, 1, time): channels-last strides, no copy
    if onednn_ok(x, w, b) and not needs_grad(x, w, b):
        y = torch.ops.mkldnn._convolution_pointwise(
            x4, w, b, [0, padding], [1, stride], [1, 1], groups, "gelu" if gelu else "none", [None],
            "none" if gelu else "")
    else:
        y = F.conv2d(x4, w, b, stride=(1, stride), padding=(0, padding), groups=groups)
        if gelu:
            y = F.gelu(y)
    return y.squeeze(2).transpose(1, 2).contiguous()  # a no-op when the output is channels-last


class _ConvTimeTrain(torch.autograd.Function):
    """y = [gelu](conv(x)) over time for channels-last x (batch, time, in), w (out, in, kernel).

    Forward: oneDNN's channels-last convolution. Backward: matrix products over chunks of output
    frames, with GELU's derivative applied chunk by chunk; oneDNN's own channels-last convolution
    backward is several times slower than its channels-first one, and chunks keep every temporary
    small and in cache. The input gradient is written, not accumulated into zeros: chunks run last
    to first, the taps j < stride of a chunk tile its frames, the taps j >= stride add on top."""

    chunk = 512  # output frames per backward chunk

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, stride: int, gelu: bool) -> Tensor:
        pre = conv_time(x, conv_weight(w), b, stride=stride)
        ctx.save_for_backward(x, w, pre if gelu else None)
        ctx.stride, ctx.has_bias, ctx.gelu = stride, b is not None, gelu
        return torch.ops.aten.gelu(pre) if gelu else pre

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w, pre = ctx.saved_tensors
        s, (cout, cin, k), (bsz, t_in, _), t_out = ctx.stride, w.shape, x.shape, grad.shape[1]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        w_cols = w.permute(2, 1, 0).reshape(k * cin, cout)  # (kernel*in, out): tap-major like the windows
        dx = torch.empty_like(x) if need_x else None
        if need_x:
            dx[:, s * t_out:].zero_()  # frames no tap j < stride covers
        gw = torch.zeros(cout, k * cin, dtype=torch.float32, device=x.device) if need_w else None
        gb = torch.zeros(cout, dtype=torch.float32, device=x.device) if need_b and ctx.has_bias else None
        for t0 in reversed(range(0, t_out, _ConvTimeTrain.chunk)):
            n = min(_ConvTimeTrain.chunk, t_out - t0)
            g = grad[:, t0: t0 + n]
            if ctx.gelu:
                g = torch.ops.aten.gelu_backward(g, pre[:, t0: t0 + n])
            g = g.reshape(bsz * n, cout)  # (rows, out)
            if gb is not None:
                gb += g.sum(0, dtype=torch.float32)
            if need_w:  # windows of k frames, stride s: (rows, kernel*in)
                u = x[:, s * t0:].as_strided((bsz, n, k * cin), (t_in * cin, s * cin, 1)).reshape(bsz * n, k * cin)
                gw += _lp(g.t(), u.t(), None).float()
            if need_x:
                du = _lp(g, w_cols, None).view(bsz, n, k, cin)
                for j in sorted(range(k), key=lambda j: j >= s):  # col2im: taps j < s write, the rest add
                    frames = dx[:, s * t0 + j: s * (t0 + n - 1) + j + 1: s]
                    frames.copy_(du[:, :, j]) if j < s else frames.add_(du[:, :, j])
        gw = gw.view(cout, k, cin).permute(0, 2, 1).to(w.dtype) if need_w else None
        return dx, gw, None if gb is None else gb.to(grad.dtype), None, None


def conv_time_train(x: Tensor, w: Tensor, b: Tensor | None, *, stride: int, gelu: bool = False) -> Tensor:
    """:func:`conv_time` (then GELU) with w (out, in, kernel), differentiable; for the feature encoder."""
    if onednn_ok(x, w, b) and needs_grad(x, w, b):
        return _ConvTimeTrain.apply(x, w, b, stride, gelu)
    y = conv_time(x, conv_weight(w), b, stride=stride)
    return F.gelu(y) if gelu else y


class _FirstConvTrain(torch.autograd.Function):
    """h = gelu(u @ w^T + b) per utterance: the feature encoder's first convolution with its group
    norm folded in. u (batch, frames, kernel): the waveform windows (no gradient); w (batch, out,
    kernel) and b (batch, out): each utterance's folded weights.

    Forward: oneDNN products with bias and GELU fused, chunk by chunk; saves u, w and b only, not
    the (batch, frames, out) pre-activation (105 MB for 8 x 4 s of `small`). Backward recomputes
    the pre-activation chunk by chunk (a product over 10 taps, cheap) while it is in cache, applies
    GELU's derivative there and accumulates the weight and bias gradients: no full-size
    pre-activation or GELU-gradient tensor ever exists."""

    chunk = 2048  # frames

    @staticmethod
    def forward(ctx, u: Tensor, w: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(u, w, b)
        n, t = u.shape[0], u.shape[1]
        out = torch.empty(n, t, w.shape[1], dtype=u.dtype, device=u.device)
        for i in range(n):
            for t0 in range(0, t, _FirstConvTrain.chunk):
                t1 = min(t, t0 + _FirstConvTrain.chunk)
                out[i, t0:t1] = _lp(u[i, t0:t1], w[i], b[i], "gelu")
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        u, w, b = ctx.saved_tensors
        n, t = u.shape[0], u.shape[1]
        dw = torch.zeros(n, w.shape[2], w.shape[1], dtype=torch.float32, device=w.device)  # (batch, kernel, out)
        db = torch.zeros(n, w.shape[1], dtype=torch.float32, device=w.device)
        for i in range(n):
            for t0 in range(0, t, _FirstConvTrain.chunk):
                t1 = min(t, t0 + _FirstConvTrain.chunk)
                uc = u[i, t0:t1]
                g = torch.ops.aten.gelu_backward(grad[i, t0:t1], _lp(uc, w[i], b[i]))  # (frames, out)
                dw[i] += _lp(uc.t(), g.t(), None).float()  # u^T g: (kernel, out)
                db[i] += g.sum(0, dtype=torch.float32)
        return None, dw.transpose(1, 2).to(w.dtype), db.to(b.dtype)


def first_conv_gelu(u: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """gelu(u @ w^T + b) per utterance; u (batch, frames, kernel), w (batch, out, kernel), b (batch, out).
    With autograd for w and b (not u), :class:`_FirstConvTrain`."""
    if onednn_ok(u, w, b) and needs_grad(w, b) and not u.requires_grad:
        return _FirstConvTrain.apply(u, w, b)
    if u.shape[0] == 1:
        return linear(u, w[0], b[0], gelu=True)
    return gelu_(torch.baddbmm(b[:, None, :], u, w.mT))


class _GroupedConvTrain(torch.autograd.Function):
    """y = conv(x) over time with stride 1, zero padding ``padding`` on both sides and ``groups``,
    channels-last x (batch, time, in) -> (batch, time', out); w (out, in/groups, kernel). For the
    positional convolution (kernel 128, 16 groups in BASE).

    Backward as two forward convolutions, which oneDNN runs several times faster than PyTorch's
    convolution backward here (BASE 2 x 10 s: 136 instead of ~220 ms in fp32, 54 instead of
    ~145 ms in bf16): the input gradient convolves the output gradient with the kernel flipped in
    time and transposed within each group; the weight gradient is a grouped convolution of the
    padded input (input channel as batch, (group, utterance) as channels) by the output gradient
    ((group, output channel) as output channels, utterance as input channels, time as kernel)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, padding: int, groups: int) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.padding, ctx.groups, ctx.has_bias = padding, groups, b is not None
        return conv_time(x, conv_weight(w), b, padding=padding, groups=groups)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        p, g, (cout, cg, k), (bsz, t, _) = ctx.padding, ctx.groups, w.shape, x.shape
        grad = grad.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            wf = w.view(g, cout // g, cg, k).transpose(1, 2).flip(-1).reshape(g * cg, cout // g, k)
            dx = conv_time(grad, conv_weight(wf), None, padding=k - 1 - p, groups=g)  # (batch, time, in)
        if ctx.needs_input_grad[1]:
            xp = F.pad(x.transpose(1, 2), (p, p))  # (batch, in, time + 2p)
            xq = xp.reshape(bsz, g, cg, -1).permute(2, 1, 0, 3).reshape(cg, g * bsz, 1, -1)
            wq = grad.permute(2, 0, 1).unsqueeze(2)  # (out, batch, 1, time')
            if _amx_unsafe(xq, bsz):  # the utterances are this convolution's input channels per group
                xq, wq = xq.float(), wq.float()
            dw = F.conv2d(xq.contiguous(memory_format=torch.channels_last),
                          wq.contiguous(memory_format=torch.channels_last), groups=g)  # (in/g, out, 1, kernel)
            dw = dw.squeeze(2).permute(1, 0, 2).contiguous().to(w.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = grad.sum((0, 1))  # accumulates in float32 (see _OneDNNLinear)
        return dx, dw, db, None, None


def grouped_conv_time_train(x: Tensor, w: Tensor, b: Tensor | None, *, padding: int, groups: int) -> Tensor:
    """:func:`conv_time` with w (out, in/groups, kernel), stride 1, differentiable; for the positional convolution."""
    if onednn_ok(x, w, b) and needs_grad(x, w, b):
        return _GroupedConvTrain.apply(x, w, b, padding, groups)
    return conv_time(x, conv_weight(w), b, padding=padding, groups=groups)


def conv_weight(w: Tensor) -> Tensor:
    """(out, in, kernel) in the layout :func:`conv_time` takes on w's device: (out, in, 1, kernel)
    in channels-last memory where :data:`CHANNELS_LAST` lists the device type, else contiguous."""
    if w.device.type in CHANNELS_LAST:
        return w.unsqueeze(2).contiguous(memory_format=torch.channels_last)
    return w.contiguous()


def gelu_(x: Tensor) -> Tensor:
    """In place when nothing needs the input for a gradient."""
    if needs_grad(x):
        return F.gelu(x)
    return torch.ops.aten.gelu_(x)
