"""CTC forced alignment: the most likely frame path for a known transcript (Viterbi)."""

from __future__ import annotations

import operator

import numpy as np
import torch

from w2v2.decoding.types import DecodedText, Word, check_emissions, ctc_collapse, spans_from_runs
from w2v2.text import infer_case, normalize_text
from w2v2.vocab import Vocabulary


def min_frames(targets) -> int:
    """Frames a CTC path for ``targets`` needs: one per token plus a blank between repeats."""
    # plain ints: fine-tuning asks this of every transcript at start-up, a tensor each cost more
    t = targets.reshape(-1).tolist() if isinstance(targets, torch.Tensor | np.ndarray) else list(targets)
    return len(t) + sum(map(operator.eq, t, t[1:]))


def ctc_forced_align(log_probs, targets, blank: int) -> torch.Tensor:
    """Viterbi CTC alignment.

    log_probs (time, vocab) log-probabilities (or logits: log-softmax is applied), targets
    (length,) token ids without blanks -> path (time,) token id per frame, the highest
    scoring frame path that collapses to ``targets``. O(time × length), vectorised over
    the 2·length+1 states (blank, y1, blank, y2, ..., blank).
    Raises ValueError when time < length + number of adjacent repeats in ``targets``.
    """
    lp = torch.as_tensor(log_probs).detach().cpu().float()
    if lp.dim() != 2:
        raise ValueError(f"log_probs must have shape (time, vocab), got {tuple(lp.shape)}")
    lp = lp.log_softmax(-1)
    targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    n_frames, n_targets = lp.shape[0], targets.numel()
    if (targets == blank).any():
        raise ValueError(f"targets contain the blank index {blank}")
    if n_targets and (targets.min() < 0 or targets.max() >= lp.shape[1]):
        raise ValueError(f"targets hold ids outside 0..{lp.shape[1] - 1}")
    if n_frames < min_frames(targets):
        raise ValueError(
            f"transcript too long for the audio: {n_targets} tokens need at least "
            f"{min_frames(targets)} frames (one per token plus a blank between repeated tokens), "
            f"but the emission has {n_frames}; check that the transcript belongs to this audio"
        )
    ext = torch.full((2 * n_targets + 1,), blank, dtype=torch.long)  # (states,)
    ext[1::2] = targets
    states = _viterbi_states(lp.numpy(), ext.numpy(), blank)  # (time,)
    return ext[states]


MAX_BACKPOINTERS = 1 << 26  # bytes of back pointers held at once (64 MiB); beyond, recompute blocks


def _viterbi_states(lp: np.ndarray, ext: np.ndarray, blank: int, max_backpointers: int = MAX_BACKPOINTERS
                    ) -> torch.Tensor:
    """lp (time, vocab) log-probs, ext (states,) token of each state -> best state per frame.

    State s may be reached from s (stay), s-1 (step) or s-2 (skip a blank between two
    different tokens). The loop over time runs in numpy: per-frame work is small, and
    torch's per-op overhead would dominate. Memory stays bounded for long audio: back
    pointers (1 byte per frame and state) are kept for at most ``max_backpointers`` bytes;
    a longer alignment keeps the scores at the start of each block of frames and recomputes
    one block at a time while tracing back (twice the time, the same result).
    """
    n_frames, n_states = lp.shape[0], len(ext)
    if n_frames == 0:
        return torch.zeros(0, dtype=torch.long)
    trellis = _Trellis(lp, ext, blank)
    block = max(1, min(n_frames, max_backpointers // n_states))
    starts = list(range(0, n_frames, block))
    alpha = trellis.initial()
    before_block = []  # scores before each block's first frame
    for b0 in starts:
        before_block.append(alpha)
        alpha = trellis.advance(alpha, b0, min(b0 + block, n_frames), keep_back=len(starts) == 1)
    s = n_states - 1
    if n_states > 1 and alpha[n_states - 2] > alpha[n_states - 1]:
        s = n_states - 2
    if alpha[s] == -np.inf:
        raise ValueError("no alignment has non-zero probability: the emission rules out a needed token")
    out = np.empty(n_frames, dtype=np.int64)
    for b0, alpha in zip(reversed(starts), reversed(before_block)):
        b1 = min(b0 + block, n_frames)
        if len(starts) > 1:
            trellis.advance(alpha, b0, b1, keep_back=True)
        for t in range(b1 - 1, b0 - 1, -1):
            out[t] = s
            s -= int(trellis.back[t - b0, s])
    return torch.from_numpy(out)


class _Trellis:
    """The Viterbi recursion over the 2·length+1 CTC states, one frame at a time."""

    def __init__(self, lp: np.ndarray, ext: np.ndarray, blank: int):
        self.lp, self.ext = lp, ext
        self.can_skip = np.zeros(len(ext), dtype=bool)  # may come from state s-2
        self.can_skip[2:] = (ext[2:] != blank) & (ext[2:] != ext[:-2])
        self.cand = np.full((3, len(ext)), -np.inf)  # (stay/step/skip, states)
        self.back = np.zeros((0, len(ext)), dtype=np.int8)  # 0 stay, 1 step, 2 skip

    def initial(self) -> np.ndarray:
        """Scores "before frame 0": only state 0, so frame 0 may start in state 0 or 1."""
        alpha = np.full(len(self.ext), -np.inf)
        alpha[0] = 0.0
        return alpha

    def advance(self, alpha: np.ndarray, t0: int, t1: int, keep_back: bool) -> np.ndarray:
        """Scores after frames t0..t1-1, given those before t0; back pointers in ``self.back``."""
        if keep_back:
            self.back = np.zeros((t1 - t0, len(self.ext)), dtype=np.int8)
        cand = self.cand
        for t in range(t0, t1):
            cand[0] = alpha
            cand[1, 1:] = alpha[:-1]
            cand[2, 2:] = np.where(self.can_skip[2:], alpha[:-2], -np.inf)
            if keep_back:
                self.back[t - t0] = cand.argmax(0)
            alpha = cand.max(0) + self.lp[t, self.ext]
        return alpha


def align_text(
    log_probs, transcript: str, vocab: Vocabulary, frame_seconds: float = 0.02, normalize: bool = True
) -> DecodedText:
    """Forced alignment of a known transcript, as a DecodedText with char and word times.

    log_probs (time, vocab). The transcript is normalised with ``normalize_text`` in the
    vocabulary's case (unless ``normalize=False``); spaces become the word delimiter.
    Characters outside the vocabulary map to ``<unk>`` if it has one (the words keep the
    transcript's characters), otherwise raise ValueError. Confidence of a character is
    the mean, over its aligned frames, of the probability of that character's token; a
    word's is the same mean over all its characters' frames.
    """
    lp = check_emissions(log_probs, vocab, name="log_probs")  # (time, vocab)
    text = normalize_text(transcript, case=infer_case(vocab)) if normalize else transcript
    try:
        targets = vocab.encode(text)
    except ValueError as e:
        raise ValueError(
            f"cannot align transcript {text!r}: {e}; add them to the vocabulary (or an <unk> token) "
            "or remove them from the transcript"
        ) from None
    path = ctc_forced_align(lp, torch.tensor(targets, dtype=torch.long), vocab.blank_index)
    tokens, starts, ends = ctc_collapse(path, vocab.blank_index)
    path_prob = lp.gather(1, path[:, None]).squeeze(1).exp()  # (time,)
    # the path collapses to exactly ``targets``: one run per transcript character
    chars, words = spans_from_runs(tokens, starts, ends, path_prob, vocab, frame_seconds, texts=list(text))
    return DecodedText(" ".join(w.word for w in words), tokens.tolist(), starts.tolist(), words, chars)


def align_words(log_probs, transcript: str, vocab: Vocabulary, frame_seconds: float = 0.02) -> list[Word]:
    """Word timestamps and confidences for a known transcript; see ``align_text``."""
    return align_text(log_probs, transcript, vocab, frame_seconds).words
