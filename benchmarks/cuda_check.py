"""Correctness and speed of w2v2 on a CUDA GPU against transformers (run on a GPU machine).

    python benchmarks/cuda_check.py [--quick]

Checks: float32 logits equal transformers' (TF32 off) for both norm variants, padded batch ==
single, "auto" precision picks bf16, bf16 logits/argmax close to float32, float32 gradients equal
transformers' (tiny config). Then measures the device's matmul peak (8192^3, fp32 without TF32 and
bf16) and times, ours vs transformers in float32 and bf16 (autocast for transformers; SDPA picks
flash attention for both where it can): inference (BASE, 1 x 10 s, 1 x 60 s, 8 x 10 s), one
CTC update (BASE 2 x 10 s, small 8 x 4 s, feature encoder frozen and trained), one pretraining
update (train_step.py's, same mask and negatives), both also for BASE at a realistic batch
(4 x 22 s, fairseq's 1.4 M samples per GPU); last, ours in bf16 eager against ``torch.compile``. The ``cold`` part times each
variant's first and second call in a fresh process (one-time setup: CUDA context, cuBLAS/cuDNN
plans) and profiles a first call on a new input shape. Each row reports model GFLOP/s
and its share of the peak (for training updates: model-FLOPs utilisation, backward = 2x the
forward of what it reaches).

    python benchmarks/cuda_check.py --parts correctness,inference,training   # one part per call

    python benchmarks/cuda_check.py --dry --quick   # tiny models on the CPU: tests the script
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import harness  # also puts this checkout first on sys.path
import torch
import torch.nn.functional as F
from torch import Tensor
import transformers

import w2v2
from w2v2 import convert
from w2v2.config import preset
from w2v2.fast import onednn

DEV = "cuda"
DRY = False  # --dry: tiny models and inputs on the CPU, to test this script without a GPU


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def device_peak() -> dict[str, float]:
    """Best GFLOP/s of a square matrix product in float32 (TF32 off) and bfloat16 on DEV."""
    if DEV != "cuda":
        p = harness.matmul_peak(n=512, repeats=2)
        return {"fp32": p["fp32"], "bf16": p["bf16"]}
    out = {}
    for key, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        n = 8192
        a, b = torch.randn(n, n, device=DEV, dtype=dtype), torch.randn(n, n, device=DEV, dtype=dtype)
        out[key] = 2 * n ** 3 / timed({"mm": lambda: a @ b}, 5)["mm"] / 1e9
        del a, b
    return out


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
            ref = hf(harness.normalized(x)).logits
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
                h16 = hf(harness.normalized(x)).logits.float()
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
        for m, inp in ((hf, harness.normalized(x)), (ours, x)):
            lp = m(inp).logits.float().log_softmax(-1).transpose(0, 1)
            F.ctc_loss(lp, tg, torch.full((2,), lp.shape[0]), torch.full((2,), 5), reduction="sum").backward()
        ref = {k.removeprefix("wav2vec2."): p.grad for k, p in hf.named_parameters()}
        scale = max(g.abs().max().item() for g in ref.values() if g is not None)
        worst = max(((p.grad - ref[k]).abs().max() / max(ref[k].abs().max().item(), 1e-2 * scale)).item()
                    for k, p in ours.named_parameters() if p.grad is not None)
        print(f"[tiny {ours.config.feat_extract_norm}] fp32 gradients vs transformers: worst relative diff {worst:.1e}")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # PyTorch defaults


def bench_inference(repeats: int, peak: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = pair("base", tmp)
    print("\n| input | transformers fp32 | transformers bf16 autocast | ours fp32 | ours bf16 | "
          "ours bf16 vs tf fp32 | ours bf16 vs tf bf16 | ours bf16 GFLOP/s (% bf16 peak) | tf bf16 GFLOP/s (%) | "
          "peak MiB tf fp32 / ours bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seconds, batch in INPUTS:
        x = torch.randn(batch, (1 if DRY else seconds) * 16000, device=DEV)
        fns = {"tf32": tf_run(hf, x, "fp32"), "tf16": tf_run(hf, x, "bf16"), "o32": ours_run(ours, x, "fp32"),
               "o16": ours_run(ours, x, "bf16")}
        t = timed(fns, repeats)
        mem = {k: peak_mib(fns[k]) for k in ("tf32", "o16")}
        gf = batch * sum(harness.forward_flops(ours.config, x.shape[1]).values()) / 1e9
        print(f"| {batch} x {seconds} s | {t['tf32'] * 1e3:.1f} ms | {t['tf16'] * 1e3:.1f} ms | {t['o32'] * 1e3:.1f} ms | "
              f"{t['o16'] * 1e3:.1f} ms | {t['tf32'] / t['o16']:.2f}x | {t['tf16'] / t['o16']:.2f}x | "
              f"{gf / t['o16']:.0f} ({100 * gf / t['o16'] / peak['bf16']:.0f}%) | "
              f"{gf / t['tf16']:.0f} ({100 * gf / t['tf16'] / peak['bf16']:.0f}%) | {mem['tf32']:.0f} / {mem['o16']:.0f} |")


def first_call(fn) -> tuple[float, str]:
    """Seconds of ``fn``'s first call (where torch.compile compiles), and "" or what made it fail."""
    t0 = time.perf_counter()
    try:
        fn()
        sync()
    except Exception as e:  # noqa: BLE001 -- report and go on
        return 0.0, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
    return time.perf_counter() - t0, ""


def bench_compiled(repeats: int, peak: dict, mode: str) -> None:
    """Ours in bf16, eager against ``torch.compile(mode=mode)`` (compiling outside the timing; one
    compile per input shape). Last in the run: compiling can take minutes. On an H200 the default
    mode gave 0.97-1.01x (inference at these sizes waits on kernel launches, which only CUDA
    graphs, mode "reduce-overhead", remove) for 22-32 s of compiling per shape."""
    with tempfile.TemporaryDirectory() as tmp:
        _, ours = pair("base", tmp)
    print(f"\n| input | ours bf16 eager | ours bf16 torch.compile ({mode}) | compile time | speedup | compiled GFLOP/s (% bf16 peak) |")
    print("|---|---|---|---|---|---|")
    ours.set_precision("bf16")
    compiled = torch.compile(ours, backend="eager") if DRY else torch.compile(ours, mode=mode)  # dry: tracing only
    for seconds, batch in INPUTS:
        x = torch.randn(batch, (1 if DRY else seconds) * 16000, device=DEV)
        fns = {"eager": ours_run(ours, x, "bf16"), "compiled": ours_run(compiled, x, "bf16")}
        compile_s, error = first_call(fns["compiled"])
        if error:
            print(f"| {batch} x {seconds} s | | failed: {error} | | | |")
            return
        t = timed(fns, repeats)
        gf = batch * sum(harness.forward_flops(ours.config, x.shape[1]).values()) / 1e9
        print(f"| {batch} x {seconds} s | {t['eager'] * 1e3:.1f} ms | {t['compiled'] * 1e3:.1f} ms | {compile_s:.0f} s | "
              f"{t['eager'] / t['compiled']:.2f}x | {gf / t['compiled']:.0f} "
              f"({100 * gf / t['compiled'] / peak['bf16']:.0f}%) |")
    bench_compiled_update(repeats, peak, mode)


def bench_compiled_update(repeats: int, peak: dict, mode: str) -> None:
    """One CTC update (BASE 2 x 10 s, encoder frozen; train_step.py's) of ours in bf16, eager
    against the model under ``torch.compile(mode=mode)`` (forward and backward graphs; the loss
    and the optimizer step stay eager), and transformers' eager update for reference: whether
    compiling is the way to 2x transformers for fine-tuning on a GPU."""
    import train_step

    print(f"\n| update | tf bf16 eager | ours bf16 eager | ours bf16 torch.compile ({mode}) | compile time | "
          "compiled vs eager | compiled vs tf bf16 | compiled GFLOP/s (% bf16 peak) |")
    print("|---|---|---|---|---|---|---|---|")
    batch, seconds = 2, 10
    hf, ours = train_step.model_pair("base", "tiny" if DRY else None, frozen_encoder=True)
    hf, ours = hf.to(DEV), ours.to(DEV)
    compiled = torch.compile(ours, backend="eager") if DRY else torch.compile(ours, mode=mode)
    x = torch.randn(batch, (1 if DRY else seconds) * 16000, device=DEV)
    frames = harness.conv_frames(ours.config, x.shape[1])[-1]
    targets = torch.randint(1, 32, (batch, max(1, frames // 4)), device=DEV)
    eager = train_step.steps(hf, ours, x, targets)
    fns = {"tf": eager["tf bf16"], "eager": eager["ours bf16"],
           "compiled": train_step.steps(hf, compiled, x, targets)["ours bf16"]}
    compile_s, error = first_call(fns["compiled"])
    if error:
        print(f"| CTC BASE frozen, {batch} x {seconds} s | | | failed: {error} | | | | |")
        return
    t = timed(fns, repeats)
    gf = harness.update_flops(ours.config, batch, x.shape[1], frozen_encoder=True) / 1e9
    print(f"| CTC BASE frozen, {batch} x {seconds} s | {t['tf'] * 1e3:.1f} ms | {t['eager'] * 1e3:.1f} ms | "
          f"{t['compiled'] * 1e3:.1f} ms | {compile_s:.0f} s | {t['eager'] / t['compiled']:.2f}x | "
          f"{t['tf'] / t['compiled']:.2f}x | {gf / t['compiled']:.0f} ({100 * gf / t['compiled'] / peak['bf16']:.0f}%) |")


COLD_VARIANTS = ("tf fp32", "tf bf16", "ours fp32", "ours bf16", "ours bf16 channels-last")
COLD_SHAPES = (60, 50)  # seconds, one utterance: a first shape, then a new one


def cold_worker(variant: str) -> dict:
    """In a fresh process: the first and second call of ``variant`` on a 60 s input, then on a new
    shape (50 s), and the profile of a third new shape's first call (40 s): what one-time work
    (CUDA context, cuBLAS/cuDNN plans) costs each variant before its steady state. "channels-last"
    runs our convolutions as height-1 channels-last images on the GPU too (the CPU's layout; the
    layout of the first H200 run, whose first bf16 call cost ~1.8 s more than transformers')."""
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = pair("base", tmp)
    lib, prec, *layout = variant.split()
    if layout:
        onednn.channels_last = lambda device: True
    runner, model = (tf_run, hf) if lib == "tf" else (ours_run, ours)
    calls = {s: runner(model, torch.randn(1, int((0.5 if DRY else 1) * s * 16000), device=DEV), prec)
             for s in (*COLD_SHAPES, 40)}
    out = {}
    for seconds in COLD_SHAPES:
        for k in ("first", "second"):
            t0 = time.perf_counter()
            calls[seconds]()
            sync()
            out[f"{seconds} s {k}"] = time.perf_counter() - t0
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        calls[40]()
        sync()
    avg = prof.key_averages()
    out["profile"] = avg.table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=50)
    if DEV == "cuda":  # where the device time goes (the kernels' own names: e.g. which convolution)
        for key in ("self_device_time_total", "self_cuda_time_total"):
            try:
                out["profile"] += "\nby device time:\n" + avg.table(sort_by=key, row_limit=10, max_name_column_width=60)
                break
            except (AttributeError, KeyError, ValueError):
                continue
    return out


def bench_cold() -> None:
    """:func:`cold_worker` for each variant, each in its own process."""
    print("\n| variant | 60 s first call | 60 s second | 50 s (new shape) first | 50 s second |")
    print("|---|---|---|---|---|")
    profiles = {}
    for variant in COLD_VARIANTS:
        r = harness.child_json([str(Path(__file__).resolve()), "--cold-worker", variant, *(["--dry"] if DRY else [])],
                               timeout=300)
        if r is None:
            print(f"| {variant} | failed | | | |")
            continue
        print(f"| {variant} | " + " | ".join(f"{r[f'{s} s {k}'] * 1e3:.1f} ms" for s in COLD_SHAPES
                                              for k in ("first", "second")) + " |")
        profiles[variant] = r["profile"]
    for variant in ("ours bf16", "ours bf16 channels-last", "ours fp32", "tf bf16"):
        if variant in profiles:
            print(f"\nFirst call on a new shape (40 s), {variant}, by self CPU time:\n{profiles[variant]}")


INPUTS = ((10, 1), (60, 1), (10, 8))  # (seconds, batch)


def tf_run(hf, x: Tensor, precision: str):
    """One inference of transformers' model on ``x`` (normalised here, once), bf16 = autocast."""
    xn = harness.normalized(x)

    def run():
        with torch.inference_mode(), torch.autocast(DEV, torch.bfloat16, enabled=precision == "bf16"):
            hf(xn)
    return run


def ours_run(model, x: Tensor, precision: str):
    """One inference of ``model`` (ours, or ours compiled) at ``precision``."""
    def run():
        getattr(model, "_orig_mod", model).set_precision(precision)
        with torch.inference_mode():
            model(x)
    return run


def peak_mib(fn) -> float:
    """Peak CUDA memory of one call of fn above what was allocated before it (nan off CUDA)."""
    if DEV != "cuda":
        return float("nan")
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def bench_training(repeats: int, peak: dict) -> None:
    """CTC updates (encoder frozen / trained) and pretraining updates, train_step.py's definitions."""
    import train_step

    print("\n| update | precision | transformers s/step | ours s/step | speedup | ours vs tf fp32 | "
          "tf GFLOP/s (% peak) | ours GFLOP/s (% peak) |")
    print("|---|---|---|---|---|---|---|---|")
    cases = [(name, b, s, enc) for name, b, s in (("base", 2, 10), ("small", 8, 4)) for enc in ("frozen", "trained")]
    cases += [("pretrain-base", 2, 10, "trained"), ("pretrain-small", 8, 4, "trained")]
    # utilisation at a realistic batch: fairseq's BASE recipe has 1.4 M samples (87.5 s) per GPU
    cases += [("base", 4, 22, "frozen"), ("pretrain-base", 4, 22, "trained")]
    for name, batch, seconds, encoder in cases:
        hf, ours = train_step.model_pair(name, "tiny" if DRY else None, frozen_encoder=encoder == "frozen")
        hf, ours = hf.to(DEV), ours.to(DEV)
        x = torch.randn(batch, (1 if DRY else seconds) * 16000, device=DEV)
        if name.startswith("pretrain-"):
            fns = train_step.pretrain_steps(hf, ours, x)
        else:
            frames = harness.conv_frames(ours.config, x.shape[1])[-1]
            targets = torch.randint(1, 32, (batch, max(1, frames // 4)), device=DEV)
            fns = train_step.steps(hf, ours, x, targets)
        t = timed(fns, repeats)
        gf = harness.update_flops(ours.config, batch, x.shape[1], frozen_encoder=encoder == "frozen") / 1e9
        label = name.replace("pretrain-", "pretraining ") if name.startswith("pretrain-") else f"CTC {name}, encoder {encoder}"
        for prec in ("fp32", "bf16"):
            a, b = t[f"tf {prec}"], t[f"ours {prec}"]
            print(f"| {label}, {batch} x {seconds} s | {prec} | {a:.4f} | {b:.4f} | {a / b:.2f}x | {t['tf fp32'] / b:.2f}x | "
                  f"{gf / a:.0f} ({100 * gf / a / peak[prec]:.0f}%) | {gf / b:.0f} ({100 * gf / b / peak[prec]:.0f}%) |")
        del hf, ours, fns
        if DEV == "cuda":
            torch.cuda.empty_cache()


PARTS = ("correctness", "inference", "cold", "training", "compile")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dry", action="store_true", help="tiny models on the CPU (tests this script)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated, run in this order: {', '.join(PARTS)} (default: all)")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   help="torch.compile mode of the compile part (default: reduce-overhead, i.e. CUDA graphs)")
    p.add_argument("--cold-worker", metavar="VARIANT", help=argparse.SUPPRESS)
    args = p.parse_args()
    parts = [s for s in args.parts.split(",") if s]
    if unknown := set(parts) - set(PARTS):
        p.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    global DEV, DRY
    if args.dry:
        DEV, DRY = "cpu", True
    if args.cold_worker:
        print(json.dumps(cold_worker(args.cold_worker)))
        return
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.cuda.get_device_name() if DEV == 'cuda' else 'CPU dry run'}")
    if "correctness" in parts:
        check_correctness()
    if set(parts) - {"correctness", "cold"}:
        peak = device_peak()
        print(f"\nmatmul peak: fp32 {peak['fp32']:.0f} GFLOP/s (TF32 off), bf16 {peak['bf16']:.0f} GFLOP/s")
    repeats = 3 if args.quick else 10
    if "inference" in parts:
        bench_inference(repeats, peak)
    if "cold" in parts:
        bench_cold()
    if "training" in parts:
        bench_training(2 if args.quick else 5, peak)
    if "compile" in parts:
        bench_compiled(repeats, peak, args.compile_mode)


if __name__ == "__main__":
    main()
