import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from w2v2.text import build_vocabulary, infer_case, normalize_text
from w2v2.vocab import Vocabulary


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Hello, world!", "HELLO WORLD"),
        ("don’t", "DON'T"),
        ("Привет, мир", "ПРИВЕТ МИР"),
        ("well-known", "WELL KNOWN"),
        ("  many   spaces\tand\nlines ", "MANY SPACES AND LINES"),
        ("'quoted' rock 'n' roll", "QUOTED ROCK N ROLL"),
        ("it`s O‘Neil’s", "IT'S O'NEIL'S"),
        ("students' books", "STUDENTS BOOKS"),
        ("Καλημέρα κόσμε", "ΚΑΛΗΜΈΡΑ ΚΌΣΜΕ"),
        ("ﬁne Ｆｕｌｌ ２０２４", "FINE FULL 2024"),  # NFKC: ligature, full-width
        ("3,000 — 4.5%", "3 000 4 5"),
        ("e\u0301te\u0301", "ÉTÉ"),  # combining accents compose
        ("नमस्ते दुनिया", "नमस्ते दुनिया"),  # Devanagari vowel signs / virama are kept
        ("zero\u200bwidth", "ZEROWIDTH"),  # format characters vanish
        ("", ""),
        ("?!", ""),
    ],
)
def test_normalize_examples(raw, expected):
    assert normalize_text(raw) == expected


def test_normalize_cases():
    assert normalize_text("Hello World", case="lower") == "hello world"
    assert normalize_text("Hello, World", case=None) == "Hello World"
    with pytest.raises(ValueError, match="case"):
        normalize_text("x", case="title")


def _allowed(c):
    cat = unicodedata.category(c)
    return cat[0] in "LM" or cat == "Nd" or c in " '"


@settings(max_examples=300, deadline=None)
@given(st.text(), st.sampled_from(["upper", "lower", None]))
def test_normalize_properties(s, case):
    out = normalize_text(s, case=case)
    assert normalize_text(out, case=case) == out  # idempotent
    assert "  " not in out and out == out.strip()
    assert all(_allowed(c) for c in out)  # letters, marks, digits, apostrophe, space
    for word in out.split():  # apostrophes only inside words
        assert not word.startswith("'") and not word.endswith("'")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(categories=["Lu", "Ll", "Nd", "Po", "Pd", "Zs", "Mn", "Cf"])))
def test_normalize_properties_dense(s):
    # the same properties, on text dense in the characters the rules care about
    out = normalize_text(s)
    assert normalize_text(out) == out
    assert all(_allowed(c) for c in out) and "  " not in out


def test_build_vocabulary_and_case():
    vocab = build_vocabulary(["Hello, world!", "don't"])
    assert vocab.tokens == ("<pad>", "<s>", "</s>", "<unk>", "|", *"'DEHLNORTW")
    assert infer_case(vocab) == "upper"
    assert infer_case(build_vocabulary(["мир"], case="lower")) == "lower"
    assert infer_case(Vocabulary.from_characters("123")) is None
    with pytest.raises(ValueError, match="no characters"):
        build_vocabulary(["?!"])


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=40), st.sampled_from(["upper", "lower", None]))
def test_ascii_text_takes_the_fast_path_to_the_same_result(s, case):
    from w2v2.text import _normalize_any

    assert normalize_text(s, case) == _normalize_any(s, case)


def test_ascii_fast_path_on_apostrophes_and_punctuation():
    from w2v2.text import _normalize_any

    for s in ["don't 'quote' ''x'' a'' ''b o`neil `tis 3,000 well-known", "'", "a'b'c", "\t x \x00y\x7f"]:
        for case in ("upper", "lower", None):
            assert normalize_text(s, case) == _normalize_any(s, case), (s, case)
