"""Stage-by-stage parity with transformers' reference implementation, random weights, no downloads."""

from __future__ import annotations

import json

import pytest
import torch

import w2v2
from w2v2.vocab import Vocabulary

from .conftest import hf_tiny_config

transformers = pytest.importorskip("transformers")
TOL = 1e-4


def perturb(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Random init leaves norms at 1/0; nudge every tensor so parity checks see real values."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def normalized(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-7)


def save_hf(model, path, vocab_size=None):
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True, "sampling_rate": 16000}))
    if vocab_size:
        Vocabulary(("<pad>", "<s>", "</s>", "<unk>", "|") + tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ'")[: vocab_size - 5]).save(
            path / "vocab.json")


@pytest.fixture(params=["group", "layer"])
def ctc_pair(request, tmp_path):
    torch.manual_seed(0)
    hf = transformers.Wav2Vec2ForCTC(hf_tiny_config(request.param)).eval()
    perturb(hf)
    save_hf(hf, tmp_path, vocab_size=12)
    return hf, w2v2.load_model(tmp_path)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def test_ctc_stage_by_stage(ctc_pair):
    hf, ours = ctc_pair
    x = torch.randn(2, 8000)
    xn = normalized(x)
    with torch.no_grad():
        hz = hf.wav2vec2.feature_extractor(xn)
        oz = ours.feature_extractor(xn)
        assert max_diff(hz, oz) <= TOL, "feature encoder"
        hp, hn = hf.wav2vec2.feature_projection(hz.transpose(1, 2))
        op, on = ours.feature_projection(oz.transpose(1, 2))
        assert max_diff(hp, op) <= TOL and max_diff(hn, on) <= TOL, "feature projection"
        assert max_diff(hf.wav2vec2.encoder.pos_conv_embed(hp), ours.encoder.pos_conv_embed(op)) <= TOL, "pos conv"
        ho = hf(xn, output_hidden_states=True)
        oo = ours(x, output_hidden_states=True)
    assert len(ho.hidden_states) == len(oo.hidden_states) == hf.config.num_hidden_layers + 1
    for i in range(1, len(oo.hidden_states)):  # each Transformer layer's output
        assert max_diff(ho.hidden_states[i], oo.hidden_states[i]) <= TOL, f"layer {i}"
    assert max_diff(ho.logits, oo.logits) <= TOL, "logits"
    assert ours.vocab is not None and len(ours.vocab) == 12


def test_ctc_padded_batch_with_attention_mask_layer_norm(tmp_path):
    """Layer-norm variant: HF with attention_mask equals ours with lengths on the valid frames."""
    torch.manual_seed(0)
    hf = transformers.Wav2Vec2ForCTC(hf_tiny_config("layer")).eval()
    perturb(hf)
    save_hf(hf, tmp_path, vocab_size=12)
    ours = w2v2.load_model(tmp_path)
    x = torch.randn(2, 8000)
    lengths = torch.tensor([8000, 5000])
    x[1, 5000:] = 0
    xn = torch.zeros_like(x)
    for i, n in enumerate(lengths.tolist()):
        xn[i, :n] = normalized(x[i : i + 1, :n])[0]
    mask = (torch.arange(8000)[None] < lengths[:, None]).long()
    with torch.no_grad():
        ho = hf(xn, attention_mask=mask)
        oo = ours(x, lengths)
    for i, n in enumerate(oo.lengths.tolist()):
        assert max_diff(ho.logits[i, :n], oo.logits[i, :n]) <= TOL


def test_pretraining_quantizer_parity(tmp_path):
    torch.manual_seed(0)
    hf = transformers.Wav2Vec2ForPreTraining(hf_tiny_config("group")).eval()
    perturb(hf)
    save_hf(hf, tmp_path)
    ours = w2v2.load_model(tmp_path)
    assert ours.quantizer is not None and ours.lm_head is None
    x = torch.randn(2, 8000)
    with torch.no_grad():
        ho = hf(normalized(x))
        frames = ho.projected_states.shape[1]
        mask = torch.zeros(2, frames, dtype=torch.bool)
        oo = ours.forward_pretraining(x, None, mask)
        # same code choice and codevectors at eval
        _, hn = hf.wav2vec2.feature_projection(hf.wav2vec2.feature_extractor(normalized(x)).transpose(1, 2))
        logits = hf.quantizer.weight_proj(hn).view(2, frames, 2, -1)
    assert torch.equal(logits.argmax(-1), oo.code_indices)
    assert max_diff(ho.projected_quantized_states, oo.projected_quantized) <= TOL
    assert max_diff(ho.projected_states, oo.projected_context) <= TOL


def test_padded_batch_equals_single_group_norm():
    """GroupNorm over padded time is a known trap; ours takes statistics over valid frames only."""
    torch.manual_seed(0)
    model = w2v2.build_model(w2v2.config.tiny(), vocab=None).eval()
    x = torch.randn(3, 9000)
    lengths = torch.tensor([9000, 6100, 3000])
    with torch.no_grad():
        batched = model(x, lengths, output_hidden_states=True)
        for i, n in enumerate(lengths.tolist()):
            alone = model(x[i : i + 1, :n])
            f = batched.lengths[i].item()
            assert f == alone.lengths[0].item()
            assert max_diff(batched.last_hidden_state[i, :f], alone.last_hidden_state[0]) <= TOL


def test_padded_batch_equals_single_layer_norm_prenorm():
    torch.manual_seed(0)
    cfg = w2v2.config.tiny(feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True)
    model = w2v2.build_model(cfg).eval()
    x = torch.randn(2, 7000)
    lengths = torch.tensor([7000, 4321])
    with torch.no_grad():
        batched = model(x, lengths)
        alone = model(x[1:, :4321])
    f = batched.lengths[1].item()
    assert max_diff(batched.last_hidden_state[1, :f], alone.last_hidden_state[0]) <= TOL


@pytest.mark.slow
def test_full_size_base_parity(tmp_path):
    torch.manual_seed(0)
    hf = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(vocab_size=32, attn_implementation="eager")).eval()
    perturb(hf, 0.01)
    save_hf(hf, tmp_path, vocab_size=32)
    ours = w2v2.load_model(tmp_path)
    x = torch.randn(1, 32000)
    with torch.no_grad():
        assert max_diff(hf(normalized(x)).logits, ours(x).logits) <= TOL
