"""Transcription and forced alignment of whole files: model -> emissions -> decoding -> result dict.

    result = transcribe(model, "talk.mp4", TranscribeOptions(lm="words.arpa"))
    result["text"], result["segments"][0]["words"][0]["chars"]

Audio of any length is read incrementally and run in overlapping chunks (``emissions.py``);
the decoder sees the stitched per-frame results. Greedy decoding is the default; an n-gram
LM (``lm``) or a ``beam_width`` selects beam search. The result is the dict ``writers.py``
documents, with word and character timestamps (20 ms frames) and word confidences; its
``metadata`` records the model and every option used.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from . import __version__
from .decoding import BeamSearchDecoder, DecodedText, align_text, greedy_decode_path, join_decoded, segment_words
from .emissions import AudioInput, Emissions, compute_emissions, plan_chunks
from .model import Wav2Vec2
from .onnx import for_precision, graph_precision
from .precision import check_precision, resolve_device, resolve_precision
from .vad import RegionSplit, load_vad

BEAM_WINDOW_SECONDS = 30.0  # beam search and its alignment run on windows of at most this


@dataclass(frozen=True)
class TranscribeOptions:
    """How to run the model and decode; every field lands in the result's metadata.

    ``beam_width=None`` and no ``lm``: greedy decoding. An ``lm`` (ARPA or KenLM binary) or a
    ``beam_width`` selects beam search (width 100 unless given). ``batch_size``: a forward
    pass holds the padded samples of at most this many full chunks (that many chunks of long
    audio, more short files); None: 1 on CPU (peak memory: one 30 s chunk of BASE needs ~0.5 GB),
    8 on a GPU. ``device=None``:
    CUDA when available. ``precision``: ``auto`` (bf16 where the hardware multiplies it natively:
    CUDA GPUs with bf16, CPUs with AVX512-BF16 or AMX; else fp32), ``fp32``, ``bf16`` or ``int8``
    (through onnxruntime: :func:`w2v2.onnx.for_precision`). ``vad``: run the model on the speech
    regions Silero VAD finds (``w2v2.vad``; needs ``w2v2[vad]``) instead of the whole recording.
    """

    chunk_seconds: float = 30.0
    stride_seconds: float = 5.0
    batch_size: int | None = None
    device: str | None = None
    precision: str = "auto"
    lm: str | None = None
    alpha: float = 0.5
    beta: float = 1.0
    beam_width: int | None = None
    max_segment_chars: int = 80
    max_segment_seconds: float = 10.0
    pause_seconds: float = 0.5
    vad: bool = False

    def __post_init__(self) -> None:
        numbers = {"chunk_seconds": self.chunk_seconds, "stride_seconds": self.stride_seconds, "alpha": self.alpha,
                   "beta": self.beta, "max_segment_seconds": self.max_segment_seconds,
                   "pause_seconds": self.pause_seconds}
        odd = [f"{k}={v}" for k, v in numbers.items() if not math.isfinite(v)]
        if odd:
            raise ValueError(f"options must be finite numbers, got {', '.join(odd)}")
        if self.chunk_seconds <= 0 or self.stride_seconds < 0:
            raise ValueError(f"chunk_seconds must be positive and stride_seconds non-negative, got "
                             f"{self.chunk_seconds} and {self.stride_seconds}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.beam_width is not None and self.beam_width < 1:
            raise ValueError(f"beam_width must be at least 1, got {self.beam_width}")
        check_precision(self.precision)
        if self.max_segment_chars < 1 or self.max_segment_seconds <= 0 or self.pause_seconds < 0:
            raise ValueError("max_segment_chars, max_segment_seconds must be positive and pause_seconds non-negative")
        if self.lm is not None and not os.path.isfile(self.lm):
            raise ValueError(f"language model {self.lm}: no such file (build one with: w2v2 lm TEXT OUT.arpa)")

    @property
    def decoder(self) -> str:
        return "beam" if self.lm is not None or self.beam_width is not None else "greedy"


class Transcriber:
    """A model with resolved options (device, precision, batch size) and, for beam search,
    its decoder (the LM loads once). ``transcribe``/``align`` and the CLI are built on it."""

    def __init__(self, model: Wav2Vec2, options: TranscribeOptions = TranscribeOptions(),
                 model_name: str | None = None):
        if model.lm_head is None or model.vocab is None:
            raise ValueError("this model has no CTC head and vocabulary; transcription needs a fine-tuned model")
        device = resolve_device(options.device)
        precision = resolve_precision(device, options.precision)
        model = for_precision(model, precision).to(device).eval()  # int8: onnxruntime
        options = dataclasses.replace(
            options,
            device=str(device),
            precision=graph_precision(model, precision),  # what runs: an ONNX graph has no bf16
            batch_size=options.batch_size or (8 if device.type == "cuda" else 1),
        )
        self.model = model
        self.options = options
        self.model_name = model_name
        self.plan = plan_chunks(options.chunk_seconds, options.stride_seconds, model.config)
        self.frame_seconds = model.config.frame_stride / model.config.sampling_rate
        self._vad = load_vad() if options.vad else None
        self._beam = None
        if options.decoder == "beam":
            self._beam = BeamSearchDecoder(model.vocab, options.lm, options.alpha, options.beta,
                                           options.beam_width or 100, frame_seconds=self.frame_seconds)

    # ------------------------------------------------------------------ emissions
    def emissions(self, inputs: Iterable[tuple[object, AudioInput]], keep_log_probs: bool,
                  on_progress: Callable[[object, float], None] | None = None
                  ) -> Iterator[tuple[object, Emissions | BaseException]]:
        return compute_emissions(
            self.model, inputs, self.plan, batch_size=self.options.batch_size, device=self.options.device,
            precision=self.options.precision, keep_log_probs=keep_log_probs, on_chunk=on_progress,
        )

    # ------------------------------------------------------------------ transcription
    def transcribe_many(self, inputs: Iterable[tuple[object, AudioInput]],
                        on_progress: Callable[[object, float], None] | None = None
                        ) -> Iterator[tuple[object, dict | BaseException]]:
        """``(key, result)`` for every ``(key, audio)``, in order; ``(key, exception)`` for an
        input that failed (the others go on)."""
        if self._vad is not None:
            yield from self._transcribe_speech(inputs, on_progress)
            return
        for key, em in self.emissions(inputs, keep_log_probs=self._beam is not None, on_progress=on_progress):
            if isinstance(em, BaseException):
                yield key, em
                continue
            try:
                result = self.result(self.decode(em), em, task="transcribe")
            except Exception as e:  # e.g. a decoding failure: this input only
                result = e
            yield key, result

    def _transcribe_speech(self, inputs: Iterable[tuple[object, AudioInput]],
                           on_progress: Callable[[object, float], None] | None = None
                           ) -> Iterator[tuple[object, dict | BaseException]]:
        """``transcribe_many`` on the speech regions of each input (``vad.RegionSplit``): each region is
        decoded alone, its times moved to the recording's, and its words make segments of their own."""
        split = RegionSplit(inputs, self._vad, self.plan.frame_stride, self.options.chunk_seconds)
        progress = None if on_progress is None else (lambda part, seconds: on_progress(part.key, seconds))
        parts = self.emissions(split.sources(), keep_log_probs=self._beam is not None, on_progress=progress)
        for part, em in itertools.chain(parts, [(None, None)]):
            if part is not None:
                try:
                    split.add(part, em if isinstance(em, BaseException) else (self.decode(em), em.frames))
                except Exception as e:  # e.g. a decoding failure: this input only
                    split.add(part, e)
            for key, regions, samples, error in split.finished():
                failed = error or next((r for _, r in regions if isinstance(r, BaseException)), None)
                if on_progress is not None and failed is None:  # the silence, skipped
                    run = sum(n for _, (_, n) in regions)
                    on_progress(key, max(0, samples // self.plan.frame_stride - run) * self.frame_seconds)
                yield key, failed if failed is not None else self._speech_result(regions, samples)

    def _speech_result(self, regions: list[tuple[int, tuple[DecodedText, int]]], samples: int) -> dict:
        """The result of a recording from its regions' ``(first sample, (decoded, frames))``."""
        em = Emissions()  # what the result's metadata reads: the recording's length, the frames run
        em.samples, em.frames = samples, sum(frames for _, (_, frames) in regions)
        fs = self.plan.frame_stride
        decoded = [d for _, (d, _) in regions]
        joined = join_decoded([(start // fs, d) for start, (d, _) in regions], self.frame_seconds,
                              self.model.vocab.word_delimiter_index)
        bounds = list(itertools.accumulate((len(d.words) for d in decoded), initial=0))
        groups = [joined.words[a:b] for a, b in itertools.pairwise(bounds)]
        result = self.result(joined, em, task="transcribe", word_groups=groups)
        result["metadata"]["speech"] = [[_ms(start // fs * self.frame_seconds), _ms((start // fs + n) * self.frame_seconds)]
                                        for start, (_, n) in regions]
        return result

    def decode(self, em: Emissions) -> DecodedText:
        if self._beam is None:
            return greedy_decode_path(em.best_ids, em.best_log_prob, self.model.vocab, self.frame_seconds)
        if em.frames == 0:
            return DecodedText(text="")
        max_frames = round(BEAM_WINDOW_SECONDS / self.frame_seconds)
        return self._beam.decode_long(em.log_probs(), max_frames=max_frames)

    # ------------------------------------------------------------------ alignment
    def align(self, audio: AudioInput, transcript: str) -> dict:
        """Word and character times of ``transcript`` in ``audio`` (CTC Viterbi forced alignment
        on the stitched log-probabilities)."""
        (_, em), = self.emissions([(None, audio)], keep_log_probs=True)
        if isinstance(em, BaseException):
            raise em
        if em.frames == 0:
            raise ValueError("the audio is shorter than one frame (25 ms): nothing to align")
        decoded = align_text(em.log_probs(), transcript, self.model.vocab, self.frame_seconds)
        return self.result(decoded, em, task="align")

    # ------------------------------------------------------------------ results
    def result(self, decoded: DecodedText, em: Emissions, task: str, word_groups: list[list] | None = None) -> dict:
        """The writers' result dict: text, segments with words (and their characters), metadata.
        ``word_groups``: ``decoded.words`` in groups that no segment spans (speech regions)."""
        o = self.options
        words = _words_with_chars(decoded)
        segments = [s for group in ([decoded.words] if word_groups is None else word_groups)
                    for s in segment_words(group, o.max_segment_chars, o.max_segment_seconds, o.pause_seconds)]
        by_id = {id(w): d for w, d in zip(decoded.words, words)}
        return {
            "text": decoded.text,
            "segments": [{"start": _ms(s["start"]), "end": _ms(s["end"]), "text": s["text"],
                          "words": [by_id[id(w)] for w in s["words"]]} for s in segments],
            "metadata": {
                "task": task,
                "model": self.model_metadata(),
                "options": dataclasses.asdict(o),
                "decoder": o.decoder if task == "transcribe" else "forced_alignment",
                "duration": em.duration,
                "frames": em.frames,
                "frame_seconds": self.frame_seconds,
                "w2v2_version": __version__,
            },
        }

    def model_metadata(self) -> dict:
        c = self.model.config
        return {"name": self.model_name, "hidden_size": c.hidden_size, "layers": c.num_hidden_layers,
                "vocab_size": c.vocab_size, "parameters": sum(p.numel() for p in self.model.parameters())}


def _words_with_chars(decoded: DecodedText) -> list[dict]:
    """Words as dicts, each with the characters it is made of (``decoded.chars`` holds them in order)."""
    out, i = [], 0
    for w in decoded.words:
        chars, text = [], ""
        while i < len(decoded.chars) and len(text) < len(w.word):
            c = decoded.chars[i]
            chars.append({"char": c.char, "start": _ms(c.start), "end": _ms(c.end), "confidence": c.confidence})
            text += c.char
            i += 1
        out.append({"word": w.word, "start": _ms(w.start), "end": _ms(w.end), "confidence": w.confidence,
                    "chars": chars})
    return out


def _ms(seconds: float) -> float:
    """Times to the millisecond: frames are 20 ms, and 0.82 reads better than 0.8200000000000001."""
    return round(seconds, 3)


# --------------------------------------------------------------------------- one-call API
def transcribe(model: Wav2Vec2, audio: AudioInput, options: TranscribeOptions = TranscribeOptions(),
               *, model_name: str | None = None) -> dict:
    """Transcribe one input: a path (any audio or video file ffmpeg reads, of any length), ``"-"``
    (standard input), or a float32 array (samples,) already at 16 kHz. Returns the result dict
    (``writers.py``). Raises ``AudioError`` for an unreadable input."""
    (_, result), = Transcriber(model, options, model_name).transcribe_many([(None, audio)])
    if isinstance(result, BaseException):
        raise result
    return result


def align(model: Wav2Vec2, audio: AudioInput, transcript: str, options: TranscribeOptions = TranscribeOptions(),
          *, model_name: str | None = None) -> dict:
    """Forced alignment of a known ``transcript``: the result dict with its words' times."""
    return Transcriber(model, options, model_name).align(audio, transcript)


__all__ = ["TranscribeOptions", "Transcriber", "align", "transcribe"]
