"""Transcription and alignment end to end on real speech, through the library and the CLI.

No trained model exists yet: a tiny random model (saved to a temp dir) makes nonsense text,
so the tests check properties that hold for any model: files exist and parse, times are
monotonic and inside the audio, segments cover the words, metadata records the run.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.conftest import first_clips, longest_clip, read_manifest
from tests.helpers import ffmpeg_exe
from tests.test_writers import check_cues, parse_cues
from w2v2.audio import SAMPLE_RATE, load_audio
from w2v2.checkpoint import load_model
from w2v2.cli import main
from w2v2.precision import fast_bf16
from w2v2.text import normalize_text
from w2v2.transcribe import TranscribeOptions, align, transcribe

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL_CHUNKS = ["--chunk-seconds", "4", "--stride-seconds", "1"]


@pytest.fixture(scope="module")
def long_clip():
    """(path, manifest row) of a ~12 s utterance: three 4 s chunks."""
    return longest_clip("ljspeech-amateur")


@pytest.fixture(scope="module")
def short_clips():
    return first_clips("speechocean762-train", 2)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


def cli(*argv: str) -> int:
    return main(["transcribe", *map(str, argv)])


def all_words(result: dict) -> list[dict]:
    return [w for s in result["segments"] for w in s["words"]]


def check_result(result: dict, duration: float) -> None:
    """Times monotonic and inside the audio; segments cover their words; chars inside words."""
    words = all_words(result)
    assert words, "the test model should emit words"
    assert result["text"] == " ".join(w["word"] for w in words)
    previous_end = 0.0
    for w in words:
        assert previous_end <= w["start"] < w["end"] <= duration
        assert 0.0 <= w["confidence"] <= 1.0
        assert "".join(c["char"] for c in w["chars"]) == w["word"]
        for c in w["chars"]:
            assert w["start"] <= c["start"] < c["end"] <= w["end"]
        previous_end = w["end"]
    for s in result["segments"]:
        assert s["start"] == s["words"][0]["start"] and s["end"] == s["words"][-1]["end"]
        assert s["text"] == " ".join(w["word"] for w in s["words"])
    starts = [s["start"] for s in result["segments"]]
    assert starts == sorted(starts)


# ---------------------------------------------------------------- library


def test_transcribe_api_long_audio(model, long_clip):
    path, row = long_clip
    options = TranscribeOptions(chunk_seconds=4, stride_seconds=1, max_segment_seconds=3)
    result = transcribe(model, path, options, model_name="tiny-test")
    check_result(result, float(row["seconds"]) + 0.01)
    meta = result["metadata"]
    assert meta["model"]["name"] == "tiny-test" and meta["options"]["chunk_seconds"] == 4
    auto = "bf16" if fast_bf16("cpu") else "fp32"  # "auto": the fast path where the CPU has native bf16
    assert meta["options"]["device"] == "cpu" and meta["options"]["precision"] == auto
    assert meta["decoder"] == "greedy"
    assert all(s["end"] - s["start"] <= 3 for s in result["segments"] if len(s["words"]) > 1)
    # an array input at 16 kHz gives the same result as the file
    same = transcribe(model, load_audio(path), options, model_name="tiny-test")
    assert same["text"] == result["text"]


def test_options_are_validated(tmp_path):
    with pytest.raises(ValueError, match="twice stride_seconds"):
        transcribe(load_model_for_options(), np.zeros(16000, np.float32), TranscribeOptions(chunk_seconds=2))
    for bad in (dict(batch_size=0), dict(precision="fp8"), dict(lm=str(tmp_path / "missing.arpa")),
                dict(chunk_seconds=0), dict(beam_width=0)):
        with pytest.raises(ValueError):
            TranscribeOptions(**bad)
    assert TranscribeOptions().decoder == "greedy" and TranscribeOptions(beam_width=8).decoder == "beam"


def load_model_for_options():
    from tests.conftest import tiny_ctc_model

    return tiny_ctc_model(["abc"])


def test_model_without_ctc_head_is_refused():
    from w2v2.config import tiny
    from w2v2.model import build_model

    with pytest.raises(ValueError, match="no CTC head"):
        transcribe(build_model(tiny()), np.zeros(16000, np.float32))


def test_silence_shorter_than_a_frame_gives_empty_result(model):
    result = transcribe(model, np.zeros(100, np.float32))
    assert result["text"] == "" and result["segments"] == [] and result["metadata"]["frames"] == 0


def test_align_api_on_real_speech(model, long_clip):
    path, row = long_clip
    result = align(model, path, row["text"], TranscribeOptions(chunk_seconds=4, stride_seconds=1))
    check_result(result, float(row["seconds"]) + 0.01)
    assert [w["word"] for w in all_words(result)] == normalize_text(row["text"]).split()
    assert result["metadata"]["decoder"] == "forced_alignment"


# ---------------------------------------------------------------- CLI


def test_cli_writes_every_format(tiny_model_dir, long_clip, short_clips, tmp_path):
    path, row = long_clip
    out = tmp_path / "out"
    assert cli(path, *short_clips, "--model", tiny_model_dir, "-f", "all", "-o", out, *SMALL_CHUNKS) == 0
    for audio in [path, *short_clips]:
        stem = Path(audio).stem
        assert {p.suffix for p in out.glob(f"{stem}.*")} == {".txt", ".srt", ".vtt", ".json", ".tsv"}
        result = json.loads((out / f"{stem}.json").read_text())
        duration = result["metadata"]["duration"]
        assert duration == pytest.approx(len(load_audio(audio)) / SAMPLE_RATE)
        check_result(result, duration)
        meta = result["metadata"]
        assert meta["model"]["name"] == str(tiny_model_dir) and meta["options"]["stride_seconds"] == 1.0
        for fmt, marker in (("srt", ","), ("vtt", ".")):
            cues = parse_cues((out / f"{stem}.{fmt}").read_text().removeprefix("WEBVTT\n\n"), marker)
            check_cues(cues, result["segments"], duration)
        tsv = (out / f"{stem}.tsv").read_text().splitlines()
        assert tsv[0] == "start_ms\tend_ms\ttext" and len(tsv) == len(result["segments"]) + 1
        assert (out / f"{stem}.txt").read_text().split() == result["text"].split()


def test_cli_prints_to_stdout(tiny_model_dir, short_clips, capsys):
    assert cli(short_clips[0], "--model", tiny_model_dir) == 0
    text = capsys.readouterr().out
    assert cli(short_clips[0], "--model", tiny_model_dir, "-f", "srt") == 0
    srt = capsys.readouterr().out
    assert "-->" in srt and text.split() == [w for c in parse_cues(srt, ",") for w in c[2].split()]
    assert cli(*short_clips, "--model", tiny_model_dir) == 0  # several inputs: a header each
    assert capsys.readouterr().out.count("==> ") == 2


def test_cli_mp4_with_video_stream(tiny_model_dir, short_clips, tmp_path):
    wav = tmp_path / "speech.wav"
    sf.write(wav, load_audio(short_clips[0]), SAMPLE_RATE, subtype="PCM_16")
    mp4 = tmp_path / "clip.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", "color=c=blue:s=32x32:r=5",
                    "-i", str(wav), "-shortest", "-c:v", "mpeg4", "-c:a", "aac", str(mp4)], check=True)
    assert cli(mp4, "--model", tiny_model_dir, "-f", "json", "-o", tmp_path) == 0
    result = json.loads((tmp_path / "clip.json").read_text())
    assert result["metadata"]["duration"] == pytest.approx(sf.info(wav).duration, abs=0.1)
    assert result["text"]


def test_cli_stdin(tiny_model_dir, short_clips, monkeypatch, capsys, tmp_path):
    data = Path(short_clips[0]).read_bytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert cli("-", "--model", tiny_model_dir, "-f", "json", "-o", tmp_path) == 0
    from_stdin = json.loads((tmp_path / "stdin.json").read_text())
    assert cli(short_clips[0], "--model", tiny_model_dir, "-f", "json", "-o", tmp_path) == 0
    from_file = json.loads((tmp_path / f"{Path(short_clips[0]).stem}.json").read_text())
    assert from_stdin["text"] == from_file["text"] and from_stdin["text"]


def test_cli_batch_reports_bad_files_and_finishes_the_rest(tiny_model_dir, short_clips, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for p in short_clips:
        shutil.copy(p, folder)
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00not really a wave file" * 10)
    missing = tmp_path / "missing.flac"
    out = tmp_path / "out"
    rc = cli(folder, missing, "--model", tiny_model_dir, "-o", out)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert any(line.startswith(f"{folder / 'broken.wav'}: ") for line in err)
    assert any(line.startswith(f"{missing}: ") for line in err)
    assert err[-1] == "2 of 4 input(s) failed"
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{Path(p).stem}.txt" for p in short_clips)


def test_cli_skip_existing(tiny_model_dir, short_clips, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(*short_clips, "--model", tiny_model_dir, "-o", out, "-f", "all") == 0
    stamps = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    assert cli(*short_clips, "--model", tiny_model_dir, "-o", out, "-f", "all", "--skip-existing") == 0
    assert "skipping 2 input(s)" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    redo = out / f"{Path(short_clips[1]).stem}.srt"
    redo.unlink()  # one output missing: that input runs again, the other stays skipped
    assert cli(*short_clips, "--model", tiny_model_dir, "-o", out, "-f", "all", "--skip-existing") == 0
    assert redo.exists() and "skipping 1 input(s)" in capsys.readouterr().err
    first = out / f"{Path(short_clips[0]).stem}.json"
    assert first.stat().st_mtime_ns == stamps[first]


def test_without_a_default_model_the_error_says_how_to_pass_one(short_clips, tmp_path, monkeypatch, capsys):
    import w2v2.checkpoint

    monkeypatch.setattr(w2v2.checkpoint, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    assert cli(short_clips[0]) == 1
    err = capsys.readouterr().err
    assert "no default model" in err and "--model" in err


@pytest.mark.skipif(not (Path(__file__).parents[1] / "w2v2/assets/default_model/config.json").exists(),
                    reason="no default model embedded in this checkout")
def test_default_model_transcribes_real_speech_and_says_what_it_is(short_clips, tmp_path, capsys):
    assert cli(short_clips[0], "-o", tmp_path, "-f", "json") == 0
    err = capsys.readouterr().err
    assert "default model" in err and "--model" in err  # its accuracy and how to pick a better one
    result = json.loads((tmp_path / f"{Path(short_clips[0]).stem}.json").read_text())
    assert result["metadata"]["model"]["name"] == "default" and result["text"].strip()  # it says something, in letters
    assert set(result["text"]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ")


def test_subtitles_of_real_speech_have_no_flashes(tmp_path, data_dir):
    """Half a minute of real read speech through the default model (whose stray letters made cues
    of 20 ms): every cue readable for a second unless boxed in, lines of 42 characters at most."""
    folder = data_dir / "ljspeech-amateur"
    rows = read_manifest(folder)[:4]
    pause = np.zeros(int(0.7 * SAMPLE_RATE), np.float32)
    audio = np.concatenate([part for r in rows for part in (load_audio(folder / r["path"]), pause)])
    sf.write(tmp_path / "read.flac", audio, SAMPLE_RATE)
    assert cli(tmp_path / "read.flac", "-f", "all", "-o", tmp_path) == 0
    result = json.loads((tmp_path / "read.json").read_text())
    for fmt, marker in (("srt", ","), ("vtt", ".")):
        cues = parse_cues((tmp_path / f"read.{fmt}").read_text().removeprefix("WEBVTT\n\n"), marker)
        check_cues(cues, result["segments"], result["metadata"]["duration"])
        assert len(cues) <= len(result["segments"])


def test_closed_stdout_is_a_quiet_exit_not_an_error(tiny_model_dir, short_clips):
    """`w2v2 transcribe clip -f json | head -c 10`: the reader goes away; no 'internal error'."""
    proc = subprocess.Popen([sys.executable, "-m", "w2v2", "transcribe", str(short_clips[0]), "--model",
                             str(tiny_model_dir), "-f", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc.stdout.close()  # before the command has written anything (loading takes longer)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "error" not in err.lower(), err


def test_cli_usage_errors(tiny_model_dir, short_clips, tmp_path, capsys):
    assert cli(short_clips[0], "--model", tiny_model_dir, "-f", "all") == 1
    assert "--output-dir" in capsys.readouterr().err
    assert cli(short_clips[0], "--model", tiny_model_dir, "--skip-existing") == 1
    assert "--skip-existing needs --output-dir" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(empty, "--model", tiny_model_dir) == 1
    assert "no audio or video files" in capsys.readouterr().err
    assert cli(short_clips[0], "--model", tiny_model_dir, "--chunk-seconds", "2", "--stride-seconds", "1") == 1
    assert "twice stride_seconds" in capsys.readouterr().err


def test_cli_url_input(tiny_model_dir, short_clips, tmp_path, monkeypatch, capsys):
    import w2v2.audio

    def fake_download(url, dest):
        Path(dest).mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(short_clips[0], Path(dest) / "video-id.opus"))

    monkeypatch.setattr(w2v2.audio, "download_url", fake_download)
    assert cli("https://example.com/watch?v=1", "--model", tiny_model_dir, "-o", tmp_path) == 0
    assert (tmp_path / "video-id.txt").exists()
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "yt_dlp", None)  # not installed: a clear line, exit 1
    assert cli("https://example.com/a.mp3", short_clips[0], "--model", tiny_model_dir, "-o", tmp_path) == 1
    err = capsys.readouterr().err
    assert "https://example.com/a.mp3: downloading URLs needs yt-dlp" in err


def test_cli_lm_and_beam_search(tiny_model_dir, data_dir, short_clips, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(r["text"] for r in read_manifest(data_dir / "speechocean762-train")[:200]))
    arpa = tmp_path / "lm.arpa"
    assert main(["lm", str(text), str(arpa), "--order", "3"]) == 0
    assert arpa.read_text().startswith("\\data\\")
    assert cli(short_clips[0], "--model", tiny_model_dir, "--lm", arpa, "--beam-width", "8", "-f", "json",
               "-o", tmp_path) == 0
    result = json.loads((tmp_path / f"{Path(short_clips[0]).stem}.json").read_text())
    assert result["metadata"]["decoder"] == "beam" and result["metadata"]["options"]["lm"] == str(arpa)
    words = all_words(result)
    assert all(w["start"] < w["end"] for w in words)


def test_cli_align(tiny_model_dir, long_clip, tmp_path, capsys):
    path, row = long_clip
    transcript = tmp_path / "transcript.txt"
    transcript.write_text(row["text"] + "\n")
    assert main(["align", str(path), str(transcript), "--model", str(tiny_model_dir), *SMALL_CHUNKS]) == 0
    result = json.loads(capsys.readouterr().out)
    check_result(result, float(row["seconds"]) + 0.01)
    assert result["text"] == normalize_text(row["text"])
    assert main(["align", str(path), "the words as text", "--model", str(tiny_model_dir), "-f", "srt",
                 "-o", str(tmp_path)]) == 0
    cues = parse_cues((tmp_path / f"{path.stem}.srt").read_text(), ",")
    assert " ".join(text for _, _, text in cues) == "THE WORDS AS TEXT"
    assert main(["align", str(path), "word " * 400, "--model", str(tiny_model_dir)]) == 1
    assert capsys.readouterr().err.startswith(f"w2v2 align: error: {path}: transcript too long")


# ---------------------------------------------------------------- memory (slow)

PEAK_RSS = """
import resource, sys, torch
torch.set_num_threads(1)
from w2v2 import load_model
from w2v2.transcribe import transcribe
result = transcribe(load_model(sys.argv[1]), sys.argv[2])
assert result["metadata"]["duration"] > 0
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def tile_speech(path: Path, clips: list[Path], seconds: float) -> Path:
    """A long 16 kHz wav of real clips repeated, written block by block (never whole in memory)."""
    pieces = [load_audio(c) for c in clips]
    need = int(seconds * SAMPLE_RATE)
    with sf.SoundFile(path, "w", samplerate=SAMPLE_RATE, channels=1, subtype="PCM_16") as out:
        i = 0
        while need > 0:
            block = np.clip(pieces[i % len(pieces)][:need], -1, 1)
            out.write(block)
            need -= len(block)
            i += 1
    return path


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_length(tiny_model_dir, short_clips, long_clip, tmp_path):
    """One hour of audio costs about what two minutes cost: the file is streamed in chunks and
    only a few bytes per frame are kept. A whole float32 waveform alone would add 230 MB."""
    peak = {}
    for seconds in (120, 3600):
        wav = tile_speech(tmp_path / f"{seconds}.wav", [*short_clips, long_clip[0]], seconds)
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(tiny_model_dir), str(wav)],
                              capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
        peak[seconds] = int(proc.stdout.split()[-1])
        wav.unlink()
    assert peak[3600] - peak[120] < 100, peak  # MB: the result's words and characters grow, nothing else


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cli_on_cuda(tmp_path):
    from tests.conftest import tiny_ctc_model
    from w2v2.checkpoint import save_pretrained

    model_dir = save_pretrained(tiny_ctc_model(["abcdefghijklmnopqrstuvwxyz"]), tmp_path / "model")
    wav = tmp_path / "noise.wav"
    sf.write(wav, (0.1 * np.random.default_rng(0).standard_normal(40 * SAMPLE_RATE)).astype(np.float32), SAMPLE_RATE)
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert cli(wav, "--model", model_dir, "--device", "cuda", "--precision", precision, "-f", "all", "-o", out) == 0
        result = json.loads((out / "noise.json").read_text())
        assert result["metadata"]["options"]["device"].startswith("cuda")
        assert result["metadata"]["options"]["precision"] == precision
        assert result["metadata"]["options"]["batch_size"] == 8
        check_result(result, 40.0)
