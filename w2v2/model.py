"""wav2vec 2.0 composed from finished parts (``modules.py``) by one builder, :func:`build_model`.

    waveform X (batch, samples)
      -> FeatureEncoder          -> Z  (batch, frames, conv_dim)       20 ms per frame
      -> FeatureProjection       -> (batch, frames, hidden)            [masked frames <- mask embedding]
      -> Encoder                 -> C  (batch, frames, hidden)
      -> lm_head (CTC models)    -> logits (batch, frames, vocab)
    and for pretraining Z -> GumbelQuantizer -> Q, with project_hid(C) and project_q(Q).

Precision: ``model.set_precision("fp32" | "bf16" | "auto")`` (default ``"fp32"``). In bf16 the
forward runs under ``torch.autocast``; parameters and outputs are float32 either way.
``model.infer(...)`` is ``forward`` for inference: eval mode, no autograd bookkeeping.

Every part is plain PyTorch; :func:`build_model` gives the parts the fast forwards of
``w2v2/fast/`` (same parameters, same function; ``W2V2_FAST=0`` switches them off).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import fast
from . import precision as _precision
from .config import ModelConfig
from .modules import Encoder, FeatureEncoder, FeatureProjection, GumbelQuantizer, lengths_to_mask
from .vocab import Vocabulary


@dataclass
class ModelOutput:
    lengths: Tensor  # (batch,) valid frames per item
    last_hidden_state: Tensor  # C: (batch, frames, hidden)
    logits: Tensor | None = None  # (batch, frames, vocab) for CTC models; float32
    hidden_states: list[Tensor] | None = None  # [encoder input, layer 1, ..., layer N], each (batch, frames, hidden)
    extract_features: Tensor | None = None  # layer-normed Z: (batch, frames, conv_dim)


@dataclass
class PretrainingOutput:
    lengths: Tensor  # (batch,)
    projected_context: Tensor  # project_hid(C): (batch, frames, proj_dim)
    projected_quantized: Tensor  # project_q(Q): (batch, frames, proj_dim)
    code_probs: Tensor  # softmax over codebook entries: (batch, frames, G, V)
    code_indices: Tensor  # chosen entry per group: (batch, frames, G)
    features_pen: Tensor  # mean squared Z (scalar, over valid frames)
    extra: dict = field(default_factory=dict)


class GradScale(torch.autograd.Function):
    """Identity forward, gradient multiplied by ``scale`` (fairseq's GradMultiply)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class Wav2Vec2(nn.Module):
    def __init__(self, cfg: ModelConfig, with_quantizer: bool = False, vocab: Vocabulary | None = None):
        super().__init__()
        if vocab is not None and cfg.vocab_size != len(vocab):
            cfg = cfg.replace(vocab_size=len(vocab))
        self.config = cfg
        self.vocab = vocab
        self.feature_extractor = FeatureEncoder(cfg)
        self.feature_projection = FeatureProjection(cfg)
        self.masked_spec_embed = nn.Parameter(torch.empty(cfg.hidden_size).uniform_())
        self.encoder = Encoder(cfg)
        self.quantizer = self.project_hid = self.project_q = None
        if with_quantizer:
            self.quantizer = GumbelQuantizer(cfg)
            self.project_hid = nn.Linear(cfg.hidden_size, cfg.proj_codevector_dim)
            self.project_q = nn.Linear(cfg.codevector_dim, cfg.proj_codevector_dim)
        self.final_dropout = nn.Dropout(cfg.final_dropout)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size) if cfg.vocab_size else None
        self.feature_grad_scale = 1.0  # set by training (0.1 for pretraining, 0 freezes)
        self.precision = "fp32"  # see set_precision

    # ------------------------------------------------------------------ precision
    def set_precision(self, precision: str) -> "Wav2Vec2":
        """Compute in ``"fp32"``, ``"bf16"`` or ``"auto"`` (bf16 where the hardware multiplies it
        natively: CUDA, or CPUs with AMX-BF16/AVX512-BF16). Parameters stay float32; bf16 runs
        the forward under ``torch.autocast``."""
        self.precision = _precision.check_precision(precision)
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        return _precision.resolve(self.precision, self.device)

    def autocast(self):
        """The forward's precision: bf16 autocast, or (fp32) whatever autocast the caller entered."""
        dtype = self.compute_dtype
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def clear_cache(self) -> "Wav2Vec2":
        """Free derived weights the fast path keeps (bf16 copies, stacked q/k/v); rebuilt on demand."""
        fast.clear_cache(self)
        return self

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.masked_spec_embed.device

    def num_frames(self, lengths: Tensor) -> Tensor:
        """Samples -> latent frames."""
        return self.feature_extractor.output_lengths(lengths)

    def normalize(self, wav: Tensor, lengths: Tensor | None) -> Tensor:
        """Zero mean, unit variance per utterance over its valid samples (HF's do_normalize; fairseq's
        layer norm over the waveform when ``config.normalize_eps`` is fairseq's 1e-5)."""
        if not self.config.do_normalize:
            return wav
        wav, eps = wav.float(), self.config.normalize_eps
        if lengths is None:
            mean = wav.mean(-1, keepdim=True)
            var = wav.var(-1, keepdim=True, unbiased=False)
            return (wav - mean) / torch.sqrt(var + eps)
        mask = lengths_to_mask(lengths, wav.shape[-1]).to(wav.dtype)
        n = lengths.clamp(min=1)[:, None].to(wav.dtype)
        mean = (wav * mask).sum(-1, keepdim=True) / n
        var = (((wav - mean) * mask) ** 2).sum(-1, keepdim=True) / n
        return ((wav - mean) / torch.sqrt(var + eps)) * mask

    def _check_input(self, wav: Tensor, lengths: Tensor | None) -> Tensor | None:
        if wav.dim() != 2:
            raise ValueError(f"waveforms must be (batch, samples), got shape {tuple(wav.shape)}")
        if wav.shape[1] < self.config.receptive_field:
            raise ValueError(
                f"audio of {wav.shape[1]} samples is shorter than one frame ({self.config.receptive_field} samples)"
            )
        if lengths is None:
            return None
        lengths = torch.as_tensor(lengths, device=wav.device).long()
        if lengths.shape != (wav.shape[0],):
            raise ValueError(f"lengths must be (batch,) = ({wav.shape[0]},), got shape {tuple(lengths.shape)}")
        if bool((lengths > wav.shape[1]).any()):
            raise ValueError(f"a length exceeds the padded size {wav.shape[1]}: {lengths.tolist()}")
        if bool((lengths == wav.shape[1]).all()):
            return None  # nothing is padded: take the fast path
        return lengths

    def extract(self, wav: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """X -> (Z raw (batch, frames, conv_dim), frame lengths (batch,), frame mask (batch, frames) or None)."""
        lengths = self._check_input(wav, lengths)
        x = self.normalize(wav.float(), lengths)  # float32 whatever the input dtype
        frozen = self.training and self.feature_grad_scale == 0
        with torch.no_grad() if frozen else contextlib.nullcontext():  # frozen: the lean no-grad path
            z = self.feature_extractor(x, lengths)
        if self.feature_grad_scale not in (0.0, 1.0) and self.training:
            z = GradScale.apply(z, self.feature_grad_scale)
        z = z.transpose(1, 2)  # (batch, frames, conv_dim)
        frames = z.shape[1]
        if lengths is None:
            flen = torch.full((wav.shape[0],), frames, dtype=torch.long, device=wav.device)
            return z, flen, None
        flen = self.num_frames(lengths)
        return z, flen, lengths_to_mask(flen, frames)

    # ------------------------------------------------------------------ inference
    def forward(self, waveforms: Tensor, lengths: Tensor | None = None, *,
                mask_time_indices: Tensor | None = None, mask_channel_indices: Tensor | None = None,
                output_hidden_states: bool = False, num_layers: int | None = None) -> ModelOutput:
        """waveforms: float (batch, samples) at 16 kHz, zero-padded; lengths: (batch,) valid samples.

        ``mask_time_indices`` (batch, frames) bool replaces those frames by the mask embedding
        and ``mask_channel_indices`` (batch, hidden) bool zeroes those channels of every frame
        (SpecAugment-style masking in fine-tuning; both act on the projected features, the
        Transformer's input, as in fairseq and Hugging Face). ``num_layers`` runs only the
        first N Transformer layers (features for downstream tasks)."""
        with self.autocast():
            z, flen, fmask = self.extract(waveforms, lengths)
            x, normed = self.feature_projection(z)  # (batch, frames, hidden), (batch, frames, conv_dim)
            if mask_time_indices is not None:
                x = torch.where(mask_time_indices[..., None], self.masked_spec_embed.to(x.dtype), x)
            if mask_channel_indices is not None:
                if mask_channel_indices.shape != (x.shape[0], x.shape[2]):
                    raise ValueError(f"mask_channel_indices must be (batch, hidden) = {(x.shape[0], x.shape[2])}, "
                                     f"got {tuple(mask_channel_indices.shape)}")
                x = x.masked_fill(mask_channel_indices[:, None, :], 0.0)
            c, hidden = self.encoder(x, fmask, num_layers=num_layers, output_hidden_states=output_hidden_states)
            logits = None
            if self.lm_head is not None and num_layers is None:
                logits = self.lm_head(self.final_dropout(c)).float()  # (batch, frames, vocab)
        if hidden is not None:
            hidden = [h.float() for h in hidden]
        return ModelOutput(lengths=flen, last_hidden_state=c.float(), logits=logits,
                           hidden_states=hidden, extract_features=normed.float())

    def infer(self, waveforms: Tensor, lengths: Tensor | None = None, **kwargs) -> ModelOutput:
        """:meth:`forward` for inference: in eval mode and ``torch.inference_mode`` (restores the mode after)."""
        was_training = self.training  # switch only when needed: each switch walks every submodule
        if was_training:
            self.eval()
        try:
            with torch.inference_mode():
                return self(waveforms, lengths, **kwargs)
        finally:
            if was_training:
                self.train()

    # ------------------------------------------------------------------ pretraining
    def forward_pretraining(self, waveforms: Tensor, lengths: Tensor | None,
                            mask_time_indices: Tensor) -> PretrainingOutput:
        """Context and quantized targets for every frame; the loss picks the masked ones."""
        if self.quantizer is None:
            raise ValueError("this model has no quantizer: build it with with_quantizer=True to pretrain")
        with self.autocast():
            z, flen, fmask = self.extract(waveforms, lengths)
            valid = fmask if fmask is not None else torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)
            features_pen = z.float().pow(2)[valid].mean()
            x, normed = self.feature_projection(z)
            x = torch.where(mask_time_indices[..., None], self.masked_spec_embed.to(x.dtype), x)
            c, _ = self.encoder(x, fmask)
            q, probs, idx = self.quantizer(normed)
            return PretrainingOutput(
                lengths=flen,
                projected_context=self.project_hid(c).float(),
                projected_quantized=self.project_q(q.to(c.dtype)).float(),
                code_probs=probs,
                code_indices=idx,
                features_pen=features_pen,
            )

    # ------------------------------------------------------------------ conversions
    def without_quantizer(self) -> "Wav2Vec2":
        self.quantizer = self.project_hid = self.project_q = None
        return self

    def with_ctc_head(self, vocab: Vocabulary) -> "Wav2Vec2":
        """Attach a fresh CTC head for ``vocab`` (fine-tuning); the quantizer is dropped."""
        self.without_quantizer()
        self.vocab = vocab
        self.config = self.config.replace(vocab_size=len(vocab))
        self.lm_head = nn.Linear(self.config.hidden_size, len(vocab)).to(self.device)
        return self


def init_weights(model: Wav2Vec2) -> Wav2Vec2:
    """fairseq/HF initialisation: normal(0, 0.02) linears, Kaiming convs, pos-conv per the paper."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not name.endswith("quantizer.weight_proj"):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv1d) and "pos_conv_embed" not in name:
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    pos = model.encoder.pos_conv_embed.conv
    k, cin = pos.kernel_size[0], pos.in_channels // pos.groups
    std = (4.0 / (k * cin)) ** 0.5
    with torch.no_grad():
        w = torch.empty_like(pos.weight).normal_(0.0, std)
        pos.parametrizations.weight.original1.copy_(w)
        pos.parametrizations.weight.original0.copy_(w.norm(dim=(0, 1), keepdim=True))
        nn.init.zeros_(pos.bias)
    return model


def build_model(cfg: ModelConfig, *, with_quantizer: bool = False, vocab: Vocabulary | None = None,
                init: bool = True) -> Wav2Vec2:
    """The one builder: a randomly initialised model for ``cfg``, with the fast forwards installed
    (:func:`w2v2.fast.install`; ``Wav2Vec2(cfg)`` alone is the plain model)."""
    model = Wav2Vec2(cfg, with_quantizer=with_quantizer, vocab=vocab)
    return fast.install(init_weights(model) if init else model)
