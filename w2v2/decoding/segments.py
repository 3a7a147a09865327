"""Group timed words into subtitle segments, and segments into subtitle cues."""

from __future__ import annotations

import textwrap

from w2v2.decoding.types import Word


def segment_words(
    words: list[Word], max_chars: int = 80, max_seconds: float = 10.0, pause_seconds: float = 0.5
) -> list[dict]:
    """Split timed words into segments ``{"start", "end", "text", "words"}``.

    A new segment starts before a word when the silence since the previous word is longer
    than ``pause_seconds``, or when adding the word would make the segment's text longer
    than ``max_chars`` or its span longer than ``max_seconds``. A single word that alone
    breaks a limit gets a segment of its own.
    """
    segments: list[list[Word]] = []
    for word in words:
        current = segments[-1] if segments else None
        if current is None or _breaks(current, word, max_chars, max_seconds, pause_seconds):
            segments.append([word])
        else:
            current.append(word)
    return [
        {"start": seg[0].start, "end": seg[-1].end, "text": " ".join(w.word for w in seg), "words": seg}
        for seg in segments
    ]


def _breaks(segment: list[Word], word: Word, max_chars: int, max_seconds: float, pause_seconds: float) -> bool:
    """Whether ``word`` must start a new segment instead of joining ``segment``."""
    pause = word.start - segment[-1].end
    n_chars = sum(len(w.word) for w in segment) + len(segment) + len(word.word)  # with spaces
    return pause > pause_seconds or n_chars > max_chars or word.end - segment[0].start > max_seconds


# ---------------------------------------------------------------------------- subtitle cues
# Display rules in the spirit of common subtitle guidelines (Netflix's timed-text style guide, the
# BBC's): a cue stays up long enough to be read, lines are short, flashes are merged away.
MIN_CUE_SECONDS = 1.0  # shorter cues are merged into a neighbour, or shown this long where there is room
MERGE_GAP_SECONDS = 1.0  # a short cue joins a neighbour at most this far away
MAX_LINE_CHARS = 42
MAX_CUE_LINES = 2  # a merge never makes a cue longer than this many full lines...
MAX_MERGED_SECONDS = 7.0  # ...or than this


def subtitle_cues(segments: list[dict], audio_seconds: float | None = None) -> list[tuple[float, float, list[str]]]:
    """``(start, end, lines)`` of the cues showing ``segments`` (dicts with ``start``, ``end``, ``text``).

    A segment shorter than ``MIN_CUE_SECONDS`` (a stray "O" of 20 ms) joins the nearer neighbour
    when the silence between is at most ``MERGE_GAP_SECONDS`` and the joined cue stays within
    ``MAX_CUE_LINES`` lines of ``MAX_LINE_CHARS`` and ``MAX_MERGED_SECONDS``. A cue still shorter
    is shown longer: its end moves towards the next cue, then its start towards the previous one
    (never overlapping them, never outside ``[0, audio_seconds]``). Text is broken into lines of at
    most ``MAX_LINE_CHARS`` (two balanced lines where it fits in two). Segments are never split.
    """
    spans = [(s["start"], s["end"], " ".join(s["text"].split())) for s in segments if s["text"].strip()]
    merged: list[tuple[float, float, str]] = []
    for i, span in enumerate(spans):
        following = spans[i + 1] if i + 1 < len(spans) else None
        if merged and _joins(merged[-1], span, following):
            merged[-1] = (merged[-1][0], span[1], f"{merged[-1][2]} {span[2]}")
        else:
            merged.append(span)
    cues, shown_until = [], 0.0
    for i, (start, end, text) in enumerate(merged):
        later = merged[i + 1][0] if i + 1 < len(merged) else audio_seconds if audio_seconds is not None else end
        end = max(end, min(start + MIN_CUE_SECONDS, max(later, end)))
        start = min(start, max(end - MIN_CUE_SECONDS, shown_until))
        cues.append((start, end, _lines(text)))
        shown_until = end
    return cues


def _joins(previous: tuple, span: tuple, following: tuple | None) -> bool:
    """Whether ``span`` joins the cue before it: one of the two is short, the silence between is
    small, the result fits, and a short ``span`` has no nearer neighbour that it fits with instead."""
    short = span[1] - span[0] < MIN_CUE_SECONDS
    if not (short or previous[1] - previous[0] < MIN_CUE_SECONDS) or not _can_join(previous, span):
        return False
    if short and following is not None and _can_join(span, following):
        return span[0] - previous[1] <= following[0] - span[1]
    return True


def _can_join(a: tuple, b: tuple) -> bool:
    return (b[0] - a[1] <= MERGE_GAP_SECONDS and b[1] - a[0] <= MAX_MERGED_SECONDS
            and len(_lines(f"{a[2]} {b[2]}")) <= MAX_CUE_LINES)


def _lines(text: str) -> list[str]:
    """``text`` in lines of at most ``MAX_LINE_CHARS`` (a longer word stands alone): one line if it
    fits, else two lines as equal as the words allow, else as many as it takes."""
    if len(text) <= MAX_LINE_CHARS:
        return [text]
    words = text.split(" ")
    splits = [(" ".join(words[:k]), " ".join(words[k:])) for k in range(1, len(words))]
    two = min(splits, key=lambda pair: max(map(len, pair)), default=None)
    if two is not None and max(map(len, two)) <= MAX_LINE_CHARS:
        return list(two)
    return textwrap.wrap(text, MAX_LINE_CHARS, break_long_words=False, break_on_hyphens=False)
