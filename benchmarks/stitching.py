"""How close a stitched (chunked) emission is to one pass over the whole file.

    python benchmarks/stitching.py [AUDIO]     # default: the longest ljspeech-amateur clip

Random weights (no trained model yet), 4 s chunks (6 s for the 2 s stride), real speech.
Prints the fraction of frames whose argmax equals the single pass and the mean absolute
difference of the log-probabilities (ours are stored as float16: 0.0005 is rounding).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from w2v2.audio import load_audio
from w2v2.config import base, tiny
from w2v2.data import read_rows
from w2v2.emissions import compute_emissions, plan_chunks
from w2v2.model import build_model
from w2v2.text import build_vocabulary

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ljspeech-amateur"
MODELS = {
    "bounded window (layer-norm encoder, no attention, no input normalisation)":
        tiny(feat_extract_norm="layer", conv_bias=True, num_hidden_layers=0, do_normalize=False),
    "tiny: attention, group norm, input normalisation": tiny(),
    "BASE": base(),
}
SETTINGS = [(4.0, 0.02), (4.0, 1.0), (6.0, 2.0)]  # (chunk, stride) seconds


def longest_clip() -> Path:
    row = max(read_rows(DATA / "manifest.tsv"), key=lambda r: float(r["seconds"]))
    return DATA / row["path"]


def main() -> None:
    audio = load_audio(sys.argv[1] if len(sys.argv) > 1 else longest_clip())
    vocab = build_vocabulary(["abcdefghijklmnopqrstuvwxyz'"])
    print(f"{len(audio) / 16000:.1f} s of speech\n")
    print("| model | chunk / stride | frames with the single-pass argmax | mean abs. log-prob difference |")
    print("|---|---|---|---|")
    for name, cfg in MODELS.items():
        torch.manual_seed(0)
        model = build_model(cfg, vocab=vocab).eval()
        with torch.inference_mode():
            ref = model(torch.from_numpy(audio)[None]).logits[0].float().log_softmax(-1)
        for chunk, stride in SETTINGS:
            plan = plan_chunks(chunk, stride, model.config)
            ((_, em),) = compute_emissions(model, [(0, audio)], plan, keep_log_probs=True)
            agree = (em.best_ids == ref.argmax(-1)).float().mean().item()
            diff = (em.log_probs() - ref).abs().mean().item()
            print(f"| {name} | {chunk:g} s / {stride:g} s | {agree:.1%} | {diff:.4f} |")


if __name__ == "__main__":
    main()
