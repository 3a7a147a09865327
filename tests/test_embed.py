"""embed(): shapes, frame times, pooling, exact batching, layer selection; the w2v2 embed CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

import w2v2
from w2v2.cli import main
from w2v2.config import tiny
from w2v2.data import padded_length
from w2v2.embed import Item, embed, frame_times, resolve_inputs, resolve_layers

LENGTHS = [16000, 7000, 400, 11111, 3210]  # samples at 16 kHz; 400 = exactly one frame


def tiny_model(norm: str = "group", layers: int = 3) -> w2v2.Wav2Vec2:
    torch.manual_seed(0)
    cfg = tiny(feat_extract_norm=norm, conv_bias=norm == "layer", do_stable_layer_norm=norm == "layer",
               num_hidden_layers=layers)
    return w2v2.build_model(cfg).eval()


def waves(lengths=LENGTHS, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.1, n).astype(np.float32) for n in lengths]


def by_index(results) -> list:
    return sorted(results, key=lambda e: e.index)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return w2v2.save_pretrained(tiny_model(), tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def wav_files(tmp_path) -> list[Path]:
    paths = []
    for i, w in enumerate(waves([16000, 5000, 9000])):
        paths.append(tmp_path / "in" / f"utt{i}.wav")
        paths[-1].parent.mkdir(exist_ok=True)
        sf.write(paths[-1], w, 16000)
    return paths


# --------------------------------------------------------------------------- API
def test_shapes_and_frame_times():
    model = tiny_model()
    out = by_index(embed(model, waves(), pool="none", batch_size=2))
    for e, n in zip(out, LENGTHS):
        frames = int(model.num_frames(torch.tensor([n])))
        assert e.ok and e.num_frames == frames
        assert e.features.shape == (4, frames, 32)  # layers 0..3
        np.testing.assert_allclose(e.frame_times, np.arange(frames) * 0.02)
    assert out[2].num_frames == 1  # 400 samples = one 25 ms receptive field
    mean = by_index(embed(model, waves(), pool="mean"))
    assert all(e.features.shape == (4, 32) and e.frame_times is None for e in mean)
    assert frame_times(3).tolist() == [0.0, 0.02, 0.04]


def test_mean_is_mean_of_valid_frames():
    model = tiny_model()
    full = by_index(embed(model, waves(), pool="none", batch_size=5))
    mean = by_index(embed(model, waves(), pool="mean", batch_size=5))
    for f, m in zip(full, mean):
        np.testing.assert_allclose(m.features, f.features.mean(axis=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_batched_equals_one_at_a_time(norm):
    model = tiny_model(norm)
    batched = by_index(embed(model, waves(), pool="none", batch_size=5))
    for e in batched:
        with torch.inference_mode():  # the model alone, without any padding
            out = model(torch.from_numpy(e.item.source)[None], output_hidden_states=True)
        alone = torch.stack(out.hidden_states)[:, 0].numpy()  # (layers, frames, dim)
        assert alone.shape == e.features.shape
        np.testing.assert_allclose(e.features, alone, rtol=1e-4, atol=1e-5)


def test_padded_length():
    assert [padded_length(n) for n in (1, 4000, 4001, 40000, 480000)] == [4000, 4000, 8000, 40960, 491520]
    for n in range(1, 10**6, 9973):
        assert n <= padded_length(n) < n + max(4000, n / 8)


def test_layer_selection_runs_only_needed_layers():
    model = tiny_model(layers=3)
    calls = []
    for i, layer in enumerate(model.encoder.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
    one = by_index(embed(model, waves(), layers=1, pool="mean", batch_size=8))
    assert set(calls) == {0}  # layer 1 is the output of the first Transformer layer
    calls.clear()
    every = by_index(embed(model, waves(), layers="all", pool="mean", batch_size=8))
    assert set(calls) == {0, 1, 2}
    for a, b in zip(one, every):
        assert a.layers == [1] and a.features.shape == (1, 32)
        np.testing.assert_allclose(a.features[0], b.features[1], rtol=1e-5, atol=1e-6)
    picked = by_index(embed(model, waves(), layers=[3, 0], pool="mean"))
    np.testing.assert_allclose(picked[0].features, every[0].features[[3, 0]], rtol=1e-5, atol=1e-6)


def test_resolve_layers():
    assert resolve_layers("all", 4) == [0, 1, 2, 3, 4]
    assert resolve_layers(-1, 4) == [4]
    assert resolve_layers("0,2", 4) == [0, 2]
    with pytest.raises(ValueError, match="layers 0..4"):
        resolve_layers(5, 4)
    with pytest.raises(ValueError, match="layers 0..3"):  # raised by the call, before iterating
        embed(tiny_model(), waves(), layers=[1, 9])
    with pytest.raises(ValueError, match="pool"):
        embed(tiny_model(), waves(), pool="max")


def test_bad_inputs_are_reported_and_others_processed(tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"not audio at all")
    items = [Item("good", waves([8000])[0], "good"), Item(str(bad), str(bad), "broken"),
             Item("short", np.zeros(100, np.float32), "short")]
    out = {e.item.key: e for e in embed(tiny_model(), items)}
    assert out["good"].ok and out["good"].features.shape == (4, 32)
    assert not out["broken"].ok and "broken.wav" in out["broken"].error and out["broken"].features is None
    assert "shorter than one frame" in out["short"].error


def test_manifest_keys_stay_relative(tmp_path, wav_files):
    manifest = tmp_path / "m.tsv"
    manifest.write_text("path\tlabel\n" + f"in/{wav_files[0].name}\ta\n" + f"{wav_files[1]}\tb\n")
    items = resolve_inputs([str(manifest)])
    assert [it.key for it in items] == ["in/utt0", "utt1"]  # an absolute path keeps only its name
    assert items[0].row["label"] == "a" and Path(items[0].source) == wav_files[0]
    assert [it.key for it in resolve_inputs([str(tmp_path / "in")])] == ["utt0", "utt1", "utt2"]
    with pytest.raises(ValueError, match="both be saved"):
        resolve_inputs([str(wav_files[1]), str(manifest)])


# --------------------------------------------------------------------------- CLI
def test_cli_writes_safetensors(tmp_path, model_dir, wav_files, capsys):
    rc = main(["embed", str(tmp_path / "in"), "--model", str(model_dir), "--pool", "none", "--layer", "1,3",
               "--output-dir", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    for p in wav_files:
        f = tmp_path / "out" / f"{p.stem}.safetensors"
        d = load_file(f)
        n = int(tiny_model().num_frames(torch.tensor([sf.info(p).frames])))
        assert d["features"].shape == (2, n, 32) and d["features"].dtype == np.float32
        np.testing.assert_allclose(d["frame_times"], np.arange(n) * 0.02)
        with safe_open(f, "np") as s:
            meta = s.metadata()
        assert meta["model"] == str(model_dir) and json.loads(meta["layers"]) == [1, 3] and meta["pool"] == "none"
        assert meta["num_frames"] == str(n) and float(meta["receptive_field"]) == 0.025
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_cli_npy_and_combined(tmp_path, model_dir, wav_files):
    assert main(["embed", *map(str, wav_files), "--model", str(model_dir), "--format", "npy", "--layer", "2",
                 "--output-dir", str(tmp_path / "npy"), "--no-progress"]) == 0
    arr = np.load(tmp_path / "npy" / "utt0.npy")
    side = json.loads((tmp_path / "npy" / "utt0.json").read_text())
    assert arr.shape == (1, 32) and side["layers"] == [2] and side["shape"] == [1, 32]
    out = tmp_path / "all.safetensors"
    assert main(["embed", *map(str, wav_files), "--model", str(model_dir), "--pool", "none",
                 "--output", str(out), "--no-progress"]) == 0
    d = load_file(out)
    with safe_open(out, "np") as s:
        keys = json.loads(s.metadata()["keys"])
    assert keys == ["utt0", "utt1", "utt2"]  # input order, not duration order
    off = d["offsets"]
    assert off[0] == 0 and off[-1] == d["features"].shape[1] == len(d["frame_times"])
    per_file = np.load(tmp_path / "npy" / "utt1.npy")  # layer 2 mean of utt1
    np.testing.assert_allclose(d["features"][2, off[1]:off[2]].mean(0), per_file[0], rtol=1e-5, atol=1e-6)


def test_cli_bad_file_skipped_nonzero_exit(tmp_path, model_dir, wav_files, capsys):
    bad = tmp_path / "in" / "zz_bad.wav"
    bad.write_bytes(b"RIFF garbage")
    rc = main(["embed", str(tmp_path / "in"), "--model", str(model_dir), "--output-dir", str(tmp_path / "out"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "zz_bad.wav" in err and "3 of 4 files" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"utt{i}.safetensors" for i in range(3)]


def test_cli_on_real_speech(tmp_path, model_dir, data_dir):
    rows = (data_dir / "fsdd" / "manifest.tsv").read_text().splitlines()
    manifest = tmp_path / "m.tsv"  # a few real rows, paths made absolute
    manifest.write_text("\n".join([rows[0]] + [f"{data_dir / 'fsdd'}/{r}" for r in rows[1:4]]) + "\n")
    out = tmp_path / "fsdd.safetensors"
    assert main(["embed", str(manifest), "--model", str(model_dir), "--output", str(out), "--no-progress"]) == 0
    assert load_file(out)["features"].shape == (3, 4, 32)
