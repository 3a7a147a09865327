"""Checkpoint interoperability: HF round trips bit-identical, fairseq layouts, clear errors."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import w2v2
from w2v2 import config, convert
from w2v2.checkpoint import CheckpointError
from w2v2.vocab import Vocabulary

from .conftest import hf_tiny_config
from .test_parity import perturb, save_hf

VOCAB = Vocabulary(("<pad>", "<s>", "</s>", "<unk>", "|", "A", "B", "C", "D", "E", "F", "G"))


def ctc_model(norm="group"):
    cfg = config.tiny(feat_extract_norm=norm, conv_bias=norm == "layer", do_stable_layer_norm=norm == "layer")
    return w2v2.build_model(cfg, vocab=VOCAB).eval()


def assert_same_state(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_ours_to_hf_loads_without_missing_keys_and_round_trips(tmp_path, norm):
    transformers = pytest.importorskip("transformers")
    ours = ctc_model(norm)
    w2v2.save_pretrained(ours, tmp_path / "a")
    hf, info = transformers.Wav2Vec2ForCTC.from_pretrained(tmp_path / "a", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    x = torch.randn(1, 6000)
    xn = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
    with torch.no_grad():
        assert torch.allclose(hf.eval()(xn).logits, ours(x).logits, atol=1e-4)
    # ours -> HF dir -> ours: every tensor bit-identical, vocabulary and config kept
    again = w2v2.load_model(tmp_path / "a")
    assert_same_state(ours.state_dict(), again.state_dict())
    assert again.vocab == ours.vocab and again.config == ours.config
    # the tokenizer files load in transformers too
    tok = transformers.Wav2Vec2CTCTokenizer.from_pretrained(tmp_path / "a")
    assert tok.convert_tokens_to_ids("|") == VOCAB.word_delimiter_index


def test_pretraining_model_to_hf(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = w2v2.build_model(config.tiny(), with_quantizer=True)
    w2v2.save_pretrained(ours, tmp_path)
    _, info = transformers.Wav2Vec2ForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert_same_state(ours.state_dict(), w2v2.load_model(tmp_path).state_dict())


def test_hf_to_ours_to_hf_bit_identical(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.Wav2Vec2ForCTC(hf_tiny_config("group"))
    perturb(hf)
    save_hf(hf, tmp_path / "hf", vocab_size=12)
    w2v2.save_pretrained(w2v2.load_model(tmp_path / "hf"), tmp_path / "ours")
    a, b = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "ours" / "model.safetensors"))
    a = convert.ours_to_hf(convert.hf_to_ours(a))  # same naming (weight-norm style) on both sides
    assert_same_state(a, b)


def test_old_weight_norm_key_style_loads(tmp_path):
    ours = ctc_model()
    w2v2.save_pretrained(ours, tmp_path)
    st = load_file(str(tmp_path / "model.safetensors"))
    st = {k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                               "weight_v"): v for k, v in st.items()}
    assert any(k.endswith("weight_g") for k in st)
    save_file(st, str(tmp_path / "model.safetensors"))
    assert_same_state(ours.state_dict(), w2v2.load_model(tmp_path).state_dict())


def test_unknown_and_missing_keys_fail_loudly(tmp_path):
    w2v2.save_pretrained(ctc_model(), tmp_path)
    st = load_file(str(tmp_path / "model.safetensors"))
    st["wav2vec2.encoder.bogus.weight"] = torch.zeros(1)
    save_file(st, str(tmp_path / "model.safetensors"))
    with pytest.raises(convert.ConversionError, match="encoder.bogus.weight"):
        w2v2.load_model(tmp_path)
    del st["wav2vec2.encoder.bogus.weight"]
    del st["wav2vec2.encoder.layers.1.final_layer_norm.bias"]
    save_file(st, str(tmp_path / "model.safetensors"))
    with pytest.raises(convert.ConversionError, match="missing keys: encoder.layers.1.final_layer_norm.bias"):
        w2v2.load_model(tmp_path)


def test_truncated_weights_clear_error(tmp_path):
    w2v2.save_pretrained(ctc_model(), tmp_path)
    p = tmp_path / "model.safetensors"
    p.write_bytes(p.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        w2v2.load_model(tmp_path)


def test_missing_source_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no such file"):
        w2v2.load_model(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="pass the local directory"):
        w2v2.load_model("someone/not-downloaded-model-xyz")


# --------------------------------------------------------------------------- fairseq layout
def to_fairseq(state: dict[str, torch.Tensor], group: bool) -> dict[str, torch.Tensor]:
    """Our names -> fairseq's (inverse of the rename table), to build checkpoints in the test."""
    out = {}
    for k, v in state.items():
        k = k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                                "weight_v")
        parts = k.split(".")
        if k.startswith("feature_extractor.conv_layers."):
            i, kind, wb = parts[2], parts[3], parts[4]
            k = f"feature_extractor.conv_layers.{i}." + ("0" if kind == "conv" else ("2" if group else "2.1")) + f".{wb}"
        elif k.startswith("feature_projection.layer_norm."):
            k = "layer_norm." + parts[-1]
        elif k.startswith("feature_projection.projection."):
            k = "post_extract_proj." + parts[-1]
        elif k == "masked_spec_embed":
            k = "mask_emb"
        elif k.startswith("encoder.pos_conv_embed.conv."):
            k = "encoder.pos_conv.0." + parts[-1]
        elif k.startswith("encoder.layers."):
            k = (k.replace(".attention.", ".self_attn.").replace(f"{parts[2]}.layer_norm.", f"{parts[2]}.self_attn_layer_norm.")
                 .replace("feed_forward.intermediate_dense", "fc1").replace("feed_forward.output_dense", "fc2"))
        elif k == "quantizer.codevectors":
            k = "quantizer.vars"
        elif k.startswith("project_hid."):
            k = "final_proj." + parts[-1]
        out[k] = v
    return out


def fairseq_model_cfg(norm: str) -> dict:
    c = config.tiny()
    return dict(
        _name="wav2vec2", extractor_mode="default" if norm == "group" else "layer_norm",
        conv_feature_layers="[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2", conv_bias=norm == "layer",
        encoder_layers=c.num_hidden_layers, encoder_embed_dim=c.hidden_size, encoder_ffn_embed_dim=c.intermediate_size,
        encoder_attention_heads=c.num_attention_heads, layer_norm_first=norm == "layer", conv_pos=c.num_conv_pos_embeddings,
        conv_pos_groups=c.num_conv_pos_embedding_groups, latent_vars=c.num_codevectors_per_group,
        latent_groups=c.num_codevector_groups, latent_dim=c.codevector_dim, final_dim=c.proj_codevector_dim,
    )


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_fairseq_pretrained_checkpoint(tmp_path, norm):
    cfg = config.tiny(feat_extract_norm=norm, conv_bias=norm == "layer", do_stable_layer_norm=norm == "layer",
                      do_normalize=norm == "layer")
    ours = w2v2.build_model(cfg, with_quantizer=True).eval()
    ckpt = {"cfg": {"model": fairseq_model_cfg(norm), "task": {"normalize": norm == "layer"}},
            "model": to_fairseq(ours.state_dict(), norm == "group")}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    loaded = w2v2.load_model(tmp_path / "ckpt.pt")
    assert loaded.config.do_normalize == (norm == "layer")
    assert_same_state(ours.state_dict(), loaded.state_dict())


def test_fairseq_finetuned_checkpoint_old_args_and_dict(tmp_path):
    ours = ctc_model()
    state = {("w2v_encoder.proj." + k.split(".")[-1]) if k.startswith("lm_head.") else "w2v_encoder.w2v_model." + k: v
             for k, v in to_fairseq({k: v for k, v in ours.state_dict().items() if not k.startswith("lm_head")}, True).items()}
    state["w2v_encoder.proj.weight"] = ours.lm_head.weight.detach()
    state["w2v_encoder.proj.bias"] = ours.lm_head.bias.detach()
    args = argparse.Namespace(w2v_args={"model": fairseq_model_cfg("group"), "task": {"normalize": True}})
    torch.save({"args": args, "model": state}, tmp_path / "ft.pt")
    (tmp_path / "dict.ltr.txt").write_text("".join(f"{t} {100 - i}\n" for i, t in enumerate(VOCAB.tokens[4:])))
    loaded = w2v2.load_model(tmp_path / "ft.pt")
    assert loaded.vocab == VOCAB
    assert_same_state(ours.state_dict(), loaded.state_dict())
    x = torch.randn(1, 5000)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ours(x).logits)


class NotAllowed:  # a class outside the allow-list must never be unpickled
    pass


def test_fairseq_unpicklable_payload_rejected(tmp_path):
    torch.save({"model": {}, "args": NotAllowed()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        w2v2.load_model(tmp_path / "evil.pt")


def test_config_in_checkpoint(tmp_path):
    w2v2.save_pretrained(ctc_model(), tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["model_type"] == "wav2vec2" and d["architectures"] == ["Wav2Vec2ForCTC"]
    assert config.ModelConfig.from_dict(d).hidden_size == 32
