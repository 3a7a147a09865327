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

Inputs that are not regular files are streams, read once as they arrive: standard input
(``"-"``), named pipes and character devices given as paths. A stream that ends within
``STREAM_BUFFER_BYTES`` is decoded like a file (any format); a longer one goes to ffmpeg as it
arrives, in bounded memory, so a format that needs seeking (an MP4 whose index is at its end)
must then be given as a file. A stream waits at most ``STREAM_WAIT_SECONDS`` for its first byte
(a named pipe nobody writes to never hangs). Sockets, block devices and symbolic link loops are
refused with that reason.
"""

from __future__ import annotations

import errno
import io
import math
import os
import select
import stat
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
STREAM_BUFFER_BYTES = 16 << 20  # a stream that ends within this many bytes is decoded like a file
STREAM_WAIT_SECONDS = 60.0  # longest wait for a stream's first byte (a pipe may have no writer yet)
STREAM_LOAD_SECONDS = 3600.0  # load_audio holds a whole input: a longer stream is refused, not buffered

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


def _path_kind(path: str) -> str:
    """``"file"`` for a regular file, ``"stream"`` for a named pipe or character device (read once,
    as it arrives); raises :class:`AudioError` with the true reason for anything else."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise _error(path, _stat_problem(path, exc)) from None
    except ValueError:  # a NUL byte in the name
        raise _error(path, "no such file (the name holds a NUL character)") from None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        return "stream"
    if stat.S_ISDIR(mode):
        raise _error(path, "is a directory, not an audio file (list_audio_files expands directories)")
    if stat.S_ISSOCK(mode):
        raise _error(path, "is a socket, not an audio file")
    if stat.S_ISBLK(mode):
        raise _error(path, "is a block device (a disk), not an audio file")
    raise _error(path, "is not a regular file")


def _stat_problem(path: str, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symbolic link loop (too many levels of symbolic links)"
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return f"broken symbolic link (its target {os.readlink(path)} does not exist)"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return "no such file"
    if exc.errno == errno.EACCES:
        return "permission denied (a folder on its path cannot be searched)"
    return f"cannot open ({_reason(exc)})"


def is_stream_path(path: str | os.PathLike) -> bool:
    """True for ``"-"``, a named pipe or a character device: inputs that can be read only once."""
    path = os.fspath(path)
    try:
        return path == "-" or _path_kind(path) == "stream"
    except AudioError:
        return False


def _check_file(path: str) -> None:
    """A regular file (see :func:`_path_kind`) that can be opened and is not empty."""
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise _error(path, "permission denied (the file is not readable)") from None
    except OSError as exc:
        raise _error(path, f"cannot open ({_reason(exc)})") from None
    if os.path.getsize(path) == 0:
        raise _error(path, "empty file (0 bytes)")


class _Stream(io.RawIOBase):
    """A non-seekable input whose first bytes were read ahead (to tell a short stream from a long
    one): they are served first, then the rest as it arrives."""

    def __init__(self, head: bytes, rest: BinaryIO, close_rest: bool):
        super().__init__()
        self._head, self._pos, self._rest, self._close_rest = memoryview(head), 0, rest, close_rest
        self._read = getattr(rest, "read1", rest.read)  # what has arrived, without waiting for more

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._pos < len(self._head):
            n = min(len(b), len(self._head) - self._pos)
            b[:n] = self._head[self._pos:self._pos + n]
            self._pos += n
            if self._pos == len(self._head):
                self._head = memoryview(b"")  # the read-ahead is not kept past its use
                self._pos = 0
            return n
        data = self._read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if self._close_rest and not self.closed:
            self._rest.close()
        super().close()


def _read_ahead(f: BinaryIO, size: int) -> bytes:
    read = getattr(f, "read1", f.read)
    parts, count = [], 0
    while count < size:
        data = read(size - count)
        if not data:
            break
        parts.append(data)
        count += len(data)
    return b"".join(parts)


def _stream_source(f: BinaryIO, name: str, close: bool) -> Source:
    """A stream as a decoder source: a seekable copy when it ends within ``STREAM_BUFFER_BYTES``,
    else a :class:`_Stream` read as it arrives."""
    try:
        head = _read_ahead(f, STREAM_BUFFER_BYTES)
    except OSError as exc:
        if close:
            f.close()
        raise _error(name, f"cannot read ({_reason(exc)})") from None
    if len(head) < STREAM_BUFFER_BYTES:
        if close:
            f.close()
        if not head:
            raise _error(name, "empty input (0 bytes)")
        return io.BytesIO(head)
    return _Stream(head, f, close_rest=close)


def _wait_for_data(fd: int, name: str) -> None:
    """Wait until ``fd`` has a byte (or its end) to read, at most ``STREAM_WAIT_SECONDS``."""
    if os.isatty(fd):
        raise _error(name, "is a terminal; pipe audio into it instead (e.g. ffmpeg ... | w2v2 transcribe -)")
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    if not poll.poll(STREAM_WAIT_SECONDS * 1000):
        raise _error(name, f"no data within {STREAM_WAIT_SECONDS:g} s (does a program write to it?)")


def _open_stream_path(path: str) -> Source:
    """A named pipe or character device, opened once; the open does not block (a pipe without a
    writer would block it), the first read waits at most ``STREAM_WAIT_SECONDS``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except PermissionError:
        raise _error(path, "permission denied (the file is not readable)") from None
    except OSError as exc:
        raise _error(path, f"cannot open ({_reason(exc)})") from None
    try:
        _wait_for_data(fd, path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return _stream_source(io.FileIO(fd, "rb", closefd=True), path, close=True)


def _stdin() -> Source:
    if sys.stdin is None:  # started with descriptor 0 closed
        raise _error("<stdin>", "standard input is closed")
    buf = sys.stdin.buffer
    try:
        fd = buf.fileno()
    except (AttributeError, OSError, ValueError):  # a stand-in without a descriptor
        fd = None
    if fd is not None:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_size > 0:  # `w2v2 transcribe - < file`: a file after all
            return buf
        _wait_for_data(fd, "<stdin>")
    return _stream_source(buf, "<stdin>", close=False)


def _resolve(path_or_file: str | os.PathLike | BinaryIO) -> tuple[str, Source]:
    """(name for messages, something soundfile and PyAV can open). ``"-"`` is standard input;
    streams come back as an in-memory copy or a :class:`_Stream` (see the module's docstring)."""
    if isinstance(path_or_file, str) and path_or_file == "-":
        return "<stdin>", _stdin()
    if hasattr(path_or_file, "read"):
        name = str(getattr(path_or_file, "name", "<file object>"))
        seekable = getattr(path_or_file, "seekable", lambda: False)()
        return name, path_or_file if seekable else _stream_source(path_or_file, name, close=False)
    path = os.fspath(path_or_file)
    if is_url(path):
        raise _error(path, "is a URL; download it first with download_url()")
    if _path_kind(path) == "stream":
        return path, _open_stream_path(path)
    _check_file(path)
    return path, path


def _address(path_or_file):
    """A span of a file or a row of a table (``PATH#t=...``, ``TABLE#row=...``, see
    :mod:`w2v2.formats.sources`), or None for anything else."""
    if isinstance(path_or_file, (str, os.PathLike)) and "#" in os.fspath(path_or_file):
        from .formats.sources import parse_address

        try:
            return parse_address(os.fspath(path_or_file))
        except ValueError as e:
            raise AudioError(str(e)) from None
    return None


def _load_address(a, sr: int) -> np.ndarray:
    """Decode a table row's audio, or a span of a file (libsndfile seeks to it; other formats
    are decoded whole and cut)."""
    if a.row is not None:
        from .formats.sources import row_audio

        try:
            data, path = row_audio(a)
        except ValueError as e:
            raise AudioError(str(e)) from None
        if data is None:
            return load_audio(path, sr)
        buffer = io.BytesIO(data)
        buffer.name = a.name  # names the row in decoding errors
        return load_audio(buffer, sr)
    _check_file(a.base)
    try:
        snd = sf.SoundFile(os.fsencode(a.base))
    except (sf.SoundFileError, RuntimeError, TypeError):
        if a.channel is not None:
            raise _error(a.name, "a channel can be chosen only in files libsndfile reads (wav, flac, ogg, ...)") from None
        audio = load_audio(a.base, sr)[round(a.start * sr):None if a.end is None else round(a.end * sr)]
    else:
        with snd:
            _check_rate(snd.samplerate, a.name)
            first = round(a.start * snd.samplerate)
            if a.channel is not None and not 0 <= a.channel < snd.channels:
                raise _error(a.name, f"no channel {a.channel} (the file has {snd.channels})")
            try:
                snd.seek(min(first, snd.frames))
                block = snd.read(-1 if a.end is None else round(a.end * snd.samplerate) - first, dtype="float32",
                                 always_2d=True)
            except (sf.SoundFileError, RuntimeError) as exc:
                raise _error(a.name, f"cannot decode the span ({_reason(exc)})") from None
            audio = resample(to_mono(block if a.channel is None else block[:, a.channel]), snd.samplerate, sr)
    if len(audio) == 0:
        raise _error(a.name, "the span holds no audio samples (does it start after the end of the file?)")
    _check_finite(audio, a.name)
    return audio


def _close(source: Source) -> None:
    """Close a stream :func:`_resolve` opened (files and caller's objects are left alone)."""
    if isinstance(source, _Stream):
        source.close()


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
    """(native sample rate, iterator of float32 mono chunks); libsndfile first, then PyAV.
    A :class:`_Stream` goes to PyAV alone: libsndfile needs to seek."""
    if isinstance(source, _Stream):
        return _open_av(source, name)
    if hasattr(source, "seek"):
        source.seek(0)
    try:
        snd = sf.SoundFile(os.fsencode(source) if isinstance(source, str) else source)  # any bytes in a name
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
        raise _error(name, f"not an audio file, or truncated/corrupt ({_reason(exc)}){_stream_hint(source)}") from None


def _stream_hint(source: Source) -> str:
    if not isinstance(source, _Stream):
        return ""
    return (f"; it was read as a stream (over {STREAM_BUFFER_BYTES >> 20} MB, without seeking), so a format "
            "that needs seeking, such as an MP4 with its index at the end, must be given as a file")


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
    return rate, _av_chunks(container, stream, rate, name, _stream_hint(source))


def _av_chunks(container, stream, rate: int, name: str, hint: str = "") -> Iterator[np.ndarray]:
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
            raise _error(name, f"cannot decode audio, the file may be corrupt ({_reason(exc)}){hint}") from None


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
    Raises :class:`AudioError` naming the input for anything wrong with it; a stream (standard
    input, a pipe) longer than ``STREAM_LOAD_SECONDS`` is refused: use :func:`stream_audio`.
    """
    address = _address(path_or_file)
    if address is not None:
        return _load_address(address, sr)
    name, source = _resolve(path_or_file)
    try:
        rate, chunks = _open_decoder(source, name)
        limit = STREAM_LOAD_SECONDS * rate if isinstance(source, _Stream) else math.inf
        parts, count = [], 0
        for chunk in chunks:
            parts.append(chunk)
            count += len(chunk)
            if count > limit:
                raise _error(name, f"a stream longer than {STREAM_LOAD_SECONDS:g} s cannot be loaded whole; "
                                   "stream it (stream_audio, w2v2 transcribe) or give a file")
    finally:
        _close(source)
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
    errors are raised while iterating. ``"-"`` reads standard input; it, named pipes and
    devices are streams (see the module's docstring): memory stays bounded there too, and they
    can be iterated once.

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
        try:
            rate, chunks = _open_decoder(self._source, self.name)
            decoded = [0]  # samples at the file's own rate: a few may resample to none, like load_audio

            def counted() -> Iterator[np.ndarray]:
                for chunk in chunks:
                    decoded[0] += len(chunk)
                    yield chunk

            yield from _rebatch(self._resampled(counted(), rate), self.block_size)
            if decoded[0] == 0:
                raise _error(self.name, "contains no audio samples (zero length)")
        finally:
            _close(self._source)

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

    Returns None for ``"-"``, URLs, named pipes and devices (which are not opened: they can be
    read only once); raises :class:`AudioError` for a missing or non-audio file.
    """
    path = os.fspath(path)
    address = _address(path)
    if address is not None:  # a table row: known once decoded; a span: from the address and the header
        if address.row is not None or address.end is not None:
            return None if address.row is not None else address.end - address.start
        total = audio_duration(address.base)
        return None if total is None else max(0.0, total - address.start)
    if path == "-" or is_url(path) or _path_kind(path) == "stream":
        return None
    _check_file(path)
    try:
        info = sf.info(os.fsencode(path))
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
