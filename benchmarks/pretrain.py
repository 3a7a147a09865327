"""One pretraining update (forward + backward + AdamW step) of w2v2 against transformers'
Wav2Vec2ForPreTraining on the same config, weights, batch, mask and negatives: time and peak memory.

    python benchmarks/pretrain.py                              # BASE 2 x 10 s, `small` 8 x 4 s; fp32, bf16
    python benchmarks/pretrain.py --quick --threads 1 --clock cpu   # one timed step; CPU time (busy machine)
    python benchmarks/pretrain.py --dry --quick                # tiny models and inputs: tests the script
    python benchmarks/pretrain.py --device cuda                # on a GPU

The update is train_step.py's (``pretrain_steps``: each library's own objective, 100 negatives per
masked frame, mask p=0.65 length 10, no layerdrop, the preset's dropouts, bf16 = ``torch.autocast``
for transformers and ``set_precision("bf16")`` for ours). Each of the four variants {transformers,
ours} x {fp32, bf16} runs in its own fresh process (``--worker``), so that one variant's memory
high-water mark cannot hide another's. The worker builds both models and the input, resets the
resident-set high-water mark (``/proc/self/clear_refs``; ``ru_maxrss`` cannot be reset, and building
the models can peak higher than a step), runs the warm-up and timed steps, and reports the median
step time and the peak RSS above the RSS after building (gradients, AdamW state, activations). On
CUDA the peak is ``torch.cuda.max_memory_allocated`` above the allocation after building.
Variants are timed in separate processes one after another, not interleaved: on a busy machine use
``--threads 1 --clock cpu``.
"""

from __future__ import annotations

import gc
import json
import platform
import sys
from pathlib import Path

import torch

import harness
import train_step

CASES = tuple(c for c in train_step.CASES if c[0].startswith("pretrain-"))
LIBS = ("tf", "ours")
PRECISIONS = ("fp32", "bf16")
DRY_SECONDS = 1.0  # --dry: the `tiny` preset on 1 s utterances (at most 2 of them)


def worker(case: str, lib: str, prec: str, args) -> dict:
    """Time ``lib prec`` on ``case`` in this (fresh) process and measure its peak memory."""
    torch.set_num_threads(args.threads)
    name, batch, seconds = next(c for c in CASES if c[0] == case)
    if args.dry:
        batch, seconds = min(batch, 2), DRY_SECONDS
    cuda = args.device == "cuda"
    hf, ours = train_step.model_pair(name, "tiny" if args.dry else None)
    hf, ours = hf.to(args.device), ours.to(args.device)
    x = harness.speech(seconds, batch).to(args.device)
    fn = train_step.pretrain_steps(hf, ours, x)[f"{lib} {prec}"]
    step = (lambda: (fn(), torch.cuda.synchronize())) if cuda else fn
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = harness.reset_peak_rss()
    t = harness.interleaved({"step": step}, args.repeats, warmup=1, clock=args.clock)["step"]
    peak = (torch.cuda.max_memory_allocated() if cuda else harness.peak_rss()) - base
    return {"seconds": t, "peak_mib": peak / 2**20}


def main() -> None:
    p = train_step.parser(__doc__, CASES)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dry", action="store_true", help="tiny models and inputs, to test this script")
    p.add_argument("--worker", nargs=3, metavar=("CASE", "LIB", "PREC"), help="(internal) run one variant in this process")
    args = p.parse_args()
    if args.quick:
        args.repeats = 1
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return

    passed = ["--repeats", str(args.repeats), "--threads", str(args.threads), "--clock", args.clock,
              "--device", args.device, *(["--dry"] if args.dry else [])]
    load_before = harness.load_average()
    rows = []
    for name, batch, seconds in CASES:
        if name not in args.cases:
            continue
        label = f"{name.removeprefix('pretrain-')} {min(batch, 2)} x {DRY_SECONDS:g} s (dry: tiny)" if args.dry \
            else f"{name.removeprefix('pretrain-')} {batch} x {seconds:g} s"
        for prec in PRECISIONS:
            r = {}
            for lib in LIBS:  # each variant's line as it finishes: a run cut short keeps what it measured
                r[lib] = harness.child_json([str(Path(__file__).resolve()), "--worker", name, lib, prec, *passed],
                                            timeout=3600)
                print(f"{label}, {prec}, {lib}: " + (f"{r[lib]['seconds']:.4f} s, {r[lib]['peak_mib']:.0f} MiB"
                                                      if r[lib] else "failed"), flush=True)
            ok = r["tf"] is not None and r["ours"] is not None
            rows.append([label, prec,
                         *(f"{r[lib]['seconds']:.3f}" if r[lib] else "failed" for lib in LIBS),
                         f"{r['tf']['seconds'] / r['ours']['seconds']:.2f}x" if ok else "-",
                         *(f"{r[lib]['peak_mib']:.0f}" if r[lib] else "failed" for lib in LIBS),
                         f"{r['tf']['peak_mib'] / max(r['ours']['peak_mib'], 1e-9):.2f}x" if ok else "-"])
    memory = "CUDA max_memory_allocated" if args.device == "cuda" else "peak RSS"
    print("\n# w2v2 pretraining update (forward + backward + AdamW) vs transformers Wav2Vec2ForPreTraining")
    print(f"torch {torch.__version__}, {args.device}: "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else platform.processor() or platform.machine()}, "
          f"threads {args.threads}, clock {args.clock}, repeats {args.repeats}, one process per variant; "
          f"memory: {memory} above the models and input, in MiB")
    print(f"load average before/after: {load_before} / {harness.load_average()}\n")
    print(harness.markdown_table(
        ["case", "precision", "tf s", "ours s", "speed ratio (tf/ours)", "tf peak MiB", "ours peak MiB",
         "memory ratio (tf/ours)"], rows))


if __name__ == "__main__":
    sys.exit(main())
