"""``w2v2 prepare``: any training input -> sorted, length-annotated tar shards and their index.

    inputs (TSV, NeMo, Hugging Face, Lhotse manifests, folders of audio)
      -> list_entries + validate_entries   every file's header read (threads); bad ones listed
      -> sorted by duration, cut into shards of about ``shard_size`` bytes
      -> one process per shard (``workers`` at a time): every utterance decoded once to check it,
         its audio stored as it came (a whole file) or as 16-bit FLAC (a span or a table row),
         with ``KEY.json`` (seconds, text, speaker, source) and ``KEY.txt``; written to a
         temporary and renamed, so a shard on disk is always complete
      -> ``shards.json``: each shard's name, count, total seconds and its utterances' keys,
         durations, texts and speakers (what the training stream plans epochs from), written last

Keys are the utterance's place in the sorted order (``000000042``): unique, dot-free, and in
order of length, so neighbouring shards hold utterances of similar lengths.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf

from ..audio import AUDIO_EXTENSIONS, SAMPLE_RATE, AudioError, load_audio
from ..data import Entry, list_entries, validate_entries
from ..fileio import atomic_open, atomic_write_text
from . import INDEX_NAME
from .sources import parse_address

log = logging.getLogger(__name__)

FLAC_BYTES_PER_SECOND = 32_000  # 16-bit 16 kHz, an upper bound used to size shards before encoding


@dataclass
class ShardResult:
    name: str
    keys: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    texts: list[str | None] = field(default_factory=list)
    speakers: list[str | None] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def index_entry(self) -> dict:
        return {"url": self.name, "count": len(self.keys), "total_seconds": round(sum(self.seconds), 3),
                "keys": self.keys, "seconds": self.seconds, "texts": self.texts, "speakers": self.speakers}


@dataclass
class Summary:
    shards: int
    utterances: int
    seconds: float
    failed: list[tuple[str, str]]
    index: Path


def _estimated_bytes(entry: Entry) -> int:
    if "#" not in entry.path or parse_address(entry.path) is None:
        try:
            return os.path.getsize(entry.path)
        except OSError:
            pass
    return int((entry.seconds or 0) * FLAC_BYTES_PER_SECOND)


def plan_shards(entries: list[Entry], shard_bytes: int) -> list[list[tuple[str, Entry]]]:
    """Entries sorted by duration (then path), keyed by their place, cut into runs of about ``shard_bytes``."""
    ordered = sorted(entries, key=lambda e: (e.seconds or 0.0, e.path))
    shards, current, size = [], [], 0
    for i, entry in enumerate(ordered):
        estimate = _estimated_bytes(entry)
        if current and size + estimate > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((f"{i:09d}", entry))
        size += estimate
    if current:
        shards.append(current)
    return shards


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: the same input gives the same bytes
    tar.addfile(info, io.BytesIO(data))


def _audio_bytes(entry: Entry) -> tuple[bytes, str, float]:
    """(encoded audio, extension, seconds): a whole file as it is (decoded once to check it), a
    span or a table row decoded and stored as 16-bit FLAC at 16 kHz."""
    suffix = Path(entry.path).suffix.lower()
    if parse_address(entry.path) is None and suffix in AUDIO_EXTENSIONS:
        with open(entry.path, "rb") as f:
            data = f.read()
        buffer = io.BytesIO(data)
        buffer.name = entry.path
        return data, suffix.lstrip("."), len(load_audio(buffer)) / SAMPLE_RATE
    audio = load_audio(entry.path)
    out = io.BytesIO()
    sf.write(out, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return out.getvalue(), "flac", len(audio) / SAMPLE_RATE


def write_shard(path: str, items: list[tuple[str, Entry]]) -> ShardResult:
    """Write one shard atomically; utterances that fail to read or decode are left out and listed."""
    result = ShardResult(os.path.basename(path))
    with atomic_open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, entry in items:
            try:
                data, ext, seconds = _audio_bytes(entry)
            except AudioError as e:
                result.failed.append((entry.path, str(e).removeprefix(f"{entry.path}: ")))
                continue
            except OSError as e:
                result.failed.append((entry.path, f"cannot read ({e.strerror or e})"))
                continue
            meta = {"seconds": round(seconds, 4), "text": entry.text, "speaker": entry.speaker, "source": entry.path}
            _member(tar, f"{key}.{ext}", data)
            _member(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
            if entry.text is not None:
                _member(tar, f"{key}.txt", entry.text.encode("utf-8"))
            result.keys.append(key)
            result.seconds.append(meta["seconds"])
            result.texts.append(entry.text)
            result.speakers.append(entry.speaker)
    if not result.keys:
        os.unlink(path)
    return result


def prepare(inputs: list[str], out_dir: str | os.PathLike, shard_size_mb: float = 256.0, workers: int = 4,
            prefix: str = "shard") -> Summary:
    """Shard ``inputs`` into ``out_dir`` (see the module's docstring). Raises
    :class:`w2v2.data.ManifestError` for unreadable inputs (before anything is written) and
    ValueError when ``out_dir`` already holds shards."""
    out = Path(out_dir)
    if (out / INDEX_NAME).exists():
        raise ValueError(f"{out} already holds {INDEX_NAME}; choose another OUT_DIR or remove it first")
    if shard_size_mb <= 0 or workers < 1:
        raise ValueError(f"--shard-size must be positive and --workers at least 1, got {shard_size_mb} and {workers}")
    entries = list_entries(inputs)
    started = time.monotonic()
    good, bad = validate_entries(entries, threads=max(8, workers))
    failed = [(e.path, reason) for e, reason in bad]
    plan = plan_shards(good, int(shard_size_mb * 1e6))
    width = max(6, len(str(len(plan) - 1)))
    names = [f"{prefix}-{i:0{width}d}.tar" for i in range(len(plan))]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    results: list[ShardResult] = []
    with ProcessPoolExecutor(max_workers=min(workers, max(1, len(plan)))) as pool:
        for result in pool.map(write_shard, [str(out / n) for n in names], plan):
            results.append(result)
            failed += result.failed
            log.info("%s: %d utterances, %.2f h", result.name, len(result.keys), sum(result.seconds) / 3600)
    written = [r for r in results if r.keys]
    total = sum(sum(r.seconds) for r in written)
    index = {"format": "w2v2 tar shards (WebDataset layout)", "version": 1, "count": sum(len(r.keys) for r in written),
             "total_seconds": round(total, 3), "failed": len(failed), "shards": [r.index_entry() for r in written]}
    atomic_write_text(out / INDEX_NAME, json.dumps(index, ensure_ascii=False) + "\n")
    log.info("prepared in %.1f s", time.monotonic() - started)
    return Summary(len(written), index["count"], total, failed, out / INDEX_NAME)
