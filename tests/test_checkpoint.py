"""Checkpoint interoperability: HF round trips bit-identical, fairseq layouts, clear errors."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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


def test_run_directory_loads_its_newest_checkpoint_by_step(tmp_path):
    """Without best/ or checkpoint_last, a run directory stands for its highest step (by number:
    checkpoint_10000000 is newer than checkpoint_9999999)."""
    old, new = ctc_model(), ctc_model("layer")
    w2v2.save_pretrained(old, tmp_path / "checkpoint_9999999")
    w2v2.save_pretrained(new, tmp_path / "checkpoint_10000000")
    assert w2v2.load_model(tmp_path).config == new.config


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
    """The options fairseq's Wav2Vec2Config holds for the tiny config (the ones w2v2 reads, and some
    it must check)."""
    c = config.tiny()
    return dict(
        _name="wav2vec2", extractor_mode="default" if norm == "group" else "layer_norm",
        conv_feature_layers="[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2", conv_bias=norm == "layer",
        encoder_layers=c.num_hidden_layers, encoder_embed_dim=c.hidden_size, encoder_ffn_embed_dim=c.intermediate_size,
        encoder_attention_heads=c.num_attention_heads, layer_norm_first=norm == "layer", conv_pos=c.num_conv_pos_embeddings,
        conv_pos_groups=c.num_conv_pos_embedding_groups, latent_vars=c.num_codevectors_per_group,
        latent_groups=c.num_codevector_groups, latent_dim=c.codevector_dim, final_dim=c.proj_codevector_dim,
        activation_fn="gelu", dropout=0.1, encoder_layerdrop=0.05, feature_grad_mult=0.1, logit_temp=0.1,
    )


def fairseq_checkpoint(layout: str, state: dict, norm: str = "layer", finetuned: bool = False,
                       **model_options) -> dict:
    """A checkpoint dict laid out as fairseq's checkpoint_utils.save_state wrote it in each era:

    * ``args`` (fairseq <= 0.10, to October 2020): one flat argparse Namespace of every model and
      task option; a fine-tuned model's ``args.w2v_args`` is the pretrained model's flat Namespace.
    * ``dictconfig`` (hydra, October 2020 to March 2021): ``cfg`` a pickled omegaconf DictConfig
      with ``model`` and ``task`` sections; a fine-tuned model's ``cfg.model.w2v_args`` is the
      pretrained model's cfg.
    * ``dictconfig-namespace``: a DictConfig whose fine-tuned ``w2v_args`` is still the flat Namespace
      of an older pretrained model (fairseq's convert_namespace_to_omegaconf lets Namespaces in).
    * ``dict`` (from March 2021): ``cfg`` as OmegaConf.to_container wrote it, plain dicts.
    """
    normalize = norm == "layer"
    pre_model = {**fairseq_model_cfg(norm), **({} if finetuned else model_options)}
    pre_task = {"_name": "audio_pretraining", "normalize": normalize, "sample_rate": 16000, "labels": None}
    flat = argparse.Namespace(**{k: v for k, v in pre_model.items() if k != "_name"}, arch="wav2vec2",
                              task="audio_pretraining", normalize=normalize, sample_rate=16000, lr=[0.0005])
    if layout == "args":
        if finetuned:
            flat = argparse.Namespace(arch="wav2vec_ctc", task="audio_pretraining", normalize=normalize,
                                      w2v_path="/pretrained/checkpoint_best.pt", w2v_args=flat, **model_options)
        return {"args": flat, "model": state, "optimizer_history": [], "extra_state": {"epoch": 3}}
    pre_cfg = {"_name": None, "common": {"fp16": True}, "model": pre_model, "task": pre_task,
               "optimization": {"lr": [0.0005], "max_update": 400000}}
    if finetuned:
        w2v_args = flat if layout == "dictconfig-namespace" else pre_cfg
        cfg = {"_name": None, "model": {"_name": "wav2vec_ctc", "w2v_path": "/pretrained/checkpoint_best.pt",
                                        "normalize": normalize, "w2v_args": w2v_args, **model_options},
               "task": {**pre_task, "labels": "ltr"}, "optimization": {"lr": [3e-5]}}
    else:
        cfg = pre_cfg
    if layout.startswith("dictconfig"):
        omegaconf = pytest.importorskip("omegaconf")
        cfg = omegaconf.OmegaConf.create(cfg, flags={"allow_objects": True})
        omegaconf.OmegaConf.set_struct(cfg, True)
    return {"cfg": cfg, "args": None, "model": state, "optimizer_history": [], "extra_state": {"epoch": 3}}


def fairseq_finetuned_state(model) -> dict:
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head")}
    state = {"w2v_encoder.w2v_model." + k: v for k, v in to_fairseq(body, model.config.feat_extract_norm == "group").items()}
    state["w2v_encoder.proj.weight"] = model.lm_head.weight.detach()
    state["w2v_encoder.proj.bias"] = model.lm_head.bias.detach()
    return state


def fairseq_normalized(x: torch.Tensor) -> torch.Tensor:
    """What fairseq's audio dataset feeds a normalize=True model: a layer norm over each waveform."""
    return torch.stack([torch.nn.functional.layer_norm(w, w.shape) for w in x])


LAYOUTS = ["args", "dictconfig", "dictconfig-namespace", "dict"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("norm", ["group", "layer"])
def test_fairseq_pretrained_checkpoint_each_layout(tmp_path, layout, norm):
    cfg = config.tiny(feat_extract_norm=norm, conv_bias=norm == "layer", do_stable_layer_norm=norm == "layer",
                      do_normalize=norm == "layer")
    ours = w2v2.build_model(cfg, with_quantizer=True).eval()
    torch.save(fairseq_checkpoint(layout, to_fairseq(ours.state_dict(), norm == "group"), norm), tmp_path / "ckpt.pt")
    loaded = w2v2.load_model(tmp_path / "ckpt.pt")
    assert loaded.config.do_normalize == (norm == "layer")
    assert loaded.config.normalize_eps == convert.FAIRSEQ_NORMALIZE_EPS
    assert_same_state(ours.state_dict(), loaded.state_dict())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fairseq_finetuned_checkpoint_each_layout_gets_fairseq_normalisation(tmp_path, layout):
    ours = ctc_model("layer")
    perturb(ours, 0.3)  # conv biases away from 0: otherwise the feature encoder ignores the input's scale
    torch.save(fairseq_checkpoint(layout, fairseq_finetuned_state(ours), "layer", finetuned=True), tmp_path / "ft.pt")
    (tmp_path / "dict.ltr.txt").write_text("".join(f"{t} {100 - i}\n" for i, t in enumerate(VOCAB.tokens[4:])))
    loaded = w2v2.load_model(tmp_path / "ft.pt")
    assert loaded.vocab == VOCAB and loaded.config.do_normalize
    assert_same_state(ours.state_dict(), loaded.state_dict())
    # quiet audio (about -40 dB), where the normalisation's eps matters: fairseq's layer norm, eps 1e-5
    x = torch.randn(2, 6000) * 0.003
    plain = w2v2.build_model(ours.config.replace(do_normalize=False), vocab=VOCAB, init=False).eval()
    plain.load_state_dict(ours.state_dict())
    with torch.no_grad():
        want = plain(fairseq_normalized(x)).logits
        got = loaded(x).logits
        hf_style = ours(x).logits  # transformers' x / sqrt(var + 1e-7)
    err, hf_err = (got - want).abs().max().item(), (hf_style - want).abs().max().item()
    assert err < 1e-4
    assert hf_err > 100 * 1e-4  # the check tells the two normalisations apart
    w2v2.save_pretrained(loaded, tmp_path / "hf")  # exported, it keeps fairseq's normalisation
    assert w2v2.load_model(tmp_path / "hf").config == loaded.config


def test_fairseq_legacy_serialization(tmp_path):
    """fairseq checkpoints written with torch < 1.6 are not zip archives."""
    ours = ctc_model("group")
    torch.save(fairseq_checkpoint("args", fairseq_finetuned_state(ours), "group", finetuned=True), tmp_path / "ft.pt",
               _use_new_zipfile_serialization=False)
    (tmp_path / "dict.ltr.txt").write_text("".join(f"{t} 1\n" for t in VOCAB.tokens[4:]))
    assert_same_state(ours.state_dict(), w2v2.load_model(tmp_path / "ft.pt").state_dict())


@pytest.mark.parametrize("option, value", [("activation_fn", "relu"), ("crop_seq_to_multiple", 4),
                                           ("pos_conv_depth", 5), ("layer_type", "conformer"),
                                           ("extractor_mode", "fancy"), ("blank_weight", 2.0)])
@pytest.mark.parametrize("layout", ["args", "dict"])
def test_fairseq_options_w2v2_does_not_compute_are_refused_by_name(tmp_path, option, value, layout):
    ours = ctc_model("group")
    finetuned = option == "blank_weight"
    state = fairseq_finetuned_state(ours) if finetuned else to_fairseq(ours.state_dict(), True)
    torch.save(fairseq_checkpoint(layout, state, "group", finetuned=finetuned, **{option: value}), tmp_path / "c.pt")
    with pytest.raises(ValueError, match=rf"c\.pt: fairseq option {option}={value!r} is not supported"):
        w2v2.load_model(tmp_path / "c.pt")


def test_dictconfig_checkpoint_without_omegaconf_says_what_to_install(tmp_path, monkeypatch):
    ours = w2v2.build_model(config.tiny(), with_quantizer=True)
    torch.save(fairseq_checkpoint("dictconfig", to_fairseq(ours.state_dict(), True), "group"), tmp_path / "c.pt")
    for name in [m for m in sys.modules if m == "omegaconf" or m.startswith("omegaconf.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "omegaconf", None)  # import omegaconf -> ImportError
    with pytest.raises(CheckpointError, match=r"c\.pt: .*pip install omegaconf"):
        w2v2.load_model(tmp_path / "c.pt")


def test_fairseq_checkpoint_pickled_by_omegaconf_2_0(tmp_path):
    """A checkpoint written by omegaconf 2.0 (fairseq's pin in 2020-2021; tests/data/make_fairseq_dictconfig.py)
    loads with today's omegaconf through the allowlist: options, letters and every weight."""
    pytest.importorskip("omegaconf")
    from .data import make_fairseq_dictconfig as made

    loaded = w2v2.load_model(Path(__file__).parent / "data" / "fairseq_dictconfig_omegaconf20.pt")
    c = loaded.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (made.DIM, made.FFN, made.MODEL["encoder_layers"])
    assert c.conv_dim == (8, 8, 8) and c.conv_kernel == (10, 3, 3) and c.conv_stride == (5, 2, 2)
    assert c.feat_extract_norm == "layer" and c.do_stable_layer_norm and c.conv_bias
    assert c.do_normalize and c.normalize_eps == convert.FAIRSEQ_NORMALIZE_EPS
    assert loaded.vocab.tokens == w2v2.fairseq_format.LIBRISPEECH_LETTERS
    want = convert.fairseq_to_ours(made.weights())
    got = loaded.state_dict()
    assert set(got) == set(want) | {"masked_spec_embed"}
    for k, v in want.items():
        assert torch.equal(got[k], v), k


class NotAllowed:  # a class outside the allow-list must never be unpickled
    def __reduce__(self):
        return (print, ("this ran",))


def test_fairseq_unpicklable_payload_rejected(tmp_path, capsys):
    torch.save({"model": {}, "args": NotAllowed()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil\.pt: not a safe weights file") as e:
        w2v2.load_model(tmp_path / "evil.pt")
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)
    assert "this ran" not in capsys.readouterr().out


def test_config_in_checkpoint(tmp_path):
    w2v2.save_pretrained(ctc_model(), tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["model_type"] == "wav2vec2" and d["architectures"] == ["Wav2Vec2ForCTC"]
    assert config.ModelConfig.from_dict(d).hidden_size == 32
