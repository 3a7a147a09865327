"""Representations for downstream tasks: hidden states of chosen layers, per file.

    files / manifest / arrays
      -> sort by duration, batches of ``batch_size``      (padding handled exactly via ``lengths``)
      -> model(..., output_hidden_states=True, num_layers=max(layers))   (later layers never run)
      -> per file: pool="none": (layers, frames, dim) + frame start times
                   pool="mean": (layers, dim), the mean over the file's valid frames

Layer 0 is the Transformer's input (projected latent frames after the positional convolution
and, for post-LN models, the encoder LayerNorm); layer i is the output of Transformer layer i.
For pre-LN (LARGE-lv60) models the last layer is taken before the encoder's final LayerNorm.

Timing: frame i starts at ``i * frame_shift`` seconds (20 ms for the standard encoder) and its
receptive field covers the next ``receptive_field`` seconds (400 samples = 25 ms), so frame i sees
the audio in [0.02 i, 0.02 i + 0.025) s. Transformer layers mix information from the whole file.

One bad input does not stop the others: its :class:`Embedding` carries ``error`` (a line naming
the input) and no features.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .audio import SAMPLE_RATE, AudioError, list_audio_files, load_audio
from .data import pad_waveforms, padded_length, read_rows
from .model import Wav2Vec2
from .shard import probe_seconds

POOLS = ("mean", "none")


@dataclass
class Item:
    """One input: ``source`` is a path or a float32 (samples,) waveform at 16 kHz."""

    name: str  # for messages and output file names
    source: str | np.ndarray
    key: str  # relative name without extension, unique within one call (output files use it)
    row: dict = field(default_factory=dict)  # the manifest row, if it came from one
    seconds: float | None = None  # duration hint for sorting into batches


@dataclass
class Embedding:
    """Features of one input, or the reason there are none."""

    index: int  # position of the input in the resolved input list
    item: Item
    layers: list[int]
    features: np.ndarray | None = None  # pool="mean": (layers, dim); pool="none": (layers, frames, dim)
    frame_times: np.ndarray | None = None  # pool="none": (frames,) start time of each frame in seconds
    num_frames: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# --------------------------------------------------------------------------- inputs
def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Rows of a manifest (:func:`w2v2.data.read_rows`), each with ``audio``: its ``path``
    resolved against the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such manifest")
    rows = read_rows(path)
    for row in rows:
        row["audio"] = str(path.parent / row["path"])
    return rows


def is_manifest(path: str) -> bool:
    return isinstance(path, str) and path.endswith(".tsv") and os.path.isfile(path)


def resolve_inputs(inputs) -> list[Item]:
    """Paths, directories (searched recursively), ``.tsv`` manifests or waveforms -> items.

    ``inputs`` is one of those or a list mixing them. Keys (used for output file names) are the
    manifest's ``path``, the path relative to a given directory, or a file's name, without the
    extension; ``ValueError`` if two inputs would get the same key."""
    if isinstance(inputs, (str, os.PathLike, np.ndarray, torch.Tensor)):
        inputs = [inputs]
    items: list[Item] = []
    for i, x in enumerate(inputs):
        if isinstance(x, (np.ndarray, torch.Tensor)):
            wav = np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
            items.append(Item(f"<array {i}>", wav, f"array_{i}", seconds=len(wav) / SAMPLE_RATE))
            continue
        x = os.fspath(x)
        if is_manifest(x):
            items.extend(rows_to_items(read_manifest(x)))
        elif os.path.isdir(x):
            for f in list_audio_files([x]):
                items.append(Item(f, f, _strip(os.path.relpath(f, x))))
        else:
            items.append(Item(x, x, _strip(os.path.basename(x))))
    _check_unique(items)
    return items


def rows_to_items(rows: list[dict]) -> list[Item]:
    """Rows of :func:`read_manifest` -> items (the ``seconds`` column, if any, orders batches)."""
    items = []
    for row in rows:
        try:
            seconds = float(row["seconds"]) if row.get("seconds") else None
        except ValueError:
            seconds = None
        items.append(Item(row["audio"], row["audio"], _strip(row["path"]), row, seconds))
    return items


def _strip(relpath: str) -> str:
    """A relative name without extension that stays inside an output directory: absolute paths
    and paths leaving their folder ("../x") keep only the file name."""
    rel = os.path.normpath(relpath)
    if os.path.isabs(rel) or rel.split(os.sep)[0] == os.pardir:
        rel = os.path.basename(rel)
    return os.path.splitext(rel)[0].replace(os.sep, "/")


def _check_unique(items: list[Item]) -> None:
    seen: dict[str, str] = {}
    for it in items:
        if it.key in seen:
            raise ValueError(f"{seen[it.key]} and {it.name} would both be saved as {it.key!r}; "
                             f"pass their common parent directory or a manifest instead")
        seen[it.key] = it.name


# --------------------------------------------------------------------------- layers
def resolve_layers(layers, num_hidden_layers: int) -> list[int]:
    """``"all"`` -> [0, ..., N]; an int or a list of ints (negative counts from the end) -> that list.

    Layer 0 is the Transformer's input, layer N its last output."""
    n = num_hidden_layers
    if isinstance(layers, str):
        if layers == "all":
            return list(range(n + 1))
        layers = [int(s) for s in layers.split(",")]
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        layer = int(layer)
        if not -(n + 1) <= layer <= n:
            raise ValueError(f"layer {layer} out of range: this model has layers 0..{n} (0 = Transformer input)")
        out.append(layer % (n + 1))
    if not out:
        raise ValueError("no layers selected")
    return out


# --------------------------------------------------------------------------- embedding
def embed(model: Wav2Vec2, inputs, *, layers="all", pool: str = "mean", batch_size: int = 8,
          device: str | torch.device | None = None) -> Iterator[Embedding]:
    """Iterate over one :class:`Embedding` per input, in order of increasing duration (see ``.index``).

    ``inputs``: see :func:`resolve_inputs` (or a list of :class:`Item`). ``layers``: ``"all"``,
    an int, or a list (see :func:`resolve_layers`). ``pool``: ``"mean"`` over the valid frames,
    or ``"none"``. Only ``max(layers)`` Transformer layers run. ``device`` moves the model there
    (default: where it is); the model is put in eval mode. Each file is embedded whole (attention
    cost grows with the square of its length: cut hour-long recordings first). Inputs that cannot
    be used come back with ``error`` set. Arguments are checked here, before the first item."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(inputs, list) and inputs and all(isinstance(x, Item) for x in inputs):
        items = inputs
    else:
        items = resolve_inputs(inputs)
    layer_ids = resolve_layers(layers, model.config.num_hidden_layers)
    if device is not None:
        model.to(device)
    model.eval()
    return _embed_all(model, items, layer_ids, pool, batch_size)


def _embed_all(model: Wav2Vec2, items: list[Item], layers: list[int], pool: str,
               batch_size: int) -> Iterator[Embedding]:
    order = sorted(range(len(items)), key=lambda i: item_seconds(items[i]))
    for start in range(0, len(order), batch_size):
        batch = [(i, items[i]) for i in order[start:start + batch_size]]
        yield from _embed_batch(model, batch, layers, pool)


def item_seconds(item: Item) -> float:
    """Its duration: the manifest's, the array's, or from the file's header; 0 when unknown."""
    if item.seconds is not None:
        return item.seconds
    if isinstance(item.source, np.ndarray):
        return len(item.source) / SAMPLE_RATE
    return probe_seconds(item.source)  # 0 when unreadable: it fails when loaded, with a proper message


def _load(item: Item, min_samples: int) -> np.ndarray:
    wav = item.source if isinstance(item.source, np.ndarray) else load_audio(item.source)
    if wav.ndim != 1:
        raise AudioError(f"{item.name}: expected a mono waveform (samples,), got shape {wav.shape}")
    if len(wav) < min_samples:
        raise AudioError(f"{item.name}: {len(wav)} samples at 16 kHz is shorter than one frame "
                         f"({min_samples} samples = {1000 * min_samples / SAMPLE_RATE:g} ms)")
    return wav


def _embed_batch(model: Wav2Vec2, batch: list[tuple[int, Item]], layers: list[int], pool: str) -> list[Embedding]:
    results, wavs = [], []
    for i, item in batch:
        try:
            wavs.append(_load(item, model.config.receptive_field))
            results.append(Embedding(i, item, layers))
        except (AudioError, OSError) as e:
            results.append(Embedding(i, item, layers, error=str(e)))
    if not wavs:
        return results
    hidden, flen = _forward(model, wavs, max(layers))  # (layers+1, batch, frames, dim), (batch,)
    shift = frame_shift(model)
    ok = [r for r in results if r.ok]
    for b, r in enumerate(ok):
        n = int(flen[b])
        h = hidden[layers, b, :n].float()  # (layers, frames, dim)
        r.num_frames = n
        if pool == "mean":
            r.features = h.mean(dim=1).cpu().numpy()
        else:
            r.features = h.cpu().numpy()
            r.frame_times = frame_times(n, shift)
    return results


@torch.inference_mode()
def _forward(model: Wav2Vec2, wavs: list[np.ndarray], num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded batch -> hidden states (num_layers+1, batch, frames, dim) and valid frames (batch,)."""
    x, lengths = pad_waveforms(wavs, padded_length(max(len(w) for w in wavs)))  # (batch, samples), (batch,)
    dev = model.device
    out = model(x.to(dev), lengths.to(dev), output_hidden_states=True, num_layers=num_layers)
    return torch.stack(out.hidden_states), out.lengths.cpu()


def frame_shift(model: Wav2Vec2) -> float:
    """Seconds between frames (0.02 for the standard encoder)."""
    return model.config.frame_stride / model.config.sampling_rate


def receptive_field(model: Wav2Vec2) -> float:
    """Seconds of audio one frame sees (0.025 for the standard encoder)."""
    return model.config.receptive_field / model.config.sampling_rate


def frame_times(num_frames: int, shift: float = 0.02) -> np.ndarray:
    """(frames,) start time in seconds of each frame: frame i covers [i * shift, i * shift + receptive field)."""
    return np.arange(num_frames, dtype=np.float64) * shift
