"""Shared parts of the benchmarks: reference model pairs, inputs, interleaved timing, analytic FLOPs,
the machine's matmul peak, and peak-RSS measurement in a fresh process."""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's w2v2, not an installed one

import torch  # noqa: E402

import w2v2  # noqa: E402
from w2v2 import convert  # noqa: E402
from w2v2.config import ModelConfig, preset  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "librispeech-unlabeled"


# --------------------------------------------------------------------------- models
def hf_config(name: str, vocab_size: int = 32, **overrides):
    """A transformers Wav2Vec2Config equal to our preset ``name`` (SDPA attention, no SpecAugment)."""
    import transformers

    d = convert.config_to_hf(preset(name, vocab_size=vocab_size), "Wav2Vec2ForCTC")
    d.update(mask_time_prob=0.0, attn_implementation="sdpa")
    d.update(overrides)
    return transformers.Wav2Vec2Config(**d)


def model_pair(directory: Path, config=None, model_dir: str | None = None, head: str = "Wav2Vec2ForCTC"):
    """(transformers ``head`` model, ours) on the same weights: random weights from ``config``
    saved to ``directory``, or the checkpoint ``model_dir``. Both in eval mode."""
    import transformers

    if model_dir is None:
        torch.manual_seed(0)
        hf = getattr(transformers, head)(config)
        hf.save_pretrained(directory)
        (Path(directory) / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True}))
        model_dir = str(directory)
    else:
        hf = getattr(transformers, head).from_pretrained(model_dir, attn_implementation="sdpa")
    return hf.eval(), w2v2.load_model(model_dir).eval()


# --------------------------------------------------------------------------- inputs
def speech(seconds: float, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """(batch, samples) of real read speech at 16 kHz (LibriSpeech clips laid end to end), or
    noise when the shared data is absent."""
    n = int(seconds * 16000)
    if not (DATA / "manifest.tsv").exists():
        return torch.randn(batch, n, generator=torch.Generator().manual_seed(seed))
    from w2v2.audio import load_audio
    from w2v2.data import read_rows

    rows = [r["path"] for r in read_rows(DATA / "manifest.tsv")]
    out, i = [], seed * 7
    for _ in range(batch):
        pieces, have = [], 0
        while have < n:
            a = torch.from_numpy(load_audio(DATA / rows[i % len(rows)]))
            pieces.append(a)
            have += len(a)
            i += 1
        out.append(torch.cat(pieces)[:n])
    return torch.stack(out).float()


def normalized(x: torch.Tensor) -> torch.Tensor:
    """What transformers' feature extractor does with do_normalize=True (ours does it inside the model)."""
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-7)


# --------------------------------------------------------------------------- timing
def interleaved(fns: dict, repeats: int, warmup: int = 1, clock: str = "wall") -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round-robin so that load from
    other processes hits all of them alike. clock="cpu" counts this process's CPU time instead
    (meaningful with one thread on a busy machine)."""
    tick = time.perf_counter if clock == "wall" else time.process_time
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            gc.collect()
            t0 = tick()
            f()
            times[name].append(tick() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


# --------------------------------------------------------------------------- FLOPs
def conv_frames(cfg: ModelConfig, samples: int) -> list[int]:
    frames, t = [], samples
    for k, s in zip(cfg.conv_kernel, cfg.conv_stride):
        t = (t - k) // s + 1
        frames.append(t)
    return frames


def forward_flops(cfg: ModelConfig, samples: int) -> dict[str, float]:
    """Multiply-adds x 2 of one utterance's forward pass, by part (elementwise work not counted)."""
    frames = conv_frames(cfg, samples)
    cin, conv = 1, 0.0
    for t, c, k in zip(frames, cfg.conv_dim, cfg.conv_kernel):
        conv += 2 * t * c * cin * k
        cin = c
    t, e, i = frames[-1], cfg.hidden_size, cfg.intermediate_size
    per_layer_proj = 2 * t * (4 * e * e + 2 * e * i)
    per_layer_attn = 2 * 2 * t * t * e  # q k^T and p v
    return {
        "feature encoder": conv,
        "projection": 2 * t * cfg.conv_dim[-1] * e,
        "positional conv": 2 * t * e * (e // cfg.num_conv_pos_embedding_groups) * cfg.num_conv_pos_embeddings,
        "linear layers": cfg.num_hidden_layers * per_layer_proj,
        "attention": cfg.num_hidden_layers * per_layer_attn,
        "lm head": 2 * t * e * (cfg.vocab_size or 0),
    }


def update_flops(cfg: ModelConfig, batch: int, samples: int, frozen_encoder: bool = False) -> float:
    """Model FLOPs of one training update: the forward, and twice the forward of what the
    backward reaches (all of it, or all but a frozen feature encoder)."""
    fwd = forward_flops(cfg, samples)
    total = sum(fwd.values())
    trained = total - (fwd["feature encoder"] if frozen_encoder else 0)
    return batch * (total + 2 * trained)


# --------------------------------------------------------------------------- machine peak
def matmul_peak(n: int = 2048, repeats: int = 5, clock: str = "wall") -> dict[str, float]:
    """Best GFLOP/s of an n x n x n product in float32 and bfloat16, over torch.mm (MKL for float32
    on x86) and oneDNN's linear (what w2v2 uses), so the peak is the machine's, not one library's."""
    tick = time.perf_counter if clock == "wall" else time.process_time
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        cands = {"torch.mm": lambda: a @ b}
        if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            cands["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [None], "")
        best = {}
        for name, f in cands.items():
            f()
            ts = []
            for _ in range(repeats):
                t0 = tick()
                f()
                ts.append(tick() - t0)
            best[name] = 2 * n ** 3 / min(ts) / 1e9
        key = "fp32" if dtype == torch.float32 else "bf16"
        out[key] = max(best.values())
        out[key + " detail"] = ", ".join(f"{k} {v:.0f}" for k, v in best.items())
    return out


# --------------------------------------------------------------------------- memory
def reset_peak_rss() -> int:
    """Reset this process's peak RSS (Linux) and return the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kb("VmHWM") * 1024


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_json(args: list[str], timeout: float = 900) -> dict | None:
    """Run ``python <args>`` in a fresh process and parse the JSON on its last stdout line."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        print(f"[child failed: {' '.join(args)}]\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- output
def markdown_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])
