"""A corpus of bad and odd audio inputs, generated into a folder in about a second.

    cases = write_corpus(tmp_path)          # name -> Case(path, problem)
    cases = write_corpus(tmp_path, long=True)  # plus a 3-hour file (a sparse WAV: instant, ~1 MB on disk)

Each :class:`Case` says what loading it must do: ``problem=None`` means it decodes (and so
must transcribe); otherwise ``problem`` is a phrase the one-line :class:`w2v2.audio.AudioError`
must contain. Files are small (a few kB each); nothing here needs real speech or the network.
"""

from __future__ import annotations

import os
import struct
import subprocess
import zlib
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
    from w2v2.audio import ffmpeg_exe

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
    return {c.name: c for c in cases}
