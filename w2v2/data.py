"""Training data: manifests and audio folders -> entries -> cropped waveforms -> padded batches.

    inputs (manifest .tsv files, folders of audio, audio files)
      -> list_entries          -> [Entry(path, seconds, speaker, text)]; every bad line of every
                                  manifest raises one ManifestError that lists them all
      -> validate_entries      -> (good, bad): every file checked up front, bad ones listed and skipped
      -> AudioDataset          -> {"index", "wav" (samples,), "text", "speaker"} decoded in DataLoader workers
      -> BucketBatchSampler    -> lists of (index, epoch) keys: batches of similar lengths filling
                                  ``max_tokens`` samples, shuffled per epoch with a seed, sharded per rank
      -> Collate               -> {"waveforms" (batch, samples) zero-padded, "lengths" (batch,), ...}
      -> make_loader_factory   -> factory(epoch, skip) -> DataLoader (what ``trainer.Trainer`` takes)

Cropping (pretraining, ``Collate(crop_to_shortest=True)``): like fairseq, each file is first cut to
at most ``max_samples`` at a random offset, then every item of a batch is cut to the shortest one,
again at a random offset, so a batch holds no padding (no compute spent on it, and the span mask
sees equal lengths). Length bucketing keeps the audio thrown away small. Fine-tuning uses
``crop_to_shortest=False``, ``max_samples=None``: items are zero-padded and ``lengths`` says how
many samples are real (the model handles lengths exactly).

Every random choice (order, crop offsets) is a function of ``(seed, epoch, index)``, never of a
worker's RNG state or of the global RNG, so a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .audio import SAMPLE_RATE, AudioError, audio_duration, is_stream_path, list_audio_files, load_audio
from .config import ConfigError

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".tsv",)


@dataclass(frozen=True)
class Entry:
    """One utterance: an audio path (absolute or relative to the working directory) and what is known of it."""

    path: str
    seconds: float | None = None
    speaker: str | None = None
    text: str | None = None


# ---------------------------------------------------------------------------- listing


class ManifestError(ConfigError):
    """Problems with training inputs (manifests, folders), all found before training: ``problems``
    lists them one per line, ``<manifest>:<line>: <problem>``."""


def read_manifest(path: str | os.PathLike, require_text: bool = False) -> list[Entry]:
    """A manifest's entries (see :func:`read_rows`): optional columns ``seconds``, ``speaker``,
    ``text`` (required when ``require_text``). Raises :class:`ManifestError` listing every bad line."""
    entries, problems = _read_manifest(Path(path), require_text)
    if problems:
        raise ManifestError(problems)
    return entries


def read_rows(path: str | os.PathLike, required: Sequence[str] = ("path",)) -> list[dict[str, str]]:
    """The rows of a manifest, as ``{column: text}`` dicts, every value exactly as written.

    The one manifest format of w2v2, read here for every command, recipe and test: UTF-8 text
    (a leading byte order mark is allowed), a header line naming the columns, then one row per
    line, fields separated by tabs. There is no quoting: a ``"`` is an ordinary character, so a
    field holds anything but a tab or a line break (as in fairseq's manifests). ``path`` is
    relative to the manifest's folder, or absolute; ``seconds``, when given, is a non-negative
    number. Blank lines are skipped; a row repeating an earlier row's ``path`` is kept with a
    warning. Raises :class:`ManifestError` listing every problem of the file, one per line."""
    rows, problems = _read_rows(Path(path), required)
    if problems:
        raise ManifestError(problems)
    return [row for _, row in rows]


def _read_rows(path: Path, required: Sequence[str]) -> tuple[list[tuple[int, dict]], list[str]]:
    """((line number, row) for each good row, problems) of one manifest."""
    rows: list[tuple[int, dict]] = []
    problems: list[str] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = reader.fieldnames
            if header is None or "path" not in header:
                return [], [f"{path}: a manifest needs a tab-separated header with a 'path' column "
                            f"(got {header}); expected e.g. 'path<TAB>seconds<TAB>speaker<TAB>text'"]
            if len(set(header)) < len(header):
                problems.append(f"{path}:1: repeated column names in the header {header}")
            problems += [f"{path}: no {c!r} column (the header is {' '.join(header)})" for c in required
                         if c not in header]
            for row in reader:
                problem = _row_problem(row, len(header))
                if problem:
                    problems.append(f"{path}:{reader.line_num}: {problem}")
                else:
                    rows.append((reader.line_num, row))
    except UnicodeDecodeError as e:
        problems.append(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); is it really a manifest?")
    except OSError as e:
        problems.append(f"{path}: cannot read ({e.strerror or e})")
    except csv.Error as e:
        problems.append(f"{path}: not a tab-separated manifest ({e})")
    _warn_repeated_paths(path, rows)
    return rows, problems


def _warn_repeated_paths(path: Path, rows: list[tuple[int, dict]]) -> None:
    first: dict[str, int] = {}
    repeats = []
    for line, row in rows:
        key = os.path.normpath(row["path"])
        if key in first:
            repeats.append(f"line {line} repeats line {first[key]}: {row['path']}")
        first.setdefault(key, line)
    if repeats:
        shown = "; ".join(repeats[:3]) + ("; ..." if len(repeats) > 3 else "")
        log.warning("%s: warning: %d row(s) repeat the path of an earlier row (%s); each counts as often as it "
                    "is listed", path, len(repeats), shown)


def _read_manifest(path: Path, require_text: bool) -> tuple[list[Entry], list[str]]:
    rows, problems = _read_rows(path, ("path", "text") if require_text else ("path",))
    entries = [Entry(path=str(path.parent / row["path"]), seconds=float(row["seconds"]) if row.get("seconds") else None,
                     speaker=row.get("speaker") or None, text=row.get("text")) for _, row in rows]
    if not rows and not problems:
        problems.append(f"{path}: no rows (the manifest holds only its header)")
    return entries, problems


def _row_problem(row: dict, columns: int) -> str | None:
    """What is wrong with one manifest row (from ``csv.DictReader``), or None."""
    extra, missing = row.get(None), [k for k, v in row.items() if k is not None and v is None]
    if extra or missing:
        got = columns + len(extra or []) - len(missing)
        return f"{got} tab-separated fields, the header has {columns}"
    if not row["path"]:
        return "empty path"
    seconds = row.get("seconds")
    if seconds:
        try:
            value = float(seconds)
        except ValueError:
            return f"seconds must be a number, got {seconds!r}"
        if not math.isfinite(value) or value < 0:
            return f"seconds must be a non-negative number, got {seconds!r}"
    return None


def list_entries(inputs: Sequence[str | os.PathLike], require_text: bool = False) -> list[Entry]:
    """Manifests (``*.tsv``), folders (searched recursively for audio; a folder holding a
    ``manifest.tsv`` uses it, so its transcripts come along) and single audio files -> entries.

    ``require_text``: every input must be a manifest with a ``text`` column. Raises
    :class:`ManifestError` listing every problem of every input."""
    entries: list[Entry] = []
    problems: list[str] = []
    for item in map(str, inputs):
        manifest = None
        if item.endswith(MANIFEST_SUFFIXES):
            if not os.path.isfile(item):
                problems.append(f"{item}: no such manifest")
                continue
            manifest = item
        elif os.path.isdir(item) and os.path.isfile(os.path.join(item, "manifest.tsv")):
            manifest = os.path.join(item, "manifest.tsv")
        elif require_text:
            problems.append(f"{item}: not a manifest with transcripts (a .tsv file with 'path' and 'text' columns, "
                            "or a folder holding one as manifest.tsv)")
            continue
        if manifest is not None:
            found, bad = _read_manifest(Path(manifest), require_text)
            entries.extend(found)
            problems.extend(bad)
        elif os.path.isdir(item):
            found = list_audio_files([item])
            if not found:
                problems.append(f"{item}: no audio files found in this folder")
            entries.extend(Entry(path=p) for p in found)
        else:
            entries.append(Entry(path=item))
    if problems:
        raise ManifestError(problems)
    return entries


def _check(entry: Entry, min_seconds: float) -> tuple[Entry, str | None]:
    if is_stream_path(entry.path):
        return entry, "a named pipe or device, not a regular file (training data is read many times)"
    try:
        seconds = audio_duration(entry.path)
        if seconds is None:  # no duration in the header: decode to measure it
            seconds = len(load_audio(entry.path)) / SAMPLE_RATE
    except AudioError as e:
        return entry, str(e).removeprefix(f"{entry.path}: ")
    except OSError as e:
        return entry, f"cannot read ({e.strerror or e})"
    if seconds < min_seconds:
        return entry, f"too short ({seconds:.3f} s < {min_seconds:.3f} s)"
    return replace(entry, seconds=seconds), None


def validate_entries(entries: Sequence[Entry], min_seconds: float = 0.0,
                     threads: int = 8) -> tuple[list[Entry], list[tuple[Entry, str]]]:
    """Check every file before training: it exists, is readable, has a decodable header, and
    lasts at least ``min_seconds``. Returns ``(good, bad)``: good entries carry the duration read
    from the file (which replaces a manifest's ``seconds``); bad ones come with the reason."""
    good, bad = [], []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for entry, reason in pool.map(lambda e: _check(e, min_seconds), entries):
            (bad.append((entry, reason)) if reason else good.append(entry))
    return good, bad


# ---------------------------------------------------------------------------- dataset


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([abs(int(k)) for k in key])


def random_crop(wav: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``size``-sample window of ``wav`` (the whole of it when shorter)."""
    if len(wav) <= size:
        return wav
    start = int(rng.integers(0, len(wav) - size + 1))
    return wav[start:start + size]


class AudioDataset(Dataset):
    """Decodes entries to float32 16 kHz mono, cut to at most ``max_samples`` at a random offset.

    Keys are ints or ``(index, epoch)`` pairs (what :class:`BucketBatchSampler` yields): the crop
    offset depends on ``(seed, epoch, index)`` only. A file that fails to decode mid-run (it passed
    validation, then changed) is logged and replaced by the next entry, so training goes on.
    Items are dicts ``{"index", "wav" (samples,) float32 tensor, "text", "speaker"}``.
    """

    def __init__(self, entries: Sequence[Entry], max_samples: int | None = 250_000, seed: int = 0,
                 sample_rate: int = SAMPLE_RATE):
        self.entries = list(entries)
        self.max_samples = max_samples
        self.seed = seed
        self.sample_rate = sample_rate

    def __len__(self) -> int:
        return len(self.entries)

    def num_samples(self, index: int) -> int:
        """Estimated samples of an item after the ``max_samples`` crop (from its known duration)."""
        seconds = self.entries[index].seconds
        n = round(seconds * self.sample_rate) if seconds is not None else (self.max_samples or self.sample_rate)
        return min(n, self.max_samples) if self.max_samples else n

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        for attempt in range(10):
            i = (index + attempt) % len(self.entries)
            entry = self.entries[i]
            try:
                wav = load_audio(entry.path, self.sample_rate)
                break
            except AudioError as e:
                log.warning("skipping unreadable audio (using the next entry instead): %s", e)
        else:
            raise AudioError(f"{self.entries[index].path}: this and the next 9 entries failed to decode")
        if self.max_samples:
            wav = random_crop(wav, self.max_samples, _rng(self.seed, epoch, i, 0))
        return {"index": i, "epoch": epoch, "wav": torch.from_numpy(np.ascontiguousarray(wav)),
                "text": entry.text, "speaker": entry.speaker}


# ---------------------------------------------------------------------------- batching


def pad_waveforms(waves: Sequence[torch.Tensor | np.ndarray], length: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D tensors or arrays -> (waveforms (batch, length) float32 zero-padded, lengths (batch,) long).

    ``length``: the padded number of samples, at least the longest item's (None: the longest).
    The one place a batch is padded: training batches (:class:`Collate`), chunked inference
    (``emissions.py``) and embeddings (``embed.py``) all come through here, so the model sees
    the same zero padding with the same ``lengths`` whichever path made the batch."""
    lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
    longest = int(lengths.max()) if len(waves) else 0
    if length is None:
        length = longest
    elif length < longest:
        raise ValueError(f"cannot pad to {length} samples: the longest item has {longest}")
    out = torch.zeros(len(waves), length, dtype=torch.float32)
    for i, w in enumerate(waves):
        out[i, :len(w)] = torch.as_tensor(w)
    return out, lengths


def padded_length(n: int) -> int:
    """Round a batch's length up to one of few sizes: a multiple of max(4000, 2^(floor(log2 n) - 3))
    samples, so under 0.25 s or 12.5% longer (padding is exact: ``lengths`` travel with the batch).
    On CPU, oneDNN builds and caches kernels for every distinct convolution shape, which costs time
    and tens of MB per shape: without buckets, a corpus of varied durations pays that for every batch
    and grows memory with it (figures in ``docs/performance.md``)."""
    step = max(4000, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


class Collate:
    """Items -> batch dict: ``waveforms`` (batch, samples) float32, ``lengths`` (batch,) long,
    ``indices`` (batch,) long, and lists ``texts``, ``speakers``.

    ``crop_to_shortest=True`` cuts every item to the shortest of the batch at a random offset
    (seeded by ``(seed, epoch, index)``): no padding. Else items are zero-padded.
    Subclass or wrap it to add fields (fine-tuning adds encoded labels)."""

    def __init__(self, crop_to_shortest: bool = False, seed: int = 0):
        self.crop_to_shortest = crop_to_shortest
        self.seed = seed

    def __call__(self, items: list[dict]) -> dict:
        waves = [it["wav"] for it in items]
        if self.crop_to_shortest and items:
            size = min(len(w) for w in waves)
            waves = [torch.from_numpy(random_crop(w.numpy(), size, _rng(self.seed, it["epoch"], it["index"], 1)))
                     for w, it in zip(waves, items)]
        waveforms, lengths = pad_waveforms(waves)
        return {"waveforms": waveforms, "lengths": lengths,
                "indices": torch.tensor([it["index"] for it in items], dtype=torch.long),
                "texts": [it["text"] for it in items], "speakers": [it["speaker"] for it in items]}


def make_batches(sizes: Sequence[int], max_tokens: int, order: Sequence[int],
                 max_batch_size: int | None = None, crop_to_shortest: bool = False) -> list[list[int]]:
    """Greedy batches over ``order`` (indices sorted by size, longest first) such that the batch's
    cost stays within ``max_tokens``: ``len * max size`` when padding, ``len * min size`` when
    cropping to the shortest. An item larger than ``max_tokens`` alone makes a batch of one."""
    batches: list[list[int]] = []
    current: list[int] = []
    bound = 0  # max (padding) or min (cropping) size in ``current``
    for i in order:
        s = sizes[i]
        new_bound = s if not current else (min(bound, s) if crop_to_shortest else max(bound, s))
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and ((len(current) + 1) * new_bound > max_tokens or full):
            batches.append(current)
            current, new_bound = [], s
        current.append(i)
        bound = new_bound
    if current:
        batches.append(current)
    return batches


class BucketBatchSampler(Sampler):
    """Batches of similar lengths up to ``max_tokens`` samples each, reshuffled every epoch.

    Per epoch: items are shuffled with ``(seed, epoch)``, sorted by size (stable, so equal
    sizes stay shuffled), packed greedily into batches, and the batch order is shuffled. With
    ``world_size > 1`` each rank takes every ``world_size``-th batch of the same list (the list is
    cut to a multiple of ``world_size`` so all ranks make the same number of steps).
    Yields lists of ``(index, epoch)`` keys for :class:`AudioDataset`. ``set_epoch(epoch, skip)``
    chooses the epoch and how many of this rank's batches to skip (resuming mid-epoch).
    """

    def __init__(self, sizes: Sequence[int], max_tokens: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, max_batch_size: int | None = None,
                 crop_to_shortest: bool = False):
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        self.sizes = list(sizes)
        self.max_tokens, self.shuffle, self.seed = max_tokens, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.max_batch_size, self.crop_to_shortest = max_batch_size, crop_to_shortest
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch`` (indices only)."""
        n = len(self.sizes)
        if self.shuffle:
            order = _rng(self.seed, epoch, 7).permutation(n)
        else:
            order = np.arange(n)
        order = order[np.argsort(-np.asarray(self.sizes, dtype=np.int64)[order], kind="stable")]
        batches = make_batches(self.sizes, self.max_tokens, order.tolist(), self.max_batch_size,
                               self.crop_to_shortest)
        if self.shuffle:
            batches = [batches[i] for i in _rng(self.seed, epoch, 11).permutation(len(batches))]
        usable = len(batches) - len(batches) % self.world_size if self.world_size > 1 else len(batches)
        return batches[self.rank:usable:self.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches(self.epoch)[self.skip:]:
            yield [(i, self.epoch) for i in batch]

    def __len__(self) -> int:
        return max(0, len(self.batches(self.epoch)) - self.skip)


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _worker_init(_: int) -> None:
    # Ctrl-C (and `kill -TERM -PGID`, e.g. from a job scheduler) goes to the whole process group:
    # workers keep serving so the trainer can finish its update and save; the main process shuts
    # them down (and PyTorch's watchdog ends them if the main process dies). Workers start with
    # both signals blocked (_Loader); ignoring them discards any that arrived meanwhile.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


class _Loader(DataLoader):
    """A DataLoader whose worker processes are started with SIGINT and SIGTERM blocked.

    Otherwise a signal to the process group that lands between a worker's fork and its
    :func:`_worker_init` runs the trainer's handler (inherited with the fork) inside the worker,
    which could kill it ("DataLoader worker exited unexpectedly") or leave it unable to stop.
    The main process gets a signal that arrives meanwhile as soon as the workers are started."""

    def __iter__(self):
        if self.num_workers == 0 or threading.current_thread() is not threading.main_thread():
            return super().__iter__()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def make_loader_factory(dataset: Dataset, sampler: BucketBatchSampler, collate: Callable[[list], dict],
                        num_workers: int = 0) -> Callable[[int, int], DataLoader]:
    """``factory(epoch, skip) -> DataLoader`` over that epoch's batches minus the first ``skip``:
    the interface :class:`w2v2.trainer.Trainer` takes. The loader has its own generator, so
    creating it never touches the global torch RNG (needed for exact resumption)."""

    def factory(epoch: int, skip: int = 0) -> DataLoader:
        sampler.set_epoch(epoch, skip)
        return _Loader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                          worker_init_fn=_worker_init if num_workers else None,
                          generator=torch.Generator().manual_seed(sampler.seed + epoch),
                          persistent_workers=False, prefetch_factor=4 if num_workers else None)

    return factory

