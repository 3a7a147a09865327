"""Audio input: any file libsndfile or ffmpeg can read -> float32 mono waveform at 16 kHz.

Decoding takes one of two paths, chosen once per file when it is opened:

- libsndfile (``soundfile``), the fast path, for whatever it recognises: wav, flac, ogg
  (vorbis, opus), mp3, aiff, ...;
- ffmpeg (``av``, PyAV) for everything else: mp4, mkv, webm, m4a, aac, ... The first audio
  stream is decoded; video streams are skipped.

Channels are averaged to mono; integer PCM is scaled to [-1, 1) (no clipping is applied after
resampling, so a full-scale signal may overshoot 1.0 by a little); soxr resamples (quality HQ).
A native rate outside ``RATE_RANGE`` (1 kHz to 1 MHz) is taken for a corrupt header and refused.
``load_audio`` returns a whole file; ``stream_audio`` yields fixed-size blocks so that a long
file never has to be in memory whole. Every problem with an input raises :class:`AudioError`
whose message names the input and the problem.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000
RESAMPLE_QUALITY = "HQ"
AUDIO_EXTENSIONS = frozenset(
    ".wav .flac .ogg .oga .opus .mp3 .m4a .aac .wma .aif .aiff .au .caf .w64 .amr .ac3 .mka "
    ".mp4 .m4v .mkv .webm .mov .avi .mpg .mpeg .ts .3gp .flv .wmv".split()
)
_READ_SAMPLES = 1 << 16  # samples (frames x channels) per libsndfile read while decoding
RATE_RANGE = (1000, 1_000_000)  # plausible native sample rates in Hz; others mean a corrupt header

Source = str | BinaryIO


class AudioError(ValueError):
    """A problem with one audio input; the message reads "<input>: <problem>"."""


def _error(name: str, problem: str) -> AudioError:
    return AudioError(f"{name or repr(name)}: {problem}")  # an empty name shows as ''


def _reason(exc: BaseException) -> str:
    """One line describing a soundfile/PyAV exception, without the file name it may repeat."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------- inputs


def is_url(s: object) -> bool:
    """True for an ``http://`` or ``https://`` address."""
    if not isinstance(s, str):
        return False
    parts = urlparse(s)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def list_audio_files(inputs: list[str]) -> list[str]:
    """Expand directories (recursively, sorted) to the audio/video files inside them.

    Anything that is not a directory is kept as given, whatever its extension: explicit
    files, URLs, ``"-"`` (standard input), and paths that do not exist (loading them later
    raises an :class:`AudioError` naming them, so one bad input does not stop a batch).
    """
    files: list[str] = []
    for item in inputs:
        if item != "-" and not is_url(item) and os.path.isdir(item):
            found = (p for p in Path(item).rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)
            files.extend(sorted(str(p) for p in found if p.is_file()))
        else:
            files.append(item)
    return files


def ffmpeg_exe() -> str:
    """Path of an ffmpeg binary (the one bundled with ``imageio-ffmpeg``)."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _check_path(path: str) -> None:
    if not os.path.exists(path):
        raise _error(path, "no such file")
    if os.path.isdir(path):
        raise _error(path, "is a directory, not an audio file (list_audio_files expands directories)")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise _error(path, "permission denied (the file is not readable)") from None
    except OSError as exc:
        raise _error(path, f"cannot open ({_reason(exc)})") from None
    if os.path.getsize(path) == 0:
        raise _error(path, "empty file (0 bytes)")


def _resolve(path_or_file: str | os.PathLike | BinaryIO) -> tuple[str, Source]:
    """(name for messages, something soundfile and PyAV can open). ``"-"`` buffers stdin."""
    if isinstance(path_or_file, str) and path_or_file == "-":
        data = sys.stdin.buffer.read()
        if not data:
            raise _error("<stdin>", "empty input (0 bytes on standard input)")
        return "<stdin>", io.BytesIO(data)
    if hasattr(path_or_file, "read"):
        return str(getattr(path_or_file, "name", "<file object>")), path_or_file
    path = os.fspath(path_or_file)
    if is_url(path):
        raise _error(path, "is a URL; download it first with download_url()")
    _check_path(path)
    return path, path


# ---------------------------------------------------------------------------- signal maths


def to_mono(audio: np.ndarray) -> np.ndarray:
    """Average channels: (frames,) or (frames, channels) -> float32 (frames,)."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        return audio
    if audio.ndim != 2:
        raise ValueError(f"expected audio of shape (frames,) or (frames, channels), got {audio.shape}")
    return audio[:, 0].copy() if audio.shape[1] == 1 else audio.mean(axis=1, dtype=np.float32)


def resample(audio: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample float32 mono (frames,) from ``sr_in`` to ``sr_out`` Hz.

    The output has ``round(frames * sr_out / sr_in)`` samples.
    """
    audio = np.asarray(audio, dtype=np.float32)
    if sr_in == sr_out or len(audio) == 0:
        return audio
    return soxr.resample(audio, sr_in, sr_out, quality=RESAMPLE_QUALITY)


def _pcm_to_float(x: np.ndarray) -> np.ndarray:
    """Decoded samples of any ffmpeg sample format -> float32 in [-1, 1)."""
    if x.dtype == np.uint8:
        return (x.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(x.dtype, np.integer):
        return x.astype(np.float32) / float(2 ** (8 * x.dtype.itemsize - 1))
    return x.astype(np.float32, copy=False)


def _check_finite(audio: np.ndarray, name: str) -> None:
    if not np.isfinite(audio).all():
        raise _error(name, "contains NaN or infinite samples")


# ---------------------------------------------------------------------------- decoding


def _open_decoder(source: Source, name: str) -> tuple[int, Iterator[np.ndarray]]:
    """(native sample rate, iterator of float32 mono chunks); libsndfile first, then PyAV."""
    if hasattr(source, "seek"):
        source.seek(0)
    try:
        snd = sf.SoundFile(source)
    except (sf.SoundFileError, RuntimeError, TypeError):
        if hasattr(source, "seek"):
            source.seek(0)
        return _open_av(source, name)
    try:
        _check_rate(snd.samplerate, name)
    except AudioError:
        snd.close()
        raise
    return snd.samplerate, _soundfile_chunks(snd, name)


def _check_rate(rate: int, name: str) -> None:
    """Refuse absurd header rates: 1 Hz would resample a 1 MB file to 30 GB."""
    low, high = RATE_RANGE
    if not low <= rate <= high:
        raise _error(name, f"implausible sample rate {rate} Hz (expected {low} to {high}); the header may be corrupt")


def _soundfile_chunks(snd: sf.SoundFile, name: str) -> Iterator[np.ndarray]:
    with snd:
        while True:
            try:
                block = snd.read(max(1, _READ_SAMPLES // snd.channels), dtype="float32", always_2d=True)
            except (sf.SoundFileError, RuntimeError) as exc:
                raise _error(name, f"cannot decode audio, the file may be corrupt ({_reason(exc)})") from None
            if len(block) == 0:
                return
            yield to_mono(block)


def _av():
    """PyAV, imported on first use: only the ffmpeg path needs it (and where it is missing,
    everything libsndfile reads still works)."""
    try:
        import av
    except ImportError as exc:  # pragma: no cover - av is a hard dependency of the package
        raise AudioError(f"PyAV (package 'av') is needed for this format: {exc}") from None
    return av


def _av_container(source: Source, name: str):
    """An open PyAV input container (metadata that is not UTF-8 is tolerated, not fatal)."""
    av = _av()
    try:
        return av.open(source, mode="r", metadata_errors="replace")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise _error(name, f"not an audio file, or truncated/corrupt ({_reason(exc)})") from None


def _open_av(source: Source, name: str) -> tuple[int, Iterator[np.ndarray]]:
    container = _av_container(source, name)
    if not container.streams.audio:
        container.close()
        raise _error(name, "not an audio file (no audio stream found)")
    stream = container.streams.audio[0]
    if stream.codec_context is None:
        container.close()
        raise _error(name, "unsupported or corrupt audio stream (ffmpeg has no decoder for it)")
    rate = stream.codec_context.sample_rate or stream.rate
    if not rate:
        container.close()
        raise _error(name, "audio stream has no sample rate; the file may be corrupt")
    try:
        _check_rate(rate, name)
    except AudioError:
        container.close()
        raise
    return rate, _av_chunks(container, stream, rate, name)


def _av_chunks(container, stream, rate: int, name: str) -> Iterator[np.ndarray]:
    av = _av()
    with container:
        try:
            for frame in container.decode(stream):
                try:
                    mono = _frame_to_mono(frame, rate)
                except ValueError as exc:  # e.g. 64-bit integer samples, which numpy conversion refuses
                    raise _error(name, f"unsupported audio sample format ({_reason(exc)})") from None
                yield mono
        except (av.error.FFmpegError, OSError) as exc:
            raise _error(name, f"cannot decode audio, the file may be corrupt ({_reason(exc)})") from None


def _frame_to_mono(frame: av.AudioFrame, rate: int) -> np.ndarray:
    """One decoded PyAV frame -> float32 mono (samples,) at ``rate``."""
    x = frame.to_ndarray()  # planar: (channels, samples); packed: (1, samples * channels)
    if not frame.format.is_planar:
        x = x.reshape(-1, frame.layout.nb_channels).T
    mono = _pcm_to_float(x).mean(axis=0, dtype=np.float32)
    if frame.sample_rate != rate:  # a few codecs switch rate mid-stream (e.g. HE-AAC)
        mono = resample(mono, frame.sample_rate, rate)
    return mono


def load_audio(path_or_file: str | os.PathLike | BinaryIO, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Decode a whole file to float32 mono (samples,) at ``sr`` Hz.

    ``path_or_file`` is a path, a binary file object, or ``"-"`` for standard input.
    Raises :class:`AudioError` naming the input for anything wrong with it.
    """
    name, source = _resolve(path_or_file)
    rate, chunks = _open_decoder(source, name)
    parts = list(chunks)
    audio = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    if len(audio) == 0:
        raise _error(name, "contains no audio samples (zero length)")
    _check_finite(audio, name)
    return resample(audio, rate, sr)


# ---------------------------------------------------------------------------- streaming


class AudioStream:
    """Iterate over float32 mono blocks of ``round(block_seconds * sr)`` samples (last one shorter).

    Decoding and resampling (``soxr.ResampleStream``) are incremental: memory stays about one
    block whatever the file's length. The path is checked when the stream is made; decoding
    errors are raised while iterating. ``"-"`` reads standard input, which is buffered whole.

    Guarantee: the concatenated blocks use the same decoder as :func:`load_audio` and differ from
    its output only by the streaming resampler: the same length within 2 samples and a maximum
    absolute difference below 1e-3 (bit-identical when no resampling is needed).
    """

    def __init__(self, path: str | os.PathLike, sr: int = SAMPLE_RATE, block_seconds: float = 30.0):
        if block_seconds <= 0:
            raise ValueError(f"block_seconds must be positive, got {block_seconds}")
        self.name, self._source = _resolve(path)
        self.sr = sr
        self.block_size = max(1, round(block_seconds * sr))

    def __iter__(self) -> Iterator[np.ndarray]:
        rate, chunks = _open_decoder(self._source, self.name)
        decoded = [0]  # samples at the file's own rate: a few may resample to none, like load_audio

        def counted() -> Iterator[np.ndarray]:
            for chunk in chunks:
                decoded[0] += len(chunk)
                yield chunk

        yield from _rebatch(self._resampled(counted(), rate), self.block_size)
        if decoded[0] == 0:
            raise _error(self.name, "contains no audio samples (zero length)")

    def _resampled(self, chunks: Iterator[np.ndarray], rate: int) -> Iterator[np.ndarray]:
        if rate == self.sr:
            for chunk in chunks:
                _check_finite(chunk, self.name)
                yield chunk
            return
        stream = soxr.ResampleStream(rate, self.sr, 1, dtype="float32", quality=RESAMPLE_QUALITY)
        for chunk in chunks:
            _check_finite(chunk, self.name)
            yield stream.resample_chunk(chunk)
        yield stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)


def _rebatch(pieces: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Regroup 1-D arrays of any lengths into blocks of exactly ``size`` (the last may be shorter)."""
    pending: list[np.ndarray] = []
    count = 0
    for piece in pieces:
        pending.append(piece)
        count += len(piece)
        while count >= size:
            joined = np.concatenate(pending)
            yield joined[:size]
            rest = joined[size:]
            pending, count = [rest], len(rest)
    if count:
        yield np.concatenate(pending)


def stream_audio(path: str | os.PathLike, sr: int = SAMPLE_RATE, block_seconds: float = 30.0) -> Iterator[np.ndarray]:
    """Yield float32 mono blocks of ``block_seconds`` at ``sr`` Hz; see :class:`AudioStream`."""
    return iter(AudioStream(path, sr=sr, block_seconds=block_seconds))


def audio_duration(path: str | os.PathLike) -> float | None:
    """Duration in seconds from the file's metadata (no decoding); None when it is not recorded.

    Returns None for ``"-"`` and URLs; raises :class:`AudioError` for a missing or non-audio file.
    """
    path = os.fspath(path)
    if path == "-" or is_url(path):
        return None
    _check_path(path)
    try:
        info = sf.info(path)
    except (sf.SoundFileError, RuntimeError, TypeError):
        pass
    else:
        _check_rate(info.samplerate, path)
        return info.frames / info.samplerate if info.frames > 0 else None
    av = _av()
    try:
        with _av_container(path, path) as container:
            if not container.streams.audio:
                raise _error(path, "not an audio file (no audio stream found)")
            stream = container.streams.audio[0]
            if stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
            return container.duration / av.time_base if container.duration else None
    except (av.error.FFmpegError, OSError) as exc:
        raise _error(path, f"not an audio file, or truncated/corrupt ({_reason(exc)})") from None


# ---------------------------------------------------------------------------- URLs


def download_url(url: str, dest_dir: str | os.PathLike) -> Path:
    """Download the best audio of ``url`` (any site yt-dlp supports) into ``dest_dir``.

    Needs the optional dependency yt-dlp (``pip install 'w2v2[url]'``).
    """
    try:
        import yt_dlp
    except ImportError:
        raise _error(url, "downloading URLs needs yt-dlp; install it with: pip install 'w2v2[url]'") from None
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    options = {
        "format": "bestaudio/best",
        "outtmpl": str(dest / "%(id)s.%(ext)s"),
        "noplaylist": True,
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
    }
    try:
        with yt_dlp.YoutubeDL(options) as ydl:
            info = ydl.extract_info(url, download=True)
            path = _downloaded_path(ydl, info)
    except yt_dlp.utils.DownloadError as exc:
        raise _error(url, f"cannot reach or download it ({_reason(exc)}); check the address and the network") from None
    if path is None or not path.is_file():
        raise _error(url, "yt-dlp finished but wrote no file (is it a playlist? pass one item's URL)")
    return path


def _downloaded_path(ydl, info: dict | None) -> Path | None:
    if not info:
        return None
    downloads = info.get("requested_downloads") or []
    if downloads and downloads[0].get("filepath"):
        return Path(downloads[0]["filepath"])
    return Path(ydl.prepare_filename(info))
