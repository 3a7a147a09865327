import itertools
import math
import random
import sys

import pytest
import torch

from w2v2.decoding import (
    BeamSearchDecoder,
    Word,
    align_text,
    align_words,
    build_ngram_lm,
    ctc_collapse,
    ctc_forced_align,
    ctc_labels,
    decoding_windows,
    greedy_decode,
    greedy_decode_batch,
    greedy_decode_path,
    segment_words,
)
from w2v2.vocab import Vocabulary

# <pad>=0 <s>=1 </s>=2 <unk>=3 |=4 A=5 B=6 C=7 E=8 H=9 O=10 S=11 T=12
VOCAB = Vocabulary.from_characters("ABCEHOST")
ID = {t: i for i, t in enumerate(VOCAB.tokens)}
ID["_"] = VOCAB.blank_index


def emission(frames, p=0.9):
    """log-probs (time, vocab): each frame a token ("C", "_", "|") with probability p and
    the rest spread evenly, or a dict {token: prob} with the rest spread evenly."""
    rows = []
    for f in frames:
        spec = {f: p} if isinstance(f, str) else f
        rest = (1 - sum(spec.values())) / (len(VOCAB) - len(spec))
        row = torch.full((len(VOCAB),), rest, dtype=torch.float64)
        for tok, prob in spec.items():
            row[ID[tok]] = prob
        rows.append(row)
    return torch.stack(rows).log().float()


# ---------------------------------------------------------------- greedy


def test_ctc_collapse_hand_case():
    tokens, starts, ends = ctc_collapse(torch.tensor([0, 5, 5, 0, 5, 6, 6]), blank=0)
    assert tokens.tolist() == [5, 5, 6]  # blank between repeats keeps both
    assert starts.tolist() == [1, 4, 5]
    assert ends.tolist() == [3, 5, 7]
    assert [t.numel() for t in ctc_collapse(torch.tensor([0, 0]), blank=0)] == [0, 0, 0]


def test_greedy_collapse_and_timestamps():
    frames = ["_", "C", {"C": 0.6}, "_", "A", "T", "T", "|", "|", "_", "A", "_", "A"]
    out = greedy_decode(emission(frames), VOCAB, frame_seconds=0.02)
    assert out.text == "CAT AA"
    assert out.tokens == [ID[c] for c in "CAT|AA"]
    assert out.token_frames == [1, 4, 5, 7, 10, 12]
    cat, aa = out.words
    assert (cat.word, aa.word) == ("CAT", "AA")
    assert cat.start == pytest.approx(0.02) and cat.end == pytest.approx(0.14)  # frames 1..6
    assert aa.start == pytest.approx(0.20) and aa.end == pytest.approx(0.26)  # frames 10..12
    # mean of the max probability over the emitting frames 1, 2, 4, 5, 6 (blank frame 3 excluded)
    assert cat.confidence == pytest.approx((0.9 + 0.6 + 0.9 + 0.9 + 0.9) / 5, abs=1e-6)
    assert [c.char for c in out.chars] == list("CATAA")
    c = out.chars[0]
    assert (c.start, c.end, c.confidence) == pytest.approx((0.02, 0.06, 0.75), abs=1e-6)


def test_greedy_skips_specials_and_accepts_logits():
    frames = ["<s>", "C", "<unk>", "A", "|", "</s>"]
    logits = emission(frames) * 3.0 + 7.0  # not log-probabilities, same argmax
    out = greedy_decode(logits, VOCAB)
    assert out.text == "CA" and [w.word for w in out.words] == ["CA"]
    assert len(out.tokens) == 6


def test_greedy_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\(time, vocab=13\)"):
        greedy_decode(torch.zeros(5, 4), VOCAB)


def test_greedy_batch_uses_lengths():
    a = emission(["C", "A", "T", "_"])
    b = emission(["A", "_", "_", "_"])
    b[1:] = emission(["B", "B", "B"])  # padding frames that must be ignored
    out = greedy_decode_batch(torch.stack([a, b]), VOCAB, lengths=[4, 1])
    assert [o.text for o in out] == ["CAT", "A"]


# ---------------------------------------------------------------- forced alignment


def test_forced_align_recovers_known_path():
    # the acoustics prefer O at frame 2, but the transcript says CAT
    lp = emission(["_", "C", {"O": 0.6, "A": 0.3}, "T", "_"])
    assert greedy_decode(lp, VOCAB).text == "COT"
    path = ctc_forced_align(lp, torch.tensor([ID[c] for c in "CAT"]), blank=0)
    assert path.tolist() == [0, ID["C"], ID["A"], ID["T"], 0]


def _brute_force(lp, targets, blank):
    best, best_path = -math.inf, None
    for path in itertools.product(range(lp.shape[1]), repeat=lp.shape[0]):
        tokens, _, _ = ctc_collapse(torch.tensor(path), blank)
        if tokens.tolist() == targets:
            score = sum(float(lp[t, k]) for t, k in enumerate(path))
            if score > best:
                best, best_path = score, list(path)
    return best, best_path


@pytest.mark.parametrize("targets, n_frames", [([1, 2], 4), ([1, 1], 5), ([2, 1, 2], 5), ([1], 1), ([], 3)])
def test_forced_align_matches_brute_force(targets, n_frames):
    gen = torch.Generator().manual_seed(sum(targets) * 10 + n_frames)
    lp = torch.randn(n_frames, 3, generator=gen).double().log_softmax(-1)
    path = ctc_forced_align(lp, torch.tensor(targets, dtype=torch.long), blank=0)
    best, best_path = _brute_force(lp, targets, blank=0)
    assert ctc_collapse(path, 0)[0].tolist() == targets
    assert sum(float(lp[t, k]) for t, k in enumerate(path.tolist())) == pytest.approx(best, abs=1e-5)
    assert path.tolist() == best_path  # continuous random scores: the optimum is unique


def test_forced_align_too_short_audio():
    lp = emission(["A", "A"])
    with pytest.raises(ValueError, match="at least 3 frames"):
        ctc_forced_align(lp, torch.tensor([ID["A"], ID["A"]]), blank=0)
    path = ctc_forced_align(emission(["A", "A", "A"]), torch.tensor([ID["A"], ID["A"]]), blank=0)
    assert path.tolist() == [ID["A"], 0, ID["A"]]  # the only valid path


def test_forced_align_impossible_emission():
    lp = torch.full((3, 3), float("-inf"))
    lp[:, 0] = 0.0  # only blank is possible
    with pytest.raises(ValueError, match="non-zero probability"):
        ctc_forced_align(lp, torch.tensor([1]), blank=0)


def test_align_words_times_and_normalisation():
    frames = ["_", "C", "A", "A", "T", "|", "_", "_", "B", "E", "_", "E", "S", "_"]
    words = align_words(emission(frames), "cat, bees!", VOCAB, frame_seconds=0.02)
    assert [w.word for w in words] == ["CAT", "BEES"]
    assert (words[0].start, words[0].end) == pytest.approx((0.02, 0.10))
    assert (words[1].start, words[1].end) == pytest.approx((0.16, 0.26))
    assert words[0].confidence == pytest.approx(0.9, abs=1e-5)


def test_align_unknown_characters():
    no_unk = Vocabulary(("<pad>", "|", "A", "C", "T"))
    lp = torch.zeros(10, len(no_unk)).log_softmax(-1)
    with pytest.raises(ValueError, match=r"not in the vocabulary: \['D'\]"):
        align_words(lp, "cad", no_unk)
    # with an <unk> token the character aligns to it and the word keeps its spelling
    frames = ["C", "A", {"<unk>": 0.9}, "_"]
    out = align_text(emission(frames), "CAD", VOCAB)
    assert out.text == "CAD" and [w.word for w in out.words] == ["CAD"]
    assert out.tokens == [ID["C"], ID["A"], VOCAB.unk_index]


# ---------------------------------------------------------------- segmentation


def _w(word, start, end):
    return Word(word, start, end, 1.0)


def test_segment_on_pause():
    words = [_w("A", 0.0, 0.2), _w("B", 0.3, 0.5), _w("C", 1.2, 1.4), _w("D", 1.5, 1.6)]
    segs = segment_words(words, pause_seconds=0.5)
    assert [s["text"] for s in segs] == ["A B", "C D"]
    assert (segs[1]["start"], segs[1]["end"]) == (1.2, 1.6)
    assert segs[0]["words"] == words[:2]


def test_segment_on_length_and_duration():
    words = [_w("AAAA", i * 1.0, i * 1.0 + 0.9) for i in range(6)]
    assert [s["text"] for s in segment_words(words, max_chars=9)] == ["AAAA AAAA"] * 3
    segs = segment_words(words, max_seconds=2.0)  # each segment spans at most 2 s
    assert [len(s["words"]) for s in segs] == [2, 2, 2]
    assert segment_words([]) == []
    assert len(segment_words([_w("X" * 100, 0.0, 1.0)])) == 1  # a too long word stands alone


# ---------------------------------------------------------------- beam search and LM


def test_ctc_labels_unique_and_mapped():
    labels = ctc_labels(VOCAB)
    assert labels[0] == "" and labels[ID["|"]] == " " and labels[ID["A"]] == "A"
    assert len(set(labels)) == len(labels)
    assert all(len(labels[i]) == 1 and labels[i] not in VOCAB.tokens for i in (1, 2, 3))


def test_beam_without_lm_equals_greedy():
    rng = random.Random(0)
    decoder = BeamSearchDecoder(VOCAB, beam_width=16)
    symbols = ["_", "|", *"ABCEHOST"]
    for _ in range(5):
        frames = [rng.choice(symbols) for _ in range(30)]
        lp = emission(frames, p=0.8)
        greedy, beam = greedy_decode(lp, VOCAB), decoder.decode(lp)
        assert beam.text == greedy.text
        def spans(words):
            return [(w.word, round(w.start / 0.02), round(w.end / 0.02)) for w in words]

        assert spans(beam.words) == spans(greedy.words)
        assert [c.char for c in beam.chars] == [c.char for c in greedy.chars]


def test_beam_with_lm_fixes_ambiguous_acoustics(tmp_path):
    lines = ["the cat sat"] * 10 + ["the cat is hot", "a cot", "the bat"]
    lm = build_ngram_lm(lines, tmp_path / "lm.arpa", order=3)
    frames = ["T", "H", "E", "|", "C", {"O": 0.5, "A": 0.4}, "T", "_"]
    lp = emission(frames)
    assert greedy_decode(lp, VOCAB).text == "THE COT"
    assert BeamSearchDecoder(VOCAB).decode(lp).text == "THE COT"
    out = BeamSearchDecoder(VOCAB, lm_path=lm, alpha=0.5, beta=1.0).decode(lp)
    assert out.text == "THE CAT"
    assert [c.char for c in out.chars] == list("THECAT")
    assert out.words[1].start == pytest.approx(0.08) and out.words[1].end == pytest.approx(0.14)


def test_beam_missing_lm_and_missing_package(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="build_ngram_lm"):
        BeamSearchDecoder(VOCAB, lm_path=tmp_path / "nope.arpa")
    monkeypatch.setitem(sys.modules, "pyctcdecode", None)
    with pytest.raises(ImportError, match=r"w2v2\[lm\]"):
        BeamSearchDecoder(VOCAB)


CORPUS = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat and a dog",
    "the cat saw the dog",
    "the dog saw a cat on the mat",
] * 3


def test_ngram_lm_loads_and_prefers_in_domain(tmp_path):
    kenlm = pytest.importorskip("kenlm")
    path = build_ngram_lm(CORPUS, tmp_path / "lm.arpa", order=3)
    model = kenlm.Model(str(path))
    assert model.order == 3
    rng = random.Random(1)
    for line in CORPUS[:5]:
        words = line.upper().split()
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        assert model.score(" ".join(words)) > model.score(" ".join(shuffled))


@pytest.mark.parametrize("context", [[], ["THE"], ["THE", "CAT"], ["CAT", "THE"], ["ZEBRA"]])
def test_ngram_lm_distributions_sum_to_one(tmp_path, context):
    kenlm = pytest.importorskip("kenlm")
    path = build_ngram_lm(CORPUS, tmp_path / "lm.arpa", order=3)
    model = kenlm.Model(str(path))
    words = sorted({w for line in CORPUS for w in line.upper().split()}) + ["</s>", "<unk>"]
    state, out = kenlm.State(), kenlm.State()
    model.BeginSentenceWrite(state)  # context starts at <s>
    for w in context:
        model.BaseScore(state, w, out)
        state, out = out, state
    total = sum(10 ** model.BaseScore(state, w, out) for w in words)
    assert total == pytest.approx(1.0, abs=1e-4)


def test_ngram_lm_from_file_normalises(tmp_path):
    src = tmp_path / "text.txt"
    src.write_text("Hello, world!\n\nhello there\n", encoding="utf-8")
    path = build_ngram_lm(src, tmp_path / "lm.arpa", order=2)
    text = path.read_text(encoding="utf-8")
    assert "\tHELLO\t" in text and "\tWORLD\t" in text and "hello" not in text
    assert "ngram 1=6" in text  # <s> </s> <unk> HELLO WORLD THERE
    with pytest.raises(ValueError, match="no words"):
        build_ngram_lm(["?!"], tmp_path / "empty.arpa")
    with pytest.raises(ValueError, match="order must be >= 2"):
        build_ngram_lm(src, tmp_path / "lm1.arpa", order=1)


# ---------------------------------------------------------------- long audio


def test_greedy_from_path_equals_greedy():
    lp = torch.randn(40, len(VOCAB), generator=torch.Generator().manual_seed(3))
    best, path = lp.log_softmax(-1).max(-1)
    assert greedy_decode_path(path, best, VOCAB) == greedy_decode(lp, VOCAB)
    with pytest.raises(ValueError, match="differ in length"):
        greedy_decode_path(path, best[:-1], VOCAB)


@pytest.mark.parametrize("budget", [1, 7, 64, 10**9])
def test_viterbi_in_blocks_equals_one_pass(budget, monkeypatch):
    """Recomputing blocks of back pointers (bounded memory) gives the very same path."""
    from w2v2.decoding import alignment

    gen = torch.Generator().manual_seed(budget)
    lp = torch.randn(57, len(VOCAB), generator=gen).log_softmax(-1)
    targets = torch.tensor([ID[c] for c in "CATS|HOST|A"])
    full = ctc_forced_align(lp, targets, blank=0)
    monkeypatch.setattr(alignment, "MAX_BACKPOINTERS", budget * (2 * len(targets) + 1))
    assert torch.equal(ctc_forced_align(lp, targets, blank=0), full)


def test_decoding_windows_cut_in_pauses():
    is_blank = torch.tensor([0, 0, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    assert decoding_windows(is_blank, 100) == [(0, 18)]
    assert decoding_windows(is_blank, 6) == [(0, 4), (4, 8), (8, 14), (14, 18)]  # middles of blank runs, else hard
    assert decoding_windows(torch.zeros(10, dtype=torch.bool), 4) == [(0, 4), (4, 8), (8, 10)]


def test_beam_decode_long_joins_windows_with_shifted_times():
    decoder = BeamSearchDecoder(VOCAB, beam_width=8)
    lp = emission(["_", "C", "A", "T", "|", "_", "_", "_", "H", "O", "T", "|", "_", "_"] * 3)
    whole = decoder.decode(lp)
    assert whole.text == "CAT HOT CAT HOT CAT HOT"
    long = decoder.decode_long(lp, max_frames=10)  # cuts fall in the runs of blanks
    assert long.text == whole.text
    assert [(w.word, round(w.start, 2), round(w.end, 2)) for w in long.words] == [
        (w.word, round(w.start, 2), round(w.end, 2)) for w in whole.words]
    assert long.tokens == whole.tokens and VOCAB.decode(long.tokens) == long.text
