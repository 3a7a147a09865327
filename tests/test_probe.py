"""Linear probes: separable data is learnt, splits are disjoint as promised, log-mel, the probe CLI, the recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import w2v2
from w2v2.cli import main
from w2v2.config import tiny
from w2v2.probe import chance_accuracy, log_mel, mel_filterbank, probe_layers, split_rows

pytest.importorskip("sklearn")
ROOT = Path(__file__).resolve().parents[1]


def blobs(n_per_class=30, classes=4, dim=16, seed=0):
    """Layer 0: pure noise; layer 1: class means 4 sd apart along random directions."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    x = rng.normal(size=(len(y), 2, dim))
    centres = rng.normal(size=(classes, dim))
    x[:, 1] += 4 * centres[y] / np.linalg.norm(centres, axis=1, keepdims=True)[y]
    return x, y.astype(str)


def test_probe_separable_and_noise():
    x, y = blobs()
    perm = np.random.default_rng(1).permutation(len(y))
    tr, te = perm[:80], perm[80:]
    res = probe_layers(x[tr], y[tr], x[te], y[te], layers=[0, 1])
    assert [r.layer for r in res] == [0, 1]
    assert res[1].accuracy >= 0.95 and res[1].converged
    assert res[0].accuracy < 0.6  # noise: near chance (0.25)
    cv = probe_layers(x[tr], y[tr], x[te], y[te], Cs=[0.01, 1.0], cv_groups=list(np.arange(80) % 4))
    assert cv[1].accuracy >= 0.95 and cv[1].C in (0.01, 1.0)


def test_probe_rejects_bad_shapes():
    x, y = blobs()
    with pytest.raises(ValueError, match="files, layers, dim"):
        probe_layers(x[:, 0], y, x[:, 0], y)
    with pytest.raises(ValueError, match="fewer than 2 classes"):
        probe_layers(x[:10], y[:10], x, y)


def rows_for(speakers=6, labels=5, per=3):
    return [{"path": f"{s}_{l}_{k}.wav", "speaker": f"s{s}", "text": f"w{l}"}
            for s in range(speakers) for l in range(labels) for k in range(per)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_by_speaker_keeps_speakers_disjoint(seed):
    rows = rows_for()
    tr, te = split_rows(rows, "speaker", label_column="text", seed=seed)
    assert sorted(tr + te) == list(range(len(rows)))
    train_spk, test_spk = {rows[i]["speaker"] for i in tr}, {rows[i]["speaker"] for i in te}
    assert not train_spk & test_spk
    assert len(test_spk) == 2  # round(0.25 * 6)


def test_split_by_utterance_is_stratified():
    rows = rows_for()
    tr, te = split_rows(rows, "utterance", label_column="speaker", test_fraction=0.2)
    assert not set(tr) & set(te) and len(tr) + len(te) == len(rows)
    per_test = Counter(rows[i]["speaker"] for i in te)
    assert set(per_test) == {f"s{s}" for s in range(6)} and set(per_test.values()) == {3}  # 20% of 15
    with pytest.raises(ValueError, match="no column 'accent'"):
        split_rows(rows, "utterance", label_column="accent")


def test_chance():
    assert chance_accuracy(["a", "a", "b"], ["a", "b", "b", "b"]) == 0.25


def test_log_mel_peaks_at_the_tone():
    fb = mel_filterbank(40, 512, 16000)
    assert fb.shape == (40, 257) and bool((fb.max(dim=1).values > 0.5).all())
    t = torch.arange(16000) / 16000
    feats = log_mel(torch.sin(2 * torch.pi * 1000 * t), n_mels=40)
    assert feats.shape == (101, 40)  # centred frames every 10 ms
    band = int(feats.mean(0).argmax())
    centres = torch.linspace(0, 2595 * np.log10(1 + 8000 / 700), 42)[1:-1]
    centre_hz = 700 * (10 ** (centres[band] / 2595) - 1)
    assert abs(float(centre_hz) - 1000) < 150


def write_tones(folder: Path, speakers=4, per_class=3) -> Path:
    """A manifest of 0.3 s tones: the label is the pitch, the 'speaker' a loudness and noise level."""
    rng = np.random.default_rng(0)
    lines = ["path\tseconds\tspeaker\tpitch"]
    (folder / "audio").mkdir(parents=True)
    for s in range(speakers):
        for label, hz in (("low", 200), ("mid", 900), ("high", 3000)):
            for k in range(per_class):
                t = np.arange(4800) / 16000
                w = (0.1 + 0.1 * s) * np.sin(2 * np.pi * hz * (1 + 0.02 * k) * t) + 0.01 * rng.normal(size=len(t))
                name = f"audio/{s}_{label}_{k}.wav"
                sf.write(folder / name, w.astype(np.float32), 16000)
                lines.append(f"{name}\t0.3\tspk{s}\t{label}")
    (folder / "manifest.tsv").write_text("\n".join(lines) + "\n")
    return folder / "manifest.tsv"


def test_probe_cli(tmp_path, capsys):
    torch.manual_seed(0)
    model = w2v2.save_pretrained(w2v2.build_model(tiny()), tmp_path / "tiny")
    manifest = write_tones(tmp_path / "tones")
    rc = main(["probe", "--model", str(model), "--data", str(manifest), "--split-by", "speaker",
               "--label-column", "pitch", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"),
               "--C", "0.1", "1", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "layer  test acc" in out and "chance" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert [d["layer"] for d in report["layers"]] == [0, 1, 2]
    assert report["n_train"] + report["n_test"] == 36 and len(report["test_speakers"]) == 1
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["probe", "--model", str(model), "--data", str(manifest), "--label-column", "pitch"]) == 1


@pytest.mark.slow
def test_recipe_on_a_few_dozen_fsdd_files(tmp_path, data_dir):
    out = tmp_path / "fsdd"
    subprocess.run([sys.executable, str(ROOT / "recipes" / "probe_fsdd.py"), "--out", str(out), "--limit", "60",
                    "--data", str(data_dir / "fsdd"), "random-tiny=random:tiny"], check=True, cwd=ROOT,
                   env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]["random-tiny"]["tasks"]) == {"digit", "speaker"}
    assert (out / "accuracy_by_layer.png").exists() and "digit recognition" in (out / "results.md").read_text()
