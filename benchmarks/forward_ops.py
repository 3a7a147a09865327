"""Where one forward pass of our fast path spends its time, by kind of operation, against the matmul peak.

    python benchmarks/forward_ops.py --threads 1            # BASE, random weights, 10 s and 60 s, bf16 and fp32
    python benchmarks/forward_ops.py --lengths 60 --precisions bf16
    python benchmarks/forward_ops.py --preset tiny --lengths 1 --repeats 1   # the script itself, in seconds

Two tables per run. **Attention kernels**: the whole pass with each attention kernel of
``w2v2.fast.training.attention`` (PyTorch's flash kernel, and the blocked oneDNN products),
interleaved, CPU seconds (median), GFLOP/s and % of the measured peak of the precision.
**Per operation**: one pass with the default kernel under ``torch.profiler``; each operator's
share of the profiled time, times the pass's process CPU time, gives its CPU seconds; FLOPs come
analytically from the config (``harness.forward_flops``, the linear layers split into q/k/v, the
output projection and the two FFN products). Process CPU time with one thread is what to use on
a shared machine: other processes' load then stretches every row alike.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile

import harness
from w2v2.fast import training

KINDS = ("attention", "q/k/v projection", "output projection", "FFN in (GELU)", "FFN out (+residual)",
         "feature encoder", "feature projection", "positional conv", "layer norms", "other (copies, GELU, ...)")


def kind_of(name: str, shapes: list, e: int, i: int) -> str:
    """The kind of operation of one profiler row (operator name, input shapes) of our fast path;
    e, i: the model's hidden and FFN sizes."""
    if "attention" in name or name in ("aten::_softmax", "aten::bmm", "aten::baddbmm"):
        return "attention"
    if name == "mkldnn::_linear_pointwise":
        x, w = shapes[0], shapes[2] if len(shapes) == 5 else shapes[1]  # .binary: (x, residual, w, b, op)
        if len(x) == 2:  # blocked attention's per-head products
            return "attention"
        if x[-1] < 64:  # conv 0 as a product over the unfolded waveform
            return "feature encoder"
        return {(3 * e, e): "q/k/v projection", (e, e): "output projection", (i, e): "FFN in (GELU)",
                (e, i): "FFN out (+residual)"}.get(tuple(w), "feature projection")
    if name == "mkldnn::_convolution_pointwise":  # (batch, channels, 1, time), (out, in / groups, 1, kernel)
        return "positional conv" if shapes[1][1] < shapes[0][1] else "feature encoder"
    if name == "aten::native_layer_norm":
        return "layer norms"
    return "other (copies, GELU, ...)"


TF_KINDS = ("attention", "linear layers", "convolutions", "norms", "other (GELU, copies, ...)")


def tf_kind_of(name: str) -> str:
    """The kind of operation of one profiler row of transformers' forward (by operator name)."""
    if "attention" in name or name in ("aten::_softmax", "aten::bmm", "aten::baddbmm"):
        return "attention"
    if name in ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul"):
        return "linear layers"
    if "conv" in name:
        return "convolutions"
    if "norm" in name:
        return "norms"
    return "other (GELU, copies, ...)"


def tf_kind_flops(cfg, samples: int) -> dict[str, float]:
    f = harness.forward_flops(cfg, samples)
    return {"attention": f["attention"], "linear layers": f["linear layers"] + f["projection"] + f["lm head"],
            "convolutions": f["feature encoder"] + f["positional conv"]}


def kind_flops(cfg, samples: int) -> dict[str, float]:
    f = harness.forward_flops(cfg, samples)
    t = harness.conv_frames(cfg, samples)[-1]
    e, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    return {"attention": f["attention"], "q/k/v projection": n * 2 * t * 3 * e * e, "output projection": n * 2 * t * e * e,
            "FFN in (GELU)": n * 2 * t * e * i, "FFN out (+residual)": n * 2 * t * e * i,
            "feature encoder": f["feature encoder"], "feature projection": f["projection"],
            "positional conv": f["positional conv"]}


def per_kind(run, kind) -> tuple[dict[str, float], float]:
    """(CPU seconds by kind, CPU seconds of the pass) for one profiled call of ``run``;
    ``kind(operator name, input shapes)`` names each operator's kind."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.process_time()
        run()
        cpu = time.process_time() - t0
    self_us = {}
    for ev in prof.key_averages(group_by_input_shape=True):
        k = kind(ev.key, ev.input_shapes)
        self_us[k] = self_us.get(k, 0.0) + ev.self_cpu_time_total
    total = sum(self_us.values())
    return {k: cpu * v / total for k, v in self_us.items()}, cpu


def op_rows(label: list[str], secs: dict[str, float], cpu: float, flops: dict[str, float], kinds, peak: float):
    """Table rows; no rate for kinds under 1% of the pass, where the profiler's resolution decides."""
    rows = []
    for k in kinds:
        s, fl = secs.get(k, 0.0), flops.get(k)
        rate = fl and s > 0.01 * cpu
        rows.append(label + [k, f"{s:.3f}", f"{100 * s / cpu:.0f}%", "-" if not fl else f"{fl / 1e9:.1f}",
                             f"{fl / s / 1e9:.0f}" if rate else "-", f"{100 * fl / s / 1e9 / peak:.0f}%" if rate else "-"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=float, nargs="+", default=[10.0, 60.0], help="input seconds")
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=("bf16", "fp32"))
    p.add_argument("--repeats", type=int, default=3, help="timed passes per attention kernel (median)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--preset", default="base", help="model config (random weights)")
    p.add_argument("--transformers", action="store_true", help="also transformers' fp32 forward by operation")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_before = harness.load_average()
    peak = harness.matmul_peak(clock="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = harness.model_pair(tmp, harness.hf_config(args.preset))
    cfg = ours.config
    kernel_rows, rows, tf_rows = [], [], []
    for seconds in args.lengths:
        x = harness.speech(seconds)
        flops = kind_flops(cfg, x.shape[1])
        total = sum(harness.forward_flops(cfg, x.shape[1]).values())
        for prec in args.precisions:
            pk = peak[prec]
            ours.set_precision(prec)

            def run(flash: bool):
                def f():
                    with mock.patch.object(training, "mkl_optimized", lambda: flash):
                        ours.infer(x)
                return f
            times = harness.interleaved({"flash (SDPA)": run(True), "blocked oneDNN": run(False)}, args.repeats,
                                        clock="cpu")
            for name, s in times.items():
                kernel_rows.append([f"{seconds:g} s", prec, name, f"{s:.3f}", f"{total / s / 1e9:.0f}",
                                    f"{100 * total / s / 1e9 / pk:.0f}%"])
            secs, cpu = per_kind(lambda: ours.infer(x), lambda name, shapes: kind_of(
                name, shapes, cfg.hidden_size, cfg.intermediate_size))
            rows += op_rows([f"{seconds:g} s", prec], secs, cpu, flops, KINDS, pk)
        if args.transformers:
            xn = harness.normalized(x)

            def tf():
                with torch.inference_mode():
                    hf(xn)
            tf()
            secs, cpu = per_kind(tf, lambda name, shapes: tf_kind_of(name))
            tf_rows += op_rows([f"{seconds:g} s", f"{cpu:.3f}"], secs, cpu, tf_kind_flops(cfg, x.shape[1]), TF_KINDS,
                               peak["fp32"])
    print(f"# w2v2 forward by operation: {args.preset}, random weights, batch 1, real speech; torch {torch.__version__}, "
          f"threads {args.threads}, CPU time")
    print(f"matmul peak (2048^3, best of): fp32 {peak['fp32']:.0f} GFLOP/s [{peak['fp32 detail']}], "
          f"bf16 {peak['bf16']:.0f} GFLOP/s [{peak['bf16 detail']}]")
    print(f"load average before/after: {load_before} / {harness.load_average()}\n")
    print(harness.markdown_table(["input", "precision", "attention kernel", "CPU s / pass", "GFLOP/s", "% of peak"],
                                 kernel_rows))
    print()
    print(harness.markdown_table(["input", "precision", "operation", "CPU s", "share", "GFLOP", "GFLOP/s", "% of peak"],
                                 rows))
    if tf_rows:
        print("\ntransformers fp32, one profiled pass:\n")
        print(harness.markdown_table(["input", "CPU s / pass", "operation", "CPU s", "share", "GFLOP", "GFLOP/s",
                                      "% of fp32 peak"], tf_rows))


if __name__ == "__main__":
    sys.exit(main())
