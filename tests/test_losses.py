import math

import pytest
import torch
import torch.nn.functional as F

from w2v2.losses import (
    codebook_perplexity,
    contrastive_logits,
    contrastive_loss,
    ctc_loss,
    diversity_loss,
    feature_penalty,
    pretraining_loss,
)
from w2v2.masking import compute_mask_indices, gather_masked, gather_negatives, sample_negatives


def tiny_case():
    """Two masked frames of one utterance, dim 2, K = 2, temperature 0.5."""
    context = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (1, 2, 2)
    quantized = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # (1, 2, 2)
    negatives = torch.tensor([[[[0.0, 1.0], [-1.0, 0.0]], [[0.0, 3.0], [3.0, 0.0]]]])  # (1, 2, 2, 2)
    return context, quantized, negatives


# ---------------------------------------------------------------- contrastive


def test_contrastive_logits_hand_computed():
    logits = contrastive_logits(*tiny_case(), temperature=0.5)
    # frame 0: cos = [1, 0, -1]; frame 1: cos = [1/sqrt2, 1, 0]; divided by 0.5
    expected = torch.tensor([[[2.0, 0.0, -2.0], [math.sqrt(2), 2.0, 0.0]]])
    assert logits.dtype == torch.float32 and logits.shape == (1, 2, 3)
    assert torch.allclose(logits, expected, atol=1e-6)


def test_contrastive_loss_hand_computed():
    loss, correct = contrastive_loss(contrastive_logits(*tiny_case(), temperature=0.5))
    frame0 = math.log(1 + math.exp(-2) + math.exp(-4))
    frame1 = -math.sqrt(2) + math.log(math.exp(math.sqrt(2)) + math.exp(2) + 1)
    assert loss.item() == pytest.approx(frame0 + frame1, rel=1e-6)
    assert correct.item() == 1  # frame 0 won, frame 1 lost to a distractor


def test_neg_is_pos_gets_minus_inf():
    context, quantized, negatives = tiny_case()
    negatives = negatives.clone()
    negatives[0, 0, 1] = quantized[0, 0]  # distractor identical to its positive
    logits = contrastive_logits(context, quantized, negatives, temperature=0.5)
    assert logits[0, 0, 2] == float("-inf") and torch.isfinite(logits[0, 1]).all()
    loss, _ = contrastive_loss(logits[:, :1])
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    # A distractor that is only parallel (cosine 1, different vector) is kept.
    negatives[0, 0, 1] = 2 * quantized[0, 0]
    assert contrastive_logits(context, quantized, negatives, 0.5)[0, 0, 2].item() == pytest.approx(2.0)


def test_accuracy_follows_fairseq_ties():
    logits = torch.tensor(
        [[[3.0, 1.0, 2.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 2.0, 0.0], [2.0, float("-inf"), 1.0]]]
    )
    _, correct = contrastive_loss(logits)
    # win; tie at max (argmax picks 0 -> correct); all equal -> wrong; loss; win against -inf
    assert correct.item() == 3
    _, correct = contrastive_loss(torch.zeros(2, 3, 1))  # K = 0: always wrong
    assert correct.item() == 0


def test_contrastive_shape_errors():
    context, quantized, negatives = tiny_case()
    with pytest.raises(ValueError, match="negatives"):
        contrastive_logits(context, quantized, negatives[:, :1])
    with pytest.raises(ValueError, match="context"):
        contrastive_logits(context, quantized[0], negatives)


# ---------------------------------------------------------------- codebook


def test_uniform_codebook_has_full_perplexity_and_zero_loss():
    probs = torch.full((7, 2, 4), 0.25)
    perplexity = codebook_perplexity(probs)
    assert perplexity.item() == pytest.approx(8.0)
    assert diversity_loss(perplexity, 2, 4).item() == pytest.approx(0.0, abs=1e-6)


def test_collapsed_codebook_has_max_loss():
    probs = F.one_hot(torch.zeros(7, 2, dtype=torch.long), 4).float()  # every frame picks code 0
    perplexity = codebook_perplexity(probs)
    assert perplexity.item() == pytest.approx(2.0)
    assert diversity_loss(perplexity, 2, 4).item() == pytest.approx(1 - 1 / 4)


def test_perplexity_mask_hand_computed():
    probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (frames=2, G=1, V=2)
    assert codebook_perplexity(probs).item() == pytest.approx(2.0)
    assert codebook_perplexity(probs, torch.tensor([True, False])).item() == pytest.approx(1.0)
    assert codebook_perplexity(probs, torch.tensor([False, False])).item() == pytest.approx(1.0)  # G, not NaN


def test_feature_penalty():
    features = torch.tensor([[[1.0, -2.0], [3.0, 0.0]]], dtype=torch.float16)
    penalty = feature_penalty(features)
    assert penalty.dtype == torch.float32 and penalty.item() == pytest.approx(14 / 4)


# ---------------------------------------------------------------- CTC


def test_ctc_single_frame_hand_computed():
    log_probs = torch.log(torch.tensor([[[0.3, 0.7]]]))  # (1, T=1, V=2)
    loss = ctc_loss(log_probs, torch.tensor([1]), torch.tensor([[1]]), torch.tensor([1]))
    assert loss.item() == pytest.approx(-math.log(0.7), rel=1e-6)


def test_ctc_matches_torch_padded_and_flat():
    torch.manual_seed(0)
    log_probs = torch.randn(3, 20, 6).log_softmax(-1)
    input_lengths = torch.tensor([20, 15, 9])
    target_lengths = torch.tensor([5, 3, 1])
    padded = torch.full((3, 5), -100)
    flat = torch.randint(1, 6, (9,))
    for b, (start, n) in enumerate([(0, 5), (5, 3), (8, 1)]):
        padded[b, :n] = flat[start : start + n]
    reference = F.ctc_loss(log_probs.transpose(0, 1), flat, input_lengths, target_lengths, reduction="sum", zero_infinity=True)
    assert torch.allclose(ctc_loss(log_probs, input_lengths, padded, target_lengths), reference)
    assert torch.allclose(ctc_loss(log_probs, input_lengths, flat, target_lengths), reference)
    none = ctc_loss(log_probs, input_lengths, padded, target_lengths, reduction="none")
    assert none.shape == (3,) and torch.allclose(none.sum(), reference)


def test_ctc_zero_infinity_and_errors():
    log_probs = torch.randn(1, 2, 4).log_softmax(-1)
    targets = torch.tensor([[1, 2, 3]])  # needs >= 3 frames
    assert ctc_loss(log_probs, torch.tensor([2]), targets, torch.tensor([3])).item() == 0.0
    with pytest.raises(ValueError, match="blank"):
        ctc_loss(log_probs, torch.tensor([2]), torch.tensor([[0]]), torch.tensor([1]))
    with pytest.raises(ValueError, match="exceeds"):
        ctc_loss(log_probs, torch.tensor([3]), torch.tensor([[1]]), torch.tensor([1]))
    with pytest.raises(ValueError, match="batch, T, V"):
        ctc_loss(log_probs[0], torch.tensor([2]), torch.tensor([[1]]), torch.tensor([1]))
    with pytest.raises(ValueError, match="flat targets"):
        ctc_loss(log_probs, torch.tensor([2]), torch.tensor([1, 2]), torch.tensor([1]))


# ---------------------------------------------------------------- combined


def test_pretraining_loss_combines_like_fairseq():
    logits = contrastive_logits(*tiny_case(), temperature=0.5)
    contrastive, correct = contrastive_loss(logits)
    out = pretraining_loss(logits, torch.tensor(6.0), 2, 4, penalty=torch.tensor(0.5))
    assert out["n_masked"] == 2 and out["accuracy"].item() == correct.item()
    assert out["diversity"].item() == pytest.approx(0.25)
    expected = contrastive.item() + 0.1 * 0.25 * 2 + 10 * 0.5 * 2
    assert out["total"].item() == pytest.approx(expected, rel=1e-6)
    no_penalty = pretraining_loss(logits, torch.tensor(6.0), 2, 4)
    assert no_penalty["total"].item() == pytest.approx(contrastive.item() + 0.05, rel=1e-6)


# ---------------------------------------------------------------- Hugging Face parity


def test_contrastive_logits_match_transformers():
    transformers = pytest.importorskip("transformers")
    hf = transformers.Wav2Vec2ForPreTraining.compute_contrastive_logits
    torch.manual_seed(1)
    context, quantized, negatives = torch.randn(2, 7, 16), torch.randn(2, 7, 16), torch.randn(2, 7, 5, 16)
    ours = contrastive_logits(context, quantized, negatives, temperature=0.1)  # (batch, n, 1 + K)
    # HF layout: targets (1, batch, n, dim), negatives (K, batch, n, dim) -> (1 + K, batch, n)
    theirs = hf(quantized[None], negatives.permute(2, 0, 1, 3), context, 0.1)
    assert torch.allclose(ours.permute(2, 0, 1), theirs, atol=1e-5)


def test_perplexity_matches_transformers():
    transformers = pytest.importorskip("transformers")
    hf = transformers.models.wav2vec2.modeling_wav2vec2.Wav2Vec2GumbelVectorQuantizer._compute_perplexity
    torch.manual_seed(2)
    probs = torch.randn(3 * 11, 2, 8).softmax(-1)
    mask = torch.rand(3, 11) > 0.5
    assert torch.allclose(codebook_perplexity(probs), hf(probs), atol=1e-5)
    assert torch.allclose(codebook_perplexity(probs, mask), hf(probs, mask), atol=1e-5)


def test_pretraining_loss_matches_transformers_model():
    """Our mask, negatives and losses reproduce Wav2Vec2ForPreTraining's loss on a tiny random model.

    The model runs in eval mode, where the quantizer picks codewords by argmax from a small
    codebook (2 groups x 4), so many distractors equal their positive: neg_is_pos is exercised.
    """
    transformers = pytest.importorskip("transformers")
    config = transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, codevector_dim=8, proj_codevector_dim=8,
        num_codevector_groups=2, num_codevectors_per_group=4, num_negatives=6,
    )
    torch.manual_seed(3)
    model = transformers.Wav2Vec2ForPreTraining(config).eval()
    waves = torch.randn(2, 1600)
    frames = int(model._get_feat_extract_output_lengths(1600))
    g = torch.Generator().manual_seed(4)
    mask = compute_mask_indices((2, frames), mask_prob=0.5, mask_length=4, generator=g)
    negatives = sample_negatives(mask, config.num_negatives, generator=g)  # (batch, n, K)
    # HF wants (batch, frames, K) indices into the flattened (batch * frames) features.
    hf_negatives = torch.zeros(2, frames, config.num_negatives, dtype=torch.long)
    hf_negatives[mask] = (negatives + frames * torch.arange(2)[:, None, None]).view(-1, config.num_negatives)
    with torch.no_grad():
        out = model(waves, mask_time_indices=mask, sampled_negative_indices=hf_negatives)
    predicted, targets = out.projected_states, out.projected_quantized_states  # (batch, frames, dim)
    logits = contrastive_logits(
        gather_masked(predicted, mask), gather_masked(targets, mask), gather_negatives(targets, negatives),
        config.contrastive_logits_temperature,
    )
    assert torch.isinf(logits).any()  # neg_is_pos really happened
    ours = pretraining_loss(logits, out.codevector_perplexity, 2, 4, diversity_weight=config.diversity_loss_weight)
    assert torch.allclose(ours["contrastive"], out.contrastive_loss, rtol=1e-5)
    assert torch.allclose(ours["diversity"] * ours["n_masked"], out.diversity_loss, rtol=1e-5)
    assert torch.allclose(ours["total"], out.loss, rtol=1e-5)
