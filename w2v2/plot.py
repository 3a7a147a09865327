"""Figures of a run directory: training curves from ``metrics.jsonl`` and diagnostics from the
last checkpoint, rendered to PNG with matplotlib's Agg backend (no display needed).

Figures live in a small registry: ``@register("name")`` on a function ``(ctx: PlotContext) ->
matplotlib Figure | None`` (None = does not apply to this run, e.g. no pretraining metrics).
Fine-tuning adds its own (WER curve, CTC emissions) the same way, in a module listed in
``PLUGINS`` (imported when present), or by calling :func:`register` before :func:`render`.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger(__name__)

FigureFn = Callable[["PlotContext"], "plt.Figure | None"]
FIGURES: dict[str, FigureFn] = {}
PLUGINS = ("w2v2.plot_finetune",)  # modules that register more figures, imported if they exist


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
            from .trainer import read_metrics
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
            from .checkpoint import load_model
            from .trainer import last_checkpoint
            ckpt = last_checkpoint(self.run_dir)
            self._cache["model"] = load_model(ckpt) if ckpt is not None else None
        return self._cache["model"]

    def waveforms(self) -> list[tuple[str, np.ndarray]]:
        """Up to ``max_audio`` decoded files: ``audio`` if given, else spread over the run's data."""
        if "audio" not in self._cache:
            from .audio import AudioError, load_audio
            files = list(self.audio)
            if not files:
                from .data import list_entries
                inputs = self.run_config().get("data", {}).get("inputs", [])
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
    for module in PLUGINS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
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
        plt.close(fig)
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


def _curve(ax, ctx: PlotContext, key: str, label: str | None = None, color=None) -> bool:
    s = ctx.series(key)
    if s is None:
        return False
    x, y = s
    line, = ax.plot(x, smooth(y), label=label or key, color=color, lw=1.6)
    ax.plot(x, y, color=line.get_color(), alpha=0.2, lw=0.8)
    return True


def _num_negatives(ctx: PlotContext) -> int | None:
    return ctx.run_config().get("loss", {}).get("num_negatives")


# ---------------------------------------------------------------------------- pretraining figures


@register("losses")
def plot_losses(ctx: PlotContext):
    """Contrastive loss against chance, the weighted extra terms, accuracy of the positive,
    learning rate and gradient norm."""
    if ctx.series("contrastive") is None:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    k = _num_negatives(ctx)
    ax = axes[0, 0]
    _curve(ax, ctx, "loss", "total")
    _curve(ax, ctx, "contrastive", "contrastive")
    if k:
        ax.axhline(np.log(k + 1), color="gray", ls="--", lw=1, label=f"chance ln({k + 1}) = {np.log(k + 1):.2f}")
    ax.set(title="loss per masked frame", xlabel="update")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    drawn = [_curve(ax, ctx, key, label) for key, label in (("diversity", "diversity (weighted)"),
                                                          ("penalty", "feature penalty (weighted)"))
             if ctx.series(key) is not None and np.any(ctx.series(key)[1] != 0)]
    ax.set(title="extra loss terms per masked frame", xlabel="update")
    if drawn:
        ax.legend(fontsize=8)
    ax = axes[1, 0]
    _curve(ax, ctx, "accuracy", "accuracy", color="tab:green")
    if k:
        ax.axhline(1 / (k + 1), color="gray", ls="--", lw=1, label=f"chance 1/{k + 1}")
    ax.set(title="positive picked among distractors", xlabel="update", ylim=(0, None))
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    _curve(ax, ctx, "grad_norm", "gradient norm", color="tab:red")
    ax.set(title="learning rate and gradient norm", xlabel="update", ylabel="gradient norm", yscale="log")
    lr = ctx.series("lr")
    if lr is not None:
        twin = ax.twinx()
        twin.plot(*lr, color="tab:purple", lw=1.2)
        twin.set_ylabel("learning rate", color="tab:purple")
    fig.tight_layout()
    return fig


@register("codebook")
def plot_codebook(ctx: PlotContext):
    """Code perplexity (hard choices) and softmax perplexity against their maximum, and the Gumbel temperature."""
    if ctx.series("code_perplexity") is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    _curve(ax, ctx, "code_perplexity", "code perplexity (hard choices)")
    _curve(ax, ctx, "prob_perplexity", "softmax perplexity (trained)")
    model_cfg = ctx.run_config().get("model", {})
    g, v = model_cfg.get("num_codevector_groups"), model_cfg.get("num_codevectors_per_group")
    if g and v:
        ax.axhline(g * v, color="gray", ls="--", lw=1, label=f"maximum G*V = {g * v}")
    ax.set(title="codebook use (masked frames, per batch)", xlabel="update", ylabel="perplexity", ylim=(0, None))
    temp = ctx.series("gumbel_temp")
    if temp is not None:
        twin = ax.twinx()
        twin.plot(*temp, color="tab:red", lw=1.2, ls=":")
        twin.set_ylabel("Gumbel temperature (dotted)", color="tab:red")
        twin.set_ylim(0, max(temp[1].max() * 1.1, 0.1))
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def _codes(model, wav: np.ndarray):
    """(code indices (frames, G), code probabilities (frames, G, V)) of one utterance, eval mode."""
    x = torch.from_numpy(wav)[None]
    with torch.no_grad():
        z, _, _ = model.extract(x, None)
        _, normed = model.feature_projection(z)
        _, probs, idx = model.quantizer(normed)
    return idx[0].numpy(), probs[0].numpy()


@register("codebook_usage")
def plot_codebook_usage(ctx: PlotContext):
    """How often each codeword is chosen over a batch of audio, per group (last checkpoint)."""
    model = ctx.model()
    if model is None or model.quantizer is None or not ctx.waveforms():
        return None
    idx = np.concatenate([_codes(model, w)[0] for _, w in ctx.waveforms()])  # (frames, G)
    groups, num_vars = model.quantizer.groups, model.quantizer.vars
    fig, axes = plt.subplots(groups, 1, figsize=(10, 2.2 * groups), squeeze=False)
    for g in range(groups):
        counts = np.bincount(idx[:, g], minlength=num_vars)
        p = counts / counts.sum()
        ppl = float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))
        ax = axes[g, 0]
        ax.bar(np.arange(num_vars), counts, width=1.0, color="tab:blue")
        ax.set(title=f"group {g}: {int((counts > 0).sum())} of {num_vars} codewords used, perplexity {ppl:.1f}",
               ylabel="frames")
    axes[-1, 0].set_xlabel("codeword index")
    fig.suptitle(f"codebook usage over {len(idx)} frames of {len(ctx.waveforms())} utterances", y=1.0)
    fig.tight_layout()
    return fig


@register("utterance")
def plot_utterance(ctx: PlotContext):
    """One utterance: waveform with the masked spans shaded and whether the positive won per
    masked frame; below, the chosen codeword per frame for each group."""
    model = ctx.model()
    if model is None or model.quantizer is None or not ctx.waveforms():
        return None
    from .masking import compute_mask_indices, sample_negatives
    from .pretrain import PretrainConfig, pretraining_step

    name, wav = ctx.waveforms()[0]
    wav = wav[: 16000 * 4]
    loss_cfg = PretrainConfig(**{k: v for k, v in ctx.run_config().get("loss", {}).items()
                                 if k in PretrainConfig.__dataclass_fields__})
    x = torch.from_numpy(wav)[None]
    frames = int(model.num_frames(torch.tensor([len(wav)]))[0])
    g = torch.Generator().manual_seed(0)
    mask = compute_mask_indices((1, frames), loss_cfg.mask_prob, loss_cfg.mask_length,
                                min_masks=loss_cfg.min_masks, generator=g)
    negatives = sample_negatives(mask, loss_cfg.num_negatives, generator=g)
    with torch.no_grad():
        r = pretraining_step(model, x, None, mask, negatives, loss_cfg)
    correct = (r["logits"][0].argmax(-1) == 0).numpy()  # (n,) per masked frame
    idx = r["out"].code_indices[0].numpy()  # (frames, G)
    stride = model.config.frame_stride / 16000
    t = np.arange(len(wav)) / 16000
    ft = np.arange(frames) * stride
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(12, 5), sharex=True, height_ratios=(2, 1), layout="constrained")
    ax.plot(t, wav, lw=0.4, color="black")
    m = mask[0].numpy()
    for start, stop in _runs(m):
        ax.axvspan(start * stride, stop * stride, color="tab:orange", alpha=0.25, lw=0)
    masked_t = ft[m]
    top = np.abs(wav).max() * 1.05
    ax.scatter(masked_t[correct], np.full(correct.sum(), top), s=6, color="tab:green", label="positive picked")
    ax.scatter(masked_t[~correct], np.full((~correct).sum(), top), s=6, color="tab:red", label="distractor picked")
    ax.set(title=f"{Path(name).name}: masked spans shaded ({m.mean():.0%} of frames), "
                 f"accuracy {correct.mean():.0%} on this utterance", ylabel="amplitude")
    ax.legend(loc="lower right", fontsize=8, markerscale=2)
    groups, num_vars = idx.shape[1], model.quantizer.vars
    image = bx.imshow(idx.T, aspect="auto", interpolation="nearest", cmap="nipy_spectral", vmin=0,
                      vmax=num_vars - 1, extent=(0, frames * stride, groups - 0.5, -0.5))
    bx.set(xlabel="time (s)", yticks=range(groups), yticklabels=[f"group {g}" for g in range(groups)],
           title="chosen codeword per frame (argmax; colour = codeword index)")
    fig.colorbar(image, ax=[ax, bx], pad=0.01, fraction=0.03, label="codeword index")
    return fig


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of the True runs of a 1-D bool array."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))
