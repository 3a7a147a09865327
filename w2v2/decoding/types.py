"""Results of CTC decoding and alignment, and the frame-run -> word bookkeeping they share.

Times are in seconds: frame index × ``frame_seconds`` (20 ms for wav2vec 2.0). A span
starts at its first frame and ends one frame after its last frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from w2v2.vocab import SPECIALS, Vocabulary


@dataclass
class Char:
    char: str
    start: float  # seconds
    end: float  # seconds
    confidence: float  # in [0, 1]; meaning depends on the producer, see its docstring


@dataclass
class Word:
    word: str
    start: float  # seconds
    end: float  # seconds
    confidence: float  # in [0, 1]; meaning depends on the producer, see its docstring


@dataclass
class DecodedText:
    """One decoded utterance.

    ``tokens`` are the emitted token ids after collapsing repeats and removing blanks
    (word delimiters and other specials included); ``token_frames[i]`` is the first frame
    of ``tokens[i]``. ``chars`` and ``words`` hold only characters of words (no word
    delimiter, no specials), so ``" ".join(w.word for w in words) == text``.
    """

    text: str
    tokens: list[int] = field(default_factory=list)
    token_frames: list[int] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    chars: list[Char] = field(default_factory=list)


def check_emissions(x, vocab: Vocabulary, name: str = "logits") -> torch.Tensor:
    """Validate one utterance's scores and return float32 log-probabilities (time, vocab)."""
    x = torch.as_tensor(x).detach().cpu()
    if x.dim() != 2 or x.shape[1] != len(vocab):
        raise ValueError(
            f"{name} must have shape (time, vocab={len(vocab)}) for one utterance, got {tuple(x.shape)}"
        )
    return x.float().log_softmax(-1)  # idempotent when x already holds log-probabilities


def ctc_collapse(path: torch.Tensor, blank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs of equal tokens in a frame path, blanks dropped.

    path (time,) token id per frame -> tokens (n,), starts (n,), ends (n,): the token of
    each non-blank run, its first frame and one past its last frame.
    ``[_, a, a, _, a, b]`` -> tokens ``[a, a, b]``, starts ``[1, 4, 5]``, ends ``[3, 5, 6]``.
    """
    path = torch.as_tensor(path, dtype=torch.long).reshape(-1)
    if path.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty.clone(), empty.clone()
    is_start = torch.ones_like(path, dtype=torch.bool)
    is_start[1:] = path[1:] != path[:-1]
    starts = is_start.nonzero().squeeze(1)
    ends = torch.cat([starts[1:], torch.tensor([path.numel()])])
    tokens = path[starts]
    keep = tokens != blank
    return tokens[keep], starts[keep], ends[keep]


def spans_from_runs(
    tokens: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    frame_scores: torch.Tensor,
    vocab: Vocabulary,
    frame_seconds: float,
    texts: list[str] | None = None,
) -> tuple[list[Char], list[Word]]:
    """Characters and words with times from token runs (see ``ctc_collapse``).

    frame_scores (time,): a probability per frame; a character's confidence is the mean
    over its run's frames, a word's the mean over all frames of its characters' runs.
    Word delimiters end words; other specials (``<unk>``, ``<s>``, ...) are skipped,
    unless ``texts`` (one string per run, e.g. the transcript's characters) names them.
    """
    skip = set(SPECIALS) | {vocab.blank, vocab.unk}
    # a Python list: indexed once per token, which for an hour of audio is ~10^5 times
    cumsum = torch.cat([torch.zeros(1, dtype=torch.float64), frame_scores.double().cumsum(0)]).tolist()
    chars: list[Char] = []
    words: list[Word] = []
    current: list[tuple[str, int, int]] = []  # (char, start frame, end frame)

    def close_word() -> None:
        if current:
            score = sum(cumsum[e] - cumsum[s] for _, s, e in current)
            n_frames = sum(e - s for _, s, e in current)
            text = "".join(c for c, _, _ in current)
            start, end = current[0][1] * frame_seconds, current[-1][2] * frame_seconds
            words.append(Word(text, start, end, score / n_frames))
            current.clear()

    if texts is None:
        texts = ["" if vocab.tokens[i] in skip else vocab.tokens[i] for i in tokens.tolist()]
    for token, t, s, e in zip(tokens.tolist(), texts, starts.tolist(), ends.tolist()):
        if token == vocab.word_delimiter_index:
            close_word()
        elif t:
            confidence = (cumsum[e] - cumsum[s]) / (e - s)
            chars.append(Char(t, s * frame_seconds, e * frame_seconds, confidence))
            current.append((t, s, e))
    close_word()
    return chars, words
