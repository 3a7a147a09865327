"""Text normalisation for CTC training and evaluation, for any alphabet.

``normalize_text`` turns a transcript into the character stream a CTC model is trained
to emit, and the same function is applied to references before scoring WER, so that
both sides agree. The rules, in order:

1. Apostrophe-like characters ``’ ‘ ` ´ ʼ`` become ``'``.
2. Format characters (Unicode category ``Cf``: zero-width joiner / non-joiner, soft
   hyphen, BOM, ...) are deleted; they are invisible and never spoken.
3. Unicode NFKC: compatibility forms fold to plain ones (ligature ``ﬁ`` -> ``fi``,
   full-width ``Ａ１`` -> ``A1``, superscript ``²`` -> ``2``), accents compose.
4. Case: ``str.upper()`` (``case="upper"``, the wav2vec 2.0 convention) or
   ``str.lower()`` (``case="lower"``); ``None`` keeps the case. Not ``casefold()``,
   which would turn Greek final ``ς`` into ``σ``. NFKC and rule 1 are applied again
   afterwards, since NFKC and case mapping can produce decomposed or apostrophe-like
   characters (``ǰ`` -> ``J̌``, ``ŉ`` -> ``ʼN``).
5. Kept characters: letters of any script (category ``L*``), decimal digits (``Nd``,
   as they are: numbers are not spelled out), combining marks (``M*``) that follow a
   letter, digit or mark (Devanagari vowel signs, Arabic harakat, Thai tone marks are
   part of the written word), and ``'`` only *inside* a word, i.e. between two kept
   characters (``don't``, ``O'Neil``; the quotes in ``'hello'`` go).
6. Everything else (hyphens, dashes, other punctuation, symbols, other numbers)
   becomes a space, so ``well-known`` -> ``WELL KNOWN`` and ``3,000`` -> ``3 000``.
7. Whitespace runs collapse to one space; leading/trailing spaces are stripped.

The result contains only word characters, ``'`` and single spaces, and
``normalize_text`` is idempotent.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from w2v2.vocab import Vocabulary

APOSTROPHE = "'"
_APOSTROPHE_LIKE = str.maketrans({c: APOSTROPHE for c in "\u2019\u2018`\u00b4\u02bc"})
CASES = ("upper", "lower", None)
# ASCII text (most corpora's) in one bytes.translate and one regex: equal to the general
# rules on every ASCII string (tests/test_text.py) and much faster: fine-tuning normalises
# every transcript at start-up
_ASCII_WORDS = bytes(c if (chr(c).isascii() and chr(c).isalnum()) or chr(c) == APOSTROPHE else
                     39 if chr(c) == "`" else 32 for c in range(256))
_OUTER_APOSTROPHE = re.compile(r"(?<![A-Za-z0-9])'|'(?![A-Za-z0-9])")


def normalize_text(s: str, case: str | None = "upper") -> str:
    """Normalise one transcript for CTC; the rules are in the module docstring.

    >>> normalize_text("Hello, world!")
    'HELLO WORLD'
    >>> normalize_text("don’t stop", case="lower")
    "don't stop"
    """
    if case not in CASES:
        raise ValueError(f"case must be one of {CASES}, got {case!r}")
    if s.isascii():
        s = s.encode("ascii").translate(_ASCII_WORDS).decode("ascii")
        if case is not None:
            s = s.upper() if case == "upper" else s.lower()
        return " ".join((_OUTER_APOSTROPHE.sub(" ", s) if APOSTROPHE in s else s).split())
    return _normalize_any(s, case)


def _normalize_any(s: str, case: str | None) -> str:
    """:func:`normalize_text` for any text, rule by rule."""
    s = s.translate(_APOSTROPHE_LIKE)
    s = "".join(c for c in s if unicodedata.category(c) != "Cf")
    s = unicodedata.normalize("NFKC", s)
    if case is not None:
        s = s.upper() if case == "upper" else s.lower()
    s = unicodedata.normalize("NFKC", s).translate(_APOSTROPHE_LIKE)
    return " ".join(_keep_word_characters(s).split())


def _is_word_char(c: str) -> bool:
    """Letter, decimal digit or combining mark."""
    cat = unicodedata.category(c)
    return cat[0] in "LM" or cat == "Nd"


def _keep_word_characters(s: str) -> str:
    """Rules 5 and 6: word characters stay, in-word apostrophes stay, the rest -> space."""
    out: list[str] = []
    for c in s:
        cat = unicodedata.category(c)
        if cat[0] == "L" or cat == "Nd" or c == APOSTROPHE:
            out.append(c)
        elif cat[0] == "M" and out and _is_word_char(out[-1]):
            out.append(c)
        else:
            out.append(" ")
    for i, c in enumerate(out):  # apostrophe only between two word characters
        if c == APOSTROPHE:
            inside = 0 < i < len(out) - 1 and _is_word_char(out[i - 1]) and _is_word_char(out[i + 1])
            if not inside:
                out[i] = " "
    return "".join(out)


def infer_case(vocab: Vocabulary) -> str | None:
    """The case a vocabulary was built for: "lower" if its cased letters are all
    lower-case, "upper" if all upper-case, None if it has both or none."""
    letters = [t for t in vocab.tokens if len(t) == 1 and t.lower() != t.upper()]
    if not letters:
        return None
    if all(t == t.lower() for t in letters):
        return "lower"
    if all(t == t.upper() for t in letters):
        return "upper"
    return None


def build_vocabulary(texts: Iterable[str], case: str | None = "upper") -> Vocabulary:
    """Character vocabulary (specials, ``|``, sorted characters) of the normalised texts."""
    chars: set[str] = set()
    for text in texts:
        chars.update(normalize_text(text, case=case))
    if not chars - {" "}:
        raise ValueError("build_vocabulary: the texts hold no characters after normalisation")
    return Vocabulary.from_characters(chars)
