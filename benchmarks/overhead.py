"""Host cost of one forward call, ours against transformers: the time that bounds GPU inference
on short inputs, where every kernel finishes before the next one is launched.

    python benchmarks/overhead.py                   # CPU, plain PyTorch ops (what a GPU runs)
    python benchmarks/overhead.py --device cuda     # on a GPU: host time plus kernel launches
    python benchmarks/overhead.py --quick           # fewer repeats

The model is BASE's op sequence with tiny widths ("skinny BASE": 7 convolutions with BASE's
kernels and strides, group norm, 12 Transformer layers, positional convolution; 16 conv channels,
hidden size 32) on 0.2 s of input, so that the arithmetic is negligible and what is left is the
work around it: Python, the dispatcher, allocations, launches. On the CPU, ours runs its plain
fast path with public operators only and channels-first convolutions
(``w2v2.fast.onednn.PRIVATE_OPS = False``), the ops it issues on a GPU; the oneDNN kernels it uses
on CPUs are left out on purpose. The calls are inference.py's: transformers in eval mode under
``inference_mode`` (bf16: ``torch.autocast``), ours through ``model.infer`` ("ours fast": bf16). "aten ops" counts the
operators each call dispatches (a ``TorchDispatchMode``): on a GPU, about one kernel each.
"""

from __future__ import annotations

import argparse
import collections
import platform
import tempfile

import harness  # also puts this checkout first on sys.path
import inference
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from w2v2.fast import onednn

SKINNY = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, conv_dim=(16,) * 7,
              num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="20 timed calls instead of 200")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per variant (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    p.add_argument("--seconds", type=float, default=0.2, help="input length")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (20 if args.quick else 200)
    dev = torch.device(args.device)
    if dev.type == "cpu":
        onednn.PRIVATE_OPS = False
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = harness.model_pair(tmp, harness.hf_config("base", **SKINNY))
    hf, ours = hf.to(dev), ours.to(dev)
    x = torch.randn(1, int(args.seconds * 16000), device=dev)
    fns = inference.runners(hf, ours, x, fast="bf16")
    if dev.type == "cuda":
        fns = {k: (lambda f=f: (f(), torch.cuda.synchronize())) for k, f in fns.items()}
    ops = {}
    for name, f in fns.items():
        f()
        with OpCount() as c:
            f()
        ops[name] = c.count
    t = harness.interleaved(fns, repeats, warmup=3)

    print(f"torch {torch.__version__}, {platform.machine()}, device {dev}, threads {torch.get_num_threads()}, "
          f"{repeats} timed calls (median), skinny BASE on 1 x {args.seconds} s, load average {harness.load_average()}")
    if dev.type == "cpu":
        print("ours on its fast path with public operators and channels-first convolutions (its GPU ops)")
    ref = t["transformers fp32"]  # "ours fast" is ours in bf16
    print(harness.markdown_table(
        ["implementation", "ms per call", "vs transformers fp32", "aten ops per call", "most frequent ops"],
        [[name, f"{t[name] * 1e3:.2f}", f"{ref / t[name]:.2f}x", sum(ops[name].values()),
          ", ".join(f"{op.removeprefix('aten.')} {n}" for op, n in ops[name].most_common(4))] for name in fns]))


if __name__ == "__main__":
    main()
