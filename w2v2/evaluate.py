"""Word and character error rates of a speech recogniser on a manifest.

    engine.transcribe(waveforms) -> hypotheses  ->  normalise ref and hyp alike  ->  jiwer

Both sides go through :func:`w2v2.text.normalize_text` with one case (the case the model's
vocabulary was built for, see :func:`w2v2.text.infer_case`), so punctuation, apostrophe
styles and letter case never count as errors; fine-tuning applies the same function to its
training and validation transcripts. WER and CER are corpus-level (total edits over total
reference words / characters, spaces counted as characters in CER), as jiwer computes them
for lists; per-utterance rates go to the error table.

Engines: :class:`W2v2Engine` (a CTC model with greedy or beam-search decoding, batched by
length) and :class:`PocketSphinxEngine` (CMU PocketSphinx with the US English model shipped
in its wheel: a classical HMM/GMM baseline scored the same way). The real-time factor is
compute seconds (model plus decoding, not audio file decoding) over audio seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import jiwer
import numpy as np
import torch

from .audio import SAMPLE_RATE, load_audio
from .fileio import atomic_open
from .text import infer_case, normalize_text


@dataclass(frozen=True)
class Utterance:
    path: str
    text: str  # reference transcript, as in the manifest


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
class Engine(Protocol):
    name: str
    case: str | None  # the case hypotheses and references are compared in

    def transcribe(self, waveforms: list[np.ndarray]) -> list[str]: ...


def length_batches(lengths: list[int], max_samples: int, max_items: int | None = None) -> list[list[int]]:
    """Indices sorted by length (longest first), grouped so that items × longest <= max_samples.

    A single item longer than ``max_samples`` gets a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches:
            b = batches[-1]
            fits = (len(b) + 1) * lengths[b[0]] <= max_samples and (max_items is None or len(b) < max_items)
            if fits:
                b.append(i)
                continue
        batches.append([i])
    return batches


class W2v2Engine:
    """A CTC model: padded batches of similar length, then greedy or beam-search decoding.

    decoder: None for greedy decoding, or an object with ``decode(logits (time, vocab))``
    returning something with ``.text`` (e.g. :class:`w2v2.decoding.BeamSearchDecoder`).
    """

    def __init__(self, model, decoder=None, batch_seconds: float = 200.0, device: str | torch.device = "cpu",
                 name: str = "w2v2"):
        if model.lm_head is None or model.vocab is None:
            raise ValueError("the model has no CTC head and vocabulary; evaluate a fine-tuned model")
        self.model = model.to(device).eval()
        self.decoder = decoder
        self.max_samples = int(batch_seconds * SAMPLE_RATE)
        self.device = torch.device(device)
        self.name = name
        self.case = infer_case(model.vocab)

    @torch.inference_mode()
    def logits(self, waveforms: list[np.ndarray]) -> list[torch.Tensor]:
        """Per utterance (frames, vocab) float32 logits on the CPU, in input order."""
        out: list[torch.Tensor | None] = [None] * len(waveforms)
        for batch in length_batches([len(w) for w in waveforms], self.max_samples):
            wav = torch.zeros(len(batch), len(waveforms[batch[0]]))  # (batch, samples), longest first
            lengths = torch.tensor([len(waveforms[i]) for i in batch])
            for row, i in enumerate(batch):
                wav[row, : len(waveforms[i])] = torch.from_numpy(waveforms[i])
            res = self.model(wav.to(self.device), lengths.to(self.device))
            logits = res.logits.float().cpu()  # (batch, frames, vocab)
            for row, i in enumerate(batch):
                out[i] = logits[row, : int(res.lengths[row])]
        return out  # type: ignore[return-value]

    def transcribe(self, waveforms: list[np.ndarray]) -> list[str]:
        from .decoding import greedy_decode

        texts = []
        for lg in self.logits(waveforms):
            decoded = greedy_decode(lg, self.model.vocab) if self.decoder is None else self.decoder.decode(lg)
            texts.append(decoded.text)
        return texts


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

    def transcribe(self, waveforms: list[np.ndarray]) -> list[str]:
        texts = []
        for w in waveforms:
            pcm = (np.clip(w, -1.0, 32767 / 32768) * 32768).astype(np.int16).tobytes()
            self._decoder.start_utt()
            self._decoder.process_raw(pcm, full_utt=True)
            self._decoder.end_utt()
            hyp = self._decoder.hyp()
            texts.append(hyp.hypstr if hyp is not None else "")
        return texts


# --------------------------------------------------------------------------- evaluation
def read_utterances(inputs: str | Path | list) -> list[Utterance]:
    """Utterances of manifests (or folders holding a ``manifest.tsv``), via :func:`w2v2.data.list_entries`."""
    from .data import list_entries

    entries = list_entries([inputs] if isinstance(inputs, (str, Path)) else inputs)
    missing = [e.path for e in entries if e.text is None]
    if missing:
        raise ValueError(f"{inputs}: {len(missing)} utterances have no transcript (a 'text' column), "
                         f"e.g. {missing[0]}")
    return [Utterance(e.path, e.text) for e in entries]


def evaluate(engine: Engine, utterances: list[Utterance], chunk: int = 256, progress=None) -> EvalResult:
    """Transcribe and score ``utterances``; audio is decoded ``chunk`` utterances at a time.

    ``progress(done, total)`` is called after each chunk when given."""
    hyps: list[str] = []
    audio_seconds = compute_seconds = 0.0
    for start in range(0, len(utterances), chunk):
        part = utterances[start : start + chunk]
        waves = [load_audio(u.path) for u in part]
        audio_seconds += sum(len(w) for w in waves) / SAMPLE_RATE
        t0 = time.perf_counter()
        hyps.extend(engine.transcribe(waves))
        compute_seconds += time.perf_counter() - t0
        if progress is not None:
            progress(start + len(part), len(utterances))
    wer, cer, per = score([u.text for u in utterances], hyps, case=engine.case, paths=[u.path for u in utterances])
    return EvalResult(wer, cer, audio_seconds, compute_seconds, per)


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
