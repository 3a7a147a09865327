"""Training data: manifests and audio folders -> entries -> cropped waveforms -> padded batches.

    inputs (manifest .tsv files, folders of audio, audio files)
      -> list_entries          -> EntryTable of Entry(path, seconds, speaker, text) (``manifest.py``);
                                  every bad line of every manifest raises one ManifestError
      -> check_entries         -> (good, bad): files probed up front, or checked when first read
                                  when the manifests give many durations (``manifest.py``)
      -> AudioDataset          -> {"index", "wav" (samples,), "text", "speaker", "skipped"} decoded in
                                  DataLoader workers; a bad file is skipped, logged and counted
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

import logging
import signal
import threading
from array import array
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .audio import SAMPLE_RATE, AudioError, audio_duration, is_stream_path, load_audio
from .manifest import (MANIFEST_SUFFIXES, UPFRONT_LIMIT, Entry, EntryTable, EntryTableBuilder,  # noqa: F401
                       ManifestError, check_entries, check_file, list_entries, read_manifest, read_rows,
                       validate_entries)

log = logging.getLogger(__name__)

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
    offset depends on ``(seed, epoch, index)`` only. Each file is checked as it is read (not a
    pipe or device, a readable header, at least ``min_seconds``, not much longer than its known
    duration, decodable samples); one that fails is logged and replaced by the next entry, so
    training goes on, and the item's ``skipped`` counts the files passed over.
    Items are dicts ``{"index", "wav" (samples,) float32 tensor, "text", "speaker", "skipped"}``.
    """

    def __init__(self, entries: Sequence[Entry], max_samples: int | None = 250_000, seed: int = 0,
                 sample_rate: int = SAMPLE_RATE, min_seconds: float = 0.0):
        self.entries = EntryTable.from_entries(entries)
        self.max_samples = max_samples
        self.seed = seed
        self.sample_rate = sample_rate
        self.min_seconds = min_seconds

    def __len__(self) -> int:
        return len(self.entries)

    def sizes(self) -> np.ndarray:
        """Estimated samples of every item after the ``max_samples`` crop (int64, from the known durations)."""
        seconds = self.entries.seconds
        n = np.where(np.isnan(seconds), self.max_samples or self.sample_rate,
                     np.rint(np.nan_to_num(seconds) * self.sample_rate)).astype(np.int64)
        return np.minimum(n, self.max_samples) if self.max_samples else n

    def num_samples(self, index: int) -> int:
        """Estimated samples of one item after the ``max_samples`` crop (from its known duration)."""
        seconds = self.entries.seconds[index]
        n = round(seconds * self.sample_rate) if not np.isnan(seconds) else (self.max_samples or self.sample_rate)
        return min(n, self.max_samples) if self.max_samples else n

    def read(self, entry: Entry) -> np.ndarray:
        """The entry's samples, or :class:`AudioError` saying why the file cannot be used."""
        if is_stream_path(entry.path):
            raise AudioError(f"{entry.path}: a named pipe or device, not a regular file (training data is read "
                             "many times)")
        header = audio_duration(entry.path)
        if header is not None:  # refused before decoding where the header tells
            self._check_length(entry, header)
        wav = load_audio(entry.path, self.sample_rate)
        self._check_length(entry, len(wav) / self.sample_rate)
        return wav

    def _check_length(self, entry: Entry, seconds: float) -> None:
        if seconds < self.min_seconds:
            raise AudioError(f"{entry.path}: too short ({seconds:.3f} s < {self.min_seconds:.3f} s)")
        if entry.seconds is not None and seconds > 1.1 * entry.seconds + 1:
            # the batch was sized from the listed duration: a longer file would overrun max_tokens
            raise AudioError(f"{entry.path}: lasts {seconds:.2f} s, its manifest says {entry.seconds:.2f} s")

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        for attempt in range(10):
            i = (index + attempt) % len(self.entries)
            entry = self.entries[i]
            try:
                wav = self.read(entry)
                break
            except (AudioError, OSError) as e:
                log.warning("skipping unreadable audio (using the next entry instead): %s", e)
        else:
            raise AudioError(f"{self.entries.path(index)}: this and the next 9 entries failed to decode")
        if self.max_samples:
            wav = random_crop(wav, self.max_samples, _rng(self.seed, epoch, i, 0))
        return {"index": i, "epoch": epoch, "wav": torch.from_numpy(np.ascontiguousarray(wav)),
                "text": entry.text, "speaker": entry.speaker, "skipped": attempt}


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
    ``indices`` (batch,) long, lists ``texts``, ``speakers``, and ``skipped_files``, the unusable
    files passed over to make the batch (the trainer counts them).

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
                "texts": [it["text"] for it in items], "speakers": [it["speaker"] for it in items],
                "skipped_files": sum(it.get("skipped", 0) for it in items)}


def batch_starts(sizes: np.ndarray, max_tokens: int, max_batch_size: int | None = None,
                 crop_to_shortest: bool = False) -> np.ndarray:
    """Greedy batches over ``sizes`` (in batch order, longest first), as boundaries: batch ``b``
    is items ``starts[b]:starts[b + 1]`` (int64, ``starts[-1] == len(sizes)``). A batch grows while
    its cost stays within ``max_tokens``: ``len * max size`` when padding, ``len * min size`` when
    cropping to the shortest. An item larger than ``max_tokens`` alone makes a batch of one.
    Memory: one int64 per batch (the sizes are read in slices, not as one list of ints)."""
    starts = array("q", [0])
    count, bound = 0, 0  # items and max (padding) or min (cropping) size of the current batch
    for first in range(0, len(sizes), 1 << 16):
        for j, s in enumerate(np.asarray(sizes[first:first + (1 << 16)]).tolist(), first):
            new_bound = s if not count else (min(bound, s) if crop_to_shortest else max(bound, s))
            if count and ((count + 1) * new_bound > max_tokens
                          or (max_batch_size is not None and count >= max_batch_size)):
                starts.append(j)
                count, new_bound = 0, s
            count += 1
            bound = new_bound
    starts.append(len(sizes))
    out = np.frombuffer(starts, np.int64)
    return out if len(sizes) else out[:1]


def make_batches(sizes: Sequence[int], max_tokens: int, order: Sequence[int],
                 max_batch_size: int | None = None, crop_to_shortest: bool = False) -> list[list[int]]:
    """Greedy batches over ``order`` (indices sorted by size, longest first), as lists of indices
    (see :func:`batch_starts`, which says how they are cut)."""
    order = np.asarray(order, dtype=np.int64)
    starts = batch_starts(np.asarray(sizes, dtype=np.int64)[order], max_tokens, max_batch_size, crop_to_shortest)
    return [order[a:b].tolist() for a, b in zip(starts[:-1].tolist(), starts[1:].tolist())]


class BucketBatchSampler(Sampler):
    """Batches of similar lengths up to ``max_tokens`` samples each, reshuffled every epoch.

    Per epoch: items are shuffled with ``(seed, epoch)``, sorted by size (stable, so equal
    sizes stay shuffled), packed greedily into batches, and the batch order is shuffled. With
    ``world_size > 1`` each rank takes every ``world_size``-th batch of the same list (the list is
    cut to a multiple of ``world_size`` so all ranks make the same number of steps).
    Yields lists of ``(index, epoch)`` keys for :class:`AudioDataset`. ``set_epoch(epoch, skip)``
    chooses the epoch and how many of this rank's batches to skip (resuming mid-epoch).

    An epoch's plan is three int64 arrays (the sorted order, batch boundaries, this rank's batch
    numbers), about 16 bytes per item, computed once per epoch; a batch's list is made when it
    is yielded.
    """

    def __init__(self, sizes: Sequence[int], max_tokens: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, max_batch_size: int | None = None,
                 crop_to_shortest: bool = False):
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.max_tokens, self.shuffle, self.seed = max_tokens, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.max_batch_size, self.crop_to_shortest = max_batch_size, crop_to_shortest
        self.epoch, self.skip = 0, 0
        self._plan: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(order, starts, mine)``: batch ``b`` is ``order[starts[b]:starts[b + 1]]``; this
        rank's batches of ``epoch`` are ``mine``, in the order it takes them."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1:]
        n = len(self.sizes)
        order = _rng(self.seed, epoch, 7).permutation(n) if self.shuffle else np.arange(n)
        order = order[np.argsort(-self.sizes[order], kind="stable")]
        starts = batch_starts(self.sizes[order], self.max_tokens, self.max_batch_size, self.crop_to_shortest)
        count = len(starts) - 1
        mine = _rng(self.seed, epoch, 11).permutation(count) if self.shuffle else np.arange(count)
        usable = count - count % self.world_size if self.world_size > 1 else count
        mine = mine[self.rank:usable:self.world_size]
        self._plan = (epoch, order, starts, mine)
        return order, starts, mine

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch`` (indices only)."""
        order, starts, mine = self.plan(epoch)
        return [order[starts[b]:starts[b + 1]].tolist() for b in mine.tolist()]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        order, starts, mine = self.plan(epoch)
        for b in mine[self.skip:].tolist():
            yield [(i, epoch) for i in order[starts[b]:starts[b + 1]].tolist()]

    def __len__(self) -> int:
        return max(0, len(self.plan(self.epoch)[2]) - self.skip)


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

