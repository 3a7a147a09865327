"""Checkpoint conversion: one declarative rename table per format.

Converters talk only to configs and state dicts. Each table is a list of
``(regex on the foreign key, replacement in our naming)``; a key no rule matches, or a
key our model expects that nothing supplies, fails loudly with the full list.
Our own parameter names are Hugging Face's without the ``wav2vec2.`` prefix.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from .config import ModelConfig

# --------------------------------------------------------------------------- Hugging Face
HF_TO_OURS: list[tuple[str, str]] = [
    (r"^wav2vec2\.(.*)$", r"\1"),
    (r"^(quantizer\.codevectors)$", r"\1"),
    (r"^(quantizer\.weight_proj\.(weight|bias))$", r"\1"),
    (r"^(project_hid\.(weight|bias))$", r"\1"),
    (r"^(project_q\.(weight|bias))$", r"\1"),
    (r"^(lm_head\.(weight|bias))$", r"\1"),
]

# --------------------------------------------------------------------------- fairseq
FAIRSEQ_TO_OURS: list[tuple[str, str]] = [
    (r"^w2v_encoder\.proj\.(weight|bias)$", r"lm_head.\1"),
    (r"^w2v_encoder\.w2v_model\.(.*)$", r"\1"),  # fine-tuned: strip the prefix, then the rules below
    (r"^feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)$", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"^feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)$", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"^feature_extractor\.conv_layers\.(\d+)\.2\.(weight|bias)$", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"^layer_norm\.(weight|bias)$", r"feature_projection.layer_norm.\1"),
    (r"^post_extract_proj\.(weight|bias)$", r"feature_projection.projection.\1"),
    (r"^mask_emb$", r"masked_spec_embed"),
    (r"^encoder\.pos_conv\.0\.(.*)$", r"encoder.pos_conv_embed.conv.\1"),
    (r"^encoder\.layer_norm\.(weight|bias)$", r"encoder.layer_norm.\1"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.(k|v|q|out)_proj\.(weight|bias)$", r"encoder.layers.\1.attention.\2_proj.\3"),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)$", r"encoder.layers.\1.layer_norm.\2"),
    (r"^encoder\.layers\.(\d+)\.fc1\.(weight|bias)$", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"^encoder\.layers\.(\d+)\.fc2\.(weight|bias)$", r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)$", r"encoder.layers.\1.final_layer_norm.\2"),
    (r"^quantizer\.vars$", r"quantizer.codevectors"),
    (r"^quantizer\.weight_proj\.(weight|bias)$", r"quantizer.weight_proj.\1"),
    (r"^project_q\.(weight|bias)$", r"project_q.\1"),
    (r"^final_proj\.(weight|bias)$", r"project_hid.\1"),
]
# Present in fairseq checkpoints, unused by wav2vec 2.0 inference or by our training.
FAIRSEQ_IGNORED = [r"^w2v_encoder\.w2v_model\.(label_embs_concat|encoder\.pos_conv\.0\._float_tensor)$",
                   r"(^|\.)_float_tensor$", r"^w2v_encoder\.w2v_model\.(project_q|final_proj|quantizer)\."]

# Weight norm has two key styles: old ``weight_g``/``weight_v`` and parametrizations.
WEIGHT_NORM_KEYS = [
    (r"^(.*)\.weight_g$", r"\1.parametrizations.weight.original0"),
    (r"^(.*)\.weight_v$", r"\1.parametrizations.weight.original1"),
]


class ConversionError(ValueError):
    pass


def rename(state: dict[str, Tensor], table: list[tuple[str, str]], ignored=(), source="checkpoint") -> dict[str, Tensor]:
    """Apply the rules of ``table`` in order to every key. Keys that no rule matches, or that
    end up outside our naming, raise ConversionError listing them all."""
    out, unknown = {}, []
    compiled = [(re.compile(p), r) for p, r in table]
    ignored_re = [re.compile(p) for p in ignored]
    for key, value in state.items():
        if any(p.search(key) for p in ignored_re):
            continue
        new, matched = key, False
        for pat, rep in compiled:  # one pass in order: a prefix rule hands the stripped key on
            if pat.match(new):
                new, matched = pat.sub(rep, new), True
        if not matched or not _is_ours(new):
            unknown.append(key)
            continue
        out[new] = value
    if unknown:
        raise ConversionError(f"{source}: {len(unknown)} unknown keys: {', '.join(sorted(unknown))}")
    return out


_OURS = re.compile(
    r"^(feature_extractor\.conv_layers\.\d+\.(conv|layer_norm)\.(weight|bias)"
    r"|feature_projection\.(layer_norm|projection)\.(weight|bias)"
    r"|masked_spec_embed"
    r"|encoder\.pos_conv_embed\.conv\.(bias|weight_g|weight_v|parametrizations\.weight\.original[01])"
    r"|encoder\.layer_norm\.(weight|bias)"
    r"|encoder\.layers\.\d+\.(attention\.(k|v|q|out)_proj|layer_norm|final_layer_norm"
    r"|feed_forward\.(intermediate|output)_dense)\.(weight|bias)"
    r"|quantizer\.codevectors|quantizer\.weight_proj\.(weight|bias)"
    r"|project_(hid|q)\.(weight|bias)|lm_head\.(weight|bias))$"
)


def _is_ours(key: str) -> bool:
    return bool(_OURS.match(key))


def normalize_weight_norm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for k, v in state.items():
        for p, r in WEIGHT_NORM_KEYS:
            if re.match(p, k):
                k = re.sub(p, r, k)
                break
        out[k] = v
    return out


def hf_to_ours(state: dict[str, Tensor], source="checkpoint") -> dict[str, Tensor]:
    return normalize_weight_norm(rename(state, HF_TO_OURS, source=source))


def ours_to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our names -> Hugging Face names (weight norm kept in parametrizations style)."""
    top = ("quantizer.", "project_hid.", "project_q.", "lm_head.")
    return {(k if k.startswith(top) else "wav2vec2." + k): v for k, v in state.items()}


def fairseq_to_ours(state: dict[str, Tensor], source="checkpoint") -> dict[str, Tensor]:
    return normalize_weight_norm(rename(state, FAIRSEQ_TO_OURS, FAIRSEQ_IGNORED, source=source))


def check_keys(expected: set[str], got: set[str], source: str) -> None:
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected)}")
        raise ConversionError(f"{source}: " + "; ".join(parts))


# --------------------------------------------------------------------------- configs
HF_UNSUPPORTED = {"add_adapter": False, "use_weighted_layer_sum": False}


def config_from_hf(d: dict, source="config.json") -> ModelConfig:
    if d.get("model_type", "wav2vec2") not in ("wav2vec2",):
        raise ConversionError(f"{source}: model_type {d.get('model_type')!r} is not wav2vec2")
    for key, ok in HF_UNSUPPORTED.items():
        if d.get(key, ok) != ok:
            raise ConversionError(f"{source}: {key}={d[key]!r} is not supported")
    for key in ("feat_extract_activation", "hidden_act"):
        if d.get(key, "gelu") != "gelu":
            raise ConversionError(f"{source}: {key}={d[key]!r} is not supported (only gelu)")
    return ModelConfig.from_dict(d)


def config_to_hf(cfg: ModelConfig, architecture: str, pad_token_id: int = 0) -> dict:
    d = cfg.to_dict()
    d.pop("sampling_rate", None)
    d.pop("do_normalize", None)
    d.update(
        model_type="wav2vec2",
        architectures=[architecture],
        num_feat_extract_layers=len(cfg.conv_dim),
        feat_extract_activation="gelu",
        hidden_act="gelu",
        mask_time_prob=0.05,
        pad_token_id=pad_token_id,
        ctc_zero_infinity=True,
        ctc_loss_reduction="sum",
    )
    if d["vocab_size"] is None:
        d["vocab_size"] = 32  # HF's default; the pretraining model has no head
    return d


def config_from_fairseq(cfg: dict) -> tuple[ModelConfig, bool]:
    """fairseq ``cfg['model']`` (pretrained) or its ``w2v_args.model`` (fine-tuned) -> (config, do_normalize)."""
    conv = eval_conv_layers(cfg.get("conv_feature_layers", "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2"))
    mode = cfg.get("extractor_mode", "default")
    latent_dim = cfg.get("latent_dim", 0) or cfg.get("final_dim", 256)
    embed = cfg.get("encoder_embed_dim", 768)
    final_dim = cfg.get("final_dim", 0) or embed
    mc = ModelConfig(
        conv_dim=tuple(c[0] for c in conv), conv_kernel=tuple(c[1] for c in conv), conv_stride=tuple(c[2] for c in conv),
        conv_bias=bool(cfg.get("conv_bias", False)),
        feat_extract_norm="layer" if mode == "layer_norm" else "group",
        hidden_size=embed,
        num_hidden_layers=cfg.get("encoder_layers", 12),
        num_attention_heads=cfg.get("encoder_attention_heads", 12),
        intermediate_size=cfg.get("encoder_ffn_embed_dim", 3072),
        do_stable_layer_norm=bool(cfg.get("layer_norm_first", False)),
        num_conv_pos_embeddings=cfg.get("conv_pos", 128),
        num_conv_pos_embedding_groups=cfg.get("conv_pos_groups", 16),
        num_codevector_groups=cfg.get("latent_groups", 2),
        num_codevectors_per_group=cfg.get("latent_vars", 320),
        codevector_dim=latent_dim,
        proj_codevector_dim=final_dim,
    )
    return mc, bool(cfg.get("normalize", mode == "layer_norm"))


def eval_conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """Parse fairseq's conv_feature_layers string like "[(512, 10, 5)] + [(512, 3, 2)] * 4" safely."""
    if not re.fullmatch(r"[\[\]\(\)\d\s,+*]+", spec):
        raise ConversionError(f"unexpected conv_feature_layers {spec!r}")
    return [tuple(t) for t in eval(spec, {"__builtins__": {}}, {})]  # noqa: S307 - digits and brackets only
