"""Pretraining objective: parity with transformers, schedules, presets, and the CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch

import w2v2
from w2v2 import pretrain
from w2v2.cli import main
from w2v2.masking import compute_mask_indices, sample_negatives
from w2v2.pretrain import PretrainingLossConfig, PretrainingLoss, gumbel_temperature, pretraining_step
from w2v2.trainer import read_metrics

from .conftest import hf_tiny_config
from .helpers import write_clips
from .test_parity import normalized, perturb, save_hf


def test_loss_components_match_transformers(tmp_path):
    """Same weights, mask and negatives: contrastive, diversity and total equal Wav2Vec2ForPreTraining's.

    transformers in eval mode picks codes by argmax and takes its perplexity from those hard
    choices (our ``code_perplexity``); in training it uses the softmax (our ``prob_perplexity``,
    what we train on), checked here against its own perplexity function. It has no feature penalty."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2GumbelVectorQuantizer as HFQuantizer

    from w2v2.losses import diversity_loss

    torch.manual_seed(0)
    hf = transformers.Wav2Vec2ForPreTraining(hf_tiny_config("group", num_negatives=12)).eval()
    perturb(hf)
    save_hf(hf, tmp_path)
    ours = w2v2.load_model(tmp_path)
    wav = torch.randn(2, 9600)
    frames = int(ours.num_frames(torch.tensor([9600]))[0])
    g = torch.Generator().manual_seed(5)
    mask = compute_mask_indices((2, frames), 0.65, 4, min_masks=2, generator=g)
    negatives = sample_negatives(mask, 12, generator=g)
    hf_neg = torch.zeros(2, frames, 12, dtype=torch.long)
    hf_neg[mask] = (negatives + frames * torch.arange(2)[:, None, None]).view(-1, 12)
    cfg = PretrainingLossConfig(num_negatives=12, penalty_weight=0.0)
    with torch.no_grad():
        theirs = hf(normalized(wav), mask_time_indices=mask, sampled_negative_indices=hf_neg)
        r = pretraining_step(ours, wav, None, mask, negatives, cfg)
        extract = hf.wav2vec2.feature_extractor(normalized(wav)).transpose(1, 2)
        _, normed = hf.wav2vec2.feature_projection(extract)
        hf_probs = hf.quantizer.weight_proj(normed).view(2 * frames, 2, -1).softmax(-1)
    n = r["n_masked"]
    assert torch.allclose(r["contrastive"], theirs.contrastive_loss, rtol=1e-4)
    assert torch.allclose(r["code_perplexity"], theirs.codevector_perplexity, rtol=1e-4)
    hard_diversity = diversity_loss(r["code_perplexity"], 2, 8) * n
    assert torch.allclose(hard_diversity, theirs.diversity_loss, rtol=1e-4)
    assert torch.allclose(r["contrastive"] + 0.1 * hard_diversity, theirs.loss, rtol=1e-4)
    assert torch.allclose(r["prob_perplexity"], HFQuantizer._compute_perplexity(hf_probs, mask.flatten()), rtol=1e-4)
    expected_total = r["contrastive"] + 0.1 * diversity_loss(r["prob_perplexity"], 2, 8) * n
    assert torch.allclose(r["total"], expected_total, rtol=1e-5)


def test_gumbel_temperature_schedule():
    cfg = PretrainingLossConfig()
    assert gumbel_temperature(0, cfg) == 2.0
    assert gumbel_temperature(1, cfg) == pytest.approx(2 * 0.999995)
    assert gumbel_temperature(10**6, cfg) == 0.5
    loss = PretrainingLoss(cfg)
    loss.set_step(100_000)
    assert loss.temperature == pytest.approx(2 * 0.999995 ** 100_000)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return w2v2.build_model(w2v2.config.tiny(), with_quantizer=True).train()


def test_loss_fn_metrics_add_up():
    model = tiny_model()
    wav = torch.randn(3, 8000)
    batch = {"waveforms": wav, "lengths": torch.tensor([8000, 8000, 6000])}
    loss_fn = PretrainingLoss(PretrainingLossConfig(num_negatives=10, mask_length=4))
    loss_fn.set_step(10)
    total, n, m = loss_fn(model, batch)
    assert model.quantizer.temperature == m["gumbel_temp"] == gumbel_temperature(10, loss_fn.cfg)
    assert model.feature_grad_scale == 0.1
    assert float(total.detach()) / n == pytest.approx(m["contrastive"] + m["diversity"] + m["penalty"], rel=1e-5)
    assert 0 <= m["accuracy"] <= 1 and 0.2 < m["mask_fraction"] < 0.8
    assert 2 <= m["code_perplexity"] <= 16 and 2 <= m["prob_perplexity"] <= 16
    total.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_feature_encoder_gradient_is_scaled():
    wav = torch.randn(2, 8000)
    mask = compute_mask_indices((2, 24), 0.65, 4, generator=torch.Generator().manual_seed(1))
    negatives = sample_negatives(mask, 5, generator=torch.Generator().manual_seed(2))
    grads = {}
    for scale in (1.0, 0.1):
        model = tiny_model()
        model.feature_grad_scale = scale
        torch.manual_seed(3)  # same Gumbel noise
        pretraining_step(model, wav, None, mask, negatives, PretrainingLossConfig(penalty_weight=0.0))["total"].backward()
        grads[scale] = model.feature_extractor.conv_layers[0].conv.weight.grad
    assert torch.allclose(grads[0.1], 0.1 * grads[1.0], rtol=1e-4, atol=1e-5)


def test_presets_and_config_file(tmp_path):
    base = pretrain.preset_config("base")
    assert base.model.hidden_size == 768 and base.train.lr == 5e-4 and base.loss.mask_prob == 0.65
    assert base.data.max_tokens == 1_400_000 and base.loss.num_negatives == 100
    small = pretrain.preset_config("small", {"train": {"lr": 2e-3}, "model": {"num_hidden_layers": 2}})
    assert small.train.lr == 2e-3 and small.model.num_hidden_layers == 2 and small.model.hidden_size == 256
    path = tmp_path / "run.json"
    path.write_text(json.dumps(small.to_dict()))
    again = pretrain.load_run_config(path)
    assert again.to_dict() == small.to_dict()
    with pytest.raises(ValueError, match="unknown PretrainingLossConfig options"):
        pretrain.preset_config("tiny", {"loss": {"negatives": 3}})
    with pytest.raises(ValueError, match="unknown preset"):
        pretrain.preset_config("huge")


def test_cli_pretrain_resume_and_bad_files(tmp_path, capsys):
    folder = tmp_path / "clips"
    write_clips(folder, [0.6, 0.7, 0.8, 0.9, 1.0, 0.1])  # the last is below min_samples
    (folder / "audio" / "broken.wav").write_bytes(b"RIFF....junk")
    run = tmp_path / "run"
    args = [str(folder / "audio"), "--out", str(run), "--preset", "tiny", "--no-progress",
            "--max-tokens", "24000", "--save-interval", "2"]
    assert main(["pretrain", *args, "--max-updates", "3"]) == 0
    err = capsys.readouterr().err
    assert "broken.wav" in err and "clip005.wav: too short" in err
    assert main(["pretrain", str(folder / "audio"), "--out", str(run), "--resume", "--max-updates", "5",
                 "--no-progress"]) == 0
    rows = read_metrics(run)
    assert [r["update"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(0 <= r["accuracy"] <= 1 and r["gumbel_temp"] <= 2.0 for r in rows)
    # the checkpoint is a Hugging Face Wav2Vec2ForPreTraining directory
    transformers = pytest.importorskip("transformers")
    hf = transformers.Wav2Vec2ForPreTraining.from_pretrained(run / "checkpoint_last")
    ours = w2v2.load_model(run / "checkpoint_last")
    assert hf.config.num_hidden_layers == ours.config.num_hidden_layers == 2
    assert json.loads((run / "pretrain_config.json").read_text())["preset"] == "tiny"


def test_cli_reports_no_usable_audio(tmp_path, capsys):
    (tmp_path / "a.wav").write_bytes(b"junk")
    assert main(["pretrain", str(tmp_path / "a.wav"), "--out", str(tmp_path / "run"), "--preset", "tiny"]) == 1
    assert "no usable audio" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_model_learns_on_real_speech(data_dir, tmp_path):
    """~25 s: accuracy rises well above chance on a few real utterances.

    The 32-wide `tiny` model stayed at its starting accuracy for 150-400 updates with some seeds
    (the contrastive plateau). 64 wide with diversity 0.3 leaves it, but at lr 5e-3 only on some
    trajectories: seed 1 learned on one thread and fell back to the plateau on two (another
    summation order). At lr 3e-3, seeds 0-5 on two threads and seeds 1 and 3 on one all left it
    (mean accuracy of the last 50 of 400 updates 0.30-0.43 from 0.11-0.13; chance 1/11)."""
    cfg = pretrain.preset_config("tiny", {"model": {"hidden_size": 64, "intermediate_size": 128, "conv_dim": [64] * 7},
                                          "train": {"max_updates": 400, "progress": False, "lr": 3e-3, "clip_norm": 10.0},
                                          "loss": {"diversity_weight": 0.3}, "data": {"max_tokens": 64_000}})
    good, _ = pretrain.prepare_data([data_dir / "ljspeech-amateur"], cfg)
    pretrain.build_trainer(good[:40], tmp_path, cfg).train()
    rows = read_metrics(tmp_path)
    first = sum(r["accuracy"] for r in rows[:20]) / 20
    last = sum(r["accuracy"] for r in rows[-20:]) / 20
    assert last > first + 0.1 and last > 3 / (cfg.loss.num_negatives + 1)
    codewords = cfg.model.num_codevector_groups * cfg.model.num_codevectors_per_group
    assert rows[-1]["code_perplexity"] > codewords / 2  # the codebook did not collapse


def test_perplexity_gradient_is_finite_when_a_codeword_is_unused():
    """A collapsed codebook (some marginal probabilities exactly 0) must not give NaN gradients."""
    from w2v2.losses import codebook_perplexity

    logits = torch.tensor([[[0.0, -200.0, -200.0]], [[0.0, -200.0, -200.0]]], requires_grad=True)  # (frames, G, V)
    codebook_perplexity(logits.softmax(-1)).backward()
    assert torch.isfinite(logits.grad).all()
