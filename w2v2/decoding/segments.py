"""Group timed words into subtitle segments."""

from __future__ import annotations

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
