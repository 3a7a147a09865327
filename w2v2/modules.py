"""The parts a wav2vec 2.0 model is built from.

Parameter names mirror Hugging Face's ``Wav2Vec2Model`` so that converting a checkpoint
is a prefix rename (see ``convert.py``). Lengths travel with tensors through every part
that changes the time resolution, so a padded batch gives each utterance the result it
would get alone (the group-norm feature encoder included: its statistics are taken over
valid frames only).

Every part is plain PyTorch, written to be read beside the paper (Baevski et al. 2020, section 2).
``w2v2/fast/`` gives some of these parts a faster forward computing the same function; it is
tested against the forwards here and switched off with ``W2V2_FAST=0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig


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
        x = x.float()  # statistics in float32, as autocast computes nn.GroupNorm
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

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """x: (batch, in_channels, time) -> (batch, out_channels, time'); ``lengths``: valid output frames."""
        x = self.conv(x)
        if self.norm_kind == "group":
            x = self.layer_norm(x, lengths)
        elif self.norm_kind == "layer":
            x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        return F.gelu(x)


class FeatureEncoder(nn.Module):
    """Waveform X (batch, samples) -> latent frames Z (batch, channels, frames): a stack of 1-D
    convolutions (paper: 7 blocks, 512 channels, strides 5,2,2,2,2,2,2, kernels 10,3,3,3,3,2,2:
    one frame per 20 ms with a 25 ms receptive field)."""

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

    def forward(self, wav: Tensor, lengths: Tensor | None = None) -> Tensor:
        """wav: (batch, samples), lengths: (batch,) valid samples or None -> (batch, channels, frames)."""
        x = wav[:, None, :]  # (batch, 1, samples)
        for layer in self.conv_layers:
            if lengths is not None:
                lengths = conv_output_lengths(lengths, (layer.conv.kernel_size[0],), (layer.conv.stride[0],))
            x = layer(x, lengths)
        return x


class FeatureProjection(nn.Module):
    """Z (batch, frames, conv_dim) -> LayerNorm -> Linear -> dropout -> (batch, frames, hidden);
    also returns the normed Z (the quantizer's input in pretraining)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(cfg.conv_dim[-1], eps=cfg.layer_norm_eps)
        self.projection = nn.Linear(cfg.conv_dim[-1], cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.feat_proj_dropout)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        normed = self.layer_norm(z)
        return self.dropout(self.projection(normed)), normed


class PositionalConvEmbedding(nn.Module):
    """Relative position embedding (paper, section 2): a grouped convolution over time with weight
    normalisation over the kernel axis, then GELU; the encoder adds it to its input."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        k = cfg.num_conv_pos_embeddings
        conv = nn.Conv1d(cfg.hidden_size, cfg.hidden_size, kernel_size=k, padding=k // 2,
                         groups=cfg.num_conv_pos_embedding_groups)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)

    def forward(self, x: Tensor) -> Tensor:
        """x: (batch, frames, hidden) -> (batch, frames, hidden)."""
        y = self.conv(x.transpose(1, 2))  # (batch, hidden, frames + 1 for an even kernel)
        return F.gelu(y[:, :, : x.shape[1]]).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017) with dropout on the attention weights."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """x: (batch, time, dim); key_mask: (batch, 1, 1, time) bool, True where attending is allowed."""
        b, t, d = x.shape

        def heads(y: Tensor) -> Tensor:  # (batch, time, dim) -> (batch, heads, time, head_dim)
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))  # heads concatenated: (batch, time, dim)


class FeedForward(nn.Module):
    """Position-wise feed-forward block: Linear -> GELU -> dropout -> Linear -> dropout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate_dropout = nn.Dropout(cfg.activation_dropout)
        self.intermediate_dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output_dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.output_dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x: (batch, time, hidden) -> (batch, time, hidden)."""
        h = self.intermediate_dropout(F.gelu(self.intermediate_dense(x)))  # (batch, time, intermediate)
        return self.output_dropout(self.output_dense(h))


class EncoderLayer(nn.Module):
    """One Transformer block: post-LN (BASE: normalise after each residual add) or pre-LN (stable
    layer norm, LARGE-lv60: normalise each sublayer's input)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_ln = cfg.do_stable_layer_norm
        self.attention = Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.attention_dropout)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """x: (batch, time, hidden) -> (batch, time, hidden)."""
        if self.pre_ln:
            x = x + self.dropout(self.attention(self.layer_norm(x), key_mask))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.dropout(self.attention(x, key_mask)))
        return self.final_layer_norm(x + self.feed_forward(x))


class Encoder(nn.Module):
    """Projected Z (batch, frames, hidden) -> context C, with the positional conv and layerdrop."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_ln = cfg.do_stable_layer_norm
        self.layerdrop = cfg.layerdrop
        self.pos_conv_embed = PositionalConvEmbedding(cfg)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.layerdrop_generator: torch.Generator | None = None  # set by the trainer (see Trainer.forward_backward)

    def forward(self, x: Tensor, frame_mask: Tensor | None = None, num_layers: int | None = None,
                output_hidden_states: bool = False) -> tuple[Tensor, list[Tensor] | None]:
        """x: (batch, frames, hidden); frame_mask: (batch, frames) bool, True on valid frames.

        Returns (last_hidden_state, hidden_states or None) where hidden_states[0] is the input to
        the first layer and hidden_states[i] the output of layer i (before the final LayerNorm of
        pre-LN). ``num_layers`` stops early (for feature extraction)."""
        key_mask = None
        if frame_mask is not None:
            x = x.masked_fill(~frame_mask[..., None], 0.0)
            if not bool(frame_mask.all()):
                key_mask = frame_mask[:, None, None, :]  # (batch, 1, 1, frames): padded keys get no weight
        x = x + self.pos_conv_embed(x)
        if not self.pre_ln:
            x = self.layer_norm(x)
        x = self.dropout(x)
        hidden = [x] if output_hidden_states else None
        layers = self.layers if num_layers is None else self.layers[:num_layers]
        drop = self.layerdrop if self.training else 0.0
        for layer in layers:
            if not (drop > 0 and torch.rand((), generator=self.layerdrop_generator) < drop):
                x = layer(x, key_mask)
            if hidden is not None:
                hidden.append(x)
        if self.pre_ln and (num_layers is None or num_layers == len(self.layers)):
            x = self.layer_norm(x)
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
        logits = self.weight_proj(z).view(b, t, self.groups, self.vars).float()
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
