"""Writes tests/data/fairseq_dictconfig_omegaconf20.pt: a tiny fine-tuned wav2vec 2.0 checkpoint
laid out as fairseq wrote them from October 2020 to March 2021 (``cfg`` a pickled omegaconf
DictConfig, ``model.w2v_args`` the pretrained model's DictConfig), pickled by omegaconf 2.0, the
version fairseq required then (later omegaconf versions pickle DictConfigs differently).

    pip download --no-deps omegaconf==2.0.6 -d /tmp/oc && unzip -o /tmp/oc/*.whl -d /tmp/oc/site
    PYTHONPATH=/tmp/oc/site python tests/data/make_fairseq_dictconfig.py

The weights are random; the test reads the options below back and compares the weights with the
file's own.
"""

from __future__ import annotations

from pathlib import Path

import torch

DIM, FFN, LETTERS = 8, 16, 32  # LibriSpeech's letter dictionary: no dict.ltr.txt needed
MODEL = dict(_name="wav2vec2", extractor_mode="layer_norm", conv_feature_layers="[(8, 10, 5)] + [(8, 3, 2)] * 2",
             conv_bias=True, encoder_layers=1, encoder_embed_dim=DIM, encoder_ffn_embed_dim=FFN,
             encoder_attention_heads=2, activation_fn="gelu", layer_norm_first=True, conv_pos=4, conv_pos_groups=2,
             latent_vars=4, latent_groups=2, latent_dim=0, final_dim=0, dropout=0.1, feature_grad_mult=0.1)
TASK = dict(_name="audio_pretraining", data="/data/manifests", normalize=True, sample_rate=16000, labels=None)


def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    p = "w2v_encoder.w2v_model."
    out = {}
    for i, (cin, k) in enumerate([(1, 10), (DIM, 3), (DIM, 3)]):
        out[f"{p}feature_extractor.conv_layers.{i}.0.weight"] = r(DIM, cin, k)
        out[f"{p}feature_extractor.conv_layers.{i}.0.bias"] = r(DIM)
        out[f"{p}feature_extractor.conv_layers.{i}.2.1.weight"] = 1 + r(DIM)
        out[f"{p}feature_extractor.conv_layers.{i}.2.1.bias"] = r(DIM)
    out.update({f"{p}layer_norm.weight": 1 + r(DIM), f"{p}layer_norm.bias": r(DIM),
                f"{p}post_extract_proj.weight": r(DIM, DIM), f"{p}post_extract_proj.bias": r(DIM),
                f"{p}mask_emb": r(DIM), f"{p}encoder.pos_conv.0.bias": r(DIM),
                f"{p}encoder.pos_conv.0.weight_g": 1 + r(1, 1, 4).abs(), f"{p}encoder.pos_conv.0.weight_v": r(DIM, 4, 4),
                f"{p}encoder.layer_norm.weight": 1 + r(DIM), f"{p}encoder.layer_norm.bias": r(DIM)})
    layer = f"{p}encoder.layers.0."
    for name in ("q", "k", "v", "out"):
        out[f"{layer}self_attn.{name}_proj.weight"] = r(DIM, DIM)
        out[f"{layer}self_attn.{name}_proj.bias"] = r(DIM)
    for name in ("self_attn_layer_norm", "final_layer_norm"):
        out[f"{layer}{name}.weight"] = 1 + r(DIM)
        out[f"{layer}{name}.bias"] = r(DIM)
    out.update({f"{layer}fc1.weight": r(FFN, DIM), f"{layer}fc1.bias": r(FFN), f"{layer}fc2.weight": r(DIM, FFN),
                f"{layer}fc2.bias": r(DIM), "w2v_encoder.proj.weight": r(LETTERS, DIM),
                "w2v_encoder.proj.bias": r(LETTERS)})
    return out


def main() -> None:
    import omegaconf
    from omegaconf import OmegaConf

    assert omegaconf.__version__.startswith("2.0."), omegaconf.__version__
    pretrained = {"_name": None, "common": {"fp16": True, "log_interval": 200}, "model": MODEL, "task": TASK,
                  "optimization": {"max_update": 400000, "lr": [0.0005]}}
    cfg = {"_name": None, "common": {"fp16": True}, "task": {**TASK, "labels": "ltr"},
           "model": {"_name": "wav2vec_ctc", "w2v_path": "/models/pretrained.pt", "normalize": True,
                     "apply_mask": True, "mask_prob": 0.5, "final_dropout": 0.0, "w2v_args": pretrained},
           "optimization": {"max_update": 20000, "lr": [3e-5]}}
    # fairseq: OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)), struct mode
    cfg = OmegaConf.create(cfg)
    OmegaConf.set_struct(cfg, True)
    state = {"cfg": cfg, "args": None, "model": weights(), "criterion": {}, "optimizer_history": [
        {"criterion_name": "CtcCriterion", "optimizer_name": "FairseqAdam", "lr_scheduler_state": {"best": 0.5},
         "num_updates": 20000}], "extra_state": {"epoch": 12, "val_loss": 0.5}, "last_optimizer_state": None}
    torch.save(state, Path(__file__).with_name("fairseq_dictconfig_omegaconf20.pt"))


if __name__ == "__main__":
    main()
