"""Scoring (jiwer, shared normalisation), batched inference, the PocketSphinx baseline, export, splits."""

from __future__ import annotations

import csv
import importlib.util

import jiwer
import pytest
import torch

import w2v2
from w2v2.cli import main
from w2v2.commands.export import export
from w2v2.config import tiny
from w2v2.evaluate import (PocketSphinxEngine, Utterance, W2v2Engine, evaluate, length_batches, read_utterances,
                           score, write_errors)
from w2v2.text import build_vocabulary

from .conftest import ROOT
from .helpers import FP16_U, logit_error_bound

CLIPS = [("000010168", "Bye!"), ("000050175", "good job"), ("000480090", "BY THE HAND.")]


def test_score_matches_jiwer_on_normalised_text():
    refs = ["Hello, world!", "the cat sat", "Été à Paris", "it's  O'Neil's"]
    hyps = ["hello word", "THE CAT SAT ON", "", "its oneil's"]
    wer, cer, per = score(refs, hyps, case="upper")
    norm_refs = ["HELLO WORLD", "THE CAT SAT", "ÉTÉ À PARIS", "IT'S O'NEIL'S"]
    norm_hyps = ["HELLO WORD", "THE CAT SAT ON", "", "ITS ONEIL'S"]
    assert [u.ref for u in per] == norm_refs and [u.hyp for u in per] == norm_hyps
    assert wer == pytest.approx(jiwer.wer(norm_refs, norm_hyps))
    assert wer == pytest.approx((1 + 1 + 3 + 2) / (2 + 3 + 3 + 2))  # hand count: sub, ins, 3 del, 2 sub
    assert cer == pytest.approx(jiwer.cer(norm_refs, norm_hyps))
    assert [u.wer for u in per] == pytest.approx([0.5, 1 / 3, 1.0, 1.0])
    assert [u.words for u in per] == [2, 3, 3, 2]


def test_length_batches_sort_and_bound():
    lengths = [5, 100, 30, 60, 7, 100]
    batches = length_batches(lengths, max_samples=200)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 200 or len(b) == 1
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    assert length_batches([500], max_samples=100) == [[0]]


def test_batched_inference_equals_one_by_one():
    torch.manual_seed(0)
    model = w2v2.build_model(tiny(), vocab=build_vocabulary(["AB CD"]))
    waves = [torch.randn(n).numpy() for n in (8000, 3000, 12000, 5000)]
    batched = W2v2Engine(model, batch_seconds=2.0).logits(waves)
    single = W2v2Engine(model, batch_seconds=0.01).logits(waves)  # one utterance per batch
    for a, b in zip(batched, single):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


class FixedEngine:
    name, case = "fixed", "upper"

    def __init__(self, texts):
        self.texts = texts

    def transcribe(self, waveforms):
        assert len(waveforms) == len(self.texts)
        return self.texts


def test_evaluate_scores_real_clips_and_writes_errors(tmp_path, data_dir):
    utts = [Utterance(str(data_dir / "speechocean762-train" / "audio" / f"{u}.opus"), t) for u, t in CLIPS]
    result = evaluate(FixedEngine(["BYE", "GOOD JOB", "BUY THE HAT"]), utts)
    assert result.wer == pytest.approx(2 / 6) and result.words == 6
    assert 4.5 < result.audio_seconds < 5.5 and result.rtf >= 0
    write_errors(result, tmp_path / "errors.tsv")
    rows = list(csv.DictReader(open(tmp_path / "errors.tsv"), delimiter="\t"))
    assert list(rows[0]) == ["path", "ref", "hyp", "wer", "cer"]
    assert rows[0]["ref"] == "BY THE HAND" and float(rows[0]["wer"]) == pytest.approx(2 / 3, abs=1e-4)  # worst first


def test_evaluate_command_on_a_fine_tuned_model(tmp_path, data_dir, capsys):
    manifest = tmp_path / "m.tsv"
    manifest.write_text("path\tseconds\tspeaker\ttext\n" + "".join(
        f"{data_dir}/speechocean762-train/audio/{u}.opus\t2\ts\t{t}\n" for u, t in CLIPS))
    assert [u.text for u in read_utterances(manifest)] == [t for _, t in CLIPS]
    torch.manual_seed(0)
    w2v2.save_pretrained(w2v2.build_model(tiny(), vocab=build_vocabulary(["BYE GOOD JOB"])), tmp_path / "model")
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--data", str(manifest), "--device", "cpu",
                 "--out", str(tmp_path / "err.tsv")]) == 0
    table = capsys.readouterr().out
    assert "WER %" in table and "m.tsv" in table
    assert len((tmp_path / "err.tsv").read_text().splitlines()) == 4
    pytest.importorskip("pyctcdecode")
    pytest.importorskip("kenlm")
    from w2v2.decoding import build_ngram_lm

    lm = build_ngram_lm(["BYE", "GOOD JOB", "BY THE HAND"], tmp_path / "lm.arpa", order=2)
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--data", str(manifest), "--device", "cpu",
                 "--lm", str(lm), "--beam", "4", "--alpha", "0.5", "--beta", "1.0"]) == 0
    assert "m.tsv" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("pocketsphinx") is None, reason="pocketsphinx not installed")
def test_pocketsphinx_baseline_scores_like_the_models(data_dir):
    path = data_dir / "speechocean762-train" / "audio" / f"{CLIPS[2][0]}.opus"
    result = evaluate(PocketSphinxEngine(), [Utterance(str(path), CLIPS[2][1])])
    hyp = result.utterances[0].hyp
    assert hyp == hyp.upper() and result.utterances[0].ref == "BY THE HAND"
    assert result.wer == pytest.approx(jiwer.wer("BY THE HAND", hyp)) if hyp else result.wer == 1.0


def test_export_round_trip_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = w2v2.build_model(tiny(), vocab=build_vocabulary(["HELLO WORLD"])).eval()
    ckpt = tmp_path / "run" / "checkpoint_0000010"
    w2v2.save_pretrained(model, ckpt)
    torch.save({"optimizer": {"state": {}}}, ckpt / "trainer_state.pt")  # what the trainer adds
    (tmp_path / "run" / "checkpoint_last").symlink_to(ckpt.name)
    out = export(str(tmp_path / "run"), str(tmp_path / "hf"))
    assert not (out / "trainer_state.pt").exists()
    hf, info = transformers.Wav2Vec2ForCTC.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    wav = torch.randn(1, 16000)
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(wav).logits, model(wav).logits, atol=1e-4, rtol=1e-4)
    half = export(str(ckpt), str(tmp_path / "hf16"), fp16=True)
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(half) < 0.6 * size(out)
    again = w2v2.load_model(half)
    assert again.vocab == model.vocab
    ref = model(wav)  # float16 weights: the error model of tests/helpers.py with float16's roundoff
    assert ((again(wav).logits - ref.logits).abs() <= logit_error_bound(model, ref, u=FP16_U)).all()


def test_make_splits_speaker_disjoint_nested_deterministic(tmp_path, data_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))  # as when run as a script: its helpers beside it
    spec = importlib.util.spec_from_file_location("make_splits", ROOT / "recipes" / "make_splits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a, b = mod.make_splits(data_dir, seed=0), mod.make_splits(data_dir, seed=0)
    assert a == b and a != mod.make_splits(data_dir, seed=1)
    paths = lambda name: {r["path"] for r in a[name]}  # noqa: E731
    speakers = lambda name: {r["speaker"] for r in a[name]}  # noqa: E731
    assert len(speakers("dev")) == 15 and not speakers("dev") & speakers("train-all")
    assert paths("train-10min") <= paths("train-1h") <= paths("train-all")
    seconds = lambda name: sum(float(r["seconds"]) for r in a[name])  # noqa: E731
    assert 540 < seconds("train-10min") <= 600 and 3500 < seconds("train-1h") <= 3600
    assert len(speakers("train-10min")) > 50  # spread over speakers, not a few of them
    assert len(a["dev"]) + len(a["train-all"]) == 2500 and len(a["test-ljspeech"]) == 137
    mod.main([str(tmp_path), "--data", str(data_dir)])
    rows = importlib.import_module("w2v2.data").read_manifest(tmp_path / "dev.tsv")
    assert len(rows) == len(a["dev"]) and all(r.path.startswith("/") for r in rows)
