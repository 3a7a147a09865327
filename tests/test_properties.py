"""Property-based tests (hypothesis) and a fuzz run of the audio loader.

Properties not covered elsewhere (tests/test_audio.py has resampler lengths, silence and
downmix; tests/test_text.py normalisation; tests/test_emissions.py chunk geometry):
- any WAV/FLAC (rate, channels, sample format) decodes to finite float32 mono of the right
  length, equal to the channel mean at 16 kHz, and streaming in any block size agrees;
- resampling preserves a band-limited tone;
- normalised transcripts always encode without <unk> and decode back;
- stitched emissions equal a single pass for every length near a chunk boundary, any batch.
The fuzz run mutates real and generated files (bit flips, byte changes, truncations, spliced
junk): every loader call returns audio or raises a one-line AudioError naming the file.
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from tests.badcorpus import ffmpeg, write_corpus
from tests.conftest import DATA, tiny_ctc_model
from w2v2.audio import SAMPLE_RATE, AudioError, _rebatch, audio_duration, load_audio, resample, stream_audio
from w2v2.emissions import compute_emissions, plan_chunks
from w2v2.text import build_vocabulary, normalize_text

RATES = [8000, 11025, 16000, 22050, 44100, 48000]
FORMATS = [("WAV", "PCM_U8", 1 / 64), ("WAV", "PCM_16", 1e-4), ("WAV", "PCM_24", 1e-6), ("WAV", "FLOAT", 1e-7),
           ("FLAC", "PCM_16", 1e-4), ("FLAC", "PCM_24", 1e-6)]
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- loader
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 6000), sr=st.sampled_from(RATES), channels=st.integers(1, 6), fmt=st.sampled_from(FORMATS),
       seed=st.integers(0, 2**32 - 1), block_seconds=st.floats(0.005, 1.0))
def test_any_wav_or_flac_decodes_to_mono_16k(n, sr, channels, fmt, seed, block_seconds):
    container, subtype, tol = fmt
    x = np.random.default_rng(seed).uniform(-0.9, 0.9, (n, channels)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=container, subtype=subtype)
    raw = buf.getvalue()
    audio = load_audio(io.BytesIO(raw))
    assert audio.dtype == np.float32 and audio.ndim == 1 and np.isfinite(audio).all()
    assert abs(len(audio) - round(n * SAMPLE_RATE / sr)) <= 1
    if sr == SAMPLE_RATE:
        np.testing.assert_allclose(audio, x.mean(axis=1), atol=tol + 1e-6)
    blocks = list(stream_audio(io.BytesIO(raw), block_seconds=block_seconds))
    streamed = np.concatenate([np.zeros(0, np.float32), *blocks])  # 1 sample at 44.1 kHz is none at 16 kHz
    assert abs(len(streamed) - len(audio)) <= 2
    m = min(len(streamed), len(audio))
    assert np.abs(streamed[:m] - audio[:m]).max(initial=0) < 1e-3


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(0, 50), max_size=20), size=st.integers(1, 40))
def test_rebatch_makes_exact_blocks(sizes, size):
    pieces = [np.arange(k, dtype=np.float32) + 100 * i for i, k in enumerate(sizes)]
    blocks = list(_rebatch(iter(pieces), size))
    assert all(len(b) == size for b in blocks[:-1]) and all(0 < len(b) <= size for b in blocks[-1:])
    joined = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    np.testing.assert_array_equal(joined, np.concatenate(pieces) if pieces else joined)


@settings(max_examples=60, deadline=None)
@given(sr_in=st.sampled_from(RATES), sr_out=st.sampled_from(RATES), rel_freq=st.floats(0.01, 0.35),
       phase=st.floats(0, 6.28), amp=st.floats(0.05, 0.9))
def test_resampling_preserves_a_band_limited_tone(sr_in, sr_out, rel_freq, phase, amp):
    """A tone below 70% of the lower Nyquist frequency comes out as the same tone sampled at
    the new rate (away from the edges, where the filter sees zeros)."""
    freq = rel_freq * min(sr_in, sr_out)
    n = sr_in // 2  # half a second
    x = (amp * np.sin(2 * np.pi * freq * np.arange(n) / sr_in + phase)).astype(np.float32)
    y = resample(x, sr_in, sr_out)
    expected = amp * np.sin(2 * np.pi * freq * np.arange(len(y)) / sr_out + phase)
    edge = len(y) // 10
    assert np.abs(y[edge:-edge] - expected[edge:-edge]).max() < 0.01 * amp + 1e-4


# ---------------------------------------------------------------------------- text
@settings(max_examples=200, deadline=None)
@given(texts=st.lists(st.text(), min_size=1, max_size=4), case=st.sampled_from(["upper", "lower", None]))
def test_normalised_transcripts_encode_without_unk_and_decode_back(texts, case):
    normalised = [normalize_text(t, case=case) for t in texts]
    assume(any(normalised))
    vocab = build_vocabulary(texts, case=case)
    for text in normalised:
        ids = vocab.encode(text)
        assert vocab.unk_index not in ids and vocab.blank_index not in ids
        assert vocab.decode(ids) == text


# ---------------------------------------------------------------------------- stitching
@pytest.fixture(scope="module")
def window_model():
    """Frames see a bounded window (no attention, layer-norm encoder, no input normalisation):
    stitching with a stride that covers it must equal one pass exactly."""
    return tiny_ctc_model(["abcdefghijklmnopqrstuvwxyz'"], feat_extract_norm="layer", conv_bias=True,
                          num_hidden_layers=0, do_normalize=False)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.integers(0, 4), offset=st.integers(-900, 900), batch_size=st.integers(1, 3),
       seed=st.integers(0, 1000))
def test_stitched_equals_single_pass_at_every_chunk_boundary(window_model, chunks, offset, batch_size, seed):
    plan = plan_chunks(1.2, 0.4, window_model.config)  # chunk 60 frames, stride 20, step 20
    n = plan.chunk + chunks * plan.step + offset  # lengths just around the points where a chunk ends
    assume(n > 0)
    audio = (0.3 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)
    with torch.inference_mode():
        ref = window_model(torch.from_numpy(audio)[None]).logits[0].float().log_softmax(-1)  # (frames, vocab)
    (_, em), = compute_emissions(window_model, [(0, audio)], plan, batch_size=batch_size, keep_log_probs=True)
    assert em.frames == ref.shape[0] == plan.frames(n) and em.samples == n
    torch.testing.assert_close(em.best_log_prob, ref.max(-1).values, atol=1e-4, rtol=0)
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3  # the argmax of a near-tie may flip with rounding
    assert torch.equal(em.best_ids[clear], ref.argmax(-1)[clear])


# ---------------------------------------------------------------------------- fuzzing the loader
def fuzz_cases() -> int:
    return int(os.environ.get("W2V2_FUZZ_CASES", "200"))


@pytest.fixture(scope="module")
def fuzz_seeds(tmp_path_factory):
    """Valid files to mutate: generated wav/flac/mp3 (+ ogg, m4a, webm, mp4) and real opus/flac."""
    folder = tmp_path_factory.mktemp("fuzz_seeds")
    corpus = write_corpus(folder)
    seeds = [c.path for c in corpus.values() if c.problem is None and c.path.stat().st_size < 300_000]
    tone = corpus["flac_tone.flac"].path
    for name, args in (("tone.ogg", ["-c:a", "libvorbis"]), ("tone.m4a", ["-c:a", "aac"]),
                       ("tone.webm", ["-c:a", "libopus"])):
        ffmpeg("-i", str(tone), *args, str(folder / name))
        seeds.append(folder / name)
    ffmpeg("-f", "lavfi", "-i", "color=c=blue:s=32x32:r=5", "-i", str(tone), "-shortest", "-c:v", "mpeg4",
           "-c:a", "aac", str(folder / "video.mp4"))
    seeds.append(folder / "video.mp4")
    real = sorted(glob.glob(str(DATA / "*" / "audio" / "*")))
    seeds += [Path(p) for p in random.Random(0).sample(real, min(8, len(real)))]
    return seeds


def mutate(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    b = bytearray(raw)
    kind = rng.choice(["bit_flips", "byte_changes", "header_bytes", "truncation", "splice"])
    if kind == "bit_flips":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == "byte_changes":
        for _ in range(rng.randint(1, 16)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == "header_bytes":  # where rates, channels, sizes and codec ids live
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(min(len(b), 64))] = rng.randrange(256)
    elif kind == "truncation":
        b = b[: rng.randrange(len(b))]
    else:
        i = rng.randrange(len(b))
        b[i : i + rng.randint(1, 200)] = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
    return kind, bytes(b)


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang


def test_fuzzed_files_decode_or_raise_audio_error(fuzz_seeds, tmp_path):
    """W2V2_FUZZ_CASES cases (200 by default), reproducible (seeded); each mutated file through
    load_audio, stream_audio and audio_duration, with a 20 s limit against hangs."""
    rng = random.Random(int(os.environ.get("W2V2_FUZZ_SEED", "0")))
    previous = signal.signal(signal.SIGALRM, _alarm)
    failures = []
    try:
        for case in range(fuzz_cases()):
            source = rng.choice(fuzz_seeds)
            kind, raw = mutate(source.read_bytes(), rng)
            path = tmp_path / f"case{case}{source.suffix}"
            path.write_bytes(raw)
            for name, read in (("load_audio", load_audio), ("stream_audio", lambda p: list(stream_audio(p))),
                               ("audio_duration", audio_duration)):
                signal.alarm(20)
                try:
                    read(path)
                except AudioError as e:
                    if not str(e).startswith(f"{path}: ") or "\n" in str(e):
                        failures.append(f"case {case} ({kind} of {source.name}) {name}: badly formed message {e!r}")
                except _Hang:
                    failures.append(f"case {case} ({kind} of {source.name}) {name}: no answer within 20 s")
                except Exception as e:  # anything else is a crash
                    failures.append(f"case {case} ({kind} of {source.name}) {name}: {type(e).__name__}: {e}")
                finally:
                    signal.alarm(0)
            if not failures or not failures[-1].startswith(f"case {case} "):
                path.unlink()
            else:
                shutil.copy(path, tmp_path / f"crash{case}{source.suffix}")
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------- the command line
class CliWorld:
    """What random command lines are made of: a tiny model, the bad-input corpus (good files, bad
    files, links, devices, a pipe without a writer) and a folder for each example's files."""

    def __init__(self, folder: Path):
        from w2v2.checkpoint import save_pretrained

        self.folder = folder
        self.model = str(save_pretrained(tiny_ctc_model(["abcdefghijklmnopqrstuvwxyz '"]), folder / "model"))
        self.corpus = write_corpus(folder / "corpus")
        self.paths = [str(c.path) for c in self.corpus.values()] + [str(folder / "missing.wav")]
        self.count = 0

    def scratch(self) -> Path:
        self.count += 1
        path = self.folder / f"example{self.count}"
        path.mkdir()
        return path


@pytest.fixture(scope="module")
def cli_world(tmp_path_factory):
    return CliWorld(tmp_path_factory.mktemp("cli"))


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
EXTENSIONS = [".wav", ".flac", ".mp3", ".mp4", ".opus", ".txt", ""]
HEADERS = ["path\ttext", "path\tseconds\tspeaker\ttext", "\ufeffpath\ttext", "file\ttext", "path", ""]
SECONDS = ["4", "1", "0.3", "0", "-1", "nan", "inf", "1e12", "x"]
COUNTS = ["1", "2", "0", "-3", "x"]
OPTIONS = {  # flag -> values to draw from, valid and not
    "transcribe": {"--chunk-seconds": SECONDS, "--stride-seconds": SECONDS, "--batch-size": COUNTS,
                   "--format": ["txt", "srt", "vtt", "json", "tsv", "all", "pdf"], "--precision": ["fp32", "fp8"],
                   "--max-segment-chars": COUNTS, "--pause-seconds": SECONDS, "--beam-width": COUNTS,
                   "--skip-existing": None, "--device": ["cpu", "tpu"]},
    "align": {"--chunk-seconds": SECONDS, "--stride-seconds": SECONDS, "--batch-size": COUNTS,
              "--format": ["json", "srt", "all"], "--max-segment-seconds": SECONDS},
    "evaluate": {"--chunk-seconds": SECONDS, "--batch-size": COUNTS, "--limit": COUNTS, "--beam": COUNTS, "--precision": ["fp32", "x"],
                 "--case": ["upper", "lower", "keep", "title"], "--device": ["cpu", "tpu"]},
    "embed": {"--layer": ["all", "0", "-1", "1,2", "99", "x", ""], "--pool": ["mean", "none", "max"],
              "--batch-size": COUNTS, "--format": ["safetensors", "npy", "x"], "--device": ["cpu", "tpu"]},
}


@st.composite
def command_lines(draw, world: CliWorld) -> tuple[list[str], Path]:
    """(argv, output folder) of one random command over random files and options."""
    scratch = world.scratch()
    made = []
    for i in range(draw(st.integers(0, 2))):  # random bytes, or a good file cut anywhere
        good = [c.path for c in world.corpus.values() if c.problem is None]
        raw = draw(st.one_of(st.binary(max_size=3000),
                             st.sampled_from(good).map(lambda p: p.read_bytes()).flatmap(
                                 lambda b: st.integers(0, len(b)).map(lambda n: b[:n]))))
        made.append(scratch / f"random{i}{draw(st.sampled_from(EXTENSIONS))}")
        made[-1].write_bytes(raw)
    pool = world.paths + [str(p) for p in made]
    files = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3))
    manifest = scratch / "m.tsv"
    rows = [f"{draw(st.sampled_from(pool))}\t{draw(TEXT)}" for _ in range(draw(st.integers(0, 3)))]
    text = "\n".join([draw(st.sampled_from(HEADERS)), *rows]) + "\n"
    manifest.write_bytes(text.encode("utf-8", "surrogateescape"))  # a Latin-1 name makes it not UTF-8
    command = draw(st.sampled_from(sorted(OPTIONS)))
    out = scratch / "out"
    if command == "transcribe":
        argv = [command, *files, "-o", str(out)] if draw(st.booleans()) else [command, *files]
    elif command == "align":
        argv = [command, files[0], draw(st.sampled_from([str(manifest), "ab c", "", "x" * 500]))]
        argv += ["-o", str(out)] if draw(st.booleans()) else []
    elif command == "evaluate":
        argv = [command, "--device", "cpu", "--out", str(out / "errors.tsv"), "--data", str(manifest)]
    else:
        inputs = draw(st.sampled_from([files, [str(manifest)], [*files, str(manifest)]]))
        where = draw(st.sampled_from([["--output-dir", str(out)], ["--output", str(out / "all.safetensors")]]))
        argv = [command, *inputs, *where, "--no-progress"]
    for flag in draw(st.lists(st.sampled_from(sorted(OPTIONS[command])), max_size=3, unique=True)):
        values = OPTIONS[command][flag]
        argv += [flag] if values is None else [flag, draw(st.sampled_from(values))]
    return [*argv, "--model", world.model], out


def check_command_line(world: CliWorld, argv: list[str], out: Path) -> None:
    """The rules for any command line: a known exit status, errors as lines without tracebacks,
    an answer within the time limit, and only complete files in the output folder."""
    from tests.badcorpus import Hang, quick_streams, run_cli

    try:
        with quick_streams(0.2):
            rc, _, err = run_cli(argv, timeout=120)
    except Hang as e:
        pytest.fail(str(e))
    event(f"{argv[0]} exit {rc}")
    assert rc in (0, 1, 2), (argv, rc, err)
    assert "Traceback" not in err and "internal error" not in err, (argv, err)
    if rc:
        assert err.strip(), argv  # a failure says why (usage errors, exit 2, included)
    if out.exists():
        for path in out.rglob("*"):
            assert not path.name.startswith(".") and not path.name.endswith(".tmp"), (argv, path)
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".safetensors":
                safe_open(str(path), "np").keys()


def _cli_property(world: CliWorld, data) -> None:
    argv, out = data.draw(command_lines(world))
    check_command_line(world, argv, out)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_command_lines_keep_the_rules(cli_world, data):
    """``w2v2 transcribe|align|evaluate|embed`` on random files (the bad-input corpus, random bytes,
    good files cut anywhere, manifests with random headers and rows) and random option values."""
    _cli_property(cli_world, data)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_command_lines_keep_the_rules_long(cli_world, data):
    _cli_property(cli_world, data)
