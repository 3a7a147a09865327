"""Training kernels of the fast path: autograd functions whose forward and backward run as oneDNN
products (:mod:`w2v2.fast.onednn`), for CPU tensors where :func:`~w2v2.fast.onednn.ok` holds.
Each one equals the plain PyTorch computation it replaces (tests/test_fast_paths.py); the wrappers
below run the plain computation wherever the kernels do not apply."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .onednn import (amx_unsafe, conv_time, conv_weight, gelu_, gelu_backward, keep_mask, linear, masked, mkl_optimized,
                     mm, needs_grad, ok, softmax_backward)


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, dropout_p: float = 0.0,
              block: int = 512, per_head_from: int = 1024, flash: bool | None = None) -> Tensor:
    """softmax(q k^T / sqrt(head_dim)) v; q, k, v: (batch, heads, time, head_dim) -> (batch, time, heads * head_dim).

    key_mask: (batch, 1, 1, time) bool, True where attending is allowed. Without autograd on a
    CPU: PyTorch's flash attention (SDPA) where ``flash`` (default: where its products get MKL's
    optimized code, :func:`~w2v2.fast.onednn.mkl_optimized`), else plain products and a softmax
    over blocks of ``block`` queries, in q's dtype with the softmax accumulating in float32; all
    heads at once up to ``per_head_from`` frames (few, large operations: robust when other
    processes compete for the cores), head by head with oneDNN beyond, where a block of all
    heads' scores would spill out of cache. The flash kernel never writes the (time x time)
    scores out and fuses the softmax into its products; with MKL's generic code (AMD CPUs) the
    blocked products are faster all the same. With autograd: :class:`AttentionTrain`; elsewhere SDPA."""
    b, h, t, d = q.shape
    if needs_grad(q, k, v) and ok("linear", q, k, v):
        return AttentionTrain.apply(q, k, v, key_mask, dropout_p)
    if flash is None:
        flash = mkl_optimized()
    if dropout_p > 0 or needs_grad(q, k, v) or flash or not ok("linear", q, k, v):
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
                s = mm(q[i, j, s0: s0 + block], k[i, j])  # (queries, keys)
                if blocked is not None:
                    s.masked_fill_(blocked[i, 0], float("-inf"))
                out[i, s0: s0 + block, j] = mm(torch.softmax(s, -1), vt[i, j])
    return out.view(b, t, h * d)


class AttentionTrain(torch.autograd.Function):
    """Attention with dropout on the probabilities, head by head with oneDNN products in both
    directions (PyTorch's CPU SDPA falls back to MKL batched products and bernoulli_ here).
    Saves q, k, v, the probabilities and the dropout mask, as SDPA's math path does.

    The (time x time) matrices only ever enter a product as oneDNN's right operand (plain or
    transposed, no copy): products with a (time x time) left factor are computed transposed (a
    transposed left operand is copied first, which costs more than the product). The dropout
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
                s = mm(q[i, j] * d ** -0.5, k[i, j], None)  # (queries, keys)
                if blocked is not None:
                    s.masked_fill_(blocked, float("-inf"))
                p = probs[i, j]
                torch.softmax(s, -1, out=p) if s.dtype == p.dtype else p.copy_(torch.softmax(s, -1))
                if keep is None:
                    out[i, :, j] = mm(p, v[i, j].t(), None)
                else:
                    out[i, :, j] = mm(masked(p, keep[i, j]), v[i, j].t(), None).mul_(ctx.drop_scale)
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
                dp = mm(dy, v[i, j], None)  # dy v^T: (queries, keys)
                if keep is None:
                    dv[i, j] = mm(dy.t(), p.t(), None).t()  # (dy^T p)^T = p^T dy
                else:
                    dv[i, j] = mm(dy.t(), masked(p, keep[i, j]).t(), None).t().mul_(ctx.drop_scale)
                    dp = masked(dp, keep[i, j])  # the scale goes with d^-0.5 below (softmax backward is linear in dp)
                ds = softmax_backward(dp, p).mul_(ctx.drop_scale * d ** -0.5)
                dq[i, j] = mm(ds, k[i, j].t(), None)  # ds k
                dk[i, j] = mm(q[i, j].t(), ds.t(), None).t()  # (q^T ds)^T = ds^T q
        return dq, dk, dv, None, None


class ConvTimeTrain(torch.autograd.Function):
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
        return F.gelu(pre) if gelu else pre

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
        for t0 in reversed(range(0, t_out, ConvTimeTrain.chunk)):
            n = min(ConvTimeTrain.chunk, t_out - t0)
            g = grad[:, t0: t0 + n]
            if ctx.gelu:
                g = gelu_backward(g, pre[:, t0: t0 + n])
            g = g.reshape(bsz * n, cout)  # (rows, out)
            if gb is not None:
                gb += g.sum(0, dtype=torch.float32)
            if need_w:  # windows of k frames, stride s: (rows, kernel*in)
                u = x[:, s * t0:].as_strided((bsz, n, k * cin), (t_in * cin, s * cin, 1)).reshape(bsz * n, k * cin)
                gw += mm(g.t(), u.t(), None).float()
            if need_x:
                du = mm(g, w_cols, None).view(bsz, n, k, cin)
                for j in sorted(range(k), key=lambda j: j >= s):  # col2im: taps j < s write, the rest add
                    frames = dx[:, s * t0 + j: s * (t0 + n - 1) + j + 1: s]
                    frames.copy_(du[:, :, j]) if j < s else frames.add_(du[:, :, j])
        gw = gw.view(cout, k, cin).permute(0, 2, 1).to(w.dtype) if need_w else None
        return dx, gw, None if gb is None else gb.to(grad.dtype), None, None


def conv_time_train(x: Tensor, w: Tensor, b: Tensor | None, *, stride: int, gelu: bool = False) -> Tensor:
    """:func:`conv_time` (then GELU) with w (out, in, kernel), differentiable; for the feature encoder."""
    if ok("linear", x, w, b) and needs_grad(x, w, b):
        return ConvTimeTrain.apply(x, w, b, stride, gelu)
    y = conv_time(x, conv_weight(w), b, stride=stride)
    return F.gelu(y) if gelu else y


class FirstConvTrain(torch.autograd.Function):
    """h = gelu(u @ w^T + b) per utterance: the feature encoder's first convolution with its group
    norm folded in. u (batch, frames, kernel): the waveform windows (no gradient); w (batch, out,
    kernel) and b (batch, out): each utterance's folded weights.

    Forward: oneDNN products with bias and GELU fused, chunk by chunk; saves u, w and b only, not
    the (batch, frames, out) pre-activation, the largest activation of the encoder. Backward recomputes
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
            for t0 in range(0, t, FirstConvTrain.chunk):
                t1 = min(t, t0 + FirstConvTrain.chunk)
                out[i, t0:t1] = mm(u[i, t0:t1], w[i], b[i], "gelu")
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        u, w, b = ctx.saved_tensors
        n, t = u.shape[0], u.shape[1]
        dw = torch.zeros(n, w.shape[2], w.shape[1], dtype=torch.float32, device=w.device)  # (batch, kernel, out)
        db = torch.zeros(n, w.shape[1], dtype=torch.float32, device=w.device)
        for i in range(n):
            for t0 in range(0, t, FirstConvTrain.chunk):
                t1 = min(t, t0 + FirstConvTrain.chunk)
                uc = u[i, t0:t1]
                g = gelu_backward(grad[i, t0:t1], mm(uc, w[i], b[i]))  # (frames, out)
                dw[i] += mm(uc.t(), g.t(), None).float()  # u^T g: (kernel, out)
                db[i] += g.sum(0, dtype=torch.float32)
        return None, dw.transpose(1, 2).to(w.dtype), db.to(b.dtype)


def first_conv_gelu(u: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """gelu(u @ w^T + b) per utterance; u (batch, frames, kernel), w (batch, out, kernel), b (batch, out).
    With autograd for w and b (not u), :class:`FirstConvTrain`."""
    if ok("linear", u, w, b) and needs_grad(w, b) and not u.requires_grad:
        return FirstConvTrain.apply(u, w, b)
    if u.shape[0] == 1:
        return linear(u, w[0], b[0], gelu=True)
    return gelu_(torch.baddbmm(b[:, None, :], u, w.mT))


class GroupedConvTrain(torch.autograd.Function):
    """y = conv(x) over time with stride 1, zero padding ``padding`` on both sides and ``groups``,
    channels-last x (batch, time, in) -> (batch, time', out); w (out, in/groups, kernel). For the
    positional convolution (kernel 128, 16 groups in BASE).

    Backward as two forward convolutions, which oneDNN runs faster than PyTorch's convolution
    backward for this shape (docs/performance.md): the input gradient convolves the output
    gradient with the kernel flipped in time and transposed within each group; the weight gradient is a grouped convolution of the
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
            if amx_unsafe(xq, bsz):  # the utterances are this convolution's input channels per group
                xq, wq = xq.float(), wq.float()
            dw = F.conv2d(xq.contiguous(memory_format=torch.channels_last),
                          wq.contiguous(memory_format=torch.channels_last), groups=g)  # (in/g, out, 1, kernel)
            dw = dw.squeeze(2).permute(1, 0, 2).contiguous().to(w.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = grad.sum((0, 1))  # accumulates in float32 (see _OneDNNLinear)
        return dx, dw, db, None, None


def grouped_conv_time_train(x: Tensor, w: Tensor, b: Tensor | None, *, padding: int, groups: int) -> Tensor:
    """:func:`conv_time` with w (out, in/groups, kernel), stride 1, differentiable; for the positional convolution."""
    if ok("linear", x, w, b) and needs_grad(x, w, b):
        return GroupedConvTrain.apply(x, w, b, padding, groups)
    return conv_time(x, conv_weight(w), b, padding=padding, groups=groups)
