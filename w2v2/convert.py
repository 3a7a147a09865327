"""Checkpoint conversion: one declarative rename table per format.

Converters talk only to configs and state dicts. Each table is a list of
``(regex on the foreign key, replacement in our naming)``; a key no rule matches, or a
key our model expects that nothing supplies, fails loudly with the full list.
Our own parameter names are Hugging Face's without the ``wav2vec2.`` prefix.
"""

from __future__ import annotations

import ast
import re

import torch
from torch import Tensor

from .config import MAX_CONV_LAYERS, ModelConfig

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


def config_from_hf(d: object, source="config.json") -> ModelConfig:
    """A Hugging Face ``config.json`` (already parsed) -> our config. Raises ConversionError naming
    ``source`` for anything that is not a wav2vec 2.0 config w2v2 computes exactly."""
    if not isinstance(d, dict):
        raise ConversionError(f"{source}: expected a JSON object of model options, got {type(d).__name__}")
    if d.get("model_type", "wav2vec2") not in ("wav2vec2",):
        raise ConversionError(f"{source}: model_type {d.get('model_type')!r} is not wav2vec2")
    for key, ok in HF_UNSUPPORTED.items():
        if d.get(key, ok) != ok:
            raise ConversionError(f"{source}: {key}={d[key]!r} is not supported")
    for key in ("feat_extract_activation", "hidden_act"):
        if d.get(key, "gelu") != "gelu":
            raise ConversionError(f"{source}: {key}={d[key]!r} is not supported (only gelu)")
    try:
        cfg = ModelConfig.from_dict(d)
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from e
    layers = d.get("num_feat_extract_layers", len(cfg.conv_dim))
    if layers != len(cfg.conv_dim):
        raise ConversionError(f"{source}: num_feat_extract_layers is {layers!r} but conv_dim has {len(cfg.conv_dim)} "
                              f"entries")
    return cfg


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


# fairseq model options that change what the model computes, with the only value w2v2 implements:
# a checkpoint with another value is refused by name instead of being run differently.
FAIRSEQ_FIXED = {
    "activation_fn": "gelu",  # of the Transformer's feed-forward layers
    "crop_seq_to_multiple": 1,  # crops the frames to a multiple of this
    "pos_conv_depth": 1,  # a stack of positional convolutions (data2vec-style)
    "layer_type": "transformer",  # "conformer" layers
    "extractor_mode": ("default", "layer_norm"),
}
# Options of a fine-tuned model (the CTC wrapper) that change its output.
FAIRSEQ_FIXED_CTC = {"blank_weight": 0}
FAIRSEQ_NORMALIZE_EPS = 1e-5  # F.layer_norm's default, which fairseq's audio dataset applies


def check_fairseq_options(cfg: dict, fixed: dict, source: str) -> None:
    for key, ok in fixed.items():
        if key in cfg and not (cfg[key] in ok if isinstance(ok, tuple) else cfg[key] == ok):
            allowed = " or ".join(map(repr, ok)) if isinstance(ok, tuple) else repr(ok)
            raise ConversionError(f"{source}: fairseq option {key}={cfg[key]!r} is not supported (only {allowed})")


def config_from_fairseq(cfg: dict, normalize: bool, source: str = "checkpoint") -> ModelConfig:
    """fairseq's model options (``cfg['model']`` of a pretrained model, ``w2v_args.model`` of a
    fine-tuned one; fairseq's own defaults for missing ones) -> our config. ``normalize``: the
    task's option; fairseq normalises with ``F.layer_norm`` over the waveform (eps 1e-5)."""
    check_fairseq_options(cfg, FAIRSEQ_FIXED, source)
    conv = parse_conv_layers(cfg.get("conv_feature_layers", "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2"),
                             source)
    embed = cfg.get("encoder_embed_dim", 768)
    final_dim = cfg.get("final_dim", 0) or embed  # fairseq: 0 means "the embedding dimension"
    try:
        return ModelConfig(
            conv_dim=tuple(c[0] for c in conv), conv_kernel=tuple(c[1] for c in conv),
            conv_stride=tuple(c[2] for c in conv), conv_bias=cfg.get("conv_bias", False),
            feat_extract_norm="layer" if cfg.get("extractor_mode", "default") == "layer_norm" else "group",
            hidden_size=embed,
            num_hidden_layers=cfg.get("encoder_layers", 12),
            num_attention_heads=cfg.get("encoder_attention_heads", 12),
            intermediate_size=cfg.get("encoder_ffn_embed_dim", 3072),
            do_stable_layer_norm=cfg.get("layer_norm_first", False),
            num_conv_pos_embeddings=cfg.get("conv_pos", 128),
            num_conv_pos_embedding_groups=cfg.get("conv_pos_groups", 16),
            num_codevector_groups=cfg.get("latent_groups", 2),
            num_codevectors_per_group=cfg.get("latent_vars", 320),
            codevector_dim=cfg.get("latent_dim", 0) or final_dim,
            proj_codevector_dim=final_dim,
            do_normalize=normalize,
            normalize_eps=FAIRSEQ_NORMALIZE_EPS,
        )
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from e


def parse_conv_layers(spec: object, source: str = "checkpoint") -> list[tuple[int, int, int]]:
    """fairseq's conv_feature_layers, a Python expression like "[(512, 10, 5)] + [(512, 3, 2)] * 4",
    read without eval: list literals of (dim, kernel, stride) integer tuples joined by ``+`` and
    repeated by ``* N``, at most MAX_CONV_LAYERS long (so "[(1,1,1)] * 10**9" allocates nothing)."""
    def bad(why: str) -> ConversionError:
        return ConversionError(f"{source}: conv_feature_layers {spec!r}: {why}")

    def value(node) -> list:
        if isinstance(node, ast.List):
            return [layer(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            out = value(node.left) + value(node.right)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            items, times = (node.left, node.right) if isinstance(node.right, ast.Constant) else (node.right, node.left)
            if not (isinstance(times, ast.Constant) and type(times.value) is int):
                raise bad("a list can only be repeated by an integer")
            if times.value > MAX_CONV_LAYERS:
                raise bad(f"more than {MAX_CONV_LAYERS} layers")
            out = value(items) * max(times.value, 0)
        else:
            raise bad("expected lists of (dim, kernel, stride) joined by + and *")
        if len(out) > MAX_CONV_LAYERS:
            raise bad(f"more than {MAX_CONV_LAYERS} layers")
        return out

    def layer(node) -> tuple[int, int, int]:
        if not (isinstance(node, ast.Tuple) and len(node.elts) == 3
                and all(isinstance(e, ast.Constant) and type(e.value) is int for e in node.elts)):
            raise bad("each layer must be a (dim, kernel, stride) tuple of integers")
        return tuple(e.value for e in node.elts)

    if not isinstance(spec, str) or len(spec) > 10_000:
        raise bad("expected a short string")
    try:
        return value(ast.parse(spec, mode="eval").body)
    except ConversionError:
        raise
    except (SyntaxError, RecursionError, MemoryError, ValueError):
        raise bad("not a list expression w2v2 reads") from None
