"""Manifests, validation, crops, bucketing, sharding and the DataLoader factory."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from w2v2 import data

from .helpers import write_clips


def test_manifest_paths_are_relative_to_the_manifest(tmp_path):
    write_clips(tmp_path / "set", [0.5, 0.7])
    entries = data.read_manifest(tmp_path / "set" / "manifest.tsv")
    assert [os.path.basename(e.path) for e in entries] == ["clip000.wav", "clip001.wav"]
    assert all(os.path.isfile(e.path) for e in entries)
    assert entries[1].text == "CLIP 1" and entries[1].speaker == "spk1" and entries[1].seconds == 0.7


def test_list_entries_folders_manifests_and_files(tmp_path):
    paths = write_clips(tmp_path / "plain", [0.3, 0.3], manifest=False)
    write_clips(tmp_path / "with", [0.3], seed=1)
    entries = data.list_entries([tmp_path / "plain", tmp_path / "with", tmp_path / "with" / "manifest.tsv", paths[0]])
    assert len(entries) == 2 + 1 + 1 + 1
    assert entries[2].text == "CLIP 0"  # a folder with a manifest uses it
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.ManifestError, match="no audio files"):
        data.list_entries([tmp_path / "empty"])
    with pytest.raises(data.ManifestError, match="no such manifest"):
        data.list_entries([tmp_path / "missing.tsv"])


def test_manifest_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("file\tseconds\nx.wav\t1\n")
    with pytest.raises(ValueError, match="bad.tsv.*'path' column"):
        data.read_manifest(bad)
    bad.write_text("path\tseconds\nx.wav\tlong\n")
    with pytest.raises(ValueError, match="bad.tsv:2"):
        data.read_manifest(bad)


def test_validate_lists_bad_files_with_reasons(tmp_path):
    good_paths = write_clips(tmp_path, [0.5, 0.05])
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "junk.wav").write_bytes(b"not audio at all" * 10)
    entries = [data.Entry(str(p), seconds=9.0) for p in good_paths]
    entries += [data.Entry(str(tmp_path / n)) for n in ("missing.wav", "empty.wav", "junk.wav")]
    good, bad = data.validate_entries(entries, min_seconds=0.1)
    assert [os.path.basename(e.path) for e in good] == ["clip000.wav"]
    assert good[0].seconds == pytest.approx(0.5)  # the file's own duration replaces the manifest's
    reasons = {os.path.basename(e.path): r for e, r in bad}
    assert "too short" in reasons["clip001.wav"]
    assert "no such file" in reasons["missing.wav"]
    assert "empty" in reasons["empty.wav"]
    assert "junk.wav" in reasons


def test_dataset_crops_deterministically(tmp_path):
    write_clips(tmp_path, [1.0])
    ds = data.AudioDataset(data.list_entries([tmp_path]), max_samples=4000, seed=5)
    a, b, c = ds[(0, 0)]["wav"], ds[(0, 0)]["wav"], ds[(0, 1)]["wav"]
    assert len(a) == 4000 and torch.equal(a, b) and not torch.equal(a, c)
    assert ds.num_samples(0) == 4000
    assert len(data.AudioDataset(ds.entries, max_samples=None)[0]["wav"]) == 16000


def test_unreadable_file_mid_run_is_replaced(tmp_path, caplog):
    paths = write_clips(tmp_path, [0.3, 0.4])
    ds = data.AudioDataset(data.list_entries([tmp_path]), max_samples=None)
    paths[0].write_bytes(b"garbage")  # broke after validation
    item = ds[0]
    assert item["index"] == 1 and len(item["wav"]) == 6400
    assert "skipping unreadable audio" in caplog.text


def test_collate_pads_or_crops_to_shortest():
    items = [{"index": i, "epoch": 0, "wav": torch.ones(n), "text": f"t{i}", "speaker": None}
             for i, n in enumerate([5, 3, 4])]
    padded = data.Collate()(items)
    assert padded["waveforms"].shape == (3, 5) and padded["lengths"].tolist() == [5, 3, 4]
    assert padded["waveforms"][1, 3:].eq(0).all() and padded["texts"] == ["t0", "t1", "t2"]
    cropped = data.Collate(crop_to_shortest=True)(items)
    assert cropped["waveforms"].shape == (3, 3) and cropped["lengths"].tolist() == [3, 3, 3]


def test_make_batches_respects_max_tokens():
    sizes = [100, 90, 80, 50, 40, 10]
    order = list(np.argsort(sizes)[::-1])
    padded = data.make_batches(sizes, 200, order)
    assert all(len(b) * max(sizes[i] for i in b) <= 200 for b in padded)
    cropped = data.make_batches(sizes, 200, order, crop_to_shortest=True)
    assert all(len(b) * min(sizes[i] for i in b) <= 200 for b in cropped)
    assert sorted(i for b in padded for i in b) == list(range(6))
    assert data.make_batches([500], 200, [0]) == [[0]]  # too long for any batch: alone
    assert all(len(b) <= 2 for b in data.make_batches(sizes, 10_000, order, max_batch_size=2))


def test_sampler_epochs_seeds_skip_and_shards():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1000, 5000, size=200).tolist()
    s = data.BucketBatchSampler(sizes, 20_000, seed=1)
    e0, e0_again, e1 = s.batches(0), s.batches(0), s.batches(1)
    assert e0 == e0_again and e0 != e1
    assert sorted(i for b in e0 for i in b) == list(range(200))
    s.set_epoch(1, skip=3)
    assert [[i for i, _ in b] for b in s] == e1[3:] and len(s) == len(e1) - 3
    assert all(ep == 1 for b in s for _, ep in b)
    shards = [data.BucketBatchSampler(sizes, 20_000, seed=1, rank=r, world_size=3).batches(0) for r in range(3)]
    assert len({len(b) for b in shards}) == 1  # every rank makes the same number of steps
    seen = [i for shard in shards for b in shard for i in b]
    assert len(seen) == len(set(seen))  # disjoint
    full = s.batches(0)
    assert sorted(map(tuple, (b for shard in shards for b in shard))) == sorted(
        map(tuple, full[:len(full) - len(full) % 3]))


def test_loader_factory_with_workers(tmp_path):
    write_clips(tmp_path, [0.5, 0.6, 0.7, 0.8, 0.9])
    entries, bad = data.validate_entries(data.list_entries([tmp_path]))
    ds = data.AudioDataset(entries, max_samples=12_000, seed=2)
    sampler = data.BucketBatchSampler([ds.num_samples(i) for i in range(len(ds))], 30_000, seed=2,
                                      crop_to_shortest=True)
    make = data.make_loader_factory(ds, sampler, data.Collate(crop_to_shortest=True, seed=2), num_workers=2)
    state = torch.get_rng_state()
    first = list(make(0, 0))
    assert torch.equal(state, torch.get_rng_state())  # making a loader leaves the global RNG alone
    again = list(make(0, 1))
    assert len(again) == len(first) - 1
    for a, b in zip(first[1:], again):
        assert torch.equal(a["waveforms"], b["waveforms"])
    for batch in first:
        assert batch["waveforms"].shape[0] * batch["waveforms"].shape[1] <= 30_000
        assert (batch["lengths"] == batch["waveforms"].shape[1]).all()
    assert sorted(i for b in first for i in b["indices"].tolist()) == list(range(5))


def test_real_manifest_validates(data_dir):
    entries = data.list_entries([data_dir / "ljspeech-amateur"])[:5]
    good, bad = data.validate_entries(entries, min_seconds=0.5)
    assert len(good) == 5 and not bad
    ds = data.AudioDataset(good, max_samples=32_000)
    wav = ds[0]["wav"]
    assert wav.dtype == torch.float32 and 0 < len(wav) <= 32_000 and wav.abs().max() > 0.01


def test_loader_workers_start_with_stop_signals_blocked(tmp_path, monkeypatch):
    """A SIGTERM (or Ctrl-C) that reaches a DataLoader worker after its fork but before its init
    ran must not run the trainer's handler, inherited with the fork, inside the worker: it once
    killed workers or left them unable to stop (`kill -TERM -PGID` during an epoch change)."""
    import signal

    hits = tmp_path / "handled_in"

    def handler(signum, frame):
        with open(hits, "a") as f:
            f.write(f"{os.getpid()}\n")

    real_init = data._worker_init

    def init(worker_id):
        os.kill(os.getpid(), signal.SIGTERM)  # as if the process group got it right after the fork
        real_init(worker_id)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        loader = data._Loader(list(range(4)), batch_size=2, num_workers=2, worker_init_fn=init)
        assert [b.tolist() for b in loader] == [[0, 1], [2, 3]]
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the main thread's mask is back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not hits.exists(), f"the handler ran in a worker: {hits.read_text()}"
