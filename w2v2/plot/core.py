"""The figure registry, the run context figures draw from, and :func:`render`.

Figures draw training curves from ``metrics.jsonl`` and diagnostics from the run's checkpoint;
a user adds one by calling :func:`register` before :func:`render`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

FigureFn = Callable[["PlotContext"], "Figure | None"]
FIGURES: dict[str, FigureFn] = {}


def register(name: str) -> Callable[[FigureFn], FigureFn]:
    """Decorator: add a figure, saved as ``<name>.png``."""

    def wrap(fn: FigureFn) -> FigureFn:
        FIGURES[name] = fn
        return fn

    return wrap


@dataclass
class PlotContext:
    """What figures draw from; the rows, the model and the audio are loaded once, on first use."""

    run_dir: Path
    audio: list[str] = field(default_factory=list)  # files for model-based figures (default: the run's data)
    max_audio: int = 8
    _cache: dict = field(default_factory=dict)

    def rows(self) -> list[dict]:
        if "rows" not in self._cache:
            from ..trainer import read_metrics
            self._cache["rows"] = [r for r in read_metrics(self.run_dir) if not r.get("skipped")]
        return self._cache["rows"]

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(updates, values) of a metric, or None when the run does not log it."""
        pts = [(r["update"], r[key]) for r in self.rows() if isinstance(r.get(key), (int, float))]
        if not pts:
            return None
        x, y = zip(*pts)
        return np.asarray(x), np.asarray(y, dtype=float)

    def run_config(self) -> dict:
        path = self.run_dir / "pretrain_config.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def model(self):
        """The last checkpoint's model in eval mode, or None."""
        if "model" not in self._cache:
            from ..checkpoint import load_model
            from ..trainer import last_checkpoint
            ckpt = last_checkpoint(self.run_dir)
            self._cache["model"] = load_model(ckpt) if ckpt is not None else None
        return self._cache["model"]

    def waveforms(self) -> list[tuple[str, np.ndarray]]:
        """Up to ``max_audio`` decoded files: ``audio`` if given, else spread over the run's data."""
        if "audio" not in self._cache:
            from ..audio import AudioError, load_audio
            from ..formats import is_shard_input
            files = list(self.audio)
            inputs = [] if files else self.run_config().get("data", {}).get("inputs", [])
            if inputs and all(map(is_shard_input, inputs)):  # a run on tar shards: a few of their utterances
                from ..formats.shards import shard_waveforms
                found = shard_waveforms(inputs, self.max_audio, min_samples=16000)
                self._cache["audio"] = [(name, wav[:16000 * 6]) for name, wav in found]
                return self._cache["audio"]
            if not files:
                from ..data import list_entries
                entries = list_entries(inputs) if inputs else []
                step = max(1, len(entries) // self.max_audio)
                files = [e.path for e in entries[::step]]
            out = []
            for f in files[: self.max_audio * 2]:
                try:
                    wav = load_audio(f)
                except AudioError as e:
                    log.warning("plot: %s", e)
                    continue
                if len(wav) >= 16000:
                    out.append((f, wav[:16000 * 6]))
                if len(out) == self.max_audio:
                    break
            self._cache["audio"] = out
        return self._cache["audio"]


def render(run_dir: str | Path, out_dir: str | Path | None = None, names: list[str] | None = None,
           audio: list[str] | None = None, dpi: int = 110) -> list[Path]:
    """Render every applicable figure (or ``names``) of ``run_dir`` to ``out_dir`` (default
    ``run_dir/plots``); returns the PNG paths written."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is this a training run directory?)")
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    unknown = set(names or []) - set(FIGURES)
    if unknown:
        raise ValueError(f"unknown figures {sorted(unknown)}; available: {', '.join(FIGURES)}")
    ctx = PlotContext(run_dir, audio=list(audio or []))
    written = []
    for name in names or list(FIGURES):
        fig = FIGURES[name](ctx)
        if fig is None:
            continue
        path = out / f"{name}.png"
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        written.append(path)
    return written


# ---------------------------------------------------------------------------- helpers


def smooth(y: np.ndarray, span: int | None = None) -> np.ndarray:
    """Exponential moving average (span ~ 2% of the points, at least 1), bias-corrected."""
    span = span or max(1, len(y) // 50)
    alpha = 2.0 / (span + 1)
    out, acc, weight = np.empty_like(y), 0.0, 0.0
    for i, v in enumerate(y):
        acc = (1 - alpha) * acc + alpha * v
        weight = (1 - alpha) * weight + alpha
        out[i] = acc / weight
    return out


def subplots(*grid, figsize: tuple[float, float], layout: str | None = None, **kw):
    """(figure, axes) like ``pyplot.subplots``, on a bare :class:`Figure`: pyplot's global state and
    backend are never touched, so importing or calling this from a notebook changes nothing there."""
    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(*grid, **kw)


def lr_twin(ax, ctx: PlotContext, lw: float) -> None:
    """The learning rate on a second y axis of ``ax``, when the run logs it."""
    lr = ctx.series("lr")
    if lr is not None:
        twin = ax.twinx()
        twin.plot(*lr, color="tab:purple", lw=lw)
        twin.set_ylabel("learning rate", color="tab:purple")


def curve(ax, ctx: PlotContext, key: str, label: str | None = None, color=None) -> bool:
    """Draw ``key``'s series smoothed, the raw values faint behind it; False when the run has none."""
    s = ctx.series(key)
    if s is None:
        return False
    x, y = s
    line, = ax.plot(x, smooth(y), label=label or key, color=color, lw=1.6)
    ax.plot(x, y, color=line.get_color(), alpha=0.2, lw=0.8)
    return True


def _num_negatives(ctx: PlotContext) -> int | None:
    return ctx.run_config().get("loss", {}).get("num_negatives")
