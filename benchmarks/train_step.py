"""One training update (forward + backward + AdamW step) of w2v2 against transformers on the same
weights and batch: CTC fine-tuning against Wav2Vec2ForCTC, pretraining against Wav2Vec2ForPreTraining.

    python benchmarks/train_step.py           # CTC and pretraining: BASE 2 x 10 s, `small` 8 x 4 s
    python benchmarks/train_step.py --quick   # one timed step per variant: a smoke run (transformers'
                                              # early updates run slower, e.g. small 1.2 s vs 0.8 s:
                                              # quote --repeats 2 or more)
    python benchmarks/train_step.py --cases pretrain-base pretrain-small   # pretraining only

(benchmarks/pretrain.py times the pretraining cases one variant per process and adds peak memory.)

CTC cases run twice: with the feature encoder frozen in both models (the fine-tuning recipe:
fairseq's feature_grad_mult 0, transformers' freeze_feature_encoder(), our default) and with
everything trained (``--encoder frozen|trained`` picks one). The preset's dropouts, no layerdrop
and no SpecAugment, so that both do the same work.
The CTC loss is the same function of the logits for both; pretraining uses each library's own
objective with the same mask and negatives (100 per masked frame). bf16 means ``torch.autocast`` for
transformers and ``set_precision("bf16")`` for ours (float32 master weights in both).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile

import torch
import torch.nn.functional as F

import harness
from w2v2.finetune import freeze_feature_encoder

CASES = (("base", 2, 10.0), ("small", 8, 4.0), ("pretrain-base", 2, 10.0), ("pretrain-small", 8, 4.0))


def adamw(model) -> torch.optim.AdamW:
    """Fused AdamW: what transformers' Trainer (torch >= 2.8) and w2v2's trainer both use."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)


def ctc_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    lp = logits.float().log_softmax(-1).transpose(0, 1)  # (frames, batch, vocab)
    b, t = logits.shape[0], logits.shape[1]
    return F.ctc_loss(lp, targets, torch.full((b,), t), torch.full((b,), targets.shape[1]), blank=0,
                      reduction="mean", zero_infinity=True)


def updates(hf, ours, device_type: str, hf_loss, ours_loss):
    """name -> one update (loss, backward, fused AdamW step) of each variant: transformers with
    and without bf16 autocast, ours in fp32 and bf16; ``hf_loss()`` / ``ours_loss()`` give the loss."""
    opt_hf, opt_ours = adamw(hf), adamw(ours)

    def tf(bf16: bool):
        def step():
            opt_hf.zero_grad(set_to_none=True)
            with torch.autocast(device_type, torch.bfloat16, enabled=bf16):
                loss = hf_loss()
            loss.backward()
            opt_hf.step()
        return step

    def ours_(prec: str):
        def step():
            opt_ours.zero_grad(set_to_none=True)
            ours.set_precision(prec)
            ours_loss().backward()
            opt_ours.step()
        return step

    return {"tf fp32": tf(False), "ours fp32": ours_("fp32"), "tf bf16": tf(True), "ours bf16": ours_("bf16")}


def steps(hf, ours, x: torch.Tensor, targets: torch.Tensor):
    """name -> one CTC update of that variant; models, ``x`` and ``targets`` on one device."""
    xn = harness.normalized(x)
    return updates(hf, ours, x.device.type, lambda: ctc_loss(hf(xn).logits, targets),
                   lambda: ctc_loss(ours(x).logits, targets))


def model_pair(name: str, preset: str | None = None, frozen_encoder: bool = False):
    """(transformers, ours) for case ``name`` on the same random weights, in train mode, without
    layerdrop, the feature encoder frozen in both if asked; ``preset`` overrides the case's
    preset (e.g. "tiny" for a dry run)."""
    pretrain = name.startswith("pretrain-")
    with tempfile.TemporaryDirectory() as tmp:
        # a pretraining model needs mask_time_prob > 0 to own its mask embedding; the mask itself is ours
        cfg = harness.hf_config(preset or name.removeprefix("pretrain-"), layerdrop=0.0,
                                **({"mask_time_prob": 0.05} if pretrain else {}))
        hf, ours = harness.model_pair(tmp, cfg, head="Wav2Vec2ForPreTraining" if pretrain else "Wav2Vec2ForCTC")
    if frozen_encoder:
        hf.freeze_feature_encoder()
        freeze_feature_encoder(ours)
    return hf.train(), ours.train()


def pretrain_steps(hf, ours, x: torch.Tensor):
    """name -> one pretraining update: same mask (p=0.65, length 10) and negatives for both.
    The models and ``x`` must be on the same device (autocast follows ``x.device``)."""
    from w2v2.masking import compute_mask_indices, sample_negatives
    from w2v2.pretrain import PretrainingLossConfig, pretraining_step

    xn, cfg = harness.normalized(x), PretrainingLossConfig()
    b, frames = x.shape[0], int(ours.num_frames(torch.tensor([x.shape[1]]))[0])
    g = torch.Generator().manual_seed(0)
    mask = compute_mask_indices((b, frames), cfg.mask_prob, cfg.mask_length, min_masks=cfg.min_masks, generator=g)
    negatives = sample_negatives(mask, cfg.num_negatives, generator=g)  # (batch, masked, K)
    hf_neg = torch.zeros(b, frames, cfg.num_negatives, dtype=torch.long)
    hf_neg[mask] = (negatives + frames * torch.arange(b)[:, None, None]).view(-1, cfg.num_negatives)
    mask, negatives, hf_neg = mask.to(x.device), negatives.to(x.device), hf_neg.to(x.device)
    ours.feature_grad_scale = cfg.feature_grad_scale
    return updates(hf, ours, x.device.type,
                   lambda: hf(xn, mask_time_indices=mask, sampled_negative_indices=hf_neg).loss,
                   lambda: pretraining_step(ours, x, None, mask, negatives, cfg)["total"])


def parser(doc: str, cases=CASES) -> argparse.ArgumentParser:
    """The options the training-update benchmarks share: --quick, --repeats, --threads, --clock, --cases."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one timed step per variant")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per variant (median reported)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or process CPU time (use with --threads 1 on a busy machine)")
    p.add_argument("--cases", nargs="+", default=[c[0] for c in cases], choices=[c[0] for c in cases])
    return p


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--encoder", nargs="+", choices=("frozen", "trained"), default=["frozen", "trained"],
                   help="CTC cases: feature encoder frozen (the fine-tuning recipe) and/or trained")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    load_before = harness.load_average()
    peak = harness.matmul_peak(clock=args.clock)
    rows = []
    for name, batch, seconds in CASES:
        if name not in args.cases:
            continue
        pretrain = name.startswith("pretrain-")
        for encoder in ["trained"] if pretrain else args.encoder:
            hf, ours = model_pair(name, frozen_encoder=encoder == "frozen")
            x = harness.speech(seconds, batch)
            frames = harness.conv_frames(ours.config, x.shape[1])[-1]
            targets = torch.randint(1, ours.config.vocab_size or 32, (batch, frames // 4),
                                    generator=torch.Generator().manual_seed(0))
            fns = pretrain_steps(hf, ours, x) if pretrain else steps(hf, ours, x, targets)
            times = harness.interleaved(fns, repeats, warmup=1, clock=args.clock)
            flops = harness.update_flops(ours.config, batch, x.shape[1], frozen_encoder=encoder == "frozen")
            label = f"pretraining {name.removeprefix('pretrain-')}" if pretrain else f"CTC {name}, encoder {encoder}"
            for prec in ("fp32", "bf16"):
                t_tf, t_ours = times[f"tf {prec}"], times[f"ours {prec}"]
                g_tf, g_ours = flops / t_tf / 1e9, flops / t_ours / 1e9
                rows.append([f"{label}, {batch} x {seconds:g} s", prec, f"{t_tf:.3f}", f"{t_ours:.3f}",
                             f"{t_tf / t_ours:.2f}x", f"{times['tf fp32'] / t_ours:.2f}x",
                             f"{g_tf:.0f} ({100 * g_tf / peak[prec]:.0f}%)", f"{g_ours:.0f} ({100 * g_ours / peak[prec]:.0f}%)",
                             f"{flops / 1e9 / peak[prec]:.3f}", f"{t_tf / 2:.3f}"])
    print("# w2v2 training update (forward + backward + AdamW) vs transformers Wav2Vec2ForCTC / Wav2Vec2ForPreTraining")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {args.threads}, "
          f"clock {args.clock}, repeats {repeats}")
    print(f"matmul peak (2048^3, best of): fp32 {peak['fp32']:.0f} GFLOP/s [{peak['fp32 detail']}], "
          f"bf16 {peak['bf16']:.0f} GFLOP/s [{peak['bf16 detail']}]")
    print("GFLOP/s: model FLOPs of the update (matrix products and convolutions; backward = 2x the forward "
          "of what it reaches) per second, and that as a share of the matmul peak")
    print("products at peak: the update's counted FLOPs at the matmul peak, a lower bound for any "
          "implementation doing these products on this machine (2x transformers needs tf/2, and the "
          "elementwise work on top)")
    print(f"load average before/after: {load_before} / {harness.load_average()}\n")
    print(harness.markdown_table(
        ["update", "precision", "transformers s/step", "ours s/step", "speedup", "ours vs tf fp32",
         "tf GFLOP/s (% peak)", "ours GFLOP/s (% peak)", "products at peak s", "tf / 2 s"], rows))


if __name__ == "__main__":
    sys.exit(main())
