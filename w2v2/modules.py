"""The parts a wav2vec 2.0 model is built from.

Parameter names mirror Hugging Face's ``Wav2Vec2Model`` so that converting a checkpoint
is a prefix rename (see ``convert.py``). Lengths travel with tensors through every part
that changes the time resolution, so a padded batch gives each utterance the result it
would get alone (the group-norm feature encoder included: its statistics are taken over
valid frames only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .kernels import (Dropout, attention, cached, conv_time, conv_time_train, conv_weight, first_conv_gelu,
                      gelu_, grouped_conv_time_train, linear, needs_grad, weight_as)


def lengths_to_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(batch,) valid lengths -> (batch, max_len) bool, True on valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def conv_output_lengths(lengths: Tensor | int, kernels, strides) -> Tensor | int:
    """Valid output frames of a stack of unpadded 1-D convolutions, for a tensor of sample counts
    or one count (an int: plain arithmetic, no tensor, which ``torch.compile`` traces as a constant)."""
    for k, s in zip(kernels, strides):
        lengths = (lengths - k) // s + 1  # floor division, also for tensors
    return lengths.clamp(min=0) if isinstance(lengths, Tensor) else max(lengths, 0)


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm with one group per channel whose statistics skip padded frames.

    Equal to ``nn.GroupNorm(C, C)`` on an unpadded input; on a padded batch each item is
    normalised with the mean and variance of its own valid frames (fairseq and
    transformers normalise over the padding too, so batched results differ there).
    """

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:  # x: (batch, channels, time)
        if lengths is None:
            return super().forward(x)
        mask = lengths_to_mask(lengths, x.shape[-1])[:, None, :].to(x.dtype)  # (batch, 1, time)
        count = lengths.clamp(min=1)[:, None, None].to(x.dtype)
        mean = (x * mask).sum(-1, keepdim=True) / count
        var = (((x - mean) * mask) ** 2).sum(-1, keepdim=True) / count
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight[None, :, None] + self.bias[None, :, None]


class ConvLayer(nn.Module):
    """Conv1d -> optional norm (group: channel-wise over time; layer: over channels) -> GELU."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int, bias: bool, norm: str | None):
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, kernel_size=kernel, stride=stride, bias=bias)
        self.norm_kind = norm
        if norm == "group":
            self.layer_norm = MaskedGroupNorm(out_dim, out_dim, affine=True)
        elif norm == "layer":
            self.layer_norm = nn.LayerNorm(out_dim, elementwise_affine=True)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:  # (batch, channels, time)
        x = self.conv(x)
        if self.norm_kind == "group":
            x = self.layer_norm(x, lengths)
        elif self.norm_kind == "layer":
            x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        return F.gelu(x)


def stats_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the folded group norm's statistics: float64, or float32 where the device has no
    float64 (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


class FeatureEncoder(nn.Module):
    """Waveform (batch, samples) -> latent frames Z (batch, channels, frames).

    ``forward`` computes what :meth:`reference_forward` (the layer-by-layer conv stack) computes,
    restructured for speed and memory:

    * the group norm after conv 0 (BASE) is a per-channel affine map whose statistics follow
      analytically from the (kernel x kernel) covariance of the waveform windows, so it is folded
      into conv 0's weights, which then run as one matrix product over the windows with GELU fused;
    * every later conv reads and writes ``(batch, time, channels)`` memory; on the CPU it runs
      channels-last (oneDNN), no transposes; elsewhere channels first (``kernels.CHANNELS_LAST``);
    * without autograd the stack runs in time chunks of ``chunk_frames`` output frames for one
      utterance, ``chunk_frames / batch`` (at least 16) for a batch (each chunk reads the waveform
      span it depends on), so the large early activations never exist for the whole input: memory
      stays flat in the input length and the working set stays in cache (a batch of 8 x 4 s runs
      1.25x faster in chunks of 32 frames than in one piece on a 2-core EPYC).
    """

    chunk_frames = {"cpu": 256}  # output frames per chunk (one utterance) by device type; others: 4096

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kernels, self.strides = cfg.conv_kernel, cfg.conv_stride
        self.norm = cfg.feat_extract_norm
        layers, in_dim = [], 1
        for i, (dim, k, s) in enumerate(zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride)):
            if cfg.feat_extract_norm == "layer":
                norm = "layer"
            else:
                norm = "group" if i == 0 else None
            layers.append(ConvLayer(in_dim, dim, k, s, cfg.conv_bias, norm))
            in_dim = dim
        self.conv_layers = nn.ModuleList(layers)
        self.frame_stride, self.receptive_field = cfg.frame_stride, cfg.receptive_field

    def output_lengths(self, lengths: Tensor) -> Tensor:
        return conv_output_lengths(lengths, self.kernels, self.strides)

    def reference_forward(self, wav: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Layer by layer, channels first: (batch, samples) -> (batch, channels, frames)."""
        x = wav[:, None, :]  # (batch, 1, samples)
        for layer in self.conv_layers:
            if lengths is not None:
                lengths = conv_output_lengths(lengths, (layer.conv.kernel_size[0],), (layer.conv.stride[0],))
            x = layer(x, lengths)
        return x

    def forward(self, wav: Tensor, lengths: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """wav: float (batch, samples); computes in ``dtype`` (default: wav's). Returns Z as a
        (batch, channels, frames) view of (batch, frames, channels) memory."""
        dtype = dtype or wav.dtype
        w0, b0 = self._first_conv(wav, lengths, dtype)
        if needs_grad(*self.parameters()):
            z = self._stack(wav, w0, b0, dtype)
        else:
            z = self._chunked(wav, w0, b0, dtype)
        return z.transpose(1, 2)

    def _first_conv(self, wav: Tensor, lengths: Tensor | None, dtype) -> tuple[Tensor, Tensor | None]:
        """Conv 0 as (weight (batch or 1, channels, kernel), bias (batch or 1, channels)), with the
        group norm folded in: per utterance, mean and variance of conv 0's output over the valid
        frames are mean(U) W^T and diag(W cov(U) W^T) for the windows U (computed in float64; float32 on
        devices without float64: Apple MPS)."""
        layer = self.conv_layers[0]
        w, b = layer.conv.weight[:, 0, :], layer.conv.bias  # (channels, kernel), (channels,)
        if layer.norm_kind != "group":
            return w[None].to(dtype), None if b is None else b[None].to(dtype)
        k, s = self.kernels[0], self.strides[0]
        acc = stats_dtype(wav.device)
        with torch.no_grad():
            u = wav.unfold(-1, k, s).to(acc)  # (batch, frames0, kernel)
            if lengths is None:
                mean_u = u.mean(1)
                uc = u - mean_u[:, None]
                cov = uc.mT @ uc / u.shape[1]
            else:
                n = conv_output_lengths(lengths, (k,), (s,))
                mask = lengths_to_mask(n, u.shape[1])[..., None].to(acc)  # (batch, frames0, 1)
                count = n.clamp(min=1).to(acc)[:, None]
                mean_u = (u * mask).sum(1) / count
                uc = (u - mean_u[:, None]) * mask
                cov = uc.mT @ uc / count[..., None]  # (batch, kernel, kernel)
        gn, wd = layer.layer_norm, w.to(acc)
        mean = mean_u @ wd.T  # (batch, channels); a conv bias cancels out
        var = ((wd @ cov) * wd).sum(-1)  # (batch, channels)
        scale = gn.weight.to(acc) / torch.sqrt(var + gn.eps)
        return (wd * scale[..., None]).to(dtype), (gn.bias.to(acc) - mean * scale).to(dtype)

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
            w = cached(layer, ("conv_w", dtype), (conv.weight,), lambda c=conv: conv_weight(c.weight.to(dtype)))
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


def layer_norm(ln: nn.LayerNorm, x: Tensor) -> Tensor:
    """``ln(x)`` computed in x's dtype (statistics in float32 inside the kernel)."""
    return F.layer_norm(x, ln.normalized_shape, weight_as(ln, "weight", x.dtype), weight_as(ln, "bias", x.dtype),
                        ln.eps)


def project(lin: nn.Linear, x: Tensor, *, gelu: bool = False, residual: Tensor | None = None,
            dropout: Dropout | None = None) -> Tensor:
    """``residual + dropout(lin(x))`` (or ``gelu(lin(x))``) in x's dtype; GELU and the residual add
    are fused into the matrix product when the dropout is inactive."""
    w, b = weight_as(lin, "weight", x.dtype), weight_as(lin, "bias", x.dtype)
    if dropout is not None and dropout.training and dropout.p > 0:
        y = dropout(linear(x, w, b, gelu=gelu))
        return y if residual is None else residual + y
    return linear(x, w, b, gelu=gelu, residual=residual)


class FeatureProjection(nn.Module):
    """Z (batch, frames, conv_dim) -> LayerNorm -> Linear -> (batch, frames, hidden); also returns the normed Z."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(cfg.conv_dim[-1], eps=cfg.layer_norm_eps)
        self.projection = nn.Linear(cfg.conv_dim[-1], cfg.hidden_size)
        self.dropout = Dropout(cfg.feat_proj_dropout)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        normed = layer_norm(self.layer_norm, z)
        return project(self.projection, normed, dropout=self.dropout), normed


class PositionalConvEmbedding(nn.Module):
    """Convolutional relative position embedding: grouped conv over time, weight norm over the kernel axis."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        k = cfg.num_conv_pos_embeddings
        conv = nn.Conv1d(cfg.hidden_size, cfg.hidden_size, kernel_size=k, padding=k // 2,
                         groups=cfg.num_conv_pos_embedding_groups)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.remove = 1 if k % 2 == 0 else 0  # an even kernel with padding k//2 yields one extra frame

    def forward(self, x: Tensor) -> Tensor:  # (batch, frames, hidden), channels-last throughout
        wn = self.conv.parametrizations.weight
        b, padding, groups = weight_as(self.conv, "bias", x.dtype), self.conv.padding[0], self.conv.groups
        if needs_grad(x, wn.original0, wn.original1, b):
            y = F.gelu(grouped_conv_time_train(x, self.conv.weight.to(x.dtype), b, padding=padding, groups=groups))
        else:
            w = cached(self, ("conv_w", x.dtype), (wn.original0, wn.original1),
                        lambda: conv_weight(self.conv.weight.to(x.dtype)))  # weight norm: once per change
            y = conv_time(x, w, b, padding=padding, groups=groups, gelu=True)
        return y[:, : x.shape[1]]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def qkv_weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """q, k and v projections stacked into one (3*dim, dim) matrix: one product instead of three."""
        ps = (self.q_proj, self.k_proj, self.v_proj)
        w = cached(self, ("w", dtype), tuple(p.weight for p in ps), lambda: torch.cat([p.weight for p in ps]).to(dtype))
        b = cached(self, ("b", dtype), tuple(p.bias for p in ps), lambda: torch.cat([p.bias for p in ps]).to(dtype))
        return w, b

    def forward(self, x: Tensor, key_mask: Tensor | None = None, *, residual: Tensor | None = None,
                dropout: Dropout | None = None) -> Tensor:
        """x: (batch, time, dim); key_mask: (batch, 1, 1, time) bool, True where attending is allowed.
        Returns ``residual + dropout(attention(x))`` (each term optional)."""
        b, t, d = x.shape
        qkv = linear(x, *self.qkv_weights(x.dtype)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, time, head_dim)
        y = attention(q, k, v, key_mask, self.dropout if self.training else 0.0)  # (batch, time, dim)
        return project(self.out_proj, y, residual=residual, dropout=dropout)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate_dropout = Dropout(cfg.activation_dropout)
        self.intermediate_dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output_dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.output_dropout = Dropout(cfg.hidden_dropout)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``residual + dropout(W2 dropout(gelu(W1 x)))``; x: (batch, time, hidden)."""
        h = self.intermediate_dropout(project(self.intermediate_dense, x, gelu=True))
        return project(self.output_dense, h, residual=residual, dropout=self.output_dropout)


class EncoderLayer(nn.Module):
    """One Transformer block; post-LN (BASE) or pre-LN (stable layer norm, LARGE-lv60)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_ln = cfg.do_stable_layer_norm
        self.attention = Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.attention_dropout)
        self.dropout = Dropout(cfg.hidden_dropout)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        if self.pre_ln:
            x = self.attention(layer_norm(self.layer_norm, x), key_mask, residual=x, dropout=self.dropout)
            return self.feed_forward(layer_norm(self.final_layer_norm, x), residual=x)
        x = layer_norm(self.layer_norm, self.attention(x, key_mask, residual=x, dropout=self.dropout))
        return layer_norm(self.final_layer_norm, self.feed_forward(x, residual=x))


class Encoder(nn.Module):
    """Projected Z (batch, frames, hidden) -> context C, with the positional conv and layerdrop."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_ln = cfg.do_stable_layer_norm
        self.layerdrop = cfg.layerdrop
        self.pos_conv_embed = PositionalConvEmbedding(cfg)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: Tensor, frame_mask: Tensor | None = None, num_layers: int | None = None,
                output_hidden_states: bool = False) -> tuple[Tensor, list[Tensor] | None]:
        """Returns (last_hidden_state, hidden_states or None) where hidden_states[0] is the input to
        the first layer and hidden_states[i] the output of layer i (before the final LayerNorm of
        pre-LN). ``num_layers`` stops early (for feature extraction)."""
        key_mask = None
        if frame_mask is not None:
            x = x.masked_fill(~frame_mask[..., None], 0.0)
            if not bool(frame_mask.all()):
                key_mask = frame_mask[:, None, None, :]
        x = x + self.pos_conv_embed(x)
        if not self.pre_ln:
            x = layer_norm(self.layer_norm, x)
        x = self.dropout(x)
        hidden = [x] if output_hidden_states else None
        layers = self.layers if num_layers is None else self.layers[:num_layers]
        for layer in layers:
            if not (self.training and self.layerdrop > 0 and torch.rand(()) < self.layerdrop):
                x = layer(x, key_mask)
            if hidden is not None:
                hidden.append(x)
        if self.pre_ln and (num_layers is None or num_layers == len(self.layers)):
            x = layer_norm(self.layer_norm, x)
        return x, hidden


class GumbelQuantizer(nn.Module):
    """Product quantizer: G codebooks of V entries; Gumbel softmax (hard, straight-through) in
    training, argmax at eval.

    codevectors: (1, G*V, codevector_dim // G) as in Hugging Face checkpoints.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.groups, self.vars = cfg.num_codevector_groups, cfg.num_codevectors_per_group
        self.codevectors = nn.Parameter(torch.empty(1, self.groups * self.vars, cfg.codevector_dim // self.groups))
        self.weight_proj = nn.Linear(cfg.conv_dim[-1], self.groups * self.vars)
        self.temperature = 2.0
        nn.init.uniform_(self.codevectors)
        nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.weight_proj.bias)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z: (batch, frames, conv_dim) -> (quantized (batch, frames, codevector_dim),
        soft probs (batch, frames, G, V) for perplexity, code indices (batch, frames, G))."""
        b, t, _ = z.shape
        logits = project(self.weight_proj, z).view(b, t, self.groups, self.vars).float()
        idx = logits.argmax(-1)  # (batch, frames, G)
        if self.training:
            onehot = F.gumbel_softmax(logits, tau=self.temperature, hard=True, dim=-1)
            idx = onehot.argmax(-1)
        else:
            onehot = F.one_hot(idx, self.vars).to(logits.dtype)
        soft = logits.softmax(-1)
        onehot = onehot.to(self.codevectors.dtype)
        codebook = self.codevectors.view(self.groups, self.vars, -1)  # (G, V, d)
        q = torch.einsum("btgv,gvd->btgd", onehot, codebook).reshape(b, t, -1)
        return q, soft, idx
