"""Inference speed, efficiency and memory of w2v2 against transformers' Wav2Vec2ForCTC.

    python benchmarks/inference.py            # BASE with random weights, 10 s and 60 s of speech
    python benchmarks/inference.py --quick    # one timed repeat, no memory measurement
    python benchmarks/inference.py --model DIR  # a checkpoint directory (Hugging Face layout)

Also our ONNX export run by onnxruntime, in float32 and with the Transformer's matrix products
in dynamic int8 (``--precision int8``), on the same threads.

Same weights, inputs and threads for both libraries, all variants timed interleaved in one
process; medians reported. GFLOP/s count the model's multiply-adds analytically from its config
(convolutions, projections, attention, FFN) and compare them with the float32 / bfloat16 matmul
peak measured here. Peak RSS is measured per variant in a fresh process (after a warm-up pass)
as the growth of the resident-set high-water mark during one pass.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile

import torch

import harness
from w2v2 import precision

VARIANTS = ("transformers fp32", "transformers bf16 autocast", "ours fp32", "ours fast", "onnx fp32", "onnx int8")


def onnx_model(ours, directory: str, threads: int):
    """Our model exported to ONNX in ``directory``, run by onnxruntime on ``threads`` threads."""
    from w2v2.onnx import OnnxModel, export_onnx

    return OnnxModel(export_onnx(ours, f"{directory}/model.onnx"), ours.config, ours.vocab, threads=threads)


def runners(hf, ours, x: torch.Tensor, fast: str, onnx=None):
    """name -> function returning float32 logits (1, frames, vocab); each runs one pass."""
    xn = harness.normalized(x)

    def tf(autocast: bool):
        def run():
            with torch.inference_mode(), torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
                return hf(xn).logits.float()
        return run

    def ours_(prec: str):
        def run():
            ours.set_precision(prec)
            return ours.infer(x).logits
        return run

    def onnx_(prec: str):
        def run():
            return onnx.set_precision(prec)(x).logits
        return run

    fns = {"transformers fp32": tf(False), "transformers bf16 autocast": tf(True),
           "ours fp32": ours_("fp32"), "ours fast": ours_(fast)}
    if onnx is not None:  # the ONNX rows need our model exported first (onnx_model)
        fns.update({"onnx fp32": onnx_("fp32"), "onnx int8": onnx_("int8")})
    return fns


def memory_child(args) -> None:
    """One pass of one variant in this fresh process; prints {"delta": bytes} as JSON."""
    torch.set_num_threads(args.threads)
    import transformers
    import w2v2

    hf = transformers.Wav2Vec2ForCTC.from_pretrained(args.model, attn_implementation="sdpa").eval() \
        if args.child.startswith("transformers") else None
    ours = w2v2.load_model(args.model).eval() if hf is None else None
    tmp = tempfile.TemporaryDirectory()
    onnx = onnx_model(ours, tmp.name, args.threads) if args.child.startswith("onnx") else None
    x, warm = harness.speech(args.seconds), harness.speech(2.0, seed=1)
    run = runners(hf, ours, warm, args.fast, onnx)[args.child]
    run()  # warm-up: lazy initialisation, oneDNN primitives, cached weights, the int8 graph
    run = runners(hf, ours, x, args.fast, onnx)[args.child]
    harness.gc.collect()
    before = harness.reset_peak_rss()
    run()
    print(json.dumps({"delta": harness.peak_rss() - before}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one timed repeat, skip the memory measurement")
    p.add_argument("--model", help="checkpoint directory (default: BASE config with random weights)")
    p.add_argument("--lengths", type=float, nargs="+", default=[10.0, 60.0], help="input seconds")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per variant (median reported)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or process CPU time (use with --threads 1 on a busy machine)")
    p.add_argument("--fast", default="auto", choices=("auto", "fp32", "bf16"), help="precision of the fast path")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="rows to run (default all; transformers fp32 always runs: the reference)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return memory_child(args)
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    load_before = harness.load_average()
    peak = harness.matmul_peak(clock=args.clock)
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = harness.model_pair(tmp, None if args.model else harness.hf_config("base"), args.model)
        model_dir = args.model or tmp
        fast_dtype = precision.resolve(args.fast, "cpu")
        variants = [v for v in VARIANTS if v in args.variants or v == "transformers fp32"]
        onnx = onnx_model(ours, tmp, args.threads) if any(v.startswith("onnx") for v in variants) else None
        rows, flop_lines = [], []
        for seconds in args.lengths:
            x = harness.speech(seconds)
            fns = {k: f for k, f in runners(hf, ours, x, args.fast, onnx).items() if k in variants}
            logits = {name: f() for name, f in fns.items()}  # also the warm-up pass
            times = harness.interleaved(fns, repeats, warmup=0, clock=args.clock)
            flops = harness.forward_flops(ours.config, x.shape[1])
            total = sum(flops.values())
            flop_lines.append(f"{seconds:g} s: {total / 1e9:.0f} GFLOP (" +
                              ", ".join(f"{k} {v / 1e9:.1f}" for k, v in flops.items()) + ")")
            ref = logits["transformers fp32"]
            for name in variants:
                bf16 = "bf16" in name or (name == "ours fast" and fast_dtype == torch.bfloat16)
                gflops = total / times[name] / 1e9
                mem = "-"
                if not args.quick:
                    res = harness.child_json([__file__, "--child", name, "--seconds", str(seconds), "--model",
                                              model_dir, "--threads", str(args.threads), "--fast", args.fast])
                    if res:
                        mem = f"{res['delta'] / 2**20:.0f} ({res['delta'] / 2**20 / seconds:.1f}/s)"
                rows.append([
                    f"{seconds:g} s", name + (f" ({args.fast}: {str(fast_dtype).split('.')[-1]})" if name == "ours fast" else ""),
                    f"{times[name]:.3f}", f"{times['transformers fp32'] / times[name]:.2f}x",
                    f"{gflops:.0f}", "-" if "int8" in name else f"{100 * gflops / peak['bf16' if bf16 else 'fp32']:.0f}%",
                    mem,
                    f"{(logits[name] - ref).abs().max().item():.1e}",
                    f"{(logits[name].argmax(-1) == ref.argmax(-1)).float().mean().item():.4f}",
                ])
    print(f"# w2v2 inference benchmark: {'checkpoint ' + args.model if args.model else 'BASE, random weights'}, "
          f"batch 1, real speech")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {args.threads}, "
          f"clock {args.clock}, repeats {repeats}, CPU bf16 features: {', '.join(precision.cpu_bf16_flags()) or 'none'}")
    print(f"matmul peak (2048^3, best of): fp32 {peak['fp32']:.0f} GFLOP/s [{peak['fp32 detail']}], "
          f"bf16 {peak['bf16']:.0f} GFLOP/s [{peak['bf16 detail']}]")
    print("model FLOPs per pass: " + "; ".join(flop_lines))
    print(f"load average before/after: {load_before} / {harness.load_average()}\n")
    print(harness.markdown_table(
        ["input", "implementation", "s / pass", "vs tf fp32", "GFLOP/s", "% of peak", "peak RSS Δ MiB (per audio s)",
         "max abs Δlogit vs tf fp32", "argmax agree"], rows))


if __name__ == "__main__":
    sys.exit(main())
