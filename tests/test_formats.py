"""Data in the forms people have: NeMo, Hugging Face and Lhotse manifests, tar shards, w2v2 prepare."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from w2v2 import pretrain
from w2v2.audio import load_audio
from w2v2.cli import main
from w2v2.data import Collate, Entry, ManifestError, list_entries
from w2v2.formats import INDEX_NAME
from w2v2.formats.shards import ShardError, load_catalog
from w2v2.formats.stream import ShardPlan, ShardStream, StreamOptions, make_shard_loader_factory, roundrobin_positions
from w2v2.trainer import read_metrics

from .conftest import read_manifest

FOLDER = "ljspeech-amateur"


@pytest.fixture
def rows(data_dir):
    """Six real utterances with text and speaker, paths absolute."""
    folder = data_dir / FOLDER
    return [dict(r, path=str(folder / r["path"])) for r in read_manifest(folder)[:6]]


@pytest.fixture
def tsv(tmp_path, rows):
    path = tmp_path / "m.tsv"
    path.write_text("path\tseconds\tspeaker\ttext\n" + "".join(
        f"{r['path']}\t{r['seconds']}\t{r['speaker']}\t{r['text']}\n" for r in rows))
    return path


def same_entries(got: list[Entry], want: list[Entry]) -> None:
    assert [(e.path, e.speaker, e.text) for e in got] == [(e.path, e.speaker, e.text) for e in want]
    assert [e.seconds for e in got] == pytest.approx([e.seconds for e in want], abs=2e-3)


# ---------------------------------------------------------------------------- manifests


def test_nemo_jsonl_reads_like_the_tsv(tmp_path, rows, tsv):
    nemo = tmp_path / "sub" / "train.json"
    nemo.parent.mkdir()
    lines = [{"audio_filepath": os.path.relpath(r["path"], nemo.parent), "duration": float(r["seconds"]),
              "text": r["text"], "speaker": r["speaker"]} for r in rows]
    nemo.write_text("".join(json.dumps(x) + "\n" for x in lines))
    got = list_entries([nemo], require_text=True)
    assert [os.path.normpath(e.path) for e in got] == [r["path"] for r in rows]
    same_entries([Entry(os.path.normpath(e.path), e.seconds, e.speaker, e.text) for e in got], list_entries([tsv]))

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n{oops\n" + json.dumps({"duration": 1}) + "\n"
                   + json.dumps({"audio_filepath": "x.wav", "duration": -1}) + "\n")
    with pytest.raises(ManifestError) as e:
        list_entries([bad])
    assert [p.split(": ")[0] for p in e.value.problems] == [f"{bad}:2", f"{bad}:3", f"{bad}:4"]


def test_nemo_offset_is_a_span_of_the_file(tmp_path, rows):
    nemo = tmp_path / "spans.jsonl"
    nemo.write_text(json.dumps({"audio_filepath": rows[0]["path"], "offset": 0.5, "duration": 1.25, "text": "x"}) + "\n")
    (entry,) = list_entries([nemo])
    whole = load_audio(rows[0]["path"])
    assert np.allclose(load_audio(entry.path), whole[8000:8000 + 20000], atol=2e-3)


def _audio_dataset(datasets, columns: dict):
    """A Hugging Face dataset with an undecoded ``audio`` column, as users' datasets hold one.
    Built from an Arrow table with a given fingerprint: ``Dataset.from_dict`` hashes the table with
    dill, which fails under pyarrow 25 (the newest pyarrow that imports with the NumPy 1.x that
    pyctcdecode, in ``.[lm]``, pins), and the fingerprint plays no part in what is read here."""
    import pyarrow as pa
    from datasets.table import InMemoryTable

    features = datasets.Features({name: datasets.Audio(decode=False) if name == "audio"
                                  else datasets.Value("float64" if name == "duration" else "string")
                                  for name in columns})
    table = pa.table({name: pa.array(values) for name, values in columns.items()}).cast(features.arrow_schema)
    return datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=features), fingerprint="fixture")


def test_hugging_face_disk_and_parquet_read_like_the_tsv(tmp_path, rows, tsv):
    datasets = pytest.importorskip("datasets")
    want = list_entries([tsv])
    by_path = _audio_dataset(datasets, {
        "audio": [{"bytes": None, "path": r["path"]} for r in rows], "text": [r["text"] for r in rows],
        "speaker_id": [r["speaker"] for r in rows], "duration": [float(r["seconds"]) for r in rows],
    })
    by_path.to_parquet(str(tmp_path / "paths.parquet"))  # paths stay paths (save_to_disk would embed the bytes)
    same_entries(list_entries([tmp_path / "paths.parquet"], require_text=True), want)

    embedded = _audio_dataset(datasets, {
        "audio": [{"bytes": open(r["path"], "rb").read(), "path": None} for r in rows],
        "sentence": [r["text"] for r in rows], "speaker": [r["speaker"] for r in rows],
    })
    embedded.save_to_disk(str(tmp_path / "bytes"))
    embedded.to_parquet(str(tmp_path / "bytes.parquet"))
    for source in (tmp_path / "bytes", tmp_path / "bytes.parquet"):
        got = list_entries([source])
        assert [(e.speaker, e.text) for e in got] == [(e.speaker, e.text) for e in want]
        assert [e.path for e in got] == [f"{source}#row={i}&column=audio" for i in range(len(rows))]
        for g, w in zip(got, want):
            assert np.array_equal(load_audio(g.path), load_audio(w.path))

    datasets.DatasetDict({"train": embedded}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ManifestError, match="one split's folder"):
        list_entries([tmp_path / "dict"])


def test_lhotse_cuts_read_like_the_tsv_and_spans_pick_the_channel(tmp_path, rows, tsv):
    lhotse = pytest.importorskip("lhotse")
    cuts = []
    for r in rows:
        rec = lhotse.Recording.from_file(r["path"])
        sup = lhotse.SupervisionSegment(id=rec.id, recording_id=rec.id, start=0, duration=rec.duration,
                                        text=r["text"], speaker=r["speaker"])
        cuts.append(lhotse.MonoCut(id=rec.id, start=0, duration=rec.duration, channel=0, recording=rec,
                                   supervisions=[sup]))
    lhotse.CutSet.from_cuts(cuts).to_file(tmp_path / "cuts.jsonl.gz")
    same_entries(list_entries([tmp_path / "cuts.jsonl.gz"], require_text=True), list_entries([tsv]))

    stereo = tmp_path / "stereo.wav"  # left: one utterance, right: another
    a, b = load_audio(rows[0]["path"])[:32000], load_audio(rows[1]["path"])[:32000]
    sf.write(stereo, np.stack([a, b], axis=1), 16000, subtype="FLOAT")
    rec = lhotse.Recording.from_file(stereo)
    cut = lhotse.MonoCut(id="c", start=0.5, duration=1.0, channel=1, recording=rec)
    lhotse.CutSet.from_cuts([cut]).to_file(tmp_path / "spans.jsonl")
    (entry,) = list_entries([tmp_path / "spans.jsonl"])
    assert entry.path == f"{stereo}#t=0.5,1.5&channel=1" and entry.seconds == 1.0
    assert np.array_equal(load_audio(entry.path), b[8000:24000])


# ---------------------------------------------------------------------------- prepare


@pytest.fixture
def prepared(tmp_path, data_dir):
    """fsdd's first 40 digits in shards of about 20 (0.1 MB), written by w2v2 prepare."""
    folder = data_dir / "fsdd"
    tsv = tmp_path / "digits.tsv"
    tsv.write_text("path\tseconds\tspeaker\ttext\n" + "".join(
        f"{folder / r['path']}\t{r['seconds']}\t{r['speaker']}\t{r['text']}\n" for r in read_manifest(folder)[:40]))
    out = tmp_path / "shards"
    assert main(["prepare", str(tsv), str(out), "--shard-size", "0.1", "--workers", "2"]) == 0
    return out, list_entries([tsv])


def test_prepare_writes_sorted_indexed_shards_and_reports_a_corrupt_file(tmp_path, data_dir, capsys):
    folder = tmp_path / "corpus"
    shutil.copytree(data_dir / FOLDER / "audio", folder, ignore=lambda d, names: sorted(names)[6:])
    good = sorted(folder.iterdir())
    data = good[2].read_bytes()
    (folder / "corrupt.opus").write_bytes(data[:200] + bytes(len(data) - 200))  # valid header, damaged body
    assert main(["prepare", str(folder), str(tmp_path / "out"), "--shard-size", "0.05", "--workers", "2"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("skipping")] == [line for line in err if "corrupt.opus" in line
                                                                     and line.startswith("skipping")]
    assert len([line for line in err if line.startswith("skipping")]) == 1
    assert "6 utterances" in err[-1] and "1 file(s) failed" in err[-1]
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert index["count"] == 6 and index["failed"] == 1 and len(index["shards"]) > 1
    seconds = [s for shard in index["shards"] for s in shard["seconds"]]
    assert seconds == sorted(seconds)  # sorted by length across shards
    assert seconds == pytest.approx(sorted(len(load_audio(p)) / 16000 for p in good), abs=1e-3)
    assert sorted(os.listdir(tmp_path / "out")) == sorted([INDEX_NAME] + [s["url"] for s in index["shards"]])
    assert main(["prepare", str(folder), str(tmp_path / "out")]) == 1  # never over an earlier result


def test_shards_read_like_their_source_locally_and_over_fsspec(prepared):
    fsspec = pytest.importorskip("fsspec")
    out, entries = prepared
    catalog = load_catalog([out])
    by_source = {e.path: e for e in entries}
    got = [(shard, pos, e) for shard, pos, e in catalog.entries()]
    assert len(got) == len(entries)
    for shard, pos, e in got:
        source = by_source[json.loads(_member(catalog.urls[shard], catalog.keys[shard][pos], "json"))["source"]]
        assert (e.text, e.speaker) == (source.text, source.speaker)
        assert e.seconds == pytest.approx(source.seconds, abs=2e-3)

    memory = fsspec.filesystem("memory")
    for name in os.listdir(out):
        if name.endswith(".tar"):  # no index over there: the shards are read once to learn durations
            memory.pipe(f"/corpus/{name}", (out / name).read_bytes())
    pattern = f"memory://corpus/shard-{{000000..{len(catalog.urls) - 1:06d}}}.tar"
    remote = load_catalog([pattern])
    assert remote.keys == catalog.keys and remote.texts == catalog.texts
    assert all(np.allclose(a, b, atol=1e-3) for a, b in zip(remote.seconds, catalog.seconds))
    opts = StreamOptions(max_tokens=40_000, seed=3)
    local_batches = list(ShardStream(ShardPlan(catalog, _all(catalog), opts, 1, 1), 0, 0, 0, Collate()))
    remote_batches = list(ShardStream(ShardPlan(remote, _all(remote), opts, 1, 1), 0, 0, 0, Collate()))
    assert len(local_batches) > 1
    for a, b in zip(local_batches, remote_batches, strict=True):
        assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["waveforms"], b["waveforms"])


def _member(url: str, key: str, ext: str) -> bytes:
    import tarfile

    with tarfile.open(url) as tar:
        return tar.extractfile(f"{key}.{ext}").read()


def _all(catalog):
    return [np.ones(len(k), dtype=bool) for k in catalog.keys]


# ---------------------------------------------------------------------------- the stream


def test_plan_covers_every_utterance_once_and_ranks_step_together(prepared):
    out, _ = prepared
    catalog = load_catalog([out])
    keep = [np.arange(len(k)) % 5 != 0 for k in catalog.keys]  # some left out
    opts = StreamOptions(max_tokens=30_000, buffer=7, pool=5, seed=1)
    one = ShardPlan(catalog, keep, opts, world_size=1, streams=2)
    streams, total = one.rank_epoch(0, 0)
    seen = [item for batches in streams for batch in batches for item in batch]
    assert sorted(seen) == sorted((s, p) for s, k in enumerate(keep) for p in np.flatnonzero(k))
    assert total == sum(map(len, streams))
    for batch in (b for batches in streams for b in batches):
        assert len(batch) == 1 or len(batch) * max(map(one.size, batch)) <= opts.max_tokens
        assert one.size(batch[0]) == round(catalog.seconds[batch[0][0]][batch[0][1]] * 16000)
    assert one.rank_epoch(1, 0)[0] != streams  # reshuffled per epoch
    two = ShardPlan(catalog, keep, opts, world_size=2, streams=1)
    per_rank = [sum(len(b) for b in two.rank_epoch(0, r)[0]) for r in range(2)]
    assert per_rank[0] != per_rank[1]  # so the cut matters
    assert len(ShardStream(two, 0, 0, 0, Collate())) == len(ShardStream(two, 0, 1, 0, Collate())) == min(per_rank)
    shards = [set(two.shards(0, r, 0)) for r in range(2)]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(len(catalog.urls)))
    assert roundrobin_positions([3, 1, 2]) == [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (0, 2)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_gives_the_rest_of_the_epoch(prepared, workers):
    """factory(epoch, skip) == the batches an uninterrupted epoch gives after its first skip,
    through real DataLoader workers (whose turn-taking the plan predicts)."""
    out, _ = prepared
    catalog = load_catalog([out])
    plan = ShardPlan(catalog, _all(catalog), StreamOptions(max_tokens=24_000, buffer=6, pool=4, seed=2), 1, workers)
    factory = make_shard_loader_factory(plan, Collate(), num_workers=workers)
    full = [b["indices"].tolist() for b in factory(1, 0)]
    assert len(full) == len(factory(1, 0)) > 4
    assert sorted(i for b in full for i in b) == list(range(len(catalog)))
    for skip in (1, 3, len(full) - 1, len(full)):
        assert [b["indices"].tolist() for b in factory(1, skip)] == full[skip:]


def test_pretraining_on_prepared_shards_resumes_exactly(prepared, tmp_path):
    out, _ = prepared
    cfg = pretrain.preset_config("tiny", {"train": {"max_updates": 7, "progress": False, "save_interval": 100},
                                          "data": {"max_tokens": 80_000, "min_samples": 4000}})

    def run(directory, hooks=(), resume=False):
        trainer = pretrain.build_trainer(load_catalog([out]), directory, cfg, hooks=hooks)
        return trainer, trainer.train(resume=resume)

    straight, _ = run(tmp_path / "a")
    assert straight.epoch >= 1  # the run crosses an epoch boundary

    def interrupt(trainer, row):
        if trainer.step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    _, first = run(tmp_path / "b", hooks=[interrupt])
    assert first["stopped_early"] and first["step"] == 5
    _, resumed = run(tmp_path / "b", resume=True)
    assert resumed["step"] == 7
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["update"] for r in b] == list(range(1, 8))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_cli_pretrain_and_finetune_on_shards(prepared, tmp_path, capsys):
    out, entries = prepared
    shards = sorted(p.name for p in out.glob("*.tar"))
    pattern = str(out / f"shard-{{{shards[0][6:12]}..{shards[-1][6:12]}}}.tar")
    assert main(["pretrain", pattern, "--out", str(tmp_path / "pt"), "--preset", "tiny", "--max-updates", "2",
                 "--no-progress", "--max-tokens", "24000"]) == 0
    assert [r["update"] for r in read_metrics(tmp_path / "pt")] == [1, 2]
    assert main(["plot", str(tmp_path / "pt")]) == 0  # its figures of the data read the shards
    valid = tmp_path / "valid.tsv"
    valid.write_text("path\ttext\n" + "".join(f"{e.path}\t{e.text}\n" for e in entries[:3]))
    assert main(["finetune", "--init", "random:tiny", "--train", str(out), "--valid", str(valid), "--out",
                 str(tmp_path / "ft"), "--max-updates", "2", "--valid-interval", "2", "--no-progress"]) == 0
    assert [r["update"] for r in read_metrics(tmp_path / "ft")] == [1, 2]
    assert main(["pretrain", pattern, str(valid), "--out", str(tmp_path / "mixed"), "--preset", "tiny"]) == 1
    assert "read as a stream" in capsys.readouterr().err


def test_a_shard_truncated_after_indexing_is_named_in_one_line(prepared, tmp_path):
    out, _ = prepared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    victim = sorted(copy.glob("*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[:9000])
    catalog = load_catalog([copy])  # the index still lists every utterance
    plan = ShardPlan(catalog, _all(catalog), StreamOptions(max_tokens=24_000), 1, 1)
    with pytest.raises(ShardError) as e:
        list(make_shard_loader_factory(plan, Collate(), num_workers=1)(0, 0))
    assert str(e.value).startswith(f"{victim}:") and "\n" not in str(e.value)


def test_a_missing_library_is_one_line_naming_the_extra(tmp_path, rows, monkeypatch, capsys):
    cuts = tmp_path / "cuts.jsonl"
    cuts.write_text(json.dumps({"id": "c", "start": 0, "duration": 1, "channel": 0, "recording": {}}) + "\n")
    monkeypatch.setitem(sys.modules, "lhotse", None)  # import lhotse raises ImportError
    assert main(["prepare", str(cuts), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'lhotse'" in err and "w2v2[data]" in err
