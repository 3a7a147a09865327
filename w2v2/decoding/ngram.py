"""A small n-gram language model builder writing ARPA files, without KenLM's ``lmplz``.

Smoothing: interpolated Kneser-Ney (Chen & Goodman 1998) with one absolute discount per
order, ``D = n1 / (n1 + 2 n2)`` from that order's count-of-counts (0.5 when undefined).
The highest order uses raw counts; lower orders use continuation counts (the number of
distinct words seen before the n-gram), except n-grams starting with ``<s>``, which keep
raw counts. Unigrams interpolate with the uniform distribution over the vocabulary plus
``<unk>``. Interpolated probabilities and backoff weights ``γ(h) = D·N1+(h•)/c(h)`` are
written so that ARPA backoff reproduces the interpolated model exactly; every
distribution sums to one. Fine for the small corpora of tests and experiments; use
KenLM's ``lmplz`` (modified Kneser-Ney, pruning) for large ones.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from w2v2.fileio import atomic_write_text
from w2v2.text import normalize_text

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
Ngram = tuple[str, ...]


TextSource = str | os.PathLike | Iterable[str]


def read_sentences(text_file_or_lines: TextSource, case: str | None = "upper") -> list[list[str]]:
    """A text file path (one sentence per line) or an iterable of lines -> normalised word lists."""
    if isinstance(text_file_or_lines, (str, os.PathLike)):
        try:
            lines = Path(text_file_or_lines).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ValueError(f"{text_file_or_lines}: cannot read LM text: {e}") from e
    else:
        lines = list(text_file_or_lines)
    sentences = [normalize_text(line, case=case).split() for line in lines]
    return [s for s in sentences if s]


def count_ngrams(sentences: list[list[str]], order: int) -> list[Counter]:
    """counts[k-1][ngram] for k = 1..order over ``<s> words </s>``; ``(<s>,)`` is not counted."""
    counts = [Counter() for _ in range(order)]
    for words in sentences:
        tokens = [BOS, *words, EOS]
        for k in range(1, order + 1):
            for i in range(len(tokens) - k + 1):
                counts[k - 1][tuple(tokens[i : i + k])] += 1
    counts[0].pop((BOS,), None)
    return counts


def kneser_ney_counts(counts: list[Counter]) -> list[Counter]:
    """Raw counts at the highest order; continuation counts below, raw for ``<s>``-initial."""
    adjusted = [Counter() for _ in counts]
    adjusted[-1] = Counter(counts[-1])
    for k in range(len(counts) - 1, 0, -1):  # adjust order k from order k+1
        preceding = Counter(g[1:] for g in counts[k])
        lower = counts[k - 1]
        adjusted[k - 1] = Counter({g: c if g[0] == BOS else preceding[g] for g, c in lower.items()})
    return adjusted


def discount(adjusted: Counter) -> float:
    """Absolute discount n1 / (n1 + 2 n2) from count-of-counts; 0.5 when undefined."""
    n1 = sum(1 for c in adjusted.values() if c == 1)
    n2 = sum(1 for c in adjusted.values() if c == 2)
    return n1 / (n1 + 2 * n2) if n1 and n2 else 0.5


Table = dict[Ngram, float]


def interpolated_kneser_ney(adjusted: list[Counter]) -> tuple[list[Table], list[Table]]:
    """Probabilities per order and backoff weights per context (natural values, not logs)."""
    vocab = sorted({g[0] for g in adjusted[0]} | {UNK})
    d = discount(adjusted[0])
    total = sum(adjusted[0].values())
    gamma = d * len(adjusted[0]) / total  # mass moved to the uniform distribution
    probs: list[Table] = [{(w,): max(adjusted[0][(w,)] - d, 0) / total + gamma / len(vocab) for w in vocab}]
    backoffs: list[Table] = []
    for k in range(1, len(adjusted)):
        d = discount(adjusted[k])
        context_total: dict[Ngram, float] = defaultdict(float)
        context_types: Counter = Counter()
        for g, c in adjusted[k].items():
            context_total[g[:-1]] += c
            context_types[g[:-1]] += 1
        gammas = {h: d * context_types[h] / context_total[h] for h in context_total}
        lower = probs[k - 1]
        probs.append(
            {g: (c - d) / context_total[g[:-1]] + gammas[g[:-1]] * lower[g[1:]] for g, c in adjusted[k].items()}
        )
        backoffs.append(gammas)
    return probs, backoffs


def write_arpa(path: str | Path, probs: list[Table], backoffs: list[Table]) -> None:
    """ARPA with log10 values; every n-gram below the highest order carries a backoff
    weight (0 when it is no context), which pyctcdecode's unigram reader expects."""
    order = len(probs)
    lines = ["\\data\\"]
    lines += [f"ngram {k}={len(probs[k - 1]) + (k == 1)}" for k in range(1, order + 1)]
    for k in range(1, order + 1):
        lines += ["", f"\\{k}-grams:"]
        entries = sorted(probs[k - 1].items())
        if k == 1:
            entries = [((BOS,), None), *entries]
        for g, p in entries:
            logp = -99.0 if p is None else math.log10(p)
            line = f"{logp:.6f}\t{' '.join(g)}"
            if k < order:
                line += f"\t{math.log10(backoffs[k - 1].get(g, 1.0)):.6f}"
            lines.append(line)
    lines += ["", "\\end\\", ""]
    atomic_write_text(path, "\n".join(lines))  # a full disk or a kill leaves no half model


def build_ngram_lm(
    text_file_or_lines: TextSource, out_path: str | Path, order: int = 3, case: str | None = "upper"
) -> Path:
    """Interpolated Kneser-Ney n-gram LM of normalised text (words in ``case``, matching the
    vocabulary) written as ARPA to ``out_path``; returns the path. Loads with
    ``kenlm.Model`` and ``BeamSearchDecoder(lm_path=...)``."""
    if order < 2:
        raise ValueError(f"order must be >= 2 (KenLM cannot load unigram models), got {order}")
    sentences = read_sentences(text_file_or_lines, case=case)
    if not sentences:
        raise ValueError("build_ngram_lm: no words in the text after normalisation")
    probs, backoffs = interpolated_kneser_ney(kneser_ney_counts(count_ngrams(sentences, order)))
    write_arpa(out_path, probs, backoffs)
    return Path(out_path)
