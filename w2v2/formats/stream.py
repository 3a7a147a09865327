"""Tar shards as a training stream: read in sequence, shuffled in a buffer, batched by length, resumable.

Shards and their catalog (every utterance's key and duration) are :mod:`.shards`. One epoch,
computed from the catalog alone (no audio read) by every process alike::

    shard order   = permutation of the shards by (seed, epoch)
    rank r        takes shards r, r + R, ...;  its stream w (one per DataLoader worker) every W-th of those
    stream        = its shards' utterances in order -> shuffle buffer (``buffer`` utterances, RNG
                    (seed, epoch, rank, stream)) -> pools of ``pool`` -> batches of similar lengths
                    within ``max_tokens`` (w2v2.data.make_batches), in shuffled order
    rank's batches = the streams' batches taken in turn (what DataLoader does with W workers),
                    cut to the smallest rank's number so that every rank makes the same steps

A worker then reads its stream's shards in sequence and decodes each batch once all its members
have arrived. Resuming at batch ``skip`` of an epoch (``factory(epoch, skip)``) is a re-derivation,
not recorded state: the plan is recomputed, each worker starts at its share of the ``skip``
batches, with the workers' turn rotated to where the interrupted run stood, and shards holding
only batches already trained on are not opened (the rest are read from their start, decoding only
what is still to come). The batches are therefore those of an uninterrupted run, given the same
shards, seed, world size and number of workers (which is why they are part of the plan).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..audio import SAMPLE_RATE, AudioError
from ..data import _Loader, _rng, _worker_init, make_batches, random_crop
from .shards import ShardCatalog, ShardError, decode, iter_samples, load_catalog

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 500  # utterances; a worker holds about buffer + pool of them as encoded bytes
POOL = 200  # utterances sorted by length together into batches


# ---------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class StreamOptions:
    """How utterances become batches (what :class:`w2v2.data.BucketBatchSampler` is to entries)."""

    max_tokens: int
    max_samples: int | None = None  # pretraining crops to this; sizes count the cropped length
    max_batch_size: int | None = None
    crop_to_shortest: bool = False
    buffer: int = SHUFFLE_BUFFER
    pool: int = POOL
    seed: int = 0
    sample_rate: int = SAMPLE_RATE


def stream_batches(items: Iterable, size: Callable[[object], int], opts: StreamOptions,
                   rng: np.random.Generator) -> Iterator[list]:
    """Items in -> batches out: a shuffle buffer of ``opts.buffer`` items (each new item takes the
    place of a random one, which moves on), pools of ``opts.pool`` sorted by size into batches
    (:func:`w2v2.data.make_batches`), each pool's batches in random order."""

    def flush(pool: list) -> Iterator[list]:
        sizes = [size(x) for x in pool]
        order = sorted(range(len(pool)), key=lambda i: -sizes[i])
        batches = make_batches(sizes, opts.max_tokens, order, opts.max_batch_size, opts.crop_to_shortest)
        for b in rng.permutation(len(batches)):
            yield [pool[i] for i in batches[b]]

    buffer, pool = [], []
    for item in items:
        if len(buffer) < opts.buffer:
            buffer.append(item)
            continue
        j = int(rng.integers(len(buffer)))
        pool.append(buffer[j])
        buffer[j] = item
        if len(pool) >= opts.pool:
            yield from flush(pool)
            pool = []
    pool += [buffer[i] for i in rng.permutation(len(buffer))]
    for start in range(0, len(pool), opts.pool):
        yield from flush(pool[start:start + opts.pool])


def roundrobin_positions(counts: Sequence[int]) -> list[tuple[int, int]]:
    """(stream, batch) in the order a DataLoader returns its workers' batches: one from each in
    turn, passing over those that have run out."""
    out, depth = [], 0
    while len(out) < sum(counts):
        out += [(w, depth) for w, n in enumerate(counts) if depth < n]
        depth += 1
    return out


class ShardPlan:
    """The batches of every rank and stream of an epoch, from the catalog (see the module's docstring)."""

    def __init__(self, catalog: ShardCatalog, keep: Sequence[np.ndarray], opts: StreamOptions,
                 world_size: int, streams: int):
        if len(catalog.urls) < world_size:
            raise ValueError(f"{len(catalog.urls)} shard(s) cannot feed {world_size} processes: each needs at least "
                             "one; write smaller shards (w2v2 prepare --shard-size)")
        self.catalog, self.keep, self.opts = catalog, [np.asarray(k, dtype=bool) for k in keep], opts
        self.world_size, self.streams = world_size, max(1, streams)
        self._sizes = [self._samples(seconds).tolist() for seconds in catalog.seconds]
        self._cached: tuple[tuple[int, int], tuple[list, int]] | None = None

    def _samples(self, seconds: np.ndarray) -> np.ndarray:
        """Samples of each utterance after the ``max_samples`` crop."""
        n = np.round(np.asarray(seconds, dtype=np.float64) * self.opts.sample_rate).astype(np.int64)
        return np.minimum(n, self.opts.max_samples) if self.opts.max_samples else n

    def size(self, item: tuple[int, int]) -> int:
        return self._sizes[item[0]][item[1]]

    def shards(self, epoch: int, rank: int, stream: int) -> list[int]:
        order = _rng(self.opts.seed, epoch, 3).permutation(len(self.catalog.urls))
        return [int(s) for s in order[rank::self.world_size][stream::self.streams]]

    def stream(self, epoch: int, rank: int, stream: int) -> list[list[tuple[int, int]]]:
        items = ((s, pos) for s in self.shards(epoch, rank, stream) for pos in np.flatnonzero(self.keep[s]).tolist())
        rng = _rng(self.opts.seed, epoch, rank, stream, 5)
        return list(stream_batches(items, self.size, self.opts, rng))

    def rank_epoch(self, epoch: int, rank: int) -> tuple[list[list[list[tuple[int, int]]]], int]:
        """(the rank's batches per stream, the batches every rank makes: the fewest any rank has).
        Every rank's plan is computed to count it, one rank at a time; the last answer is kept."""
        if self._cached is None or self._cached[0] != (epoch, rank):
            mine, counts = None, []
            for r in range(self.world_size):
                streams = [self.stream(epoch, r, w) for w in range(self.streams)]
                counts.append(sum(len(b) for b in streams))
                mine = streams if r == rank else mine
            self._cached = ((epoch, rank), (mine, min(counts)))
        return self._cached[1]


# ---------------------------------------------------------------------------- the dataset


def _as_is(batch):
    return batch


class ShardStream(IterableDataset):
    """One rank's batches of one epoch, minus the first ``skip``, as collated batch dicts.

    With W DataLoader workers, worker k runs stream ``(rotation + k) % W``, yielding its batches
    ``start[stream]:stop[stream]``; the DataLoader's turn-taking then returns them in the plan's
    order (see the module's docstring)."""

    def __init__(self, plan: ShardPlan, epoch: int, rank: int, skip: int, collate: Callable[[list[dict]], dict]):
        self.plan, self.epoch, self.rank, self.collate = plan, epoch, rank, collate
        streams, total = plan.rank_epoch(epoch, rank)
        order = roundrobin_positions([len(b) for b in streams])[:total]
        skip = min(skip, total)
        self.start = [sum(1 for w, _ in order[:skip] if w == s) for s in range(plan.streams)]
        self.stop = [sum(1 for w, _ in order if w == s) for s in range(plan.streams)]
        self.rotation = order[skip][0] if skip < total else 0
        self.batches = [b[self.start[s]:self.stop[s]] for s, b in enumerate(streams)]
        self.length = total - skip

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        stream = (self.rotation + worker) % self.plan.streams
        if info is None and self.plan.streams > 1:
            raise RuntimeError("a plan with several streams needs as many DataLoader workers")
        try:
            yield from self._run(stream)
        except (ShardError, AudioError) as e:  # handed over as data: see _OneLineErrors
            yield _Failed(e)

    def _run(self, stream: int) -> Iterator[dict]:
        batches = self.batches[stream]
        wanted = {item: b for b, batch in enumerate(batches) for item in batch}
        waiting = [len(batch) for batch in batches]
        per_shard: dict[int, int] = {}
        for s, _ in wanted:
            per_shard[s] = per_shard.get(s, 0) + 1
        held: dict[tuple[int, int], tuple[str, dict]] = {}
        done = 0
        catalog = self.plan.catalog
        for s in self.plan.shards(self.epoch, self.rank, stream):
            if not per_shard.get(s):
                continue  # nothing still to train on in this shard (resumed past it)
            url = catalog.urls[s]
            for pos, (key, sample) in enumerate(iter_samples(url)):
                if pos >= len(catalog.keys[s]) or catalog.keys[s][pos] != key:
                    raise ShardError(f"{url}: member {pos} is {key!r}, the catalog says "
                                     f"{catalog.keys[s][pos] if pos < len(catalog.keys[s]) else 'nothing'}; "
                                     "the shard changed since it was indexed (rerun w2v2 prepare)")
                if (s, pos) not in wanted:
                    continue
                held[(s, pos)] = (key, sample)
                waiting[wanted[(s, pos)]] -= 1
                per_shard[s] -= 1
                while done < len(batches) and waiting[done] == 0:
                    yield self._batch(batches[done], held)
                    done += 1
                if not per_shard[s]:
                    break
            if per_shard[s]:
                raise ShardError(f"{url}: ends before utterance {catalog.keys[s][-1]!r} of its catalog; it is truncated "
                                 "or changed since it was indexed (rerun w2v2 prepare)")
        if done < len(batches):
            raise ShardError(f"{len(batches) - done} batch(es) of epoch {self.epoch} never completed: "
                             "a shard holds fewer utterances than its catalog says")

    def _batch(self, batch: list[tuple[int, int]], held: dict) -> dict:
        catalog, opts = self.plan.catalog, self.plan.opts
        items, failed = [], []
        for s, pos in batch:
            key, sample = held.pop((s, pos))
            index = int(catalog.offsets[s]) + pos
            try:
                wav = decode(catalog.urls[s], key, sample, opts.sample_rate)
            except AudioError as e:
                log.warning("skipping unreadable audio in a shard: %s", e)
                failed.append(str(e))
                continue
            if opts.max_samples:
                wav = random_crop(wav, opts.max_samples, _rng(opts.seed, self.epoch, index, 0))
            items.append({"index": index, "epoch": self.epoch, "wav": torch.from_numpy(np.ascontiguousarray(wav)),
                          "text": catalog.texts[s][pos], "speaker": catalog.speakers[s][pos]})
        if not items:
            raise AudioError(f"every utterance of a batch failed to decode, e.g. {failed[0]}")
        return self.collate(items)


def make_shard_loader_factory(plan: ShardPlan, collate: Callable[[list[dict]], dict], rank: int = 0,
                              num_workers: int = 0) -> Callable[[int, int], Iterable]:
    """``factory(epoch, skip) -> DataLoader`` over the rank's shard batches (the trainer's contract,
    as :func:`w2v2.data.make_loader_factory`); ``num_workers`` must be the plan's stream count."""
    if max(1, num_workers) != plan.streams:
        raise ValueError(f"the plan has {plan.streams} streams, the loader {num_workers} workers")

    def factory(epoch: int, skip: int = 0):
        dataset = ShardStream(plan, epoch, rank, skip, collate)
        return _OneLineErrors(_Loader(dataset, batch_size=None, collate_fn=_as_is, num_workers=num_workers,
                       worker_init_fn=_worker_init if num_workers else None, persistent_workers=False,
                       prefetch_factor=2 if num_workers else None,
                       generator=torch.Generator().manual_seed(plan.opts.seed + epoch)))  # not the global RNG

    return factory


@dataclass
class _Failed:
    error: Exception


class _OneLineErrors:
    """A loader that raises a worker's shard or audio error as it was raised, in one line.

    The worker hands the error over as an item (:class:`_Failed`) rather than raising it: a
    DataLoader re-raises a worker's exception with the worker's traceback in its message, and its
    traceback keeps the loader's iterator alive in a reference cycle, whose workers (which ignore
    SIGTERM, see ``w2v2.data._worker_init``) then block the interpreter's exit."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        batches = iter(self.loader)
        for batch in batches:
            if isinstance(batch, _Failed):
                error = batch.error
                break
            yield batch
        else:
            return
        del batches  # the workers stop here
        raise error


def shard_loader(inputs_or_catalog, opts: StreamOptions, collate, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, keep: Sequence[np.ndarray] | None = None):
    """(catalog, factory) for training on shards; ``keep``: per shard, which utterances to use."""
    catalog = inputs_or_catalog if isinstance(inputs_or_catalog, ShardCatalog) else load_catalog(inputs_or_catalog)
    keep = keep if keep is not None else [np.ones(len(k), dtype=bool) for k in catalog.keys]
    plan = ShardPlan(catalog, keep, opts, world_size, num_workers)
    return catalog, make_shard_loader_factory(plan, collate, rank, num_workers)
