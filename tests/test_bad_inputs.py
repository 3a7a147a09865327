"""Bad and odd inputs (tests/badcorpus.py): each is transcribed or rejected with one line naming it.

The loader must decode every good case and raise a one-line ``AudioError`` for every bad one;
``w2v2 transcribe`` on the whole corpus at once must write every good case's outputs, print one
line per bad case, finish the batch, exit 1, and show no traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import builtins
import csv
import errno
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import w2v2.audio
from tests.badcorpus import LONG_SECONDS, write_corpus, write_sparse_wav
from tests.conftest import tiny_ctc_model
from w2v2.audio import SAMPLE_RATE, AudioError, audio_duration, load_audio, stream_audio
from w2v2.checkpoint import CheckpointError, save_pretrained
from w2v2.cli import main
from w2v2.writers import WRITERS

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
FAST = ["--chunk-seconds", "4", "--stride-seconds", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random CTC model over the letters (no real data needed)."""
    return save_pretrained(tiny_ctc_model(["abcdefghijklmnopqrstuvwxyz '"]), tmp_path_factory.mktemp("model") / "m")


@pytest.fixture
def locked(corpus, monkeypatch):
    """``unreadable.wav`` is chmod 000, which root reads anyway: as root, opening it fails as
    it would for anyone else (the loader's own ``open`` is replaced; nothing else changes)."""
    path = str(corpus["unreadable.wav"].path)
    if os.name == "posix" and os.geteuid() == 0:
        def refuse(file, *args, **kwargs):
            if os.fspath(file) == path:
                raise PermissionError(errno.EACCES, "Permission denied", path)
            return builtins.open(file, *args, **kwargs)

        monkeypatch.setattr(w2v2.audio, "open", refuse, raising=False)
    return path


def good_cases(corpus):
    return [c for c in corpus.values() if c.problem is None]


def bad_cases(corpus):
    return [c for c in corpus.values() if c.problem is not None]


# ---------------------------------------------------------------------------- the loader
def test_loader_decodes_good_cases(corpus):
    for case in good_cases(corpus):
        audio = load_audio(case.path)
        assert audio.dtype == np.float32 and audio.ndim == 1 and np.isfinite(audio).all(), case.name
        if case.seconds is not None:
            assert abs(len(audio) - case.seconds * SAMPLE_RATE) <= 2, case.name
        else:
            assert len(audio) > 0, case.name
        streamed = np.concatenate(list(stream_audio(case.path, block_seconds=0.25)))
        assert abs(len(streamed) - len(audio)) <= 2, case.name


def test_loader_rejects_bad_cases_with_one_line(corpus, locked):
    for case in bad_cases(corpus):
        for read in (load_audio, lambda p: list(stream_audio(p))):
            with pytest.raises(AudioError) as info:
                read(case.path)
            message = str(info.value)
            assert message.startswith(f"{case.path}: ") and "\n" not in message, message
            assert case.problem in message, message


def test_three_hour_file_is_read_lazily(tmp_path):
    """The sparse 3-hour WAV: its length comes from the header and streaming starts at once."""
    path = tmp_path / "three_hours.wav"
    write_sparse_wav(path, LONG_SECONDS)
    assert audio_duration(path) == LONG_SECONDS
    first = next(iter(stream_audio(path, block_seconds=30.0)))
    assert len(first) == 30 * SAMPLE_RATE and np.abs(first[:SAMPLE_RATE]).max() > 0.1


# ---------------------------------------------------------------------------- w2v2 transcribe
def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def check_outputs(out: Path, case) -> None:
    """All five formats exist and parse; times lie inside the audio."""
    stem = case.path.stem
    files = {ext: out / f"{stem}.{ext}" for ext in WRITERS}
    assert all(p.exists() for p in files.values()), (case.name, sorted(p.name for p in out.iterdir()))
    result = json.loads(files["json"].read_text())
    duration = result["metadata"]["duration"]
    if case.seconds is not None:
        assert duration == pytest.approx(case.seconds, abs=0.01), case.name
    words = [w for s in result["segments"] for w in s["words"]]
    assert result["text"] == " ".join(w["word"] for w in words)
    assert all(0 <= w["start"] < w["end"] <= duration + 1e-6 for w in words)
    assert files["txt"].read_text().split() == result["text"].split()
    stamp = r"(\d+):(\d\d):(\d\d)[,.](\d{3})"
    for ext in ("srt", "vtt"):
        cues = [line for line in files[ext].read_text().splitlines() if "-->" in line]
        assert len(cues) == len(result["segments"]), (case.name, ext)
        for line in cues:
            a, b = (int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000 for h, m, s, ms in re.findall(stamp, line))
            assert 0 <= a <= b <= duration + 0.001
    rows = list(csv.reader(io.StringIO(files["tsv"].read_text()), delimiter="\t"))
    assert rows[0] == ["start_ms", "end_ms", "text"] and len(rows) == 1 + len(result["segments"])


def test_cli_transcribes_good_cases_and_rejects_bad_ones(corpus, model_dir, locked, tmp_path, capsys):
    out = tmp_path / "out"
    paths = [str(c.path) for c in corpus.values()]
    rc = main(["transcribe", *paths, "--model", str(model_dir), "-f", "all", "-o", str(out), *FAST])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback" not in err
    lines = stderr_lines(err)
    for case in bad_cases(corpus):
        mine = [line for line in lines if line.startswith(f"{case.path}: ")]
        assert len(mine) == 1, (case.name, lines)
        assert case.problem in mine[0], mine[0]
    assert lines[-1] == f"{len(bad_cases(corpus))} of {len(corpus)} input(s) failed"
    for case in good_cases(corpus):
        check_outputs(out, case)
    written = {p.stem for p in out.iterdir()}
    assert written == {c.path.stem for c in good_cases(corpus)}  # nothing for the bad ones
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_cli_all_good_exits_zero_and_prints_nothing_on_stderr(corpus, model_dir, tmp_path, capsys):
    good = [str(c.path) for c in good_cases(corpus)][:4]
    assert main(["transcribe", *good, "--model", str(model_dir), "-o", str(tmp_path), *FAST]) == 0
    assert capsys.readouterr().err == ""


def test_cli_debug_shows_the_traceback(corpus, model_dir, tmp_path, capsys):
    bad, good = corpus["text.wav"].path, corpus["pcm16.wav"].path
    assert main(["--debug", "transcribe", str(bad), str(good), "--model", str(model_dir), "-o", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "AudioError" in err and f"{bad}: not an audio file" in err
    assert (tmp_path / "pcm16.txt").exists()  # --debug does not stop the batch
    # an error outside the batch: one line, or the exception itself with --debug
    assert main(["transcribe", str(good), "--model", str(tmp_path / "no-model")]) == 1
    err = capsys.readouterr().err
    assert len(stderr_lines(err)) == 1 and "no-model" in err and "Traceback" not in err
    with pytest.raises(CheckpointError):
        main(["transcribe", str(good), "--model", str(tmp_path / "no-model"), "--debug"])


def test_cli_empty_directory_in_a_batch_is_a_failure(corpus, model_dir, tmp_path, capsys):
    empty = tmp_path / "nothing here"
    empty.mkdir()
    rc = main(["transcribe", str(empty), str(corpus["pcm16.wav"].path), "--model", str(model_dir),
               "-o", str(tmp_path / "out")])
    lines = stderr_lines(capsys.readouterr().err)
    assert rc == 1
    assert lines == [f"{empty}: no audio or video files in this directory", "1 of 2 input(s) failed"]
    assert (tmp_path / "out" / "pcm16.txt").exists()


def test_cli_exit_status_in_a_subprocess(corpus, model_dir, tmp_path):
    """The real process: exit status 1 when an input failed, 0 when none did; no traceback."""
    good, bad = corpus["rate_48k.wav"].path, corpus["image.wav"].path
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "w2v2", "transcribe", "--model", str(model_dir), "-o", str(tmp_path)]
    failed = subprocess.run([*run, str(bad), str(good)], capture_output=True, text=True, env=env, timeout=300)
    assert failed.returncode == 1, failed.stderr
    assert "Traceback" not in failed.stderr
    assert f"{bad}: not an audio file" in failed.stderr and "1 of 2 input(s) failed" in failed.stderr
    assert (tmp_path / "rate_48k.txt").exists()
    ok = subprocess.run([*run, str(good)], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0 and "Traceback" not in ok.stderr, ok.stderr


@pytest.mark.slow
def test_cli_transcribes_a_three_hour_file(model_dir, tmp_path, capsys):
    """About a minute on one core: 3 hours streamed in 30 s chunks, every format written."""
    cases = write_corpus(tmp_path / "corpus", long=True)
    case = cases["three_hours.wav"]
    assert main(["transcribe", str(case.path), "--model", str(model_dir), "-f", "all", "-o", str(tmp_path / "out"),
                 "--batch-size", "4"]) == 0
    check_outputs(tmp_path / "out", case)
