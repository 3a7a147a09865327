"""Audio input on real speech from ../shared/data and on files made here (soundfile, ffmpeg)."""

import io
import os
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st

import w2v2.audio
from w2v2.audio import (
    SAMPLE_RATE,
    AudioError,
    audio_duration,
    download_url,
    is_url,
    list_audio_files,
    load_audio,
    resample,
    stream_audio,
    to_mono,
)

from tests.badcorpus import ffmpeg
from tests.conftest import DATA, read_manifest

RATES = [8000, 11025, 16000, 22050, 44100, 48000]


def first_manifest_row(folder: str) -> tuple[Path, float]:
    manifest = DATA / folder / "manifest.tsv"
    if not manifest.exists():
        pytest.skip(f"{manifest} not found")
    row = read_manifest(DATA / folder)[0]
    return DATA / folder / row["path"], float(row["seconds"])


@pytest.fixture(scope="module")
def opus_file():
    return first_manifest_row("speechocean762-train")


@pytest.fixture(scope="module")
def flac_8k():
    return first_manifest_row("fsdd")


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory, opus_file):
    """Real speech as a 16 kHz 16-bit wav, the input for the ffmpeg-made files."""
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    sf.write(path, load_audio(opus_file[0]), SAMPLE_RATE, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def speech_mp4(speech_wav):
    """A video: a colour-card stream first, then AAC audio (the file the tests decode with PyAV)."""
    out = speech_wav.with_name("speech.mp4")
    ffmpeg("-f", "lavfi", "-i", "color=c=blue:s=32x32:r=5", "-i", str(speech_wav),
           "-shortest", "-c:v", "mpeg4", "-c:a", "aac", "-b:a", "64k", str(out))
    return out


def sine(n: int, sr: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(n) / sr)).astype(np.float32)


def check_waveform(audio: np.ndarray) -> None:
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert np.isfinite(audio).all()
    assert 0.001 < np.abs(audio).max() <= 1.05


# ---------------------------------------------------------------------------- real files


@pytest.mark.parametrize("fixture", ["opus_file", "flac_8k"])
def test_real_file_length_and_range(fixture, request):
    path, seconds = request.getfixturevalue(fixture)
    audio = load_audio(path)
    check_waveform(audio)
    assert abs(len(audio) - seconds * SAMPLE_RATE) <= 0.002 * SAMPLE_RATE
    assert audio_duration(path) == pytest.approx(seconds, abs=0.002)


def test_other_target_rate(flac_8k):
    path, seconds = flac_8k
    assert len(load_audio(path, sr=8000)) == round(seconds * 8000)


def test_mp4_with_video_stream_matches_wav(speech_wav, speech_mp4):
    wav, mp4 = load_audio(speech_wav), load_audio(speech_mp4)
    check_waveform(mp4)
    assert abs(len(mp4) - len(wav)) <= 1024  # AAC frames are 1024 samples
    n = min(len(wav), len(mp4))
    assert np.corrcoef(wav[:n], mp4[:n])[0, 1] > 0.95
    assert audio_duration(speech_mp4) == pytest.approx(len(wav) / SAMPLE_RATE, abs=0.1)


@pytest.mark.parametrize("codec,tol", [("pcm_u8", 1 / 64), ("pcm_s16le", 1e-4), ("pcm_s32le", 1e-6), ("pcm_f32le", 0)])
def test_pyav_sample_formats_scaled_and_downmixed(tmp_path, codec, tol):
    source = tmp_path / "src.wav"
    left, right = sine(8000, SAMPLE_RATE, 440, 0.6), sine(8000, SAMPLE_RATE, 1000, 0.3)
    sf.write(source, np.stack([left, right], axis=1), SAMPLE_RATE, subtype="FLOAT")
    signal = (left + right) / 2
    mkv = tmp_path / f"{codec}.mkv"  # libsndfile cannot read mkv: exercises the PyAV path
    ffmpeg("-i", str(source), "-c:a", codec, str(mkv))
    audio = load_audio(mkv)
    assert len(audio) == len(signal)
    np.testing.assert_allclose(audio, signal, atol=tol + 1e-7)


# ---------------------------------------------------------------------------- wav variants


@pytest.mark.parametrize("subtype,tol", [("PCM_U8", 1 / 64), ("PCM_16", 1e-4), ("PCM_24", 1e-6), ("FLOAT", 0)])
def test_wav_sample_formats(tmp_path, subtype, tol):
    signal = sine(4000, SAMPLE_RATE)
    path = tmp_path / f"{subtype}.wav"
    sf.write(path, signal, SAMPLE_RATE, subtype=subtype)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and len(audio) == len(signal)
    np.testing.assert_allclose(audio, signal, atol=tol + 1e-7)


def test_stereo_48k_downmix_and_resample(tmp_path):
    left, right = sine(48000, 48000, 440, 0.6), sine(48000, 48000, 1000, 0.2)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 48000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path, sr=48000), (left + right) / 2, atol=1e-7)
    audio = load_audio(path)
    assert len(audio) == 16000
    np.testing.assert_allclose(audio, resample((left + right) / 2, 48000, 16000), atol=1e-6)


def test_file_object_input(flac_8k):
    path, _ = flac_8k
    with open(path, "rb") as f:
        np.testing.assert_array_equal(load_audio(f), load_audio(path))


# ---------------------------------------------------------------------------- bad inputs


def tiny_png() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = (1).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0\0")) + chunk(b"IEND", b"")


def make_bad(kind: str, tmp_path: Path, speech_mp4: Path, flac_8k) -> tuple[Path, str]:
    """(path, words the message must contain) for one kind of bad input."""
    path = tmp_path / f"{kind}.wav"
    if kind == "missing":
        return path, "no such file"
    if kind == "directory":
        path.mkdir()
        return path, "directory"
    if kind == "empty":
        path.touch()
        return path, "empty"
    if kind == "zero_samples":
        sf.write(path, np.zeros(0, np.float32), SAMPLE_RATE)
        return path, "no audio samples"
    if kind == "text":
        path.write_text("this is not audio\n" * 20)
        return path, "not an audio file"
    if kind == "png":
        path.write_bytes(tiny_png())
        return path, "not an audio file"
    if kind == "truncated_header":
        sf.write(path, sine(1000, SAMPLE_RATE), SAMPLE_RATE)
        path.write_bytes(path.read_bytes()[:20])
        return path, ""
    if kind == "truncated_mp4":
        path = tmp_path / "truncated.mp4"
        path.write_bytes(speech_mp4.read_bytes()[: speech_mp4.stat().st_size // 2])
        return path, ""
    if kind == "corrupt_flac":
        data = bytearray(flac_8k[0].read_bytes())
        data[200:] = np.random.default_rng(0).integers(0, 256, len(data) - 200, dtype=np.uint8).tobytes()
        path = tmp_path / "corrupt.flac"
        path.write_bytes(bytes(data))
        return path, ""
    if kind in ("nan", "inf"):
        signal = sine(1000, SAMPLE_RATE)
        signal[500] = np.nan if kind == "nan" else np.inf
        sf.write(path, signal, SAMPLE_RATE, subtype="FLOAT")
        return path, "contains NaN or infinite samples"
    raise AssertionError(kind)


BAD_KINDS = ["missing", "directory", "empty", "zero_samples", "text", "png", "truncated_header",
             "truncated_mp4", "corrupt_flac", "nan", "inf"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_raises_audio_error_naming_file(kind, tmp_path, speech_mp4, flac_8k):
    path, words = make_bad(kind, tmp_path, speech_mp4, flac_8k)
    for read in (load_audio, lambda p: list(stream_audio(p))):
        with pytest.raises(AudioError) as info:
            read(path)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and "\n" not in message
        assert words in message


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.wav"
    sf.write(path, sine(100, SAMPLE_RATE), SAMPLE_RATE)
    path.chmod(0)
    with pytest.raises(AudioError, match="permission denied"):
        load_audio(path)


def test_url_is_not_a_path():
    with pytest.raises(AudioError, match="download_url"):
        load_audio("https://example.com/a.wav")


# ---------------------------------------------------------------------------- streaming


@pytest.fixture(scope="module")
def stereo_44k(tmp_path_factory):
    path = tmp_path_factory.mktemp("stereo") / "stereo44k.wav"
    rng = np.random.default_rng(1)
    sf.write(path, (0.2 * rng.standard_normal((44100 * 3 + 17, 2))).astype(np.float32), 44100, subtype="PCM_16")
    return path


@pytest.mark.parametrize("fixture", ["opus_file", "flac_8k", "speech_mp4", "stereo_44k"])
@pytest.mark.parametrize("block_seconds", [0.25, 30.0])
def test_stream_equals_whole_file(fixture, block_seconds, request):
    value = request.getfixturevalue(fixture)
    path = value[0] if isinstance(value, tuple) else value
    whole = load_audio(path)
    blocks = list(stream_audio(path, block_seconds=block_seconds))
    block_size = round(block_seconds * SAMPLE_RATE)
    assert all(len(b) == block_size for b in blocks[:-1]) and 0 < len(blocks[-1]) <= block_size
    assert all(b.dtype == np.float32 and b.ndim == 1 for b in blocks)
    streamed = np.concatenate(blocks)
    assert abs(len(streamed) - len(whole)) <= 2
    n = min(len(streamed), len(whole))
    assert np.abs(streamed[:n] - whole[:n]).max() < 1e-3


# ---------------------------------------------------------------------------- stdin


def fake_stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(data)))


@pytest.mark.parametrize("fixture", ["opus_file", "speech_mp4"])
def test_stdin(fixture, monkeypatch, request):
    value = request.getfixturevalue(fixture)
    path = value[0] if isinstance(value, tuple) else value
    fake_stdin(monkeypatch, path.read_bytes())
    np.testing.assert_array_equal(load_audio("-"), load_audio(path))


class Pipe(io.RawIOBase):
    """Bytes that arrive a few at a time and cannot be sought, like a pipe."""

    def __init__(self, data: bytes, step: int = 1000):
        self.data, self.pos, self.step, self.reads = data, 0, step, 0

    def readable(self):
        return True

    def readinto(self, b):
        n = min(len(b), self.step, len(self.data) - self.pos)
        b[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        self.reads += 1
        return n


@pytest.mark.parametrize("buffer_bytes", [1 << 30, 4096])
def test_stdin_pipe_streams_past_the_read_ahead(buffer_bytes, tmp_path, monkeypatch):
    """A pipe shorter than the read-ahead is decoded like a file; a longer one as it arrives
    (ffmpeg), reading little more than it decodes: the same samples either way."""
    path = tmp_path / "long.wav"  # 80 s: longer than what ffmpeg reads to probe a format (~1 MB)
    sf.write(path, (0.1 * np.random.default_rng(0).standard_normal(80 * 22050)).astype(np.float32), 22050,
             subtype="PCM_16")
    monkeypatch.setattr(w2v2.audio, "STREAM_BUFFER_BYTES", buffer_bytes)
    raw = path.read_bytes()
    pipe = Pipe(raw, step=4096)
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=pipe))
    blocks = stream_audio("-", block_seconds=0.25)
    first = next(blocks)
    if buffer_bytes < len(raw):
        assert pipe.pos < len(raw) // 2  # the first block came long before the end of the input was read
    streamed = np.concatenate([first, *blocks])
    whole = load_audio(path)
    assert abs(len(streamed) - len(whole)) <= 2
    n = min(len(streamed), len(whole))
    assert np.abs(streamed[:n] - whole[:n]).max() < 1e-3


def test_a_stream_too_long_to_load_whole_is_refused(stereo_44k, monkeypatch):
    monkeypatch.setattr(w2v2.audio, "STREAM_BUFFER_BYTES", 4096)
    monkeypatch.setattr(w2v2.audio, "STREAM_LOAD_SECONDS", 1.0)
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=Pipe(stereo_44k.read_bytes())))
    with pytest.raises(AudioError, match="^<stdin>: a stream longer than 1 s cannot be loaded whole"):
        load_audio("-")
    monkeypatch.setattr(w2v2.audio, "STREAM_LOAD_SECONDS", 4.0)
    assert len(load_audio(Pipe(stereo_44k.read_bytes()))) == len(load_audio(stereo_44k))  # within the limit: read


def test_stdin_redirected_from_a_file_is_the_file(opus_file, monkeypatch, tmp_path):
    with open(opus_file[0], "rb") as f:
        monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=f))
        np.testing.assert_array_equal(load_audio("-"), load_audio(opus_file[0]))
    (tmp_path / "empty").touch()
    with open(tmp_path / "empty", "rb") as f:
        monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=f))
        with pytest.raises(AudioError, match="^<stdin>: empty input"):
            load_audio("-")


def test_named_pipe_and_devices(opus_file, tmp_path, monkeypatch):
    from tests.badcorpus import feed_fifo

    feed_fifo(tmp_path / "pipe", opus_file[0].read_bytes())
    assert audio_duration(tmp_path / "pipe") is None  # not opened: a pipe can be read once
    np.testing.assert_array_equal(load_audio(tmp_path / "pipe"), load_audio(opus_file[0]))
    monkeypatch.setattr(w2v2.audio, "STREAM_WAIT_SECONDS", 0.2)
    with pytest.raises(AudioError, match="pipe: no data within 0.2 s"):
        list(stream_audio(tmp_path / "pipe"))  # its writer is gone; nobody else comes
    with pytest.raises(AudioError, match=f"^{os.devnull}: empty input"):
        load_audio(os.devnull)
    with pytest.raises(AudioError, match="^/dev/zero: not an audio file"):
        load_audio("/dev/zero")


def test_links_and_names(opus_file, tmp_path):
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    for read in (load_audio, audio_duration):
        with pytest.raises(AudioError, match="a: symbolic link loop"):
            read(tmp_path / "a")
    os.symlink("gone.wav", tmp_path / "link.wav")
    with pytest.raises(AudioError, match=r"link.wav: broken symbolic link \(its target gone.wav does not exist\)"):
        load_audio(tmp_path / "link.wav")
    latin1 = tmp_path / os.fsdecode(b"\xe9t\xe9.opus")  # a valid file whose name is not UTF-8
    latin1.write_bytes(opus_file[0].read_bytes())
    np.testing.assert_array_equal(load_audio(latin1), load_audio(opus_file[0]))
    assert audio_duration(latin1) == audio_duration(opus_file[0])
    with pytest.raises(AudioError) as info:
        load_audio(tmp_path / os.fsdecode(b"\xff.wav"))
    assert str(info.value).startswith(os.fsdecode(os.fsencode(tmp_path) + b"/\xff.wav: no such file"))


def test_stdin_empty_and_garbage(monkeypatch):
    fake_stdin(monkeypatch, b"")
    with pytest.raises(AudioError, match="^<stdin>: empty"):
        load_audio("-")
    fake_stdin(monkeypatch, b"not audio at all" * 10)
    with pytest.raises(AudioError, match="^<stdin>: not an audio file"):
        load_audio("-")


# ---------------------------------------------------------------------------- resampler and downmix


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 3000), sr_in=st.sampled_from(RATES), sr_out=st.sampled_from(RATES),
       seed=st.integers(0, 2**32 - 1), amp=st.floats(0, 1))
def test_resample_length_and_finite(n, sr_in, sr_out, seed, amp):
    x = (amp * np.random.default_rng(seed).uniform(-1, 1, n)).astype(np.float32)
    y = resample(x, sr_in, sr_out)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - round(n * sr_out / sr_in)) <= 1
    assert np.isfinite(y).all()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3000), sr_in=st.sampled_from(RATES), sr_out=st.sampled_from(RATES),
       channels=st.integers(1, 6))
def test_silence_stays_silence(n, sr_in, sr_out, channels):
    assert not resample(to_mono(np.zeros((n, channels), np.float32)), sr_in, sr_out).any()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 500), channels=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_downmix_is_channel_mean(n, channels, seed):
    x = np.random.default_rng(seed).uniform(-1, 1, (n, channels)).astype(np.float32)
    mono = to_mono(x)
    assert mono.shape == (n,) and mono.dtype == np.float32
    np.testing.assert_allclose(mono, x.mean(axis=1), atol=1e-6)
    assert (mono <= x.max(axis=1) + 1e-6).all() and (mono >= x.min(axis=1) - 1e-6).all()
    np.testing.assert_allclose(to_mono(np.repeat(x[:, :1], channels, axis=1)), x[:, 0], rtol=1e-6)


# ---------------------------------------------------------------------------- inputs and URLs


def test_list_audio_files(tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    for name in ["b/c/z.FLAC", "b/a.wav", "b/notes.txt", "b/clip.mp4", "b/c/y.opus"]:
        (tmp_path / name).write_bytes(b"x")
    explicit = tmp_path / "b" / "notes.txt"
    assert list_audio_files([str(tmp_path), "-", str(explicit), "missing.xyz"]) == [
        str(tmp_path / "b" / "a.wav"), str(tmp_path / "b" / "c" / "y.opus"), str(tmp_path / "b" / "c" / "z.FLAC"),
        str(tmp_path / "b" / "clip.mp4"), "-", str(explicit), "missing.xyz",
    ]


def test_is_url():
    assert is_url("https://example.com/a.mp3") and is_url("http://x.org")
    assert not any(map(is_url, ["a.wav", "-", "file:///a.wav", "https://", "ftp://x.org/a", None]))


def test_download_url_without_yt_dlp(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "yt_dlp", None)  # makes `import yt_dlp` raise ImportError
    with pytest.raises(AudioError, match=r"w2v2\[url\]"):
        download_url("https://example.com/v", tmp_path)


def test_download_url_offline(monkeypatch, tmp_path):
    class DownloadError(Exception):
        pass

    class YoutubeDL:
        def __init__(self, options):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def extract_info(self, url, download):
            raise DownloadError("ERROR: Unable to download webpage: <urlopen error [Errno -3] name resolution>")

    fake = types.SimpleNamespace(YoutubeDL=YoutubeDL, utils=types.SimpleNamespace(DownloadError=DownloadError))
    monkeypatch.setitem(sys.modules, "yt_dlp", fake)
    with pytest.raises(AudioError, match=r"^https://example.com/v: cannot reach"):
        download_url("https://example.com/v", tmp_path)


def test_audio_duration_errors(tmp_path):
    assert audio_duration("-") is None
    with pytest.raises(AudioError, match="no such file"):
        audio_duration(tmp_path / "nope.wav")
    (tmp_path / "t.wav").write_text("text " * 50)
    with pytest.raises(AudioError, match="t.wav: not an audio file"):
        audio_duration(tmp_path / "t.wav")


def test_an_empty_file_name_is_shown_quoted():
    with pytest.raises(AudioError, match=r"^'': no such file"):
        load_audio("")
