"""Speech regions of long audio (Silero VAD), so that transcription runs the model on speech only.

    for region in speech_regions(audio_blocks("talk.flac", 30.0), load_vad()):
        region.start, region.audio          # first sample in the recording, float32 (samples,)

The detector scores every 32 ms window of the stream (Silero's window at 16 kHz) with a
speech probability, and a region runs from a window above ``THRESHOLD`` until the probability
has stayed below ``NEG_THRESHOLD`` for ``MIN_SILENCE_SECONDS`` (Silero's own hysteresis, run
as a stream: nothing per window is kept). Each region keeps ``PAD_SECONDS`` of audio on both
sides and starts on the model's frame grid, so its frames are frames of the recording.
A region longer than ``MAX_REGION_SECONDS`` is cut at its longest inner pause (or, with none,
where it reaches the limit): the audio held is at most that much, whatever the recording.

:class:`RegionSplit` turns a stream of ``(key, audio)`` inputs into one of ``(part, region)``
inputs for :func:`w2v2.emissions.compute_emissions` and gathers the parts' results back per
input, in input order; ``Transcriber`` decodes each region and maps its times back.

Needs the optional ``silero-vad`` package (``pip install 'w2v2[vad]'``), whose wheel holds the
model: nothing is downloaded.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .audio import SAMPLE_RATE
from .emissions import audio_blocks

WINDOW = 512  # samples Silero scores at a time at 16 kHz (32 ms)
THRESHOLD = 0.5  # Silero's default: a window above starts (or continues) speech
NEG_THRESHOLD = 0.35  # Silero's default (THRESHOLD - 0.15): only below this is it a pause
MIN_SILENCE_SECONDS = 0.5  # a pause at least this long ends a region: a breath between phrases, not a hesitation
MIN_SPEECH_SECONDS = 0.25  # shorter bursts (a click, a breath) are no region: shorter than any word said alone
PAD_SECONDS = 0.3  # audio kept on each side: soft onsets and fading ends, and the lead-in the model was trained on
MAX_REGION_SECONDS = 300.0  # bounds the audio held (19 MB of float32); longer regions are cut at a pause

assert MIN_SILENCE_SECONDS >= PAD_SECONDS  # a region's right pad has been read when its end is known


def load_vad():
    """Silero VAD's model, run by onnxruntime (the wheel ships it); ImportError in one line when
    the extra is missing."""
    threads = torch.get_num_threads()
    try:
        import onnxruntime  # noqa: F401
        from silero_vad import load_silero_vad
    except ImportError:
        raise ImportError("--vad needs the silero-vad and onnxruntime packages: pip install 'w2v2[vad]'") from None
    finally:
        torch.set_num_threads(threads)  # importing silero_vad sets torch to one thread for the whole process
    with warnings.catch_warnings():  # its loader uses importlib.resources.path, deprecated: not the user's concern
        warnings.simplefilter("ignore", DeprecationWarning)
        return load_silero_vad(onnx=True)


@dataclass
class Region:
    start: int  # first sample in the recording (a multiple of the model's frame stride)
    audio: np.ndarray  # float32 (samples,)

    @property
    def end(self) -> int:
        return self.start + len(self.audio)


def speech_regions(blocks: Iterable[np.ndarray], vad, frame_stride: int = 320,
                   lengths: list[int] | None = None) -> Iterator[Region]:
    """The speech regions of a stream of 1-D float32 blocks at 16 kHz, in order (see the module
    docstring). ``lengths``, when given, gets the recording's length in samples appended at the end."""
    vad.reset_states()
    pad = round(PAD_SECONDS * SAMPLE_RATE)
    min_silence, min_speech = round(MIN_SILENCE_SECONDS * SAMPLE_RATE), round(MIN_SPEECH_SECONDS * SAMPLE_RATE)
    max_region = round(MAX_REGION_SECONDS * SAMPLE_RATE)
    held: deque[np.ndarray] = deque()  # the windows' samples from sample held_from on: the region and its left pad
    held_from = 0
    read = 0  # samples read (and scored) so far
    start = None  # first speech sample of the region in progress
    pause = None  # first sample of the pause in progress within the region
    longest = (0, 0)  # (length, middle sample) of the region's longest pause that speech followed
    last_end = 0  # end of the previous region: a left pad stops there

    def cut(a: int, b: int) -> Region:
        nonlocal last_end
        a, last_end = max(a - pad, last_end) // frame_stride * frame_stride, min(b + pad, read)
        return Region(a, np.concatenate(held)[a - held_from : last_end - held_from])

    for window, samples in _windows(blocks):
        p = float(vad(torch.from_numpy(window), SAMPLE_RATE))
        held.append(window[:samples])
        at, read = read, read + samples
        if p >= THRESHOLD:
            if start is None:
                start = at
            elif pause is not None and at - pause > longest[0]:
                longest = (at - pause, (pause + at) // 2)
            pause = None
        elif p < NEG_THRESHOLD and start is not None:
            pause = at if pause is None else pause
            if read - pause >= min_silence:
                if pause - start >= min_speech:
                    yield cut(start, pause)
                start, pause, longest = None, None, (0, 0)
        if start is not None and read - start >= max_region:
            end = longest[1] if longest[0] else read
            yield cut(start, end)
            start, pause, longest = end, None, (0, 0)
        keep_from = (read if start is None else start) - pad - frame_stride  # what a region may still need
        while held and held_from + len(held[0]) <= keep_from:
            held_from += len(held.popleft())
    if start is not None:
        end = read if pause is None else pause
        if end - start >= min_speech:
            yield cut(start, end)
    if lengths is not None:
        lengths.append(read)


def _windows(blocks: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, int]]:
    """(window of WINDOW samples, how many of them are the recording's): the last one zero-padded."""
    rest = np.zeros(0, dtype=np.float32)
    for block in blocks:
        rest = np.concatenate([rest, np.asarray(block, dtype=np.float32)])
        n = len(rest) // WINDOW * WINDOW
        for i in range(0, n, WINDOW):
            yield rest[i : i + WINDOW], WINDOW
        rest = rest[n:]
    if len(rest):
        yield np.pad(rest, (0, WINDOW - len(rest))), len(rest)


# --------------------------------------------------------------------------- many inputs
@dataclass
class _Input:
    key: object
    results: list[tuple[int, object]] = field(default_factory=list)  # (first sample of a region, its result)
    sent: int = 0  # regions handed out
    samples: int = 0  # the recording's length, once read
    error: BaseException | None = None  # why the input could not be read
    done_reading: bool = False


@dataclass(frozen=True, eq=False)
class Part:
    """The key of one region in the stream of :meth:`RegionSplit.sources`."""

    input: _Input
    start: int  # first sample of the region in its recording
    samples: int

    @property
    def key(self) -> object:
        return self.input.key


class RegionSplit:
    """``(key, audio)`` inputs -> ``(Part, region audio)`` parts, and the parts' results back per input.

    :meth:`sources` reads the inputs one after the other, as it is iterated; :meth:`add` records
    a part's result; :meth:`finished` yields, in input order, every input read to its end whose
    parts all have results: ``(key, [(first sample, result) per region], samples, error)``.
    An input without speech has no parts: it is finished as soon as it is read.
    """

    def __init__(self, inputs: Iterable[tuple[object, object]], vad, frame_stride: int, block_seconds: float):
        self._inputs, self._vad = inputs, vad
        self._frame_stride, self._block_seconds = frame_stride, block_seconds
        self._open: list[_Input] = []

    def sources(self) -> Iterator[tuple[Part, np.ndarray]]:
        for key, audio in self._inputs:
            item = _Input(key)
            self._open.append(item)
            lengths: list[int] = []
            try:
                blocks = audio_blocks(audio, block_seconds=self._block_seconds)
                for region in speech_regions(blocks, self._vad, self._frame_stride, lengths):
                    item.sent += 1
                    yield Part(item, region.start, len(region.audio)), region.audio
            except Exception as e:  # one bad input: report it, go on with the next
                item.error = e
            item.samples = lengths[0] if lengths else 0
            item.done_reading = True

    def add(self, part: Part, result: object) -> None:
        part.input.results.append((part.start, result))

    def finished(self) -> Iterator[tuple[object, list[tuple[int, object]], int, BaseException | None]]:
        while self._open and self._open[0].done_reading and len(self._open[0].results) == self._open[0].sent:
            item = self._open.pop(0)
            yield item.key, item.results, item.samples, item.error
