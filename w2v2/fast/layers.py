"""Fast forwards for the parts of ``w2v2/modules.py``: subclasses that add no parameter and no
buffer (state dicts are unchanged), each computing its parent's function restructured for speed and
memory, and calling the parent's plain forward wherever it does not apply (:func:`compute_dtype`).

* The feature encoder folds the group norm after conv 0 into conv 0's weights (its statistics
  follow analytically from the covariance of the waveform windows), runs the later convolutions
  on ``(batch, time, channels)`` memory (channels-last on x86 CPUs: no transposes), and without
  autograd in chunks of time, so the early, 64-fold oversampled activations never exist for the
  whole input.
* A Transformer layer projects q, k and v as one product, fuses GELU and the residual adds into
  the products (oneDNN post-ops on the CPU), runs attention by PyTorch's flash kernel or in
  blocks (:func:`~w2v2.fast.training.attention` picks by CPU), and draws dropout masks cheaply.
* In bfloat16 the weights are cast once and cached until they change; activations stay bfloat16
  end to end, with norms and softmax accumulating in float32 inside their kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modules import (EncoderLayer, FeatureEncoder, FeatureProjection, PositionalConvEmbedding, conv_output_lengths,
                       lengths_to_mask)
from . import onednn
from .onednn import conv_time, conv_weight, dropout, gelu_, linear, needs_grad
from .state import autocast_off, cached, compute_dtype, weight_as
from .training import attention, conv_time_train, first_conv_gelu, grouped_conv_time_train


def layer_norm(ln: nn.LayerNorm, x: Tensor) -> Tensor:
    """``ln(x)`` computed in x's dtype (statistics in float32 inside the kernel)."""
    return F.layer_norm(x, ln.normalized_shape, weight_as(ln, "weight", x.dtype), weight_as(ln, "bias", x.dtype),
                        ln.eps)


def project(lin: nn.Linear, x: Tensor, *, gelu: bool = False, residual: Tensor | None = None,
            drop: nn.Dropout | None = None) -> Tensor:
    """``residual + drop(lin(x))`` (or ``gelu(lin(x))``) in x's dtype; GELU and the residual add
    are fused into the matrix product when the dropout is inactive."""
    w, b = weight_as(lin, "weight", x.dtype), weight_as(lin, "bias", x.dtype)
    if drop is not None and drop.training and drop.p > 0:
        y = dropout(linear(x, w, b, gelu=gelu), drop.p, True)
        return y if residual is None else residual + y
    return linear(x, w, b, gelu=gelu, residual=residual)


def stats_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the folded group norm's statistics: float64, or float32 where the device has no
    float64 (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def fold_group_norm(layer: nn.Module, u: Tensor, n: Tensor | None, dtype) -> tuple[Tensor, Tensor]:
    """Conv 0 and its group norm as one per-utterance (weight (batch, channels, kernel), bias
    (batch, channels)) in ``dtype``, from conv 0's input windows u (batch, frames0, kernel) and the
    valid frame counts n (batch,) or None: per utterance, mean and variance of conv 0's output over
    the valid frames are mean(U) W^T and diag(W cov(U) W^T), computed in u's dtype."""
    acc = u.dtype
    with torch.no_grad():
        if n is None:
            mean_u = u.mean(1)
            uc = u - mean_u[:, None]
            cov = uc.transpose(1, 2) @ uc / u.shape[1]  # (transpose: mT has no ONNX export)
        else:
            mask = lengths_to_mask(n, u.shape[1])[..., None].to(acc)  # (batch, frames0, 1)
            count = n.clamp(min=1).to(acc)[:, None]
            mean_u = (u * mask).sum(1) / count
            uc = (u - mean_u[:, None]) * mask
            cov = uc.transpose(1, 2) @ uc / count[..., None]  # (batch, kernel, kernel)
    gn, wd = layer.layer_norm, layer.conv.weight[:, 0, :].to(acc)
    mean = mean_u @ wd.T  # (batch, channels); a conv bias cancels out
    var = ((wd @ cov) * wd).sum(-1)  # (batch, channels)
    scale = gn.weight.to(acc) / torch.sqrt(var + gn.eps)
    return (wd * scale[..., None]).to(dtype), (gn.bias.to(acc) - mean * scale).to(dtype)


class FastFeatureEncoder(FeatureEncoder):
    """:class:`FeatureEncoder` with the group norm folded into conv 0, channels-last convolutions
    and, without autograd, chunks of ``chunk_frames`` output frames for one utterance
    (``chunk_frames / batch``, at least 16, for a batch); each chunk reads the waveform span it
    depends on. Returns Z as a (batch, channels, frames) view of (batch, frames, channels) memory."""

    chunk_frames = {"cpu": 256}  # output frames per chunk (one utterance) by device type; others: 4096

    def forward(self, wav: Tensor, lengths: Tensor | None = None) -> Tensor:
        dtype = compute_dtype(wav)
        if dtype is None:
            return super().forward(wav, lengths)
        with autocast_off(wav):
            w0, b0 = self._first_conv(wav, lengths, dtype)
            if needs_grad(*self.parameters()):
                z = self._stack(wav, w0, b0, dtype)
            else:
                z = self._chunked(wav, w0, b0, dtype)
        return z.transpose(1, 2)

    def _first_conv(self, wav: Tensor, lengths: Tensor | None, dtype) -> tuple[Tensor, Tensor | None]:
        """Conv 0 as (weight (batch or 1, channels, kernel), bias (batch or 1, channels)), with the
        group norm folded in (:func:`fold_group_norm`)."""
        layer = self.conv_layers[0]
        w, b = layer.conv.weight[:, 0, :], layer.conv.bias  # (channels, kernel), (channels,)
        if layer.norm_kind != "group":
            return w[None].to(dtype), None if b is None else b[None].to(dtype)
        k, s = self.kernels[0], self.strides[0]
        with torch.no_grad():
            u = wav.unfold(-1, k, s).to(stats_dtype(wav.device))  # (batch, frames0, kernel)
        n = None if lengths is None else conv_output_lengths(lengths, (k,), (s,))
        return fold_group_norm(layer, u, n, dtype)

    def _stack(self, wav: Tensor, w0: Tensor, b0: Tensor | None, dtype) -> Tensor:
        """(batch, samples) -> (batch, frames, channels)."""
        layer = self.conv_layers[0]
        u = wav.unfold(-1, self.kernels[0], self.strides[0]).to(dtype)  # (batch, frames0, kernel)
        if layer.norm_kind == "group":
            h = first_conv_gelu(u, w0, b0)
        else:
            h = linear(u, w0[0], None if b0 is None else b0[0])
            if layer.norm_kind == "layer":
                h = gelu_(layer_norm(layer.layer_norm, h))
            else:
                h = gelu_(h)
        for layer in self.conv_layers[1:]:
            conv, stride = layer.conv, layer.conv.stride[0]
            b = weight_as(conv, "bias", dtype)
            if needs_grad(conv.weight, b) and layer.norm_kind == "layer":
                h = F.gelu(layer_norm(layer.layer_norm, conv_time_train(h, conv.weight.to(dtype), b, stride=stride)))
                continue
            if needs_grad(conv.weight, b):
                h = conv_time_train(h, conv.weight.to(dtype), b, stride=stride, gelu=True)
                continue
            w = cached(layer, ("conv_w", dtype, onednn.channels_last(wav.device)), (conv.weight,),
                       lambda c=conv: conv_weight(c.weight.to(dtype)))
            if layer.norm_kind == "layer":
                h = gelu_(layer_norm(layer.layer_norm, conv_time(h, w, b, stride=stride)))
            else:
                h = conv_time(h, w, b, stride=stride, gelu=True)
        return h

    def _chunked(self, wav: Tensor, w0: Tensor, b0: Tensor | None, dtype) -> Tensor:
        """:meth:`_stack` over spans of the waveform, ``chunk_frames`` output frames at a time."""
        frames = conv_output_lengths(wav.shape[1], self.kernels, self.strides)
        step = self.chunk_frames.get(wav.device.type, 4096)
        step = max(min(16, step), step // max(1, wav.shape[0]))
        if frames <= step:
            return self._stack(wav, w0, b0, dtype)
        out = torch.empty(wav.shape[0], frames, self.conv_layers[-1].conv.out_channels, dtype=dtype,
                          device=wav.device)
        for f0 in range(0, frames, step):
            f1 = min(f0 + step, frames)
            span = wav[:, f0 * self.frame_stride: (f1 - 1) * self.frame_stride + self.receptive_field]
            out[:, f0:f1] = self._stack(span, w0, b0, dtype)
        return out


class FastFeatureProjection(FeatureProjection):
    """:class:`FeatureProjection` in the compute dtype, the product by oneDNN on x86 CPUs."""

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        dtype = compute_dtype(z)
        if dtype is None:
            return super().forward(z)
        with autocast_off(z):
            normed = layer_norm(self.layer_norm, z.to(dtype))
            return project(self.projection, normed, drop=self.dropout), normed


class FastPositionalConvEmbedding(PositionalConvEmbedding):
    """:class:`PositionalConvEmbedding` on (batch, frames, hidden) memory without transposes, GELU
    fused, the weight-normed kernel computed once per parameter change."""

    def forward(self, x: Tensor) -> Tensor:
        dtype = compute_dtype(x)
        if dtype is None:
            return super().forward(x)
        with autocast_off(x):
            x = x.to(dtype)
            wn = self.conv.parametrizations.weight
            b, padding, groups = weight_as(self.conv, "bias", dtype), self.conv.padding[0], self.conv.groups
            if needs_grad(x, wn.original0, wn.original1, b):
                y = F.gelu(grouped_conv_time_train(x, self.conv.weight.to(dtype), b, padding=padding, groups=groups))
            else:
                w = cached(self, ("conv_w", dtype, onednn.channels_last(x.device)), (wn.original0, wn.original1),
                           lambda: conv_weight(self.conv.weight.to(dtype)))
                y = conv_time(x, w, b, padding=padding, groups=groups, gelu=True)
            return y[:, : x.shape[1]]


class FastEncoderLayer(EncoderLayer):
    """:class:`EncoderLayer` with q/k/v as one product, GELU and the residual adds fused into the
    products where no dropout sits between, and attention by :func:`attention`."""

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        dtype = compute_dtype(x)
        if dtype is None:
            return super().forward(x, key_mask)
        with autocast_off(x):
            x = x.to(dtype)
            if self.pre_ln:
                x = self._attention(layer_norm(self.layer_norm, x), key_mask, residual=x)
                return self._feed_forward(layer_norm(self.final_layer_norm, x), residual=x)
            x = layer_norm(self.layer_norm, self._attention(x, key_mask, residual=x))
            return layer_norm(self.final_layer_norm, self._feed_forward(x, residual=x))

    def _qkv_weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """q, k and v projections stacked into one (3*dim, dim) matrix: one product instead of three."""
        ps = (self.attention.q_proj, self.attention.k_proj, self.attention.v_proj)
        w = cached(self.attention, ("w", dtype), tuple(p.weight for p in ps),
                   lambda: torch.cat([p.weight for p in ps]).to(dtype))
        b = cached(self.attention, ("b", dtype), tuple(p.bias for p in ps),
                   lambda: torch.cat([p.bias for p in ps]).to(dtype))
        return w, b

    def _attention(self, x: Tensor, key_mask: Tensor | None, residual: Tensor) -> Tensor:
        """``residual + dropout(attention(x))``; x: (batch, time, dim)."""
        att, (b, t, d) = self.attention, x.shape
        qkv = linear(x, *self._qkv_weights(x.dtype)).view(b, t, 3, att.heads, d // att.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, time, head_dim)
        y = attention(q, k, v, key_mask, att.dropout if att.training else 0.0)  # (batch, time, dim)
        return project(att.out_proj, y, residual=residual, drop=self.dropout)

    def _feed_forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """``residual + dropout(W2 dropout(gelu(W1 x)))``; x: (batch, time, hidden)."""
        ff = self.feed_forward
        drop = ff.intermediate_dropout
        h = dropout(project(ff.intermediate_dense, x, gelu=True), drop.p, drop.training)
        return project(ff.output_dense, h, residual=residual, drop=ff.output_dropout)


class FastDropout(nn.Dropout):
    """:class:`nn.Dropout` with a cheaper mask on CPUs (same semantics, another random stream)."""

    def forward(self, x: Tensor) -> Tensor:
        if compute_dtype(x) is None:
            return super().forward(x)
        return dropout(x, self.p, self.training)


FAST = {FeatureEncoder: FastFeatureEncoder, FeatureProjection: FastFeatureProjection,
        PositionalConvEmbedding: FastPositionalConvEmbedding, EncoderLayer: FastEncoderLayer, nn.Dropout: FastDropout}


def install(model: nn.Module) -> nn.Module:
    """Give every part of ``model`` that has one its fast forward, in place (the class of the part
    becomes the fast subclass: parameters, names and state dict stay as they are)."""
    for m in model.modules():
        fast = FAST.get(type(m))
        if fast is not None:
            m.__class__ = fast
    return model
