"""Test helpers: small generated audio for training tests (seconds to make, no real data needed),
and tolerances for reduced precision.

Tolerances for reduced precision come from one error model, never from a machine's observations.

Standard model of floating point: every rounding to a format with unit roundoff ``u`` multiplies a
value by (1 + d) with |d| <= u; bfloat16 keeps 8 significant bits, u = 2^-8 (float32: 2^-24).

* One product of bf16 operands of length k, accumulated in float32 in any order (AMX tiles,
  AVX512-BF16 dot products, AVX512 or AVX2 emulation) and rounded to bf16, is exact up to
  ``gamma_k (1 + u) sum|a||b| + u |a.b|`` with gamma_k = k u32 / (1 - k u32): a rigorous bound
  (:func:`dot_error_bound`) for operands held in bf16 and compared with float64 arithmetic.
* A whole network rounds every activation and weight to bf16 along a chain of ``stages`` (a conv
  layer, the projection, the positional conv, an attention or feed-forward block, the head), at
  most ROUNDINGS_PER_STAGE times each (inputs, weights, output). Rounding errors behave as
  independent, mean-zero (Higham & Mary, SIAM J. Sci. Comput. 2019), so their effect on a frame's
  vector grows like sqrt(number of roundings), not linearly: relative to the vector's norm, the
  error stays below SIGMAS * u * sqrt(ROUNDINGS_PER_STAGE * stages) (:func:`network_relative_error`).
  The model assumes normalised stages (layer/group norms keep each stage's gain near 1), which is
  what wav2vec 2.0's post-LN and pre-LN stacks do.
* Logits v of frame f follow by Cauchy-Schwarz from the final hidden state c_f:
  |dlogit| <= eps * |W_v| |c_f| + u |logit| (the head's own output rounding) (:func:`logit_error_bound`).
* log-softmax moves by at most twice the largest logit error; a frame's argmax can change only where
  the float32 top-2 margin is below twice the logit bound (:func:`stable_frames`).

The same formulas with u = 2^-24 bound float32, so a bf16 result must also exceed the float32 bound
(proof that it ran in bf16). They hold on every instruction set oneDNN may pick (.ci/run reruns the
``bf16`` tests under each ONEDNN_MAX_CPU_ISA the CPU allows).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch


def ffmpeg_exe() -> str:
    """Path of an ffmpeg binary for making test media (the one bundled with ``imageio-ffmpeg``, a
    test dependency: w2v2 itself decodes through PyAV)."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def write_clips(folder: Path, seconds: list[float], sr: int = 16000, seed: int = 0,
                manifest: bool = True) -> list[Path]:
    """Harmonic tones with noise, one file per duration; a manifest.tsv beside them when asked."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "audio").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, s in enumerate(seconds):
        t = np.arange(int(s * sr)) / sr
        f0 = rng.uniform(100, 300)
        wav = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) / k for k in range(1, 5))
        wav = 0.2 * wav + 0.01 * rng.standard_normal(len(t))
        path = folder / "audio" / f"clip{i:03d}.wav"
        sf.write(path, wav.astype(np.float32), sr, subtype="PCM_16")
        paths.append(path)
    if manifest:
        lines = ["path\tseconds\tspeaker\ttext"]
        lines += [f"audio/{p.name}\t{s:.3f}\tspk{i % 2}\tCLIP {i}" for i, (p, s) in enumerate(zip(paths, seconds))]
        (folder / "manifest.tsv").write_text("\n".join(lines) + "\n")
    return paths


# --------------------------------------------------------------------------- reduced precision

BF16_U = 2.0 ** -8
FP16_U = 2.0 ** -11
TF32_U = 2.0 ** -11  # TensorFloat-32: float32 range, 11 significant bits
FP32_U = 2.0 ** -24
ROUNDINGS_PER_STAGE = 3  # inputs, weights, output of each stage
SIGMAS = 3.0  # standard deviations of the probabilistic model


def dot_error_bound(abs_products: torch.Tensor, k: int, result: torch.Tensor | None = None,
                    u_out: float = BF16_U) -> torch.Tensor:
    """Rigorous bound on |fl(a.b) - a.b| for bf16 operands: ``abs_products`` = sum|a||b| (any
    shape), ``k`` the reduction length, ``result`` the exact a.b when the output is rounded to a
    format of unit roundoff ``u_out`` (None: kept in float32)."""
    gamma = k * FP32_U / (1 - k * FP32_U)
    if result is None:
        return gamma * abs_products
    return gamma * (1 + u_out) * abs_products + u_out * result.abs()  # the sum's error, then rounded once


def model_stages(cfg) -> int:
    """Stages along the longest path of a wav2vec 2.0 model: conv layers, projection, positional
    conv, two blocks per Transformer layer, the CTC head."""
    return len(cfg.conv_dim) + 2 + 2 * cfg.num_hidden_layers + 1


def network_relative_error(stages: int, u: float = BF16_U) -> float:
    """Bound on a frame vector's error relative to its norm after ``stages`` rounded stages."""
    return SIGMAS * u * math.sqrt(ROUNDINGS_PER_STAGE * stages)


def hidden_error_bound(cfg, hidden: torch.Tensor, u: float = BF16_U) -> torch.Tensor:
    """(..., frames, 1) bound on |d hidden_f| (norm over channels) for the float32 last hidden state."""
    return network_relative_error(model_stages(cfg) - 1, u) * hidden.norm(dim=-1, keepdim=True)


def logit_error_bound(model, ref, u: float = BF16_U) -> torch.Tensor:
    """(..., frames, vocab) bound on |d logit| given the float32 reference output ``ref`` (ModelOutput)."""
    eps = network_relative_error(model_stages(model.config), u)
    w = model.lm_head.weight.detach().float().norm(dim=-1)  # (vocab,)
    return eps * ref.last_hidden_state.norm(dim=-1, keepdim=True) * w + u * ref.logits.abs()


def stable_frames(logits: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Frames whose argmax no error within ``bound`` (same shape as ``logits``) can change:
    the top-2 margin exceeds the two largest bounds of that frame."""
    top2 = logits.topk(2, dim=-1).values
    b2 = bound.topk(2, dim=-1).values.sum(-1)
    return (top2[..., 0] - top2[..., 1]) > b2


def within(err: torch.Tensor, bound: torch.Tensor) -> tuple[bool, float]:
    """(every error <= its bound, the worst ratio err/bound) for messages."""
    ratio = (err / bound).max().item()
    return ratio <= 1.0, ratio
