"""Pretraining figures: losses, codebook use, and one utterance's masked spans and codewords."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from .core import PlotContext, curve, lr_twin, register, subplots


def _num_negatives(ctx: PlotContext) -> int | None:
    return ctx.run_config().get("loss", {}).get("num_negatives")



@register("losses")
def plot_losses(ctx: PlotContext):
    """Contrastive loss against chance, the weighted extra terms, accuracy of the positive,
    learning rate and gradient norm."""
    if ctx.series("contrastive") is None:
        return None
    fig, axes = subplots(2, 2, figsize=(12, 7))
    k = _num_negatives(ctx)
    ax = axes[0, 0]
    curve(ax, ctx, "loss", "total")
    curve(ax, ctx, "contrastive", "contrastive")
    if k:
        ax.axhline(np.log(k + 1), color="gray", ls="--", lw=1, label=f"chance ln({k + 1}) = {np.log(k + 1):.2f}")
    ax.set(title="loss per masked frame", xlabel="update")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    drawn = [curve(ax, ctx, key, label) for key, label in (("diversity", "diversity (weighted)"),
                                                          ("penalty", "feature penalty (weighted)"))
             if ctx.series(key) is not None and np.any(ctx.series(key)[1] != 0)]
    ax.set(title="extra loss terms per masked frame", xlabel="update")
    if drawn:
        ax.legend(fontsize=8)
    ax = axes[1, 0]
    curve(ax, ctx, "accuracy", "accuracy", color="tab:green")
    if k:
        ax.axhline(1 / (k + 1), color="gray", ls="--", lw=1, label=f"chance 1/{k + 1}")
    ax.set(title="positive picked among distractors", xlabel="update", ylim=(0, None))
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    curve(ax, ctx, "grad_norm", "gradient norm", color="tab:red")
    ax.set(title="learning rate and gradient norm", xlabel="update", ylabel="gradient norm", yscale="log")
    lr_twin(ax, ctx, lw=1.2)
    fig.tight_layout()
    return fig


@register("codebook")
def plot_codebook(ctx: PlotContext):
    """Code perplexity (hard choices) and softmax perplexity against their maximum, and the Gumbel temperature."""
    if ctx.series("code_perplexity") is None:
        return None
    fig, ax = subplots(figsize=(8, 4))
    curve(ax, ctx, "code_perplexity", "code perplexity (hard choices)")
    curve(ax, ctx, "prob_perplexity", "softmax perplexity (trained)")
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
    fig, axes = subplots(groups, 1, figsize=(10, 2.2 * groups), squeeze=False)
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
    from ..masking import compute_mask_indices, sample_negatives
    from ..pretrain import PretrainingLossConfig, pretraining_step

    name, wav = ctx.waveforms()[0]
    wav = wav[: 16000 * 4]
    loss_cfg = PretrainingLossConfig(**{k: v for k, v in ctx.run_config().get("loss", {}).items()
                                        if k in PretrainingLossConfig.__dataclass_fields__})
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
    fig, (ax, bx) = subplots(2, 1, figsize=(12, 5), sharex=True, height_ratios=(2, 1), layout="constrained")
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
