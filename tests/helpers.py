"""Small generated audio for training tests: seconds to make, no real data needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf


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
