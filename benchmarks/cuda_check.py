"""Correctness and speed of w2v2 on a CUDA GPU against transformers (run on a GPU machine).

    python benchmarks/cuda_check.py [--quick]

Checks: float32 logits equal transformers' (TF32 off) for both norm variants, padded batch ==
single, "auto" precision picks bf16, bf16 logits/argmax close to float32, float32 gradients equal
transformers' (tiny config); then times inference (BASE, 10 s and 60 s) and one CTC update (BASE
2 x 10 s, small 8 x 4 s), ours vs transformers, float32 and bf16 (autocast for transformers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import harness  # noqa: F401  (puts this checkout first on sys.path)
import torch
import torch.nn.functional as F
import transformers

import w2v2
from w2v2 import convert
from w2v2.config import preset

DEV = "cuda"
DRY = False  # --dry: tiny models and inputs on the CPU, to test this script without a GPU


def sync():
    if DEV == "cuda":
        sync()


def pair(name: str, tmp: str, **overrides):
    name = "tiny" if DRY else name
    d = convert.config_to_hf(preset(name, vocab_size=32), "Wav2Vec2ForCTC")
    d.update(mask_time_prob=0.0, attn_implementation="sdpa", **overrides)
    torch.manual_seed(0)
    hf = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**d))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    hf.save_pretrained(tmp)
    (Path(tmp) / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True}))
    return hf.to(DEV).eval(), w2v2.load_model(tmp, device=DEV).eval()


def norm(x):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-7)


def timed(fns: dict, repeats: int) -> dict:
    for f in fns.values():
        f()
    sync()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def check_correctness() -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for name, overrides in (("base", {}), ("small", dict(feat_extract_norm="layer", conv_bias=True,
                                                          do_stable_layer_norm=True))):
        with tempfile.TemporaryDirectory() as tmp:
            hf, ours = pair(name, tmp, **overrides)
        x = torch.randn(2, 64000, device=DEV)
        with torch.inference_mode():
            ref = hf(norm(x)).logits
            o32 = ours.infer(x).logits
            print(f"[{name} {ours.config.feat_extract_norm}] fp32 max|Δlogit| vs transformers: {(o32 - ref).abs().max().item():.2e}")
            lengths = torch.tensor([64000, 40000], device=DEV)
            b, a = ours.infer(x, lengths), ours.infer(x[1:, :40000])
            f = b.lengths[1].item()
            print(f"  padded batch vs single: {(b.logits[1, :f] - a.logits[0]).abs().max().item():.2e}")
            ours.set_precision("auto")
            print(f"  auto precision resolves to {ours.compute_dtype}")
            o16 = ours.infer(x).logits
            with torch.autocast(DEV, torch.bfloat16):
                h16 = hf(norm(x)).logits.float()
            for k, o in (("ours bf16", o16), ("tf autocast", h16)):
                print(f"  {k}: max|Δlogit| {(o - o32).abs().max().item():.3f}, argmax agreement "
                      f"{(o.argmax(-1) == o32.argmax(-1)).float().mean().item():.4f}")
    torch.manual_seed(0)
    for name, overrides in (("tiny", {}), ("tiny", dict(feat_extract_norm="layer", conv_bias=True,
                                                         do_stable_layer_norm=True))):
        with tempfile.TemporaryDirectory() as tmp:
            hf, ours = pair(name, tmp, **overrides)
        hf.train(), ours.train()
        x, tg = torch.randn(2, 8000, device=DEV), torch.randint(1, 32, (2, 5), device=DEV)
        for m, inp in ((hf, norm(x)), (ours, x)):
            lp = m(inp).logits.float().log_softmax(-1).transpose(0, 1)
            F.ctc_loss(lp, tg, torch.full((2,), lp.shape[0]), torch.full((2,), 5), reduction="sum").backward()
        ref = {k.removeprefix("wav2vec2."): p.grad for k, p in hf.named_parameters()}
        scale = max(g.abs().max().item() for g in ref.values() if g is not None)
        worst = max(((p.grad - ref[k]).abs().max() / max(ref[k].abs().max().item(), 1e-2 * scale)).item()
                    for k, p in ours.named_parameters() if p.grad is not None)
        print(f"[tiny {ours.config.feat_extract_norm}] fp32 gradients vs transformers: worst relative diff {worst:.1e}")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # PyTorch defaults


def bench_inference(repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = pair("base", tmp)
    print("\n| input | transformers fp32 | transformers bf16 autocast | ours fp32 | ours bf16 | ours bf16 vs tf fp32 | "
          "ours bf16 vs tf bf16 | peak MiB tf fp32 / ours bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for seconds, batch in ((10, 1), (60, 1), (10, 8)):
        x = torch.randn(batch, (1 if DRY else seconds) * 16000, device=DEV)
        xn = norm(x)

        def tf(bf16):
            def run():
                with torch.inference_mode(), torch.autocast(DEV, torch.bfloat16, enabled=bf16):
                    hf(xn)
            return run

        def us(prec):
            def run():
                ours.set_precision(prec).infer(x)
            return run

        fns = {"tf32": tf(False), "tf16": tf(True), "o32": us("fp32"), "o16": us("bf16")}
        t = timed(fns, repeats)
        mem = {}
        for k in ("tf32", "o16"):
            if DEV != "cuda":
                mem[k] = float("nan")
                continue
            sync()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fns[k]()
            mem[k] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        print(f"| {batch} x {seconds} s | {t['tf32'] * 1e3:.1f} ms | {t['tf16'] * 1e3:.1f} ms | {t['o32'] * 1e3:.1f} ms | "
              f"{t['o16'] * 1e3:.1f} ms | {t['tf32'] / t['o16']:.2f}x | {t['tf16'] / t['o16']:.2f}x | "
              f"{mem['tf32']:.0f} / {mem['o16']:.0f} |")


def bench_training(repeats: int) -> None:
    print("\n| batch | precision | transformers s/step | ours s/step | speedup |")
    print("|---|---|---|---|---|")
    for name, batch, seconds in (("base", 2, 10), ("small", 8, 4)):
        with tempfile.TemporaryDirectory() as tmp:
            hf, ours = pair(name, tmp, layerdrop=0.0)
        hf.train(), ours.train()
        x = torch.randn(batch, (1 if DRY else seconds) * 16000, device=DEV)
        xn = norm(x)
        tg = torch.randint(1, 32, (batch, 20), device=DEV)
        oh, oo = torch.optim.AdamW(hf.parameters(), 1e-5), torch.optim.AdamW(ours.parameters(), 1e-5)

        def loss(logits):
            lp = logits.float().log_softmax(-1).transpose(0, 1)
            return F.ctc_loss(lp, tg, torch.full((batch,), lp.shape[0]), torch.full((batch,), 20), zero_infinity=True)

        def tf(bf16):
            def step():
                oh.zero_grad(set_to_none=True)
                with torch.autocast(DEV, torch.bfloat16, enabled=bf16):
                    logits = hf(xn).logits
                loss(logits).backward()
                oh.step()
            return step

        def us(prec):
            def step():
                oo.zero_grad(set_to_none=True)
                loss(ours.set_precision(prec)(x).logits).backward()
                oo.step()
            return step

        t = timed({"tf32": tf(False), "o32": us("fp32"), "tf16": tf(True), "o16": us("bf16")}, repeats)
        for prec, a, b in (("fp32", "tf32", "o32"), ("bf16", "tf16", "o16")):
            print(f"| {name} {batch} x {seconds} s | {prec} | {t[a]:.4f} | {t[b]:.4f} | {t[a] / t[b]:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dry", action="store_true", help="tiny models on the CPU (tests this script)")
    args = p.parse_args()
    global DEV, DRY
    if args.dry:
        DEV, DRY = "cpu", True
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.cuda.get_device_name() if DEV == 'cuda' else 'CPU dry run'}")
    check_correctness()
    bench_inference(3 if args.quick else 10)
    bench_training(2 if args.quick else 5)


if __name__ == "__main__":
    main()
