"""Span masking and distractor sampling for wav2vec 2.0 (pure tensor functions).

Time masking follows fairseq's ``compute_mask_indices`` (``mask_type="static"``,
``no_overlap=False``, ``require_same_masks=True``): per utterance,
``num_spans = int(mask_prob * valid_len / mask_length + u)`` with ``u ~ U[0, 1)``
(probabilistic rounding), at least ``min_masks``; span starts are drawn uniformly
without replacement; spans may overlap; afterwards every utterance keeps the same number
of masked frames (the minimum over the batch), so the masked frames of a batch form a
dense ``(batch, n_masked)`` grid.

Randomness comes only from the optional ``torch.Generator`` argument (CPU generator;
the masks are built on the CPU, as in fairseq and Hugging Face, and can be moved with
``.to(device)``). Pass a seeded generator for reproducible masks; ``None`` uses torch's
global RNG.

Differences from fairseq worth knowing:

* Start positions range over ``[0, valid_len - span]`` inclusive, so the final frame can
  be masked; fairseq draws from ``range(valid_len - span)`` and never starts a span at
  the last possible position.
* If more spans are asked for than there are start positions (short utterances, large
  ``min_masks``), the number of spans is clamped to the number of start positions.
* An utterance shorter than ``mask_length`` uses a single span length of ``valid_len``
  (fairseq raises in that case).
"""

from __future__ import annotations

import torch


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _num_spans(valid_len: int, mask_prob: float, span: int, min_masks: int, u: float) -> int:
    """Probabilistically rounded number of spans, at least ``min_masks``, at most the starts."""
    num = max(min_masks, int(mask_prob * valid_len / span + u))
    return min(num, valid_len - span + 1)


def _span_indices(
    valid_len: int, num_spans: int, span: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Sorted unique frame indices covered by ``num_spans`` random spans of ``span`` frames.

    Starts are drawn without replacement from ``[0, valid_len - span]``; returns a 1-D
    LongTensor with values in ``[0, valid_len)``.
    """
    if num_spans <= 0:
        return torch.zeros(0, dtype=torch.long)
    starts = torch.randperm(valid_len - span + 1, generator=generator)[:num_spans]
    frames = starts[:, None] + torch.arange(span)[None, :]  # (num_spans, span)
    return torch.unique(frames.flatten())


def _check_lengths(lengths: torch.Tensor | None, batch: int, size: int) -> list[int]:
    if lengths is None:
        return [size] * batch
    lengths = torch.as_tensor(lengths)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape (batch,) = ({batch},), got {tuple(lengths.shape)}")
    out = [int(n) for n in lengths.tolist()]
    bad = [n for n in out if n < 1 or n > size]
    if bad:
        raise ValueError(
            f"every valid length must lie in [1, {size}] (the padded number of frames), got {bad}; "
            "drop empty utterances from the batch before masking"
        )
    return out


def _check_args(shape: tuple[int, int], mask_prob: float, mask_length: int) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"shape must be (batch, frames), got {tuple(shape)}")
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must lie in [0, 1], got {mask_prob}")
    if mask_length < 1:
        raise ValueError(f"mask_length must be >= 1, got {mask_length}")
    return int(shape[0]), int(shape[1])


def compute_mask_indices(
    shape: tuple[int, int],
    mask_prob: float = 0.65,
    mask_length: int = 10,
    lengths: torch.Tensor | None = None,
    min_masks: int = 2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Time mask for pretraining (or fine-tuning), fairseq "static" spans, equalised.

    Args:
        shape: ``(batch, frames)``, frames being the padded number of latent frames.
        mask_prob: ``mask_prob * valid_len / mask_length`` spans per utterance (before
            rounding), i.e. the fraction of frames that *start* a span is
            ``mask_prob / mask_length``; with the defaults about 49% of frames end up masked.
        mask_length: span length in frames (clamped to ``valid_len`` for short utterances).
        lengths: ``(batch,)`` valid (unpadded) frames per utterance, or ``None`` for all
            ``frames``. Masked frames always lie inside ``[0, lengths[b])``.
        min_masks: lower bound on the number of spans per utterance.
        generator: CPU ``torch.Generator`` for reproducibility.

    Returns:
        BoolTensor ``(batch, frames)``; every row has the same number of ``True`` entries
        (the minimum over the batch of each row's unique masked frames).
    """
    batch, frames = _check_args(shape, mask_prob, mask_length)
    if frames == 0:
        return torch.zeros(batch, 0, dtype=torch.bool)
    valid = _check_lengths(lengths, batch, frames)
    # fairseq draws one shared rounding variable when there is no padding information.
    shared_u = _uniform(generator) if lengths is None else None

    per_item = []
    for valid_len in valid:
        span = min(mask_length, valid_len)
        u = shared_u if shared_u is not None else _uniform(generator)
        num = _num_spans(valid_len, mask_prob, span, min_masks, u)
        per_item.append(_span_indices(valid_len, num, span, generator))

    keep = min((len(idx) for idx in per_item), default=0)
    mask = torch.zeros(batch, frames, dtype=torch.bool)
    for b, idx in enumerate(per_item):
        if len(idx) > keep:
            idx = idx[torch.randperm(len(idx), generator=generator)[:keep]]
        mask[b, idx] = True
    return mask


def compute_channel_mask(
    shape: tuple[int, int],
    mask_prob: float,
    mask_length: int,
    min_masks: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Channel mask for fine-tuning (fairseq ``mask_channel_*``): same spans along channels.

    Each utterance draws its own number of spans,
    ``max(min_masks, int(mask_prob * channels / mask_length + u))``; no equalisation.

    Args:
        shape: ``(batch, channels)``.
    Returns:
        BoolTensor ``(batch, channels)``; apply to features ``(batch, time, channels)`` as
        ``features.masked_fill(mask[:, None, :], 0.0)``.
    """
    batch, channels = _check_args(shape, mask_prob, mask_length)
    mask = torch.zeros(batch, channels, dtype=torch.bool)
    if channels == 0:
        return mask
    span = min(mask_length, channels)
    for b in range(batch):
        num = _num_spans(channels, mask_prob, span, min_masks, _uniform(generator))
        mask[b, _span_indices(channels, num, span, generator)] = True
    return mask


def masked_counts(mask: torch.Tensor) -> int:
    """Number of masked frames per utterance of a ``(batch, frames)`` mask; raises if unequal."""
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a (batch, frames) bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    counts = mask.sum(dim=1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError(
            f"every utterance must have the same number of masked frames, got {counts.tolist()}; "
            "build the mask with compute_mask_indices (which equalises the counts)"
        )
    return int(counts[0]) if counts.numel() else 0


def sample_negatives(
    mask: torch.Tensor, num_negatives: int = 100, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Distractor frame indices for each masked frame (fairseq / Hugging Face semantics).

    For the j-th masked frame of utterance b, ``num_negatives`` indices are drawn uniformly
    *with* replacement from the other ``n - 1`` masked frames of utterance b: draw
    ``s ~ U{0, ..., n-2}``, then shift ``s >= j`` up by one, so the positive itself is never
    drawn and the others stay equally likely.

    Args:
        mask: ``(batch, frames)`` bool, the same number ``n`` of masked frames per row.
        num_negatives: ``K``.
        generator: CPU ``torch.Generator`` for reproducibility.

    Returns:
        LongTensor ``(batch, n, K)`` of frame indices into ``[0, frames)`` (no batch offset).
        Row ``j`` belongs to the j-th masked frame in time order, matching
        :func:`gather_masked`; feed it to :func:`gather_negatives`.

    Compared with Hugging Face ``_sample_negative_indices`` the draw is the same (uniform
    over the other masked frames of the utterance, shift-by-one trick) but the layout
    differs: HF returns ``(batch, frames, K)`` for every frame (rows of unmasked frames are
    filler) with indices offset by ``b * frames`` into the flattened batch, and uses
    NumPy's global RNG. Convert with
    ``hf = zeros(batch, frames, K); hf[mask] = (neg + frames * arange(batch)[:, None, None]).view(-1, K)``.
    fairseq (``cross_sample_negatives=0``) also draws from the masked frames only.
    """
    n = masked_counts(mask)
    batch = mask.shape[0]
    if n == 1 and num_negatives > 0:
        raise ValueError(
            "each utterance has only 1 masked frame, so there is no other masked frame to draw "
            "negatives from; raise mask_prob/min_masks or use longer utterances"
        )
    positions = mask.cpu().nonzero()[:, 1].view(batch, n)  # (batch, n), time order
    if n == 0 or num_negatives == 0:
        return torch.zeros(batch, n, num_negatives, dtype=torch.long)
    draws = torch.randint(0, n - 1, (batch, n, num_negatives), generator=generator)
    draws += (draws >= torch.arange(n)[None, :, None]).long()  # skip the positive itself
    negatives = positions.gather(1, draws.view(batch, n * num_negatives))
    return negatives.view(batch, n, num_negatives).to(mask.device)


def gather_masked(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Select masked frames: ``(batch, frames, dim)`` and ``(batch, frames)`` -> ``(batch, n, dim)``."""
    if features.dim() != 3 or features.shape[:2] != mask.shape:
        raise ValueError(
            f"features must be (batch, frames, dim) matching mask {tuple(mask.shape)}, got {tuple(features.shape)}"
        )
    n = masked_counts(mask)
    return features[mask].view(features.shape[0], n, features.shape[2])


def gather_negatives(features: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Look up distractors: ``(batch, frames, dim)`` and ``(batch, n, K)`` -> ``(batch, n, K, dim)``."""
    if features.dim() != 3 or negatives.dim() != 3 or negatives.shape[0] != features.shape[0]:
        raise ValueError(
            f"need features (batch, frames, dim) and negatives (batch, n, K) with equal batch, "
            f"got {tuple(features.shape)} and {tuple(negatives.shape)}"
        )
    batch = torch.arange(features.shape[0], device=features.device)[:, None, None]
    return features[batch, negatives.to(features.device)]
