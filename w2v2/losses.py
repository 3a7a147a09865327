"""Losses for wav2vec 2.0 pretraining and CTC fine-tuning (pure tensor functions).

Pretraining (fairseq ``Wav2vecCriterion`` with ``infonce=True``)::

    total = contrastive_sum
          + diversity_weight * diversity * n_masked
          + penalty_weight * penalty * n_masked

The contrastive term is a *sum* over the ``n_masked = batch * n`` masked frames, and fairseq
scales the per-batch extra losses by the same sample size, so the per-frame loss of each
component is ``value / n_masked`` (the trainer divides the total by ``n_masked``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_logits(
    context: torch.Tensor,
    quantized: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Cosine similarities between context and [positive, distractors], over ``temperature``.

    Args:
        context: ``(batch, n, dim)`` projected transformer outputs at the masked frames.
        quantized: ``(batch, n, dim)`` projected quantized targets (positives) at those frames.
        negatives: ``(batch, n, K, dim)`` projected quantized distractors.
        temperature: kappa in the paper (0.1).

    Returns:
        float32 ``(batch, n, 1 + K)``; index 0 is the positive. A distractor equal to its
        positive in every element gets ``-inf`` (fairseq ``neg_is_pos``: happens when the
        codebook is poorly used), so it cannot count against the positive.
    """
    if context.dim() != 3 or quantized.shape != context.shape:
        raise ValueError(
            f"context and quantized must both be (batch, n, dim), got {tuple(context.shape)} "
            f"and {tuple(quantized.shape)}"
        )
    if negatives.dim() != 4 or negatives.shape[:2] != context.shape[:2] or negatives.shape[3] != context.shape[2]:
        raise ValueError(
            f"negatives must be (batch, n, K, dim) = {tuple(context.shape[:2])} + (K, {context.shape[2]}), "
            f"got {tuple(negatives.shape)}"
        )
    targets = torch.cat([quantized[:, :, None], negatives], dim=2)  # (batch, n, 1 + K, dim)
    logits = torch.cosine_similarity(context.float()[:, :, None], targets.float(), dim=-1) / temperature
    neg_is_pos = (negatives == quantized[:, :, None]).all(dim=-1)  # (batch, n, K)
    return torch.cat([logits[..., :1], logits[..., 1:].masked_fill(neg_is_pos, float("-inf"))], dim=-1)


def contrastive_loss(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE summed over frames, and the number of frames the positive wins.

    Args:
        logits: ``(batch, n, 1 + K)`` from :func:`contrastive_logits`, positive at index 0.

    Returns:
        ``(loss_sum, accuracy_count)``: cross-entropy with target 0, ``reduction="sum"``
        (float32 scalar), and a long scalar counting frames with ``argmax == 0`` and
        ``argmin != 0`` -- fairseq's ``corr = max.sum() - (max & min).sum()``. Ties at the
        maximum go to the lowest index (so a distractor merely tying the positive still
        counts as correct); only rows where all logits are equal (including ``K = 0``) are
        counted as wrong. Accuracy = ``accuracy_count / (batch * n)``.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (batch, n, 1 + K), got {tuple(logits.shape)}")
    flat = logits.reshape(-1, logits.shape[-1]).float()  # (batch * n, 1 + K)
    target = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
    loss = F.cross_entropy(flat, target, reduction="sum")
    if flat.shape[0] == 0:
        return loss, torch.zeros((), dtype=torch.long, device=flat.device)
    is_max = flat.argmax(dim=-1) == 0
    is_min = flat.argmin(dim=-1) == 0
    return loss, (is_max & ~is_min).sum()


def codebook_perplexity(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Perplexity of the average codeword distribution, summed over groups.

    ``sum_g exp(H(mean_t probs[t, g]))`` (Hugging Face ``_compute_perplexity``): ``G * V`` for
    uniform use of every codeword, ``G`` when each group always picks one codeword.

    Args:
        probs: ``(frames, G, V)`` codeword probabilities (e.g. ``(batch * time, G, V)``).
        mask: optional bool mask with ``frames`` elements in any shape (e.g. the
            ``(batch, time)`` time mask); only those frames are averaged. An all-False mask
            gives ``G`` rather than NaN.
    Returns:
        float scalar.
    """
    if probs.dim() != 3:
        raise ValueError(f"probs must be (frames, G, V), got {tuple(probs.shape)}")
    if mask is None:
        marginal = probs.mean(dim=0)  # (G, V)
    else:
        mask = mask.flatten()
        if mask.numel() != probs.shape[0]:
            raise ValueError(f"mask has {mask.numel()} elements but probs has {probs.shape[0]} frames")
        kept = probs.masked_fill(~mask.bool()[:, None, None], 0.0)
        marginal = kept.sum(dim=0) / mask.sum().clamp(min=1)
    # log(p + 1e-7) as fairseq and Hugging Face: xlogy(p, p) has the right value at p = 0 but an
    # infinite gradient there, which turns a collapsed codebook's gradients into NaN.
    return torch.exp(-(marginal * torch.log(marginal + 1e-7)).sum(dim=-1)).sum()


def diversity_loss(perplexity: torch.Tensor, num_groups: int, num_vars: int) -> torch.Tensor:
    """``(G * V - perplexity) / (G * V)``: 0 for uniform codeword use, ``1 - 1/V`` at collapse."""
    total = num_groups * num_vars
    return (total - perplexity) / total


def feature_penalty(features: torch.Tensor) -> torch.Tensor:
    """L2 penalty on the feature encoder output ``(batch, time, channels)``: mean of squares."""
    return features.float().pow(2).mean()


def _flatten_targets(targets: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """Padded ``(batch, S)`` or flat ``(sum(target_lengths),)`` targets -> flat 1-D."""
    if targets.dim() == 1:
        if targets.numel() != int(target_lengths.sum()):
            raise ValueError(
                f"flat targets have {targets.numel()} labels but target_lengths sum to {int(target_lengths.sum())}"
            )
        return targets
    if targets.dim() != 2 or targets.shape[0] != target_lengths.shape[0]:
        raise ValueError(
            f"padded targets must be (batch, S) with batch {target_lengths.shape[0]}, got {tuple(targets.shape)}"
        )
    if target_lengths.numel() and int(target_lengths.max()) > targets.shape[1]:
        raise ValueError(f"a target length exceeds the padded target width {targets.shape[1]}")
    keep = torch.arange(targets.shape[1], device=targets.device)[None, :] < target_lengths[:, None].to(targets.device)
    return targets[keep]


def ctc_loss(
    log_probs: torch.Tensor,
    input_lengths: torch.Tensor,
    targets: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int = 0,
    zero_infinity: bool = True,
    reduction: str = "sum",
) -> torch.Tensor:
    """CTC loss over batch-first log-probabilities (thin wrapper over ``F.ctc_loss``).

    Args:
        log_probs: ``(batch, T, V)`` log-softmax outputs; computed in float32.
        input_lengths: ``(batch,)`` valid frames per utterance, each ``<= T``.
        targets: ``(batch, S)`` labels padded beyond ``target_lengths`` (e.g. with -100), or
            flat ``(sum(target_lengths),)``. Labels must lie in ``[0, V)`` and differ from
            ``blank``.
        target_lengths: ``(batch,)``.
        reduction: ``"sum"`` (fairseq / HF fine-tuning), ``"mean"`` or ``"none"`` as in torch.

    cuDNN's CTC is disabled, as in Hugging Face, for determinism and padded-target support.
    """
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must be (batch, T, V), got {tuple(log_probs.shape)}")
    batch, frames, vocab = log_probs.shape
    input_lengths = torch.as_tensor(input_lengths, dtype=torch.long)
    target_lengths = torch.as_tensor(target_lengths, dtype=torch.long)
    if input_lengths.shape != (batch,) or target_lengths.shape != (batch,):
        raise ValueError(
            f"input_lengths and target_lengths must be (batch,) = ({batch},), got "
            f"{tuple(input_lengths.shape)} and {tuple(target_lengths.shape)}"
        )
    if batch and int(input_lengths.max()) > frames:
        raise ValueError(f"an input length {int(input_lengths.max())} exceeds the {frames} frames of log_probs")
    flat = _flatten_targets(targets, target_lengths).long()
    if flat.numel() and (bool((flat < 0).any()) or bool((flat >= vocab).any()) or bool((flat == blank).any())):
        raise ValueError(f"target labels must lie in [0, {vocab}) and differ from blank={blank}")
    with torch.backends.cudnn.flags(enabled=False):
        return F.ctc_loss(
            log_probs.float().transpose(0, 1),  # (T, batch, V)
            flat,
            input_lengths,
            target_lengths,
            blank=blank,
            reduction=reduction,
            zero_infinity=zero_infinity,
        )


def pretraining_loss(
    logits: torch.Tensor,
    perplexity: torch.Tensor,
    num_groups: int,
    num_vars: int,
    penalty: torch.Tensor | None = None,
    diversity_weight: float = 0.1,
    penalty_weight: float = 10.0,
) -> dict[str, torch.Tensor | int]:
    """Combine the wav2vec 2.0 pretraining losses as fairseq does.

    Args:
        logits: ``(batch, n, 1 + K)`` from :func:`contrastive_logits`.
        perplexity: scalar from :func:`codebook_perplexity`.
        num_groups, num_vars: codebook size ``G`` and ``V``.
        penalty: scalar from :func:`feature_penalty`, or ``None`` to leave it out.

    Returns:
        dict with ``total`` (to backpropagate; a sum over frames), ``contrastive`` (sum),
        ``diversity`` and ``penalty`` (unweighted, per-batch values), ``accuracy`` (count of
        frames won by the positive) and ``n_masked`` (``batch * n``, an int). Per-frame
        values are ``total / n_masked``, ``contrastive / n_masked`` and
        ``accuracy / n_masked``.
    """
    n_masked = logits.shape[0] * logits.shape[1]
    contrastive, accuracy = contrastive_loss(logits)
    diversity = diversity_loss(perplexity, num_groups, num_vars)
    if penalty is None:
        penalty = torch.zeros((), device=contrastive.device)
    total = contrastive + (diversity_weight * diversity + penalty_weight * penalty) * n_masked
    return {
        "total": total,
        "contrastive": contrastive,
        "diversity": diversity,
        "penalty": penalty,
        "accuracy": accuracy,
        "n_masked": n_masked,
    }
