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
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import w2v2.audio
from tests.badcorpus import (LONG_SECONDS, feed_fifo, quick_streams, run_cli, tone, wav_header, write_corpus,
                             write_sparse_wav)
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


@pytest.fixture(autouse=True)
def _quick_streams():
    """The corpus's pipe without a writer is given up after half a second, not a minute."""
    with quick_streams(0.5):
        yield


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


# ---------------------------------------------------------------------------- streams
def test_named_pipe_with_a_writer_is_read_once(corpus, model_dir, tmp_path):
    """A pipe is opened once (no up-front check that opens and closes it, which would kill the
    writer and leave the real open waiting forever): its transcript equals the file's."""
    source = corpus["pcm16.wav"].path
    feed_fifo(tmp_path / "pipe.wav", source.read_bytes(), delay=0.3)
    rc, _, err = run_cli(["transcribe", str(tmp_path / "pipe.wav"), str(source), "--model", str(model_dir),
                          "-f", "json", "-o", str(tmp_path / "out"), *FAST], timeout=120)
    assert rc == 0 and err == "", err
    piped, direct = (json.loads((tmp_path / "out" / f"{n}.json").read_text()) for n in ("pipe", "pcm16"))
    assert piped["text"] == direct["text"] and piped["segments"] == direct["segments"]


def test_named_pipe_in_an_evaluate_manifest(corpus, model_dir, tmp_path):
    manifest = tmp_path / "m.tsv"
    manifest.write_text(f"path\ttext\npipe.wav\tA B C\n{corpus['pcm16.wav'].path}\tA B\n")
    feed_fifo(tmp_path / "pipe.wav", corpus["pcm16.wav"].path.read_bytes(), delay=0.3)
    rc, out, err = run_cli(["evaluate", "--model", str(model_dir), "--data", str(manifest), "--device", "cpu"])
    assert rc == 0 and "Traceback" not in err and " 2 " in out, (out, err)
    (tmp_path / "pipe.wav").unlink()
    os.mkfifo(tmp_path / "pipe.wav")  # nobody writes: an error naming it, after the (shortened) wait
    rc, out, err = run_cli(["evaluate", "--model", str(model_dir), "--data", str(manifest), "--device", "cpu"])
    assert rc == 1 and out == ""
    assert stderr_lines(err)[-1] == f"w2v2 evaluate: error: {tmp_path / 'pipe.wav'}: no data within 0.5 s " \
                                    "(does a program write to it?)"


def w2v2_process(model_dir, stdin, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "w2v2", "transcribe", "--model", str(model_dir), *args],
                            stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def rss_mb(pid: int) -> float | None:
    """Resident memory of a running process, from /proc (None once it has gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024 if "VmRSS" in status else None


def watch(proc: subprocess.Popen, seconds: float, limit_mb: float = 1500.0) -> list[float]:
    """RSS samples (MB) every 0.2 s for up to ``seconds`` or until the process ends; a process
    past ``limit_mb`` is killed at once (the test fails on the samples, the machine survives)."""
    samples = []
    deadline = time.monotonic() + seconds
    while proc.poll() is None and time.monotonic() < deadline:
        rss = rss_mb(proc.pid)
        if rss is not None:
            samples.append(rss)
            if rss > limit_mb:
                break
        time.sleep(0.2)
    return samples


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads memory use from /proc")
def test_endless_standard_input_streams_in_bounded_memory(model_dir):
    """`producer | w2v2 transcribe -` where the producer never stops (a WAV header, then zeros, as
    fast as they are taken): after the first 16 MB, memory stays flat while input keeps flowing."""
    proc = w2v2_process(model_dir, subprocess.PIPE, "-")
    sent = [0]

    def produce() -> None:
        block = bytes(1 << 20)
        try:
            proc.stdin.write(wav_header())
            while proc.poll() is None:
                proc.stdin.write(block)
                sent[0] += len(block)
        except (BrokenPipeError, OSError, ValueError):
            pass

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        start = time.monotonic()
        while sent[0] < 2 * w2v2.audio.STREAM_BUFFER_BYTES and time.monotonic() - start < 60 and proc.poll() is None:
            time.sleep(0.1)  # past the read-ahead: from here on, only streaming
        at_start, fed_at_start = rss_mb(proc.pid), sent[0]
        samples = watch(proc, 6.0)
        fed = sent[0] - fed_at_start
    finally:
        proc.kill()
        proc.wait()
        producer.join(5)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()  # it was still reading
    assert fed > 8 << 20, f"only {fed} bytes taken in 6 s"  # the stream flowed (~4 min of audio)
    assert max(samples) - at_start < 150, (at_start, samples)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_endless_garbage_on_standard_input_ends_quickly(model_dir, device):
    """`cat /dev/zero | w2v2 transcribe -`: refused after reading ahead, within seconds, in bounded memory."""
    with open(device, "rb") as stdin:
        proc = w2v2_process(model_dir, stdin, "-")
        samples = watch(proc, 60.0)
        proc.kill()
        err = proc.communicate()[1].decode()
    assert proc.returncode == 1, err
    assert max(samples, default=0) < 1500
    assert stderr_lines(err) == ["<stdin>: not an audio file, or truncated/corrupt (Invalid data found when processing "
                                 "input); it was read as a stream (over 16 MB, without seeking), so a format that "
                                 "needs seeking, such as an MP4 with its index at the end, must be given as a file",
                                 "1 of 1 input(s) failed"]


def test_terminal_on_standard_input_is_refused(model_dir):
    import pty

    primary, secondary = pty.openpty()
    try:
        proc = w2v2_process(model_dir, secondary, "-")
        err = proc.communicate(timeout=120)[1].decode()
    finally:
        os.close(primary)
        os.close(secondary)
    assert proc.returncode == 1 and "<stdin>: is a terminal; pipe audio into it" in err, err


def test_names_that_are_not_utf8_in_a_subprocess(corpus, model_dir, tmp_path):
    """A Latin-1 file name is transcribed, and names in messages and headers still print, even
    with a strict UTF-8 standard output."""
    good = corpus["caf\udce9 \udcff.wav"].path
    junk = tmp_path / "\udce9t\udce9.wav"
    junk.write_bytes(b"not audio " * 10)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, "-m", "w2v2", "transcribe", "--model", str(model_dir), str(good),
                           str(junk), str(tmp_path / "\udcffmissing.wav")],
                          capture_output=True, env=env, timeout=300)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err, err
    shown = lambda p: str(p).encode("utf-8", "backslashreplace").decode()  # noqa: E731 - Python's stderr
    assert stderr_lines(err) == [f"{shown(junk)}: not an audio file, or truncated/corrupt (Invalid data found when "
                                 "processing input)", f"{shown(tmp_path)}/\\udcffmissing.wav: no such file",
                                 "2 of 3 input(s) failed"]
    assert proc.stdout.decode().splitlines()[0] == f"==> {shown(good)} <=="
