"""Greedy (best path) CTC decoding."""

from __future__ import annotations

import torch

from w2v2.decoding.types import DecodedText, check_emissions, ctc_collapse, spans_from_runs
from w2v2.vocab import Vocabulary


def greedy_decode(logits, vocab: Vocabulary, frame_seconds: float = 0.02) -> DecodedText:
    """Best path decoding of one utterance: argmax per frame, collapse repeats, drop blanks.

    logits (time, vocab): logits or log-probabilities. Confidence of a character is the
    mean, over the frames of its argmax run, of the frame's highest softmax probability;
    a word's is the same mean over all emitting frames of its characters (blank frames
    between them do not count).
    """
    log_probs = check_emissions(logits, vocab)  # (time, vocab)
    best_log_prob, path = log_probs.max(-1)  # (time,), (time,)
    return greedy_decode_path(path, best_log_prob, vocab, frame_seconds)


def greedy_decode_path(path, best_log_prob, vocab: Vocabulary, frame_seconds: float = 0.02) -> DecodedText:
    """``greedy_decode`` from what it keeps of each frame: path (time,) the best token id,
    best_log_prob (time,) its log-probability. Long audio needs only these two numbers per frame."""
    path = torch.as_tensor(path, dtype=torch.long).reshape(-1)
    best_log_prob = torch.as_tensor(best_log_prob).reshape(-1).float()
    if path.shape != best_log_prob.shape:
        raise ValueError(f"path {tuple(path.shape)} and best_log_prob {tuple(best_log_prob.shape)} differ in length")
    tokens, starts, ends = ctc_collapse(path, vocab.blank_index)
    chars, words = spans_from_runs(tokens, starts, ends, best_log_prob.exp(), vocab, frame_seconds)
    return DecodedText(
        text=vocab.decode(tokens.tolist()),
        tokens=tokens.tolist(),
        token_frames=starts.tolist(),
        words=words,
        chars=chars,
    )


def greedy_decode_batch(
    logits, vocab: Vocabulary, lengths=None, frame_seconds: float = 0.02
) -> list[DecodedText]:
    """logits (batch, time, vocab), lengths (batch,) valid frames per item (None: all)."""
    logits = torch.as_tensor(logits)
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (batch, time, vocab), got {tuple(logits.shape)}")
    if lengths is None:
        lengths = [logits.shape[1]] * logits.shape[0]
    return [greedy_decode(x[: int(n)], vocab, frame_seconds) for x, n in zip(logits, lengths)]
