"""Shared fixtures: tiny configs, reference models built locally (no downloads), real speech paths."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def read_manifest(folder: Path) -> list[dict]:
    with open(folder / "manifest.tsv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


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
