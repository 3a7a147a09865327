"""CTC beam search with an optional KenLM n-gram language model (via pyctcdecode)."""

from __future__ import annotations

from pathlib import Path

import torch

from w2v2.decoding.alignment import align_text
from w2v2.decoding.types import DecodedText, check_emissions
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

    def decode_batch(self, logits, lengths=None) -> list[DecodedText]:
        """logits (batch, time, vocab), lengths (batch,) valid frames per item (None: all)."""
        logits = torch.as_tensor(logits)
        if logits.dim() != 3:
            raise ValueError(f"logits must have shape (batch, time, vocab), got {tuple(logits.shape)}")
        if lengths is None:
            lengths = [logits.shape[1]] * logits.shape[0]
        return [self.decode(x[: int(n)]) for x, n in zip(logits, lengths)]
