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


# ---------------------------------------------------------------------------- one manifest format
QUOTED = ['say "hi"', '"fully quoted, with ""doubled"" quotes"', "it's a 'single' quote", 'tab\\t"x']


def every_reader(manifest, monkeypatch) -> dict[str, list[str]]:
    """The transcripts of ``manifest`` as each part of w2v2 that reads manifests sees them."""
    import importlib
    import importlib.util

    from .conftest import ROOT
    from .conftest import read_manifest as conftest_read

    monkeypatch.syspath_prepend(str(ROOT / "recipes"))  # as when run as a script: its helpers beside it
    spec = importlib.util.spec_from_file_location("make_splits", ROOT / "recipes" / "make_splits.py")
    make_splits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_splits)
    embed, evaluate = importlib.import_module("w2v2.embed"), importlib.import_module("w2v2.evaluate")
    return {
        "data.read_rows": [r["text"] for r in data.read_rows(manifest)],
        "data.read_manifest": [e.text for e in data.read_manifest(manifest)],
        "data.list_entries": [e.text for e in data.list_entries([manifest])],
        "embed.read_manifest": [r["text"] for r in embed.read_manifest(manifest)],
        "evaluate.read_utterances": [u.text for u in evaluate.read_utterances(manifest)],
        "recipes/make_splits.py": [r["text"] for r in make_splits.read_manifest(manifest)],
        "tests/conftest.py": [r["text"] for r in conftest_read(manifest.parent)],
    }


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_quotes_parse_the_same_in_every_reader(tmp_path, bom, newline, monkeypatch):
    """No quoting anywhere: a '"' is a character; a byte order mark and CRLF lines are accepted."""
    write_clips(tmp_path, [0.1] * len(QUOTED), manifest=False)
    lines = [b"path\tseconds\tspeaker\ttext"] + [f"audio/clip{i:03d}.wav\t0.1\ts\t{t}".encode()
                                                 for i, t in enumerate(QUOTED)]
    (tmp_path / "manifest.tsv").write_bytes(bom + newline.join(lines) + newline)
    seen = every_reader(tmp_path / "manifest.tsv", monkeypatch)
    assert all(texts == QUOTED for texts in seen.values()), seen


def test_repeated_paths_warn_and_header_only_is_a_problem(tmp_path, caplog):
    write_clips(tmp_path, [0.1, 0.1], manifest=False)
    m = tmp_path / "m.tsv"
    m.write_text("path\ttext\naudio/clip000.wav\tA\naudio/clip001.wav\tB\n./audio/clip000.wav\tA\naudio/clip000.wav\tC\n")
    assert len(data.list_entries([m])) == 4  # kept: a repeat may be meant (oversampling)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{m}: warning: 2 row(s) repeat the path of an earlier row (line 4 repeats line 2: "
                        "./audio/clip000.wav; line 5 repeats line 2: audio/clip000.wav); each counts as often as it "
                        "is listed"]
    m.write_text("path\ttext\n\n")
    with pytest.raises(data.ManifestError, match="m.tsv: no rows"):
        data.list_entries([m])
    assert data.read_rows(m) == []  # the plain reader has no opinion about an empty table


# ---------------------------------------------------------------------------- corpus scale
def test_entry_table_holds_entries_exactly():
    entries = [data.Entry("a/x.wav", 1.5, "s1", "HELLO"), data.Entry("/abs/y.flac"),
               data.Entry("b/\udcff\udcfe.wav", 0.0, None, ""), data.Entry("c.wav", None, "s1", 'say "hi"\u00e9')]
    table = data.EntryTable.from_entries(entries)
    assert list(table) == entries and len(table) == 4 and table[-1] == entries[-1]
    assert list(table[1:3]) == entries[1:3] and list(table.select([3, 0])) == [entries[3], entries[0]]
    assert list(table.select(np.array([True, False, False, True]))) == [entries[0], entries[3]]
    assert list(table.select([])) == []
    both = data.EntryTable.concat([table, data.EntryTable.from_entries(entries[::-1])])
    assert list(both) == entries + entries[::-1] and both.speakers == ["s1"]
    assert table.total_seconds() == 1.5
    with pytest.raises(IndexError):
        table[4]


def test_check_entries_probes_small_inputs_and_trusts_large_manifests(tmp_path, monkeypatch):
    paths = write_clips(tmp_path, [0.5, 0.05])
    (tmp_path / "junk.wav").write_bytes(b"not audio at all" * 10)
    entries = [data.Entry(str(p), seconds=0.5) for p in paths] + [data.Entry(str(tmp_path / "junk.wav"), 0.5),
                                                                  data.Entry(str(paths[0]))]
    good, bad = data.check_entries(entries, min_seconds=0.1)  # few durations: every file probed, as before
    old_good, old_bad = data.validate_entries(entries, min_seconds=0.1)
    assert list(good) == old_good and bad == old_bad and len(good) == 2

    probed = []
    real = data.check_file
    monkeypatch.setattr("w2v2.manifest.check_file", lambda e, m: probed.append(e.path) or real(e, m))
    entries.append(data.Entry(str(paths[1]), seconds=0.02))
    good, bad = data.check_entries(entries, min_seconds=0.1, upfront_limit=3)
    assert probed == [str(paths[0])]  # only the entry without a duration
    assert [e.path for e in good] == [str(p) for p in paths] + [str(tmp_path / "junk.wav"), str(paths[0])]
    assert bad == [(entries[-1], "too short (0.020 s < 0.100 s, says the manifest)")]


def test_a_bad_file_is_found_when_read(tmp_path, caplog):
    paths = write_clips(tmp_path, [0.3, 0.3, 3.0, 0.5])
    table = data.check_entries(data.list_entries([tmp_path]), upfront_limit=0)[0]
    table.seconds[2] = 0.4  # the manifest understates a file: its batch would overrun max_tokens
    paths[0].write_bytes(b"garbage")
    ds = data.AudioDataset(table, max_samples=None, min_seconds=0.35)
    items = [ds[i] for i in range(4)]
    assert [(it["index"], it["skipped"]) for it in items] == [(3, 3), (3, 2), (3, 1), (3, 0)]
    assert data.Collate()(items)["skipped_files"] == 6
    for path, reason in ((paths[0], "not an audio file"), (paths[1], "too short (0.300 s < 0.350 s)"),
                         (paths[2], "lasts 3.00 s, its manifest says 0.40 s")):
        assert f"skipping unreadable audio (using the next entry instead): {path}: {reason}" in caplog.text


def test_batches_are_the_greedy_ones():
    """Every batch is within budget (or a lone item), and the next item would not have fit: the
    only partition the greedy rule can give, whatever the implementation."""
    rng = np.random.default_rng(0)
    for case in range(300):
        sizes = rng.integers(1, 60, size=int(rng.integers(0, 40))) * int(rng.choice([1, 100]))
        order = np.argsort(-sizes, kind="stable")
        budget, cap, crop = int(rng.integers(50, 400)) * (sizes.max(initial=1) // 60 + 1), \
            rng.choice([None, 3]), bool(case % 2)
        batches = data.make_batches(sizes.tolist(), budget, order.tolist(), cap, crop)
        assert [i for b in batches for i in b] == order.tolist()

        def cost(b):
            return len(b) * (min if crop else max)(sizes[i] for i in b)

        for b, after in zip(batches, batches[1:] + [None]):
            assert len(b) == 1 or cost(b) <= budget and (cap is None or len(b) <= cap)
            if after is not None:
                assert cost(b + after[:1]) > budget or (cap is not None and len(b) >= cap)
    sizes = [100, 90, 80, 50, 40, 10]  # by hand: 2 x 100 fits 200, 3 x 100 does not; 4 x 10 does
    assert data.make_batches(sizes, 200, range(6)) == [[0, 1], [2, 3], [4, 5]]
    assert data.make_batches(sizes, 200, range(6), crop_to_shortest=True) == [[0, 1], [2, 3, 4, 5]]


def test_a_large_manifest_lists_in_bounded_memory_without_probing(tmp_path, monkeypatch):
    """200 000 rows with durations: no file is opened, and the memory allocated while listing,
    checking and planning an epoch stays within a bound derived from the table's layout."""
    import tracemalloc

    n, path, text = 200_000, "audio/clip000.wav", "SOME WORDS"
    with open(tmp_path / "m.tsv", "w") as f:
        f.write("path\tseconds\tspeaker\ttext\n")
        f.writelines(f"{path}\t{1 + i % 7}.5\tspk{i % 100}\t{text}\n" for i in range(n))
    monkeypatch.setattr("w2v2.manifest.check_file", lambda *a: pytest.fail("a file was probed"))
    tracemalloc.start()
    try:
        entries = data.list_entries([tmp_path / "m.tsv"])
        good, bad = data.check_entries(entries, min_seconds=1.0)
        ds = data.AudioDataset(good, max_samples=250_000)
        sampler = data.BucketBatchSampler(ds.sizes(), 1_400_000, crop_to_shortest=True)
        batches = len(sampler)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(good) == n and not bad and batches >= n // 58  # 1.4M samples hold 58 of 1.5 s at most
    # The layout: root index 4, path offset 8, seconds 8, speaker code 4, text offset 8, has-text 1
    # bytes, plus the path and text bytes; the sampler keeps 16 (sizes, order) and 8 per batch.
    layout = 33 + len(path) + len(text)
    assert entries.nbytes == n * layout + 16  # the two offset arrays have one element more
    assert held <= n * (layout + 16 + 8) + 2**20
    # at most two copies of the table at once (builder and table), and sorting's temporaries
    assert peak <= n * (2 * layout + 64) + 2**20, (peak / n, layout)
