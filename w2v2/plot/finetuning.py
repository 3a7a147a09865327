"""Fine-tuning figures.

* ``wer``: validation WER and CER against updates (``valid.jsonl``), with the training CTC loss
  per character and the learning rate, and the Transformer freeze phase shaded.
* ``emissions``: one utterance through the run's best model: waveform with the reference words
  placed by forced alignment, the CTC posteriorgram (frames x tokens) with the greedy path on
  top, and the greedy transcript's words with their times.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .core import PlotContext, curve, lr_twin, register, subplots


def _finetune_config(ctx: PlotContext) -> dict | None:
    path = ctx.run_dir / "finetune_config.json"
    return json.loads(path.read_text()) if path.exists() else None


@register("wer")
def plot_wer(ctx: PlotContext):
    """Validation WER/CER (left), training loss per character and learning rate (right)."""
    from ..finetune import read_valid_log

    cfg = _finetune_config(ctx)
    valid = read_valid_log(ctx.run_dir)
    if cfg is None or not valid:
        return None
    fig, (ax, bx) = subplots(1, 2, figsize=(13, 4))
    x = [r["update"] for r in valid]
    for key, label, color in (("valid_wer", "WER", "tab:blue"), ("valid_cer", "CER", "tab:orange")):
        y = [100 * r[key] for r in valid]
        ax.plot(x, y, marker="o", ms=3, label=label, color=color)
    best = min(valid, key=lambda r: r["valid_wer"])
    ax.annotate(f"best {100 * best['valid_wer']:.1f}% @ {best['update']}", (best["update"], 100 * best["valid_wer"]),
                textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ax.set(title="validation error rates (greedy decoding)", xlabel="update", ylabel="%", ylim=(0, None))
    ax.legend(fontsize=8)
    curve(bx, ctx, "loss_per_token", "train CTC loss per character")
    vx = [r["update"] for r in valid if r.get("valid_loss") is not None]
    bx.plot(vx, [r["valid_loss"] for r in valid if r.get("valid_loss") is not None], marker="o", ms=3,
            color="tab:green", label="valid CTC loss per character")
    bx.set(title="CTC loss and learning rate", xlabel="update", yscale="log")
    lr_twin(bx, ctx, lw=1.0)
    freeze = cfg.get("freeze_updates", 0)
    for a in (ax, bx):
        if freeze:
            a.axvspan(0, freeze, color="gray", alpha=0.12, lw=0, label="Transformer frozen")
    bx.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def _utterance(ctx: PlotContext, cfg: dict) -> tuple[str, str | None] | None:
    """(audio path, reference text or None): the first ``--audio`` file, else the first
    validation utterance of the run."""
    if ctx.audio:
        return ctx.audio[0], None
    from ..data import list_entries

    entries = list_entries(cfg.get("valid", []))
    return (entries[0].path, entries[0].text) if entries else None


@register("emissions")
def plot_emissions(ctx: PlotContext):
    from ..audio import load_audio
    from ..checkpoint import load_model
    from ..decoding import align_words, greedy_decode
    from ..text import normalize_text

    cfg = _finetune_config(ctx)
    if cfg is None:
        return None
    utt = _utterance(ctx, cfg)
    if utt is None:
        return None
    path, ref = utt
    model = load_model(ctx.run_dir)  # best/, else the newest checkpoint
    wav = load_audio(path)[: 16000 * 8]
    with torch.no_grad():
        log_probs = model(torch.from_numpy(wav)[None]).logits[0].float().log_softmax(-1)  # (frames, vocab)
    vocab = model.vocab
    stride = model.config.frame_stride / 16000
    greedy = greedy_decode(log_probs, vocab, frame_seconds=stride)
    ref_words = []
    if ref:
        ref = normalize_text(ref, case=cfg.get("case", "upper"))
        try:
            ref_words = align_words(log_probs, ref, vocab, frame_seconds=stride)
        except ValueError:  # transcript longer than the audio allows
            ref_words = []

    frames = log_probs.shape[0]
    fig, (ax, bx) = subplots(2, 1, figsize=(13, 7), sharex=True, height_ratios=(1, 2.4))
    t = np.arange(len(wav)) / 16000
    ax.plot(t, wav, lw=0.4, color="black")
    top = float(np.abs(wav).max()) or 1.0
    for i, w in enumerate(ref_words):
        ax.axvspan(w.start, w.end, color=("tab:green" if i % 2 else "tab:olive"), alpha=0.2, lw=0)
        ax.text((w.start + w.end) / 2, top * 0.9, w.word, ha="center", va="top", fontsize=8)
    ax.set(ylabel="amplitude", title=f"{Path(path).name}  ref: {ref or '(none)'}\n"
                                     f"greedy: {greedy.text or '(empty)'}")
    probs = log_probs.exp().numpy().T  # (vocab, frames)
    extent = (0, frames * stride, len(vocab) - 0.5, -0.5)
    bx.imshow(probs, aspect="auto", origin="upper", cmap="magma", extent=extent, interpolation="nearest")
    path_ids = log_probs.argmax(-1).numpy()
    centers = (np.arange(frames) + 0.5) * stride
    non_blank = path_ids != vocab.blank_index
    bx.scatter(centers[non_blank], path_ids[non_blank], s=8, color="cyan", label="greedy path (non-blank)")
    bx.set_yticks(range(len(vocab)), [("∅" if i == vocab.blank_index else t) for i, t in enumerate(vocab.tokens)],
                  fontsize=6)
    for w in greedy.words:
        bx.annotate(w.word, ((w.start + w.end) / 2, len(vocab) - 0.5), xytext=(0, -14), textcoords="offset points",
                    ha="center", fontsize=8, color="tab:blue", annotation_clip=False)
        bx.axvline(w.start, color="tab:blue", lw=0.5, alpha=0.5)
    bx.set(xlabel="time (s); greedy words below", ylabel="token",
           title="CTC posteriorgram (probability per frame and token)")
    bx.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig
