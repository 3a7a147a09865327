"""Tar shards: reading them in sequence from local paths or fsspec URLs, and their catalog.

A shard is a tar file in WebDataset layout: the members of one utterance share a key (the name
up to the first dot of its last component) and follow each other: ``KEY.flac`` (or any audio
extension) and ``KEY.json`` (``seconds``, ``text``, ``speaker``) and/or ``KEY.txt``. Shards are
named by local paths or any fsspec URL, with brace patterns (``train-{000..009}.tar``), so a
corpus is read where it lies, never unpacked on the training nodes.

The catalog. Batching by length and exact resumption (:mod:`.stream`) need each utterance's
duration before its audio is read. ``w2v2 prepare`` writes them beside the shards, in
``shards.json``; for shards without it, each shard is read once at start (:func:`scan_shard`).
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..audio import AUDIO_EXTENSIONS, SAMPLE_RATE, AudioError, load_audio
from ..data import Entry, ManifestError
from . import INDEX_NAME
from .sources import _require

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = tuple(sorted(e.lstrip(".") for e in AUDIO_EXTENSIONS))


# ---------------------------------------------------------------------------- reading


def _fsspec():
    return _require("fsspec", "tar shards")


def expand(pattern: str) -> list[str]:
    """Brace patterns -> shard URLs (``a-{00..02}.tar`` -> a-00.tar a-01.tar a-02.tar)."""
    braceexpand = _require("braceexpand", "shard patterns")
    return list(braceexpand.braceexpand(pattern))


def split_key(name: str) -> tuple[str, str]:
    """A member name -> (key, extension): the key runs to the first dot of the last component."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def iter_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each utterance of a shard, read in one sequential pass."""
    fsspec = _fsspec()
    key, sample = None, {}
    try:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = split_key(member.name)
                if k != key and sample:
                    yield key, sample
                    sample = {}
                key = k
                sample[ext] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError, EOFError) as e:
        raise ShardError(f"{url}: cannot read the shard ({e})") from None
    if sample:
        yield key, sample


class ShardError(ValueError):
    """A shard or its catalog is unreadable or does not match."""


def audio_member(sample: dict[str, bytes]) -> str | None:
    return next((ext for ext in sample if ext in AUDIO_SUFFIXES), None)


def decode(url: str, key: str, sample: dict[str, bytes], sr: int = SAMPLE_RATE) -> np.ndarray:
    ext = audio_member(sample)
    if ext is None:
        raise AudioError(f"{url}#{key}: no audio member (found {', '.join(sample) or 'nothing'})")
    buffer = io.BytesIO(sample[ext])
    buffer.name = f"{url}#{key}.{ext}"
    return load_audio(buffer, sr)


def sample_metadata(sample: dict[str, bytes]) -> dict:
    """``seconds``, ``text``, ``speaker`` from the ``json`` member, the text also from ``txt``."""
    meta = {}
    if "json" in sample:
        meta = json.loads(sample["json"])
        if "seconds" not in meta and "duration" in meta:
            meta["seconds"] = meta["duration"]
    if "txt" in sample and meta.get("text") is None:
        meta["text"] = sample["txt"].decode("utf-8").strip()
    return meta


def shard_waveforms(inputs: Sequence[str], count: int, min_samples: int = 0) -> list[tuple[str, np.ndarray]]:
    """Up to ``count`` decoded utterances (``URL#KEY``, waveform) of at least ``min_samples``,
    spread over the shards (one pass over the start of each shard visited), for a look at the data."""
    urls, _ = shard_urls(inputs)
    out = []
    for url in urls[:: max(1, len(urls) // max(1, count))]:
        for key, sample in iter_samples(url):
            try:
                wav = decode(url, key, sample)
            except AudioError as e:
                log.warning("%s", e)
                continue
            if len(wav) >= min_samples:
                out.append((f"{url}#{key}", wav))
                break
        if len(out) == count:
            break
    return out


# ---------------------------------------------------------------------------- the catalog


@dataclass
class ShardCatalog:
    """Every shard's utterances, in member order: keys, durations, texts, speakers."""

    urls: list[str]
    keys: list[list[str]]
    seconds: list[np.ndarray]
    texts: list[list[str | None]]
    speakers: list[list[str | None]]
    offsets: np.ndarray = field(init=False)  # the global number of each shard's first utterance

    def __post_init__(self) -> None:
        self.offsets = np.concatenate([[0], np.cumsum([len(k) for k in self.keys])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def entries(self) -> Iterator[tuple[int, int, Entry]]:
        """(shard, position, entry) for every utterance; the entry's path is ``URL#KEY``."""
        for s, url in enumerate(self.urls):
            for pos, key in enumerate(self.keys[s]):
                yield s, pos, Entry(f"{url}#{key}", float(self.seconds[s][pos]), self.speakers[s][pos],
                                    self.texts[s][pos])


def read_index(url: str) -> dict:
    fsspec = _fsspec()
    try:
        with fsspec.open(url, "rt", encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{url}: cannot read the shard index ({e})") from None
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise ShardError(f"{url}: not a shard index (expected {{\"shards\": [...]}}, as w2v2 prepare writes)")
    return index


def shard_urls(inputs: Sequence[str]) -> tuple[list[str], dict[str, dict]]:
    """(shard URLs, {URL: its entry of a shards.json}) for the inputs: patterns, indexes or folders."""
    fsspec = _fsspec()
    urls, known = [], {}
    for item in map(str, inputs):
        if item.endswith(INDEX_NAME) or not item.endswith(".tar"):
            index_url = item if item.endswith(INDEX_NAME) else posixpath.join(item, INDEX_NAME)
            folder = posixpath.dirname(index_url)
            found = [posixpath.join(folder, s["url"]) for s in read_index(index_url)["shards"]]
        else:
            found = expand(item)
            folder = posixpath.dirname(found[0])
            index_url = posixpath.join(folder, INDEX_NAME)
            fs, path = fsspec.core.url_to_fs(index_url)
            if not fs.exists(path):
                urls += found
                continue
        index = {posixpath.join(folder, s["url"]): s for s in read_index(index_url)["shards"]}
        urls += found
        known.update({u: index[u] for u in found if u in index})
    return urls, known


def scan_shard(url: str) -> dict:
    """A shard's catalog entry, read from the shard itself (durations decoded when not recorded)."""
    keys, seconds, texts, speakers = [], [], [], []
    for key, sample in iter_samples(url):
        meta = sample_metadata(sample)
        if meta.get("seconds") is None:
            meta["seconds"] = len(decode(url, key, sample)) / SAMPLE_RATE
        keys.append(key)
        seconds.append(float(meta["seconds"]))
        texts.append(meta.get("text"))
        speakers.append(meta.get("speaker"))
    return {"keys": keys, "seconds": seconds, "texts": texts, "speakers": speakers}


def load_catalog(inputs: Sequence[str], threads: int = 8) -> ShardCatalog:
    """The catalog of the shards ``inputs`` name: from ``shards.json`` where it lists them, else by
    reading each shard once. Raises :class:`w2v2.data.ManifestError` listing every bad shard."""
    try:
        urls, known = shard_urls(inputs)
    except (ShardError, ValueError) as e:
        raise ManifestError([str(e)]) from None
    missing = [u for u in urls if u not in known]
    problems = []
    if missing:
        log.info("reading %d shard(s) without a %s entry to learn their durations", len(missing), INDEX_NAME)

        def scan(url):
            try:
                return url, scan_shard(url), None
            except (ShardError, AudioError, ValueError) as e:
                return url, None, str(e)

        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for url, entry, problem in pool.map(scan, missing):
                (problems.append(problem) if problem else known.__setitem__(url, entry))
    if not urls:
        problems.append(f"{' '.join(map(str, inputs))}: no shards")
    if problems:
        raise ManifestError(problems)
    parts = [known[u] for u in urls]
    return ShardCatalog(urls, [list(p["keys"]) for p in parts],
                        [np.asarray(p["seconds"], dtype=np.float64) for p in parts],
                        [list(p.get("texts") or [None] * len(p["keys"])) for p in parts],
                        [list(p.get("speakers") or [None] * len(p["keys"])) for p in parts])


