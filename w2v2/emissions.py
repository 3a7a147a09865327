"""CTC emissions of whole files of any length: overlapping chunks, batched, stitched per frame.

A file is decoded incrementally (``audio.stream_audio``) and cut into chunks of ``chunk``
samples that overlap by ``2 * stride`` samples; chunk ``k`` starts at sample ``k * step``
with ``step = chunk - 2 * stride``. Chunk, stride and step are whole numbers of frames
(``config.frame_stride`` = 320 samples = 20 ms), so frame ``j`` of chunk ``k`` *is* frame
``k * step / 320 + j`` of the file: every output frame lines up with a single-pass frame.
Each chunk keeps the frames of its central part and drops the ``stride`` on each side
(none at the start of the file, none at its end), so every file frame comes from the chunk
where it has at least ``stride`` of context on both sides::

    file    |------------------------------------------------|
    chunk 0 |kkkkkkkkkkkkkkkk.ssss|                              k: kept, s: dropped stride
    chunk 1            |ssss.kkkkkkkkkkkk.ssss|
    chunk 2                         |ssss.kkkkkkkkkkkkkkkkkkk|   (last: kept to the end)

Audio that fits in one chunk is run in a single pass. Chunks of many files are batched
together with ``lengths``; only the per-frame results a decoder needs are kept (see
:class:`Emissions`), never the whole waveform or the raw logits of a file.

The stitched emission equals a single pass exactly for a model whose frames see a bounded
window (the feature encoder and positional convolution) when the stride covers that window;
self-attention, the feature encoder's group norm (BASE) and the input normalisation see
the whole chunk, so for full models the stride trades compute for agreement (see
``docs/transcribe.md``).

:func:`utterance_logits` is the one path without chunks: raw logits of whole utterances in
padded batches, for fine-tuning's validation loss.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .audio import SAMPLE_RATE, AudioError, stream_audio
from .config import ModelConfig
from .data import make_batches, pad_waveforms, padded_length
from .model import Wav2Vec2
from .modules import conv_output_lengths
from .precision import precision_context


# --------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class ChunkPlan:
    """Chunk geometry in samples, every value a multiple of ``frame_stride``."""

    chunk: int  # samples per chunk
    stride: int  # samples of context dropped on each side of a chunk
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)  # the feature encoder's, for frame counts
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)

    @property
    def frame_stride(self) -> int:
        return math.prod(self.conv_stride)

    @property
    def step(self) -> int:
        return self.chunk - 2 * self.stride

    def frames(self, samples: int) -> int:
        """Frames the feature encoder makes of ``samples`` samples (0 when shorter than one frame)."""
        return conv_output_lengths(samples, self.conv_kernel, self.conv_stride)


def plan_chunks(chunk_seconds: float, stride_seconds: float, config: ModelConfig | None = None) -> ChunkPlan:
    """Chunk geometry for a model's feature encoder (the standard one when ``config`` is None).

    Chunk and stride are rounded to whole frames; the stride is at least the frames one
    frame's receptive field spills over (1 frame for the standard encoder), without which a
    frame at a chunk boundary would be missing.
    """
    config = config or ModelConfig()
    frame_stride, receptive_field, sample_rate = config.frame_stride, config.receptive_field, config.sampling_rate
    chunk = round(chunk_seconds * sample_rate / frame_stride) * frame_stride
    min_stride = max(1, math.ceil((receptive_field - frame_stride) / frame_stride)) * frame_stride
    stride = max(round(stride_seconds * sample_rate / frame_stride) * frame_stride, min_stride)
    if chunk - 2 * stride < frame_stride:
        raise ValueError(
            f"chunk_seconds ({chunk_seconds}) must be longer than twice stride_seconds ({stride_seconds}) "
            f"by at least one frame ({frame_stride / sample_rate * 1000:g} ms)"
        )
    plan = ChunkPlan(chunk, stride, config.conv_kernel, config.conv_stride)
    if plan.frames(chunk) < (chunk - stride) // frame_stride:  # an encoder whose frames see far ahead
        raise ValueError(f"stride_seconds ({stride_seconds}) is too short for this model's receptive field "
                         f"({receptive_field} samples)")
    return plan


@dataclass
class Chunk:
    """One piece of a file for the model; ``keep`` are the frames of its output that the file keeps."""

    start: int  # first sample in the file (a multiple of frame_stride)
    audio: np.ndarray  # float32 (samples,)
    keep_start: int  # first kept frame of this chunk's output
    keep_end: int  # one past the last kept frame
    last: bool  # the file's final chunk


def iter_chunks(blocks: Iterable[np.ndarray], plan: ChunkPlan) -> Iterator[Chunk]:
    """Cut a stream of 1-D sample blocks into overlapping chunks (see the module docstring).

    Holds at most one chunk plus one block of samples. A chunk is known not to be the last
    once a sample beyond it has arrived; whatever remains at the end is the last chunk.
    """
    buf = np.zeros(0, dtype=np.float32)
    buf_start = 0  # file index of buf[0]
    k = 0
    left = plan.stride // plan.frame_stride  # frames dropped on the left of every chunk but the first
    right_end = (plan.chunk - plan.stride) // plan.frame_stride
    for block in blocks:
        buf = np.concatenate([buf, np.asarray(block, dtype=np.float32)])
        while len(buf) - (k * plan.step - buf_start) > plan.chunk:
            a = k * plan.step - buf_start
            yield Chunk(k * plan.step, buf[a : a + plan.chunk].copy(), left if k else 0, right_end, last=False)
            k += 1
            drop = k * plan.step - buf_start
            buf, buf_start = buf[drop:], buf_start + drop
    rest = buf[k * plan.step - buf_start :].copy()
    yield Chunk(k * plan.step, rest, left if k else 0, plan.frames(len(rest)), last=True)


# --------------------------------------------------------------------------- per-file results
class Emissions:
    """The stitched per-frame results of one file, appended chunk by chunk.

    Always kept: the best token per frame (int16) and its log-probability (float32), which
    is all greedy decoding needs: 6 bytes per frame, 1.1 MB per hour of audio. With
    ``keep_log_probs`` (beam search, forced alignment) also every log-probability as float16:
    2 bytes × vocabulary per frame, 11.5 MB per hour for a 32-token vocabulary.
    """

    def __init__(self, keep_log_probs: bool = False):
        self.keep_log_probs = keep_log_probs
        self._best_ids: list[torch.Tensor] = []
        self._best: list[torch.Tensor] = []
        self._log_probs: list[torch.Tensor] = []
        self.samples = 0  # file length, known once the last chunk was added
        self.frames = 0

    def add(self, log_probs: torch.Tensor) -> None:
        """log_probs: (frames, vocab) float32 of kept frames, in file order."""
        best, ids = log_probs.max(-1)
        self._best_ids.append(ids.to(torch.int16).cpu())
        self._best.append(best.float().cpu())
        if self.keep_log_probs:
            self._log_probs.append(log_probs.to(torch.float16).cpu())
        self.frames += log_probs.shape[0]

    @property
    def best_ids(self) -> torch.Tensor:
        """(frames,) int64 id of the best token per frame (the greedy path, before collapsing)."""
        return torch.cat(self._best_ids).long() if self._best_ids else torch.zeros(0, dtype=torch.long)

    @property
    def best_log_prob(self) -> torch.Tensor:
        """(frames,) float32 log-probability of the best token."""
        return torch.cat(self._best) if self._best else torch.zeros(0)

    def log_probs(self) -> torch.Tensor:
        """(frames, vocab) float32 log-probabilities (needs ``keep_log_probs``)."""
        if not self.keep_log_probs:
            raise ValueError("these emissions were computed without keep_log_probs=True")
        if not self._log_probs:
            return torch.zeros(0, 0)
        return torch.cat(self._log_probs).float()

    @property
    def duration(self) -> float:
        return self.samples / SAMPLE_RATE


# --------------------------------------------------------------------------- batched inference
AudioInput = str | os.PathLike | np.ndarray | torch.Tensor


def audio_blocks(source: AudioInput, block_seconds: float) -> Iterator[np.ndarray]:
    """Blocks of float32 mono samples at 16 kHz: a file path (or ``"-"``) is streamed;
    an array (samples,) already at 16 kHz is one block."""
    if isinstance(source, (np.ndarray, torch.Tensor)):
        audio = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else source
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"audio must be (samples,) mono at 16 kHz, got shape {audio.shape}")
        if not np.isfinite(audio).all():
            raise AudioError("<array>: contains NaN or infinite samples")
        return iter([audio])
    return stream_audio(source, block_seconds=block_seconds)


@dataclass
class _Job:
    state: "_FileState"  # the file the chunk belongs to
    chunk: Chunk


@dataclass
class _FileState:
    key: object
    emissions: Emissions
    error: BaseException | None = None  # why the input could not be read
    pending: int = 0  # chunks sent to the model, not yet back
    done_reading: bool = False


def compute_emissions(
    model: Wav2Vec2,
    sources: Iterable[tuple[object, AudioInput]],
    plan: ChunkPlan,
    *,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    keep_log_probs: bool = False,
    on_chunk: Callable[[object, float], None] | None = None,
) -> Iterator[tuple[object, Emissions | BaseException]]:
    """Stitched emissions for every ``(key, audio)`` of ``sources``, yielded in order as
    ``(key, Emissions)``, or ``(key, exception)`` for an input that could not be read
    (the others go on). ``on_chunk(key, seconds)`` reports progress after each batch, in
    seconds of audio. Errors of the model itself (out of memory, say) are raised.

    Chunks of consecutive files share batches of at most ``batch_size`` full chunks' worth of
    padded samples: ``batch_size`` chunks of long audio, or more of short files (memory stays
    that of ``batch_size`` chunks). A batch is padded to one of few lengths
    (:func:`w2v2.data.padded_length`, at most one chunk), so runs over many files of varied
    length meet few distinct shapes. Padding is exact (``lengths``): a file's emissions depend
    on its batch neighbours only by float rounding.
    """
    device = torch.device(device)
    budget = batch_size * plan.chunk  # padded samples per forward pass
    states: list[_FileState] = []  # files with chunks in flight, in input order
    batch: list[_Job] = []

    def finished() -> Iterator[tuple[object, Emissions | BaseException]]:
        while states and states[0].done_reading and states[0].pending == 0:
            st = states.pop(0)
            yield st.key, (st.error if st.error is not None else st.emissions)

    for key, source in sources:
        state = _FileState(key, Emissions(keep_log_probs))
        states.append(state)
        for chunk in _read_chunks(state, source, plan):
            if chunk.last:
                state.emissions.samples = chunk.start + len(chunk.audio)
            if chunk.keep_end <= chunk.keep_start:  # shorter than one frame: nothing to run
                continue
            job = _Job(state, chunk)
            if batch and _padded_samples([*batch, job], plan) > budget:
                _run_batch(model, batch, plan, device, precision, on_chunk)
                batch = []
                yield from finished()
            batch.append(job)
            state.pending += 1
            if _padded_samples(batch, plan) >= budget:
                _run_batch(model, batch, plan, device, precision, on_chunk)
                batch = []
                yield from finished()
        state.done_reading = True
        yield from finished()
    if batch:
        _run_batch(model, batch, plan, device, precision, on_chunk)
    yield from finished()


def _padded_width(jobs: list[_Job], plan: ChunkPlan) -> int:
    """Samples per row of the padded batch: the longest chunk rounded up to a bucket, at most a chunk."""
    return min(padded_length(max(len(j.chunk.audio) for j in jobs)), plan.chunk)


def _padded_samples(jobs: list[_Job], plan: ChunkPlan) -> int:
    return len(jobs) * _padded_width(jobs, plan)


def _read_chunks(state: _FileState, source: AudioInput, plan: ChunkPlan) -> Iterator[Chunk]:
    """The chunks of one input; a failure to read it ends them and is kept in ``state.error``."""
    try:
        yield from iter_chunks(audio_blocks(source, block_seconds=plan.chunk / SAMPLE_RATE), plan)
    except Exception as e:  # one bad input: report it, go on with the next
        state.error = e


def _run_batch(model: Wav2Vec2, batch: list[_Job], plan: ChunkPlan, device: torch.device, precision: str,
               on_chunk: Callable[[object, float], None] | None) -> None:
    """Run the model on a batch of chunks (zero-padded, with lengths); append kept frames."""
    wav, lengths = pad_waveforms([job.chunk.audio for job in batch], _padded_width(batch, plan))  # (batch, samples)
    with torch.inference_mode(), precision_context(model, precision):
        out = model(wav.to(device), lengths.to(device))
    log_probs = out.logits.float().log_softmax(-1)  # (batch, frames, vocab)
    for i, job in enumerate(batch):
        state, chunk = job.state, job.chunk
        state.pending -= 1
        if state.error is None:
            state.emissions.add(log_probs[i, chunk.keep_start : chunk.keep_end])
        if on_chunk is not None:
            kept = (chunk.keep_end - chunk.keep_start) * model.config.frame_stride
            on_chunk(state.key, kept / SAMPLE_RATE)
    del out, log_probs, wav
    release_free_memory()


# --------------------------------------------------------------------------- whole utterances
def utterance_logits(model: Wav2Vec2, waveforms: Sequence[np.ndarray], max_samples: int) -> list[torch.Tensor]:
    """(frames, vocab) float32 logits on the CPU of each whole waveform (samples,), in input order.

    No chunking: padded batches of similar length (longest first, items × longest
    <= ``max_samples``), in eval mode on the model's device and precision. For fine-tuning's
    validation, whose CTC loss needs the raw logits of whole training-length utterances;
    accuracy figures of a finished model come from ``evaluate``, which runs the transcriber.
    """
    lengths = [len(w) for w in waveforms]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[torch.Tensor | None] = [None] * len(waveforms)
    for batch in make_batches(lengths, max_samples, order):
        wav, lens = pad_waveforms([waveforms[i] for i in batch])  # (batch, samples), (batch,)
        res = model.infer(wav.to(model.device), lens.to(model.device))
        logits = res.logits.float().cpu()  # (batch, frames, vocab)
        for row, i in enumerate(batch):
            out[i] = logits[row, : int(res.lengths[row])]
    return out  # type: ignore[return-value]


def release_free_memory() -> None:
    """Give the pages of freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    glibc raises its mmap threshold after each large free, so a chunk's activations of a few
    MB soon come from the heap, whose fragments grow from chunk to chunk: without this, peak
    memory creeps up with the length of the file (docs/performance.md has the measurement).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
