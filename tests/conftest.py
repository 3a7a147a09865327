"""Shared fixtures: tiny configs, reference models built locally (no downloads), real speech paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _find_data() -> Path:
    """The shared real-speech folder: $W2V2_TEST_DATA, else $W2V2_DATA, else ../shared/data beside
    the checkout (as the recipes find it)."""
    for candidate in (os.environ.get("W2V2_TEST_DATA"), os.environ.get("W2V2_DATA"), ROOT.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return ROOT.parent / "shared" / "data"


DATA = _find_data()


def read_manifest(folder: Path) -> list[dict]:
    """The rows of ``folder/manifest.tsv``, read as w2v2 reads every manifest."""
    from w2v2.data import read_rows

    return read_rows(folder / "manifest.tsv")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.exists():
        pytest.skip(f"real speech not found at {DATA}")
    return DATA


def hf_tiny_config(norm: str = "group", vocab_size: int = 12, **kw):
    """A transformers Wav2Vec2Config with shrunk dims matching w2v2.config.tiny."""
    transformers = pytest.importorskip("transformers")
    cfg = dict(
        conv_dim=(32,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_bias=norm == "layer", feat_extract_norm=norm, do_stable_layer_norm=norm == "layer",
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        num_codevector_groups=2, num_codevectors_per_group=8, codevector_dim=16, proj_codevector_dim=16,
        vocab_size=vocab_size, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.05,
        attn_implementation="eager",
    )
    cfg.update(kw)
    return transformers.Wav2Vec2Config(**cfg)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


def longest_clip(folder: str) -> tuple[Path, dict]:
    """The longest utterance of a data folder: (path, manifest row)."""
    if not (DATA / folder / "manifest.tsv").exists():
        pytest.skip(f"real speech not found at {DATA / folder}")
    row = max(read_manifest(DATA / folder), key=lambda r: float(r["seconds"]))
    return DATA / folder / row["path"], row


def first_clips(folder: str, n: int) -> list[Path]:
    """The paths of the first ``n`` utterances of a data folder's manifest."""
    if not (DATA / folder / "manifest.tsv").exists():
        pytest.skip(f"real speech not found at {DATA / folder}")
    return [DATA / folder / r["path"] for r in read_manifest(DATA / folder)[:n]]


def tiny_ctc_model(vocab_texts, seed: int = 0, **config):
    """A randomly initialised tiny CTC model over the characters of ``vocab_texts``.

    The blank and the word delimiter get a small bias so that a random model still emits
    words of a few characters (random logits alone give one endless word)."""
    from w2v2.config import tiny
    from w2v2.model import build_model
    from w2v2.text import build_vocabulary

    torch.manual_seed(seed)
    vocab = build_vocabulary(vocab_texts)
    model = build_model(tiny(**config), vocab=vocab).eval()
    with torch.no_grad():
        model.lm_head.bias[vocab.word_delimiter_index] = 0.15
        model.lm_head.bias[vocab.blank_index] = 0.2
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, data_dir):
    """A tiny random CTC model saved in Hugging Face layout (no trained model exists yet)."""
    from w2v2.checkpoint import save_pretrained

    texts = [r["text"] for r in read_manifest(data_dir / "ljspeech-amateur")]
    return save_pretrained(tiny_ctc_model(texts), tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded machine OpenMP's
    busy-waiting makes them 10-100x slower; restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
