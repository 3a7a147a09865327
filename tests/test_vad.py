"""--vad: speech regions of real speech, transcription on them only, times on the recording's timeline."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from .conftest import read_manifest

pytest.importorskip("silero_vad")
pytest.importorskip("onnxruntime")

from benchmarks.vad import build_recording, pink_noise  # noqa: E402
from w2v2 import vad as V  # noqa: E402

SR = 16000
# A region may start before its utterance by its pad and one model frame (its start moves down
# onto the frame grid), and end after it by its pad and the detector's hangover: its probability
# falls below NEG_THRESHOLD up to 5 windows after speech ends (at most 0.16 s over 60 dev
# utterances at 10 and 20 dB SNR, benchmarks/vad.py's recordings). No more: else it is in a pause.
EARLY = V.PAD_SECONDS + 0.05
LATE = V.PAD_SECONDS + 0.2
# The utterances' edges (trimmed at 35 dB below their peak) still hold up to ~0.5 s of the
# clips' own room noise and breath, which the detector rightly leaves out: regions cover most of
# an utterance, not all of it (at least 76%, median 88%, on those 60 utterances).
COVERED = 0.6


@pytest.fixture(scope="module")
def clips(data_dir):
    rows = read_manifest(data_dir / "speechocean762-train")[:6]
    return [(data_dir / "speechocean762-train" / r["path"], r["text"]) for r in rows]


@pytest.fixture(scope="module")
def recording(clips):
    """Six real utterances apart by 1 to 3 s of pink noise at 20 dB SNR."""
    return build_recording(clips, 20.0, pauses=(1.0, 2.0, 3.0))


@pytest.fixture(scope="module")
def vad():
    return V.load_vad()


@pytest.fixture(scope="module")
def model():
    import w2v2

    return w2v2.load_model(None)


def _seconds(region: V.Region) -> tuple[float, float]:
    return region.start / SR, region.end / SR


def test_regions_find_the_utterances(recording, vad, one_thread):
    regions = [_seconds(r) for r in V.speech_regions([recording.audio], vad)]
    for a, b in regions:  # nothing in the pauses
        assert any(s - EARLY <= a and b <= e + LATE for s, e in recording.spans), (a, b, recording.spans)
    for s, e in recording.spans:  # every utterance found, most of it
        covered = sum(max(0.0, min(b, e) - max(a, s)) for a, b in regions)
        assert covered >= COVERED * (e - s), (s, e, regions)


def test_regions_do_not_depend_on_how_the_audio_is_cut_into_blocks(recording, vad, one_thread):
    whole = [(r.start, len(r.audio)) for r in V.speech_regions([recording.audio], vad)]
    lengths: list[int] = []
    streamed = list(V.speech_regions(np.array_split(recording.audio, 37), vad, lengths=lengths))
    assert [(r.start, len(r.audio)) for r in streamed] == whole
    assert lengths == [len(recording.audio)]
    for r in streamed:  # on the model's frame grid, and the recording's own samples
        assert r.start % 320 == 0
        np.testing.assert_array_equal(r.audio, recording.audio[r.start : r.end])


def test_a_long_region_is_cut_at_its_longest_pause(recording, vad, monkeypatch, one_thread):
    """Memory stays bounded: no region is longer than MAX_REGION_SECONDS (and its pads), and the cut
    falls in a pause, not in a word, when there is one."""
    monkeypatch.setattr(V, "MIN_SILENCE_SECONDS", 3.5)  # the pauses no longer end regions
    monkeypatch.setattr(V, "MAX_REGION_SECONDS", 8.0)
    regions = [_seconds(r) for r in V.speech_regions([recording.audio], vad)]
    assert len(regions) >= 3
    assert all(b - a <= 8.0 + 2 * V.PAD_SECONDS for a, b in regions), regions
    for (_, b), (a, _) in zip(regions, regions[1:]):
        cut = b - V.PAD_SECONDS
        assert not any(s + 0.1 < cut < e - 0.1 for s, e in recording.spans), (cut, recording.spans)


def test_silence_and_noise_give_an_empty_transcript_without_running_the_model(model, one_thread):
    from w2v2.transcribe import TranscribeOptions, Transcriber

    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        rng = np.random.default_rng(0)
        inputs = [("zeros", np.zeros(20 * SR, np.float32)), ("noise", 0.01 * pink_noise(20 * SR, rng))]
        results = dict(Transcriber(model, TranscribeOptions(vad=True, precision="fp32")).transcribe_many(inputs))
    finally:
        hook.remove()
    assert calls == []
    for result in results.values():
        assert result["text"] == "" and result["segments"] == [] and result["metadata"]["speech"] == []
        assert result["metadata"]["duration"] == 20.0


def test_word_times_are_on_the_recordings_timeline(model, recording, one_thread):
    from w2v2.decoding.segments import subtitle_cues
    from w2v2.transcribe import TranscribeOptions, Transcriber

    progress = []
    transcriber = Transcriber(model, TranscribeOptions(vad=True, precision="fp32"))
    (_, result), = transcriber.transcribe_many([("rec", recording.audio)], on_progress=lambda k, s: progress.append(s))
    assert sum(progress) == pytest.approx(len(recording.audio) / SR, rel=0.01)  # speech run and silence skipped
    speech = result["metadata"]["speech"]
    words = [w for s in result["segments"] for w in s["words"]]
    assert len(speech) >= len(recording.spans) and len(words) >= len(recording.spans)
    for w in words:  # inside a region, and so near an utterance
        assert any(a <= w["start"] <= w["end"] <= b for a, b in speech), (w, speech)
        assert any(s - EARLY <= w["start"] and w["end"] <= e + LATE for s, e in recording.spans), w
    for s in result["segments"]:  # no segment spans a pause between regions
        assert any(a <= s["start"] and s["end"] <= b for a, b in speech), (s, speech)
    gaps = [(e, s) for (_, e), (s, _) in zip(recording.spans, recording.spans[1:])]
    for start, end, _ in subtitle_cues(result["segments"], result["metadata"]["duration"]):
        assert not any(start < e - 0.1 and s + 0.1 < end and s - e > 1.0 for e, s in gaps), (start, end)


def test_each_region_is_transcribed_as_it_would_be_alone(model, recording, vad, one_thread):
    """The only difference --vad makes is what the model sees: the words of a region, run alone,
    are --vad's words for it, moved by the region's start."""
    from w2v2.transcribe import TranscribeOptions, transcribe

    options = TranscribeOptions(precision="fp32")
    result = transcribe(model, recording.audio, TranscribeOptions(vad=True, precision="fp32"))
    words = [(w["word"], w["start"], w["end"]) for s in result["segments"] for w in s["words"]]
    expected = []
    for region in V.speech_regions([recording.audio], vad):
        alone = transcribe(model, region.audio, options)
        shift = region.start / SR
        expected += [(w["word"], round(w["start"] + shift, 3), round(w["end"] + shift, 3))
                     for s in alone["segments"] for w in s["words"]]
    assert [w[0] for w in words] == [w[0] for w in expected]
    assert np.allclose([w[1:] for w in words], [w[1:] for w in expected], atol=1e-3)


def test_one_bad_input_fails_alone(model, clips, tmp_path, one_thread):
    from w2v2.transcribe import TranscribeOptions, Transcriber

    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wav file")
    inputs = [("missing", str(tmp_path / "missing.flac")), ("bad", str(bad)), ("good", str(clips[0][0])),
              ("nan", np.full(SR, np.nan, np.float32))]
    results = dict(Transcriber(model, TranscribeOptions(vad=True, precision="fp32")).transcribe_many(inputs))
    assert list(results) == ["missing", "bad", "good", "nan"]
    for key in ("missing", "bad", "nan"):
        assert isinstance(results[key], Exception) and "\n" not in str(results[key]), results[key]
    assert isinstance(results["good"], dict) and results["good"]["text"]


def test_missing_extra_is_one_line_error(model, monkeypatch):
    from w2v2.transcribe import TranscribeOptions, Transcriber

    monkeypatch.setitem(sys.modules, "silero_vad", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'w2v2\[vad\]'") as e:
        Transcriber(model, TranscribeOptions(vad=True))
    assert "\n" not in str(e.value)


def test_loading_the_detector_keeps_torchs_threads(monkeypatch):
    """Importing silero_vad sets torch to one thread for the whole process; load_vad undoes that."""
    import torch

    for name in [n for n in sys.modules if n == "silero_vad" or n.startswith("silero_vad.")]:
        monkeypatch.delitem(sys.modules, name)  # imported afresh, as in a new process
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        V.load_vad()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cli_vad_and_missing_extra(clips, monkeypatch, capsys):
    """The flag end to end; without the package, one line and exit status 1."""
    from w2v2.cli import main

    assert main(["transcribe", str(clips[0][0]), "--vad", "-f", "srt", "--precision", "fp32"]) == 0
    assert " --> " in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "silero_vad", None)  # as if it were not installed
    assert main(["transcribe", str(clips[0][0]), "--vad"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("w2v2 transcribe: error: --vad needs the silero-vad and onnxruntime "
                                            "packages: pip install 'w2v2[vad]'"), err
    assert "Traceback" not in err


def test_benchmark_runs_and_prints_both_engines(data_dir):
    """benchmarks/vad.py end to end on a few utterances, so that a long run does not die on a script error."""
    import os
    import subprocess

    from .conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "W2V2_DATA": str(data_dir)}
    proc = subprocess.run([sys.executable, "benchmarks/vad.py", "--utterances", "2", "--singles", "2", "--repeats", "1"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and " s speech " in line]
    assert len(rows) == 6 and sum("--vad" in r for r in rows) == 3, proc.stdout
    singles = [line for line in proc.stdout.splitlines() if line.startswith("| --vad ") and " of 2 " in line]
    assert len(singles) == 1, proc.stdout


def test_server_with_vad_answers_on_the_recordings_timeline(recording, tmp_path):
    """``w2v2 serve --vad`` runs the same transcriber: an upload's words lie in its utterances."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    import soundfile as sf

    from w2v2.serve.process import ServerProcess

    path = tmp_path / "recording.wav"
    sf.write(path, recording.audio, SR, subtype="PCM_16")
    server = ServerProcess("--vad", "--precision", "fp32", env={"OMP_NUM_THREADS": "1", "W2V2_API_KEY": ""})
    try:
        with open(path, "rb") as f:
            answer = httpx.post(server.url + "/v1/audio/transcriptions", timeout=120,
                                files={"file": ("recording.wav", f, "audio/wav")},
                                data={"response_format": "verbose_json", "timestamp_granularities[]": "word"})
    finally:
        assert server.stop() == 0
    assert answer.status_code == 200, answer.text
    words = answer.json()["words"]
    assert len(words) >= len(recording.spans)
    for w in words:
        assert any(s - EARLY <= w["start"] and w["end"] <= e + LATE for s, e in recording.spans), w


def test_beam_search_decodes_each_region_too(model, recording, one_thread):
    pytest.importorskip("pyctcdecode")
    from w2v2.transcribe import TranscribeOptions, transcribe

    result = transcribe(model, recording.audio, TranscribeOptions(vad=True, beam_width=8, precision="fp32"))
    speech = result["metadata"]["speech"]
    words = [w for s in result["segments"] for w in s["words"]]
    assert result["metadata"]["decoder"] == "beam" and len(words) >= len(recording.spans)
    assert result["text"] == " ".join(w["word"] for w in words)
    assert all(any(a <= w["start"] <= w["end"] <= b for a, b in speech) for w in words), (words, speech)
