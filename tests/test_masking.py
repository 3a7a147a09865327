import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from w2v2.masking import (
    compute_channel_mask,
    compute_mask_indices,
    gather_masked,
    gather_negatives,
    masked_counts,
    sample_negatives,
)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- time masks


def test_mask_shape_dtype_and_equal_counts():
    lengths = torch.tensor([120, 80, 100, 60])
    mask = compute_mask_indices((4, 120), lengths=lengths, generator=seeded())
    assert mask.shape == (4, 120) and mask.dtype == torch.bool
    counts = mask.sum(dim=1)
    assert (counts == counts[0]).all() and counts[0] > 0


def test_mask_respects_lengths():
    lengths = torch.tensor([50, 23, 11, 37])
    for seed in range(20):
        mask = compute_mask_indices((4, 50), lengths=lengths, generator=seeded(seed))
        for b, n in enumerate(lengths.tolist()):
            assert not mask[b, n:].any()


def test_masked_fraction_matches_start_probability():
    # mask_prob 0.65 with spans of 10 means each frame starts a span with p = 0.065,
    # so a frame is covered with probability about 1 - (1 - p) ** 10 = 0.489.
    expected = 1 - (1 - 0.065) ** 10
    g = seeded(1)
    single = torch.stack([compute_mask_indices((1, 2000), generator=g).float().mean() for _ in range(20)])
    assert abs(single.mean().item() - expected) < 0.02
    # Equalising a batch keeps the minimum count, so slightly less.
    batched = torch.stack([compute_mask_indices((8, 2000), generator=g).float().mean() for _ in range(10)])
    assert expected - 0.06 < batched.mean().item() < expected


def test_min_masks_honoured():
    # mask_prob 0 leaves exactly min_masks distinct spans of 10: 11..20 frames, contiguous runs.
    for seed in range(20):
        mask = compute_mask_indices((1, 100), mask_prob=0.0, mask_length=10, min_masks=2, generator=seeded(seed))
        assert 11 <= int(mask.sum()) <= 20
    assert not compute_mask_indices((2, 100), mask_prob=0.0, min_masks=0).any()


def test_spans_are_whole_before_equalisation():
    # A single item is never subsampled: every masked run is a union of full 10-frame spans.
    mask = compute_mask_indices((1, 300), mask_prob=0.2, mask_length=10, min_masks=1, generator=seeded(3))[0]
    edges = torch.diff(mask.int(), prepend=torch.zeros(1, dtype=torch.int), append=torch.zeros(1, dtype=torch.int))
    starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
    assert len(starts) > 0 and ((ends - starts) >= 10).all()


def test_short_utterance_clamps_span():
    mask = compute_mask_indices((2, 20), mask_length=10, lengths=torch.tensor([20, 4]), generator=seeded())
    assert not mask[1, 4:].any()
    assert mask.sum(1)[0] == mask.sum(1)[1] == 4  # the 4-frame item is fully masked, the other equalised


def test_deterministic_with_seed():
    a = compute_mask_indices((3, 200), lengths=torch.tensor([200, 150, 90]), generator=seeded(7))
    b = compute_mask_indices((3, 200), lengths=torch.tensor([200, 150, 90]), generator=seeded(7))
    c = compute_mask_indices((3, 200), lengths=torch.tensor([200, 150, 90]), generator=seeded(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(shape=(2, 10), lengths=torch.tensor([10, 0])),
        dict(shape=(2, 10), lengths=torch.tensor([10, 11])),
        dict(shape=(2, 10), lengths=torch.tensor([10])),
        dict(shape=(2, 10), mask_prob=1.5),
        dict(shape=(2, 10), mask_length=0),
    ],
)
def test_mask_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        compute_mask_indices(**kwargs)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    batch=st.integers(1, 5),
    frames=st.integers(1, 150),
    mask_prob=st.floats(0.0, 1.0),
    mask_length=st.integers(1, 15),
    min_masks=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_mask_properties(data, batch, frames, mask_prob, mask_length, min_masks, seed):
    lengths = torch.tensor(data.draw(st.lists(st.integers(1, frames), min_size=batch, max_size=batch)))
    mask = compute_mask_indices((batch, frames), mask_prob, mask_length, lengths, min_masks, seeded(seed))
    assert mask.shape == (batch, frames) and mask.dtype == torch.bool
    counts = mask.sum(dim=1)
    assert (counts == counts[0]).all()
    assert counts[0] <= lengths.min()
    positions = torch.arange(frames)[None, :]
    assert not (mask & (positions >= lengths[:, None])).any()
    if min_masks > 0:
        assert counts[0] >= 1
    assert torch.equal(mask, compute_mask_indices((batch, frames), mask_prob, mask_length, lengths, min_masks, seeded(seed)))


# ---------------------------------------------------------------- channel masks


def test_channel_mask():
    mask = compute_channel_mask((3, 64), mask_prob=0.5, mask_length=8, generator=seeded())
    assert mask.shape == (3, 64) and mask.dtype == torch.bool and mask.any()
    assert not compute_channel_mask((3, 64), mask_prob=0.0, mask_length=8).any()
    assert compute_channel_mask((2, 64), 0.0, 8, min_masks=1, generator=seeded()).sum(1).ge(8).all()
    assert torch.equal(compute_channel_mask((3, 64), 0.3, 4, generator=seeded(5)), compute_channel_mask((3, 64), 0.3, 4, generator=seeded(5)))


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 4), channels=st.integers(1, 100), p=st.floats(0, 1), length=st.integers(1, 20), seed=st.integers(0, 1000))
def test_channel_mask_properties(batch, channels, p, length, seed):
    mask = compute_channel_mask((batch, channels), p, length, generator=seeded(seed))
    assert mask.shape == (batch, channels)


# ---------------------------------------------------------------- negatives


def test_negatives_never_positive_and_within_masked_frames():
    lengths = torch.tensor([100, 70, 40])
    mask = compute_mask_indices((3, 100), lengths=lengths, generator=seeded(2))
    n = masked_counts(mask)
    neg = sample_negatives(mask, num_negatives=50, generator=seeded(3))
    assert neg.shape == (3, n, 50) and neg.dtype == torch.long
    positions = torch.stack([row.nonzero().flatten() for row in mask])  # (batch, n)
    assert (neg != positions[:, :, None]).all()
    for b in range(3):
        assert mask[b, neg[b]].all()


def test_negatives_roughly_uniform():
    mask = torch.zeros(1, 12, dtype=torch.bool)
    masked = torch.tensor([1, 4, 5, 9, 11])
    mask[0, masked] = True
    neg = sample_negatives(mask, num_negatives=20000, generator=seeded(4))[0]  # (5, K)
    for j, positive in enumerate(masked.tolist()):
        freq = torch.stack([(neg[j] == m).float().mean() for m in masked.tolist()])
        others = masked != positive
        assert freq[~others].item() == 0.0
        assert torch.allclose(freq[others], torch.full((4,), 0.25), atol=0.02)


def test_negatives_errors():
    one = torch.zeros(2, 5, dtype=torch.bool)
    one[:, 2] = True
    with pytest.raises(ValueError, match="only 1 masked frame"):
        sample_negatives(one, 3)
    unequal = torch.tensor([[True, True, False], [True, False, False]])
    with pytest.raises(ValueError, match="same number of masked frames"):
        sample_negatives(unequal, 3)


def test_gather_helpers_line_up_with_negatives():
    features = torch.arange(2 * 6, dtype=torch.float).view(2, 6, 1).expand(2, 6, 3)  # value = b * 6 + t
    mask = torch.tensor([[0, 1, 0, 1, 1, 0], [1, 0, 0, 1, 0, 1]], dtype=torch.bool)
    masked = gather_masked(features, mask)
    assert masked.shape == (2, 3, 3)
    assert masked[:, :, 0].tolist() == [[1, 3, 4], [6, 9, 11]]
    neg = sample_negatives(mask, 4, generator=seeded())
    gathered = gather_negatives(features, neg)  # (2, 3, 4, 3)
    assert gathered.shape == (2, 3, 4, 3)
    assert torch.equal(gathered[..., 0], (neg + torch.tensor([0, 6])[:, None, None]).float())
