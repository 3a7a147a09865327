"""Character vocabulary for CTC: index <-> token, blank, word delimiter.

Stored as Hugging Face's ``vocab.json`` (token -> index). The blank is the pad token
(index 0 in Hugging Face and fairseq letter dictionaries); ``|`` separates words.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BLANK = "<pad>"
WORD_DELIMITER = "|"
UNK = "<unk>"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


@dataclass(frozen=True)
class Vocabulary:
    tokens: tuple[str, ...]  # index -> token
    blank: str = BLANK
    word_delimiter: str = WORD_DELIMITER
    unk: str = UNK

    def __post_init__(self) -> None:
        if len(set(self.tokens)) != len(self.tokens):
            dup = sorted({t for t in self.tokens if self.tokens.count(t) > 1})
            raise ValueError(f"vocabulary has duplicate tokens: {dup}")
        if self.blank not in self.tokens:
            raise ValueError(f"vocabulary has no blank token {self.blank!r}")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def blank_index(self) -> int:
        return self.tokens.index(self.blank)

    @property
    def word_delimiter_index(self) -> int | None:
        return self.tokens.index(self.word_delimiter) if self.word_delimiter in self.tokens else None

    @property
    def unk_index(self) -> int | None:
        return self.tokens.index(self.unk) if self.unk in self.tokens else None

    def index(self, token: str) -> int:
        return self._lookup.get(token, self.unk_index if self.unk_index is not None else -1)

    @property
    def _lookup(self) -> dict[str, int]:
        # frozen dataclass: cache on the instance dict
        cache = self.__dict__.get("_lookup_cache")
        if cache is None:
            cache = {t: i for i, t in enumerate(self.tokens)}
            object.__setattr__(self, "_lookup_cache", cache)
        return cache

    @property
    def plain_characters(self) -> frozenset[str]:
        """Characters that :meth:`encode` maps to a token of their own: one-character tokens, and the
        space (to the word delimiter) when there is one."""
        cache = self.__dict__.get("_plain_characters_cache")  # frozen dataclass: as for ``_lookup``
        if cache is None:
            cache = frozenset(t for t in self.tokens if len(t) == 1) | (
                {" "} if self.word_delimiter in self.tokens else frozenset())
            object.__setattr__(self, "_plain_characters_cache", cache)
        return cache

    def encode(self, text: str) -> list[int]:
        """Characters of already-normalised text to indices; spaces become the word delimiter.

        Raises ValueError naming the characters that have no token when there is no unk token.
        """
        chars = [self.word_delimiter if c == " " else c for c in text]
        lookup = self._lookup  # once, not per character (fine-tuning encodes every transcript at start-up)
        ids = [lookup.get(c) for c in chars]
        if None in ids:
            if self.unk_index is None:
                missing = sorted({c for c, i in zip(chars, ids) if i is None})
                raise ValueError(f"characters not in the vocabulary: {missing}")
            ids = [self.unk_index if i is None else i for i in ids]
        return ids  # type: ignore[return-value]

    def decode(self, ids) -> str:
        """Indices (already CTC-collapsed, blanks removed) to text with spaces between words."""
        specials = set(SPECIALS) | {self.blank}
        out = []
        for i in ids:
            t = self.tokens[int(i)]
            if t == self.word_delimiter:
                out.append(" ")
            elif t not in specials:
                out.append(t)
        return " ".join("".join(out).split())

    # --- persistence (Hugging Face vocab.json) ---
    def to_json_dict(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json_dict(), ensure_ascii=False, indent=1), encoding="utf-8")

    @classmethod
    def from_json_dict(cls, d: dict[str, int], **kw) -> "Vocabulary":
        by_index = sorted(d.items(), key=lambda kv: kv[1])
        if [i for _, i in by_index] != list(range(len(by_index))):
            raise ValueError("vocab.json indices must be 0..N-1 without gaps")
        return cls(tuple(t for t, _ in by_index), **kw)

    @classmethod
    def load(cls, path: str | Path, **kw) -> "Vocabulary":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # ValueError: invalid JSON, or bytes that are not UTF-8
            raise ValueError(f"{path}: cannot read vocabulary: {e}") from e
        return cls.from_json(d, path, **kw)

    @classmethod
    def from_json(cls, d: object, source: str | Path, **kw) -> "Vocabulary":
        """The vocabulary in a parsed ``vocab.json``; ValueError naming ``source`` when it is not one."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: vocabulary must be a JSON object token -> index")
        # HF multi-lingual vocab files nest {lang: {token: id}}; take the single entry
        if d and all(isinstance(v, dict) for v in d.values()):
            if len(d) != 1:
                raise ValueError(f"{source}: vocabulary holds several languages {list(d)}; not supported")
            d = next(iter(d.values()))
        if not all(type(i) is int for i in d.values()):
            raise ValueError(f"{source}: vocabulary must map each token to an integer index")
        try:
            return cls.from_json_dict(d, **kw)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e

    @classmethod
    def from_characters(cls, chars) -> "Vocabulary":
        """Specials first (blank at 0, as in Hugging Face), then the word delimiter, then sorted chars."""
        chars = sorted(set(chars) - {" ", WORD_DELIMITER} - set(SPECIALS))
        return cls(SPECIALS + (WORD_DELIMITER,) + tuple(chars))
