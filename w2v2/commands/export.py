"""``w2v2 export``: a training checkpoint (or any loadable model) -> a clean Hugging Face directory."""

from __future__ import annotations

import logging

log = logging.getLogger("w2v2.export")


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="training run dir or checkpoint dir, HF dir or hub id, fairseq .pt")
    p.add_argument("out_dir", help="output folder (config.json, model.safetensors, vocab.json, ...)")
    p.add_argument("--fp16", action="store_true", help="store float16 weights (half the size)")
    p.add_argument("--keep-quantizer", action="store_true",
                   help="keep the quantizer of a pretraining checkpoint (which is dropped without this flag)")


def export(checkpoint: str, out_dir: str, fp16: bool = False, keep_quantizer: bool = False):
    """Load ``checkpoint`` (optimizer state and training metadata are not read) and write HF layout."""
    import torch

    from ..checkpoint import load_model, save_pretrained

    model = load_model(checkpoint, with_quantizer=None if keep_quantizer else False)
    if fp16:
        model = model.to(torch.float16)
    return save_pretrained(model, out_dir)


def run(args) -> int:
    from ._shared import check_output_target

    check_output_target(args.out_dir, folder=True, option="out_dir")  # before loading anything
    out = export(args.checkpoint, args.out_dir, fp16=args.fp16, keep_quantizer=args.keep_quantizer)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")
    return 0
