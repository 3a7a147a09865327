"""The one batch-padding function, whole-utterance logits in padded batches, the one device resolver."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import tiny_ctc_model
from w2v2.data import pad_waveforms
from w2v2.emissions import utterance_logits
from w2v2.precision import resolve_device

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pad_waveforms_takes_arrays_and_tensors_and_pads_with_zeros():
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(5).astype(np.float32), torch.randn(3), rng.standard_normal(7).astype(np.float64)]
    x, lengths = pad_waveforms(waves)
    assert x.shape == (3, 7) and x.dtype == torch.float32 and lengths.tolist() == [5, 3, 7]
    for row, w in zip(x, waves):
        torch.testing.assert_close(row[: len(w)], torch.as_tensor(w).float())
        assert not row[len(w):].any()
    wider, same = pad_waveforms(waves, length=10)
    assert wider.shape == (3, 10) and torch.equal(wider[:, :7], x) and torch.equal(same, lengths)
    with pytest.raises(ValueError, match="cannot pad to 6 samples: the longest item has 7"):
        pad_waveforms(waves, length=6)
    empty, none = pad_waveforms([])
    assert empty.shape == (0, 0) and none.shape == (0,)


def test_utterance_logits_of_a_padded_batch_equal_one_by_one():
    model = tiny_ctc_model(["AB CD"])
    model.train()  # validation calls it mid-training: eval mode inside, training mode after
    waves = [torch.randn(n, generator=torch.Generator().manual_seed(n)).numpy() for n in (8000, 3000, 12000, 5000)]
    batched = utterance_logits(model, waves, max_samples=2 * 16000)  # several per batch
    single = utterance_logits(model, waves, max_samples=1)  # one utterance per batch
    assert model.training
    cfg = model.config
    for w, a, b in zip(waves, batched, single):
        assert a.shape == b.shape == ((len(w) - cfg.receptive_field) // cfg.frame_stride + 1, cfg.vocab_size)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto", local_rank=1) == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"--device {name}: no CUDA GPU is available"):
            resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("auto", local_rank=2) == resolve_device("cuda", local_rank=2) == torch.device("cuda:2")
    assert resolve_device("cuda:0", local_rank=2) == torch.device("cuda:0")  # an explicit index wins
    for name, value in (("RANK", "13"), ("WORLD_SIZE", "16"), ("LOCAL_RANK", "5")):  # torchrun's, 8 per machine
        monkeypatch.setenv(name, value)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda:1")  # 8 processes share 4 GPUs
    assert resolve_device("cuda:3") == torch.device("cuda:3")
    with pytest.raises(ValueError, match="--device gpu: not a device"):
        resolve_device("gpu")
