"""A corpus of bad and odd audio inputs, generated into a folder in about a second.

    cases = write_corpus(tmp_path)          # name -> Case(path, problem)
    cases = write_corpus(tmp_path, long=True)  # plus a 3-hour file (a sparse WAV: instant, ~1 MB on disk)

Each :class:`Case` says what loading it must do: ``problem=None`` means it decodes (and so
must transcribe); otherwise ``problem`` is a phrase the one-line :class:`w2v2.audio.AudioError`
must contain. Files are small (a few kB each); nothing here needs real speech or the network.

Besides files, the corpus holds what is not a regular file: symbolic link loops and broken
links, a named pipe nobody writes to (the reader must give up after ``w2v2.audio.STREAM_WAIT_SECONDS``:
lower it in tests, see :func:`quick_streams`), character devices (``/dev/zero``, ``/dev/null``),
a socket, and a file whose name is not UTF-8. Streams that need a writer or run forever are made
by :func:`feed_fifo` and :func:`endless_wav_header`; :func:`run_cli` runs a command in-process
with a time limit, for tests of any class of input (model files included).

Classes of hostile input and where each is tried:

    files (truncated, garbage, odd formats)   write_corpus          test_bad_inputs, test_properties (fuzz)
    not regular files, names                  write_corpus          test_bad_inputs
    streams (stdin, pipes, endless input)     feed_fifo, endless_*  test_bad_inputs, test_audio
    manifests (BOM, quotes, repeats, empty)   -                     test_data, test_upfront_checks
    random files and arguments, every command -                     test_properties (CLI)
    model files (archive and config bombs)    run_cli               the model-loading tests
    outputs (full disk, clashes)              -                     the writers' tests
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import struct
import subprocess
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16000
LONG_SECONDS = 3 * 3600


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    problem: str | None  # None: a good input; else words its error message must contain
    seconds: float | None = None  # duration of a good input, in seconds


def tone(seconds: float, sr: int = SR, channels: int = 1, amp: float = 0.3) -> np.ndarray:
    """Harmonic tone with a little noise, float32 (frames,) or (frames, channels)."""
    n = round(seconds * sr)
    t = np.arange(n) / sr
    rng = np.random.default_rng(n + channels)
    mono = sum(np.sin(2 * np.pi * 180 * k * t) / k for k in range(1, 4)) + 0.05 * rng.standard_normal(n)
    mono = (amp * mono / np.abs(mono).max()).astype(np.float32)
    if channels == 1:
        return mono
    return np.stack([mono * (0.5 + 0.5 * c / channels) for c in range(channels)], axis=1).astype(np.float32)


def ffmpeg(*args: str) -> None:
    from .helpers import ffmpeg_exe

    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", *args], check=True)


def png_bytes() -> bytes:
    """A valid 1x1 PNG image."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0\0")) + chunk(b"IEND", b"")


def write_sparse_wav(path: Path, seconds: float, sr: int = SR) -> None:
    """A 16-bit mono WAV of ``seconds``: a second of tone at each end, silence (a file hole) between."""
    n = round(seconds * sr)
    data_bytes = 2 * n
    header = b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sr, 2 * sr, 2, 16)
    header += b"data" + struct.pack("<I", data_bytes)
    burst = (tone(1.0, sr) * 32767).astype("<i2").tobytes()
    with open(path, "wb") as f:
        f.write(header + burst)
        f.seek(len(header) + data_bytes - len(burst))
        f.write(burst)


def wav_header(sr: int = SR, data_bytes: int = 0xFFFFFFFF) -> bytes:
    """A 16-bit mono WAV header; the default size is what a program writing to a pipe puts there
    (it cannot know the length): the audio runs until the stream ends."""
    return (b"RIFF" + struct.pack("<I", min(36 + data_bytes, 0xFFFFFFFF)) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sr, 2 * sr, 2, 16) + b"data" + struct.pack("<I", data_bytes))


def feed_fifo(path: str | os.PathLike, data: bytes, delay: float = 0.0) -> threading.Thread:
    """Make a named pipe at ``path`` and a thread that writes ``data`` into it once, after ``delay``
    seconds (a writer that dies of a closed reader is fine: the thread just ends)."""
    os.mkfifo(path)

    def write() -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            threading.Event().wait(delay)
            with open(path, "wb") as f:
                f.write(data)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def quick_streams(seconds: float = 0.5) -> Iterator[None]:
    """Streams give up waiting for a first byte after ``seconds`` (a pipe without a writer)."""
    import w2v2.audio

    before = w2v2.audio.STREAM_WAIT_SECONDS
    w2v2.audio.STREAM_WAIT_SECONDS = seconds
    try:
        yield
    finally:
        w2v2.audio.STREAM_WAIT_SECONDS = before


class Hang(Exception):
    """A command did not finish within its time limit."""


def run_cli(argv: list[str], timeout: float = 120.0) -> tuple[int, str, str]:
    """``w2v2.cli.main(argv)`` in this process: (exit status, stdout, stderr). A usage error's
    ``SystemExit`` gives its status; a run longer than ``timeout`` seconds raises :class:`Hang`
    (SIGALRM, so call it from the main thread)."""
    from w2v2.cli import main

    def alarm(signum, frame):
        raise Hang(f"w2v2 {' '.join(argv)}: no answer within {timeout} s")

    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return rc, out.getvalue(), err.getvalue()


NOT_UTF8_NAME = os.fsdecode(b"caf\xe9 \xff.wav")  # Latin-1 bytes: valid on disk, not UTF-8


def write_corpus(folder: str | os.PathLike, long: bool = False) -> dict[str, Case]:
    """Write every case into ``folder`` (created); returns them by name, good ones first."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def good(name: str, seconds: float) -> None:
        cases.append(Case(name, d / name, None, seconds))

    def bad(name: str, problem: str) -> None:
        cases.append(Case(name, d / name, problem))

    # ---- odd but good
    for subtype, name in (("PCM_U8", "pcm8.wav"), ("PCM_16", "pcm16.wav"), ("PCM_24", "pcm24.wav"),
                          ("FLOAT", "float.wav")):
        sf.write(d / name, tone(1.0), SR, subtype=subtype)
        good(name, 1.0)
    sf.write(d / "six_channels.wav", tone(1.0, channels=6), SR, subtype="PCM_16")
    good("six_channels.wav", 1.0)
    sf.write(d / "rate_8k.wav", tone(1.0, 8000), 8000, subtype="PCM_16")
    good("rate_8k.wav", 1.0)
    sf.write(d / "rate_48k.wav", tone(1.0, 48000, channels=2), 48000, subtype="PCM_16")
    good("rate_48k.wav", 1.0)
    sf.write(d / "silence.wav", np.zeros(SR, np.float32), SR, subtype="PCM_16")
    good("silence.wav", 1.0)
    sf.write(d / "shorter_than_a_frame.wav", tone(0.01), SR, subtype="PCM_16")
    good("shorter_than_a_frame.wav", 0.01)
    sf.write(d / "flac_named.wav", tone(1.0), SR, format="FLAC", subtype="PCM_16")  # content, not extension, counts
    good("flac_named.wav", 1.0)
    sf.write(d / "flac_tone.flac", tone(2.0), SR, subtype="PCM_16")
    good("flac_tone.flac", 2.0)
    ffmpeg("-i", str(d / "flac_tone.flac"), "-c:a", "libmp3lame", "-b:a", "32k", str(d / "mp3_tone.mp3"))
    good("mp3_tone.mp3", 2.0)
    # MP3 has no reliable total length: a file cut in its audio decodes up to the cut (~0.9 s here)
    mp3 = (d / "mp3_tone.mp3").read_bytes()
    (d / "mp3_truncated.mp3").write_bytes(mp3[: len(mp3) // 2])
    good("mp3_truncated.mp3", None)
    # metadata that is not UTF-8 (PyAV decodes it strictly unless told otherwise)
    ffmpeg("-i", str(d / "flac_tone.flac"), "-c:a", "aac", "-metadata", "title=QQQQQQQQ", str(d / "tagged.m4a"))
    tagged = (d / "tagged.m4a").read_bytes()
    (d / "tagged.m4a").unlink()
    (d / "metadata_not_utf8.m4a").write_bytes(tagged.replace(b"QQQQQQQQ", bytes(range(0xFF, 0xF7, -1))))
    good("metadata_not_utf8.m4a", None)
    sf.write(os.fsencode(d / NOT_UTF8_NAME), tone(1.0), SR, subtype="PCM_16")
    good(NOT_UTF8_NAME, 1.0)
    if long:
        write_sparse_wav(d / "three_hours.wav", LONG_SECONDS)
        good("three_hours.wav", float(LONG_SECONDS))

    # ---- bad
    (d / "empty.wav").touch()
    bad("empty.wav", "empty file")
    sf.write(d / "zero_length.wav", np.zeros(0, np.float32), SR, subtype="PCM_16")
    bad("zero_length.wav", "no audio samples")
    flac = (d / "flac_tone.flac").read_bytes()
    (d / "flac_header_only.flac").write_bytes(flac[:30])  # cut inside the STREAMINFO block
    bad("flac_header_only.flac", "corrupt")
    (d / "mp3_header_only.mp3").write_bytes(mp3[:100])  # cut inside the first frame
    bad("mp3_header_only.mp3", "not an audio file")
    (d / "flac_truncated.flac").write_bytes(flac[: len(flac) // 2])  # libFLAC notices: rejected
    bad("flac_truncated.flac", "corrupt")
    (d / "text.wav").write_text("this is a text file, not audio\n" * 30)
    bad("text.wav", "not an audio file")
    (d / "image.wav").write_bytes(png_bytes())
    bad("image.wav", "not an audio file")
    for value, name in ((np.nan, "nan.wav"), (np.inf, "inf.wav")):
        x = tone(0.5)
        x[1000] = value
        sf.write(d / name, x, SR, subtype="FLOAT")
        bad(name, "NaN or infinite")
    sf.write(d / "rate_1hz.wav", tone(0.5), 1, subtype="PCM_16")  # a corrupt header's rate: would resample x16000
    bad("rate_1hz.wav", "implausible sample rate")
    ffmpeg("-f", "lavfi", "-i", "color=c=blue:s=32x32:r=5:d=1", "-c:v", "mpeg4", str(d / "video_only.mp4"))
    bad("video_only.mp4", "no audio stream")
    pcm16 = (d / "pcm16.wav").read_bytes()  # WAV header: bits per sample at byte 34
    (d / "pcm_bits50.wav").write_bytes(pcm16[:34] + struct.pack("<H", 50) + pcm16[36:])
    bad("pcm_bits50.wav", "no decoder")
    (d / "pcm_s64.wav").write_bytes(pcm16[:34] + struct.pack("<H", 64) + pcm16[36:])  # 64-bit integers
    bad("pcm_s64.wav", "unsupported audio sample format")
    bad("missing.wav", "no such file")
    (d / "directory.wav").mkdir(exist_ok=True)
    bad("directory.wav", "directory")
    sf.write(d / "unreadable.wav", tone(0.5), SR, subtype="PCM_16")
    os.chmod(d / "unreadable.wav", 0)
    bad("unreadable.wav", "permission denied")

    # ---- not regular files
    os.symlink("loop_b.wav", d / "loop_a.wav")
    os.symlink("loop_a.wav", d / "loop_b.wav")
    bad("loop_a.wav", "symbolic link loop")
    os.symlink("nowhere.wav", d / "broken_link.wav")
    bad("broken_link.wav", "broken symbolic link")
    os.symlink(os.devnull, d / "dev_null.wav")  # a character device that ends at once
    bad("dev_null.wav", "empty input")
    os.symlink("/dev/zero", d / "dev_zero.wav")  # one that never ends (and is not audio)
    bad("dev_zero.wav", "not an audio file")
    os.mkfifo(d / "fifo_no_writer.wav")
    bad("fifo_no_writer.wav", "no data within")
    with socket.socket(socket.AF_UNIX) as sock:  # the file stays after the socket closes
        sock.bind(str(d / "socket.wav"))
    bad("socket.wav", "is a socket")
    return {c.name: c for c in cases}
