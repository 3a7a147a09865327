"""Word and character error rates of a speech recogniser on a manifest.

    engine.transcribe(paths) -> hypotheses  ->  normalise ref and hyp alike  ->  jiwer

Both sides go through :func:`w2v2.text.normalize_text` with one case (the case the model's
vocabulary was built for, see :func:`w2v2.text.infer_case`), so punctuation, apostrophe
styles and letter case never count as errors; fine-tuning applies the same function to its
training and validation transcripts. WER and CER are corpus-level (total edits over total
reference words / characters, spaces counted as characters in CER), as jiwer computes them
for lists; per-utterance rates go to the error table.

Engines: :class:`W2v2Engine` runs a :class:`w2v2.transcribe.Transcriber`, the one that
``w2v2 transcribe`` runs: the same audio reading, chunking of long files, batching, precision
and decoders, so a hypothesis is the text ``transcribe`` gives for that file with the same
options, and a WER printed here is the accuracy of ``transcribe``. :class:`PocketSphinxEngine`
is CMU PocketSphinx with the US English model shipped in its wheel: a classical HMM/GMM
baseline scored the same way. The real-time factor is the engine's seconds from file to text
(reading the audio, the model, decoding) over audio seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import jiwer
import numpy as np

from .audio import SAMPLE_RATE, AudioError, load_audio
from .fileio import atomic_open
from .text import infer_case, normalize_text


@dataclass(frozen=True)
class Utterance:
    path: str
    text: str  # reference transcript, as in the manifest
    seconds: float | None = None  # the manifest's duration, for batching only


@dataclass
class UtteranceScore:
    path: str
    ref: str  # normalised
    hyp: str  # normalised
    wer: float
    cer: float
    words: int  # reference words


@dataclass
class EvalResult:
    wer: float
    cer: float
    audio_seconds: float
    compute_seconds: float
    utterances: list[UtteranceScore] = field(default_factory=list)

    @property
    def rtf(self) -> float:
        return self.compute_seconds / max(self.audio_seconds, 1e-9)

    @property
    def words(self) -> int:
        return sum(u.words for u in self.utterances)


# --------------------------------------------------------------------------- scoring
def error_rates(refs: list[str], hyps: list[str]) -> tuple[float, float]:
    """Corpus WER and CER of already-normalised strings (jiwer). Empty lists give (0, 0)."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        return 0.0, 0.0
    return float(jiwer.wer(refs, hyps)), float(jiwer.cer(refs, hyps))


def score(refs: list[str], hyps: list[str], case: str | None = "upper",
          paths: list[str] | None = None) -> tuple[float, float, list[UtteranceScore]]:
    """Normalise references and hypotheses with ``case`` and score them: (WER, CER, per utterance)."""
    refs = [normalize_text(r, case=case) for r in refs]
    hyps = [normalize_text(h, case=case) for h in hyps]
    paths = paths if paths is not None else [""] * len(refs)
    per = []
    for p, r, h in zip(paths, refs, hyps):
        w, c = error_rates([r], [h])
        per.append(UtteranceScore(p, r, h, w, c, len(r.split())))
    wer, cer = error_rates(refs, hyps)
    return wer, cer, per


# --------------------------------------------------------------------------- engines
@dataclass(frozen=True)
class Hypothesis:
    text: str  # as the engine wrote it, not normalised
    seconds: float  # audio length


class Engine(Protocol):
    name: str
    case: str | None  # the case hypotheses and references are compared in

    def transcribe(self, paths: list[str]) -> list[Hypothesis]: ...


class W2v2Engine:
    """A CTC model run by a :class:`w2v2.transcribe.Transcriber` (its options say device,
    precision, batch size, chunking and decoder). All paths of a call go to one
    ``transcribe_many``, whose batches take chunks of consecutive files."""

    def __init__(self, transcriber, name: str = "w2v2"):
        self.transcriber = transcriber
        self.name = name
        self.case = infer_case(transcriber.model.vocab)

    def transcribe(self, paths: list[str]) -> list[Hypothesis]:
        out = []
        for path, result in self.transcriber.transcribe_many((p, p) for p in paths):
            if isinstance(result, AudioError):  # its message starts with the path
                raise result
            if isinstance(result, BaseException):
                raise ValueError(f"{path}: {result}") from result
            out.append(Hypothesis(result["text"], result["metadata"]["duration"]))
        return out


class PocketSphinxEngine:
    """CMU PocketSphinx, US English acoustic model, LM and dictionary from its wheel (16 kHz int16)."""

    name = "pocketsphinx"

    def __init__(self, case: str | None = "upper"):
        try:
            from pocketsphinx import Decoder
        except ImportError as e:
            raise ImportError("the pocketsphinx baseline needs pocketsphinx: pip install pocketsphinx") from e
        self.case = case
        self._decoder = Decoder(samprate=SAMPLE_RATE, logfn="/dev/null")

    def transcribe(self, paths: list[str]) -> list[Hypothesis]:
        out = []
        for path in paths:
            w = load_audio(path)
            pcm = (np.clip(w, -1.0, 32767 / 32768) * 32768).astype(np.int16).tobytes()
            self._decoder.start_utt()
            self._decoder.process_raw(pcm, full_utt=True)
            self._decoder.end_utt()
            hyp = self._decoder.hyp()
            out.append(Hypothesis(hyp.hypstr if hyp is not None else "", len(w) / SAMPLE_RATE))
        return out


# --------------------------------------------------------------------------- evaluation
def read_utterances(inputs: str | Path | list) -> list[Utterance]:
    """Utterances of manifests (or folders holding a ``manifest.tsv``), via :func:`w2v2.data.list_entries`."""
    from .data import list_entries

    entries = list_entries([inputs] if isinstance(inputs, (str, Path)) else inputs)
    missing = [e.path for e in entries if e.text is None]
    if missing:
        raise ValueError(f"{inputs}: {len(missing)} utterances have no transcript (a 'text' column), "
                         f"e.g. {missing[0]}")
    return [Utterance(e.path, e.text, e.seconds) for e in entries]


def evaluate(engine: Engine, utterances: list[Utterance], chunk: int = 256, progress=None) -> EvalResult:
    """Transcribe and score ``utterances``, ``chunk`` utterances per call of the engine.

    Within a call the longest utterances go first (by the manifest's ``seconds`` where given),
    so that a batch holds files of similar length. ``progress(done, total)`` is called after
    each call when given. A file that cannot be transcribed stops the evaluation with an error
    naming it: a WER without some utterances is not the manifest's WER."""
    hyps: list[str] = []
    audio_seconds = compute_seconds = 0.0
    for start in range(0, len(utterances), chunk):
        part = utterances[start : start + chunk]
        order = sorted(range(len(part)), key=lambda i: -(part[i].seconds or 0.0))
        t0 = time.perf_counter()
        out = engine.transcribe([part[i].path for i in order])
        compute_seconds += time.perf_counter() - t0
        texts: list[str] = [""] * len(part)
        for i, h in zip(order, out, strict=True):
            texts[i] = h.text
            audio_seconds += h.seconds
        hyps.extend(texts)
        if progress is not None:
            progress(start + len(part), len(utterances))
    wer, cer, per = score([u.text for u in utterances], hyps, case=engine.case, paths=[u.path for u in utterances])
    return EvalResult(wer, cer, audio_seconds, compute_seconds, per)


def merge_results(parts: list[tuple[list[int], EvalResult]]) -> EvalResult:
    """The result of a whole manifest from the results of its parts (each with the positions of
    its utterances in the manifest, e.g. one part per process): utterances back in manifest
    order, WER and CER over all of them at once (total edits over total reference length), the
    figures :func:`evaluate` gives for the whole manifest in one process; compute seconds summed."""
    placed = sorted(((i, u) for where, r in parts for i, u in zip(where, r.utterances, strict=True)),
                    key=lambda p: p[0])
    utts = [u for _, u in placed]
    wer, cer = error_rates([u.ref for u in utts], [u.hyp for u in utts])
    return EvalResult(wer, cer, sum(r.audio_seconds for _, r in parts), sum(r.compute_seconds for _, r in parts),
                      utts)


def write_errors(result: EvalResult, path: str | Path) -> None:
    """Per-utterance table, worst first: ``path ref hyp wer cer`` (tab-separated, atomically)."""
    rows = sorted(result.utterances, key=lambda u: (-u.wer, -u.cer, u.path))
    with atomic_open(path, "w") as f:
        f.write("path\tref\thyp\twer\tcer\n")
        for u in rows:
            f.write(f"{u.path}\t{u.ref}\t{u.hyp}\t{u.wer:.4f}\t{u.cer:.4f}\n")


def format_table(rows: list[tuple[str, str, EvalResult]]) -> str:
    """(system, data, result) rows as a small fixed-width table."""
    head = f"{'system':<28} {'data':<20} {'utts':>5} {'words':>6} {'WER %':>7} {'CER %':>7} {'RTF':>7}"
    lines = [head, "-" * len(head)]
    for system, data, r in rows:
        lines.append(f"{system[-28:]:<28} {data[-20:]:<20} {len(r.utterances):>5} {r.words:>6} "
                     f"{100 * r.wer:>7.2f} {100 * r.cer:>7.2f} {r.rtf:>7.3f}")
    return "\n".join(lines)
