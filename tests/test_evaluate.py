"""Scoring (jiwer, shared normalisation), batched inference, the PocketSphinx baseline, export, splits."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
from pathlib import Path

import jiwer
import pytest
import torch

import w2v2
from w2v2.cli import main
from w2v2.commands.export import export
from w2v2.config import tiny
from w2v2.audio import SAMPLE_RATE, load_audio
from w2v2.evaluate import (Hypothesis, PocketSphinxEngine, Utterance, W2v2Engine, evaluate, read_utterances, score,
                           write_errors)
from w2v2.text import build_vocabulary, normalize_text

from .conftest import ROOT, read_manifest
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


class FixedEngine:
    """Fixed texts by file name (whatever order evaluate asks in), the real audio length."""

    name, case = "fixed", "upper"

    def __init__(self, texts: dict[str, str]):
        self.texts = texts

    def transcribe(self, paths):
        return [Hypothesis(self.texts[Path(p).stem], len(load_audio(p)) / SAMPLE_RATE) for p in paths]


def test_evaluate_scores_real_clips_and_writes_errors(tmp_path, data_dir):
    utts = [Utterance(str(data_dir / "speechocean762-train" / "audio" / f"{u}.opus"), t, s)
            for (u, t), s in zip(CLIPS, (1.0, 3.0, 2.0))]  # the engine gets them longest first
    result = evaluate(FixedEngine(dict(zip([u for u, _ in CLIPS], ["BYE", "GOOD JOB", "BUY THE HAT"]))), utts)
    assert [u.hyp for u in result.utterances] == ["BYE", "GOOD JOB", "BUY THE HAT"]  # back in manifest order
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


# ---------------------------------------------------------------- evaluate scores what transcribe ships


@pytest.fixture(scope="module")
def real_slice(tmp_path_factory, data_dir):
    """A manifest of real speech: 20 speechocean762 utterances spread over the corpus, the 3 longest
    ljspeech ones (chunked below) and 2 fsdd digits (8 kHz: resampled while read)."""
    rows = []
    for folder, pick in (("speechocean762-train", lambda m: m[::125][:20]),
                         ("ljspeech-amateur", lambda m: sorted(m, key=lambda r: -float(r["seconds"]))[:3]),
                         ("fsdd", lambda m: m[::1500])):
        rows += [(data_dir / folder / r["path"], r) for r in pick(read_manifest(data_dir / folder))]
    path = tmp_path_factory.mktemp("slice") / "slice.tsv"
    path.write_text("path\tseconds\tspeaker\ttext\n" + "".join(
        f"{p}\t{r['seconds']}\t{r['speaker']}\t{r['text']}\n" for p, r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def slice_lm(tmp_path_factory, data_dir):
    pytest.importorskip("pyctcdecode")
    pytest.importorskip("kenlm")
    from w2v2.decoding import build_ngram_lm

    texts = [r["text"] for r in read_manifest(data_dir / "speechocean762-train")]
    return build_ngram_lm(texts, tmp_path_factory.mktemp("lm") / "so.arpa", order=3)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("decoder", ["greedy", "lm"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_evaluate_hypotheses_are_what_transcribe_writes(precision, decoder, real_slice, tmp_path, capsys, request):
    """For every utterance, `w2v2 evaluate` scores exactly the text `w2v2 transcribe` writes for that
    file with the same options: the embedded trained model, chunks of 6 s so that the long files are
    cut and stitched, beam search with an n-gram LM in the "lm" case."""
    options = ["--precision", precision, "--device", "cpu", "--chunk-seconds", "6", "--stride-seconds", "1"]
    if decoder == "lm":
        options += ["--lm", str(request.getfixturevalue("slice_lm"))]
    utts = read_utterances(real_slice)
    assert main(["transcribe", *[u.path for u in utts], "-f", "json", "-o", str(tmp_path / "out"), *options]) == 0
    shipped = {u.path: json.loads((tmp_path / "out" / f"{Path(u.path).stem}.json").read_text())["text"] for u in utts}
    assert sum(len(t.split()) for t in shipped.values()) > 20  # a real model saying real words
    capsys.readouterr()
    assert main(["evaluate", "--data", str(real_slice), "--out", str(tmp_path / "errors.tsv"), *options]) == 0
    table = capsys.readouterr().out
    rows = {r["path"]: r for r in csv.DictReader(open(tmp_path / "errors.tsv", encoding="utf-8"), delimiter="\t",
                                                 quoting=csv.QUOTE_NONE)}
    assert set(rows) == set(shipped)
    for path, text in shipped.items():
        assert rows[path]["hyp"] == normalize_text(text, case="upper"), path
    wer, cer, _ = score([u.text for u in utts], [shipped[u.path] for u in utts], case="upper")
    assert f"{100 * wer:>7.2f} {100 * cer:>7.2f}" in table  # the printed WER is the shipped text's


def test_w2v2_engine_returns_the_transcribers_raw_texts_in_any_batch(real_slice):
    """The engine's texts (before normalisation) are the one-call API's; batching several
    files' chunks together (as on a GPU) pads exactly, so the texts stay the same."""
    from w2v2.transcribe import TranscribeOptions, Transcriber, transcribe

    model = w2v2.load_model()
    paths = [u.path for u in read_utterances(real_slice)][18:]  # two short, three long, two 8 kHz files
    options = TranscribeOptions(chunk_seconds=6.0, stride_seconds=1.0, device="cpu", precision="fp32")
    alone = [transcribe(model, p, options)["text"] for p in paths]
    for batch_size in (1, 4):
        engine = W2v2Engine(Transcriber(model, dataclasses.replace(options, batch_size=batch_size)))
        hyps = engine.transcribe(paths)
        assert [h.text for h in hyps] == alone, batch_size
        assert [h.seconds for h in hyps] == pytest.approx([len(load_audio(p)) / SAMPLE_RATE for p in paths],
                                                          abs=1e-3)


def test_evaluate_stops_on_an_unreadable_file_with_one_line_naming_it(tmp_path, data_dir, tiny_model_dir, capsys):
    """A WER without some of the manifest's utterances would be presented as the manifest's."""
    junk = tmp_path / "junk.wav"
    junk.write_text("not audio")
    good = data_dir / "speechocean762-train" / "audio" / f"{CLIPS[0][0]}.opus"
    manifest = tmp_path / "m.tsv"
    manifest.write_text(f"path\ttext\n{good}\tBYE\n{junk}\tHELLO\n{tmp_path / 'missing.wav'}\tHELLO\n")
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(manifest), "--device", "cpu",
                 "--out", str(tmp_path / "errors.tsv")]) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"w2v2 evaluate: error: {junk}: ") and "Traceback" not in err
    assert "WER" not in out and not (tmp_path / "errors.tsv").exists()
