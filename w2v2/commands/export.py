"""``w2v2 export``: a training checkpoint (or any loadable model) -> a clean Hugging Face directory,
or with ``--onnx`` an ONNX graph beside the same config and vocabulary files."""

from __future__ import annotations

import logging

log = logging.getLogger("w2v2.export")


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="training run dir or checkpoint dir, HF dir or hub id, fairseq .pt")
    p.add_argument("out_dir", help="output folder (config.json, model.safetensors, vocab.json, ...)")
    p.add_argument("--fp16", action="store_true", help="store float16 weights (half the size)")
    p.add_argument("--keep-quantizer", action="store_true",
                   help="keep the quantizer of a pretraining checkpoint (which is dropped without this flag)")
    p.add_argument("--onnx", action="store_true",
                   help="write model.onnx (float32, dynamic batch and length, a lengths input) instead of "
                        "model.safetensors; load_model / --model runs the folder through onnxruntime")
    p.add_argument("--int8", action="store_true",
                   help="with --onnx: also write model.int8.onnx (dynamic int8), which --precision int8 runs")


def export(checkpoint: str, out_dir: str, fp16: bool = False, keep_quantizer: bool = False,
           onnx: bool = False, int8: bool = False):
    """Load ``checkpoint`` (optimizer state and training metadata are not read) and write HF layout,
    or (``onnx``) the config and vocabulary files with ``model.onnx`` (and ``model.int8.onnx``)."""
    import torch

    from ..checkpoint import ONNX_GRAPH, load_model, save_pretrained
    from ..model import Wav2Vec2

    if int8 and not onnx:
        raise ValueError("--int8 needs --onnx (int8 runs through onnxruntime)")
    if onnx and fp16:
        raise ValueError("--fp16 and --onnx cannot be combined (the ONNX graph is float32)")
    model = load_model(checkpoint, with_quantizer=None if keep_quantizer else False)
    if not isinstance(model, Wav2Vec2):
        raise ValueError(f"{checkpoint}: already an ONNX model; export the PyTorch checkpoint it came from")
    if not onnx:
        if fp16:
            model = model.to(torch.float16)
        return save_pretrained(model, out_dir)
    from ..onnx import export_onnx, quantize_onnx

    if model.lm_head is None:
        raise ValueError(f"{checkpoint}: ONNX export needs a fine-tuned (CTC) model; this one has no CTC head")
    out = save_pretrained(model, out_dir, weights=False)
    graph = export_onnx(model, out / ONNX_GRAPH)
    if int8:
        quantize_onnx(graph, graph.with_suffix(".int8.onnx"))
    return out


def run(args) -> int:
    from ._shared import check_output_target

    check_output_target(args.out_dir, folder=True, option="out_dir")  # before loading anything
    out = export(args.checkpoint, args.out_dir, fp16=args.fp16, keep_quantizer=args.keep_quantizer,
                 onnx=args.onnx, int8=args.int8)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")
    return 0
