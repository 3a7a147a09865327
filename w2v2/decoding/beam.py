"""CTC beam search with an optional KenLM n-gram language model (via pyctcdecode)."""

from __future__ import annotations

from pathlib import Path

import torch

from w2v2.decoding.alignment import align_text
from w2v2.decoding.types import Char, DecodedText, Word, check_emissions
from w2v2.vocab import SPECIALS, Vocabulary

_PRIVATE_USE = 0xF0000  # specials become private-use characters (plane 15), removed from the output


def _import_pyctcdecode():
    try:
        import pyctcdecode
    except ImportError as e:
        raise ImportError(
            "beam search needs pyctcdecode (and kenlm for a language model): pip install 'w2v2[lm]'"
        ) from e
    return pyctcdecode


def ctc_labels(vocab: Vocabulary) -> list[str]:
    """pyctcdecode labels, one per vocabulary index: blank -> "", word delimiter -> " ",
    other specials (``<s>``, ``</s>``, ``<unk>``) -> unique private-use characters that
    ``strip_specials`` removes again; characters stay as they are."""
    skip = set(SPECIALS) | {vocab.unk}
    labels = []
    for i, t in enumerate(vocab.tokens):
        if i == vocab.blank_index:
            labels.append("")
        elif i == vocab.word_delimiter_index:
            labels.append(" ")
        elif t in skip or len(t) > 1:
            labels.append(chr(_PRIVATE_USE + i))
        else:
            labels.append(t)
    if len(set(labels)) != len(labels):
        raise ValueError(f"vocabulary gives duplicate beam search labels: {labels}")
    return labels


def strip_specials(text: str) -> str:
    """Remove the private-use characters that stand for specials in ``ctc_labels``."""
    return "".join(c for c in text if not _PRIVATE_USE <= ord(c) < _PRIVATE_USE + 0xFFFE)


class BeamSearchDecoder:
    """CTC prefix beam search (pyctcdecode) with optional shallow fusion of a KenLM model.

    lm_path: ARPA (``.arpa``; its unigrams also restrict the word list) or KenLM binary.
    alpha weights the LM log-probability, beta is a bonus per word. Without an LM the
    search uses acoustics only.
    """

    def __init__(
        self,
        vocab: Vocabulary,
        lm_path: str | Path | None = None,
        alpha: float = 0.5,
        beta: float = 1.0,
        beam_width: int = 100,
        *,
        beam_prune_logp: float = -10.0,
        token_min_logp: float = -5.0,
        unigrams: list[str] | None = None,
        frame_seconds: float = 0.02,
    ):
        pyctcdecode = _import_pyctcdecode()
        if lm_path is not None and not Path(lm_path).is_file():
            raise FileNotFoundError(f"language model {lm_path} not found; build one with build_ngram_lm")
        self.vocab = vocab
        self.beam_width = beam_width
        self.beam_prune_logp = beam_prune_logp
        self.token_min_logp = token_min_logp
        self.frame_seconds = frame_seconds
        self._decoder = pyctcdecode.build_ctcdecoder(
            ctc_labels(vocab),
            kenlm_model_path=None if lm_path is None else str(lm_path),
            unigrams=unigrams,
            alpha=alpha,
            beta=beta,
        )

    def decode(self, logits) -> DecodedText:
        """logits (time, vocab) of one utterance -> the best beam's text, aligned.

        Times, ``tokens`` and ``chars`` come from a Viterbi alignment of the chosen text
        (``align_text``), not from pyctcdecode's word frames: those follow whichever merged
        prefix was seen last rather than the best path and drift by a frame or more.
        Confidence is the mean probability of the aligned tokens over a word's frames.
        """
        log_probs = check_emissions(logits, self.vocab)  # (time, vocab)
        beams = self._decoder.decode_beams(
            log_probs.numpy(),
            beam_width=self.beam_width,
            beam_prune_logp=self.beam_prune_logp,
            token_min_logp=self.token_min_logp,
        )
        text = " ".join(strip_specials(beams[0][0]).split())
        return align_text(log_probs, text, self.vocab, self.frame_seconds, normalize=False)

    def decode_long(self, logits, max_frames: int = 1500) -> DecodedText:
        """``decode`` for audio of any length: the emission is cut into windows of at most
        ``max_frames`` frames (30 s) at pauses (see ``decoding_windows``), each window is
        searched and aligned on its own, and the results are joined with their times shifted.
        The LM context restarts at each cut; search and alignment costs stay per window."""
        log_probs = check_emissions(logits, self.vocab)  # (time, vocab)
        is_blank = log_probs.argmax(-1) == self.vocab.blank_index
        parts = [(a, self.decode(log_probs[a:b])) for a, b in decoding_windows(is_blank, max_frames)]
        return join_decoded(parts, self.frame_seconds, self.vocab.word_delimiter_index)


def decoding_windows(is_blank, max_frames: int) -> list[tuple[int, int]]:
    """Cut ``time`` frames into consecutive windows ``(start, end)`` of at most ``max_frames``.

    is_blank (time,) bool: frames whose best token is the blank. Each cut falls in the middle
    of the longest run of blank frames in the second half of the window (a pause, so that no
    token is split), or at the window's end when that half has no blank frame.
    """
    is_blank = torch.as_tensor(is_blank, dtype=torch.bool).reshape(-1)
    if max_frames < 2:
        raise ValueError(f"max_frames must be at least 2, got {max_frames}")
    n, start, windows = is_blank.numel(), 0, []
    while n - start > max_frames:
        lo, hi = start + max_frames // 2, start + max_frames
        middle = _middle_of_longest_run(is_blank[lo:hi])
        cut = hi if middle is None else lo + middle
        windows.append((start, cut))
        start = cut
    windows.append((start, n))
    return windows


def _middle_of_longest_run(mask: torch.Tensor) -> int | None:
    """Index in the middle of the longest run of True values (the first one on ties); None if none."""
    if not bool(mask.any()):
        return None
    padded = torch.cat([torch.tensor([False]), mask, torch.tensor([False])]).int()
    edges = padded.diff()
    starts, ends = (edges == 1).nonzero().squeeze(1), (edges == -1).nonzero().squeeze(1)
    longest = int((ends - starts).argmax())
    return int(starts[longest] + ends[longest]) // 2


def join_decoded(parts: list[tuple[int, DecodedText]], frame_seconds: float,
                 word_delimiter: int | None = None) -> DecodedText:
    """Consecutive window results ``(first frame, DecodedText)`` -> one, times in the whole emission.
    Windows end between words: ``word_delimiter`` (a token id) is put between their tokens."""
    out = DecodedText(text="")
    for offset, d in parts:
        shift = offset * frame_seconds
        if word_delimiter is not None and out.words and d.words:
            out.tokens.append(word_delimiter)
            out.token_frames.append(offset)
        out.tokens += d.tokens
        out.token_frames += [f + offset for f in d.token_frames]
        out.words += [Word(w.word, w.start + shift, w.end + shift, w.confidence) for w in d.words]
        out.chars += [Char(c.char, c.start + shift, c.end + shift, c.confidence) for c in d.chars]
    out.text = " ".join(w.word for w in out.words)
    return out
