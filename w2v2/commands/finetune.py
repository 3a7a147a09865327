"""``w2v2 finetune``: CTC fine-tuning on transcribed audio (see :mod:`w2v2.finetune`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

HELP = "CTC fine-tuning on transcribed audio"
log = logging.getLogger("w2v2.finetune")


def add_arguments(p) -> None:
    g = p.add_argument_group("data and model")
    g.add_argument("--init", required=True,
                   help="pretrained model: our run or checkpoint dir, HF dir or hub id, fairseq .pt, "
                        "or random:PRESET (tiny, small, base, large) or random:CONFIG.json to train from scratch")
    g.add_argument("--train", required=True, nargs="+", help="manifest(s) with transcripts (path seconds speaker text)")
    g.add_argument("--valid", required=True, nargs="+", help="validation manifest(s)")
    g.add_argument("--out", required=True, help="run directory (checkpoints, metrics, best/)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--case", choices=("upper", "lower", "keep"), default="upper",
                   help="letter case of the normalised transcripts (vocabulary, targets, scoring)")

    g = p.add_argument_group("schedule")
    g.add_argument("--max-updates", type=int, default=13000)
    g.add_argument("--max-minutes", type=float, default=None,
                   help="stop (and save) after this many minutes of training")
    g.add_argument("--schedule-clock", choices=("updates", "time"), default="updates",
                   help="run the learning-rate schedule over --max-updates, or over --max-minutes of "
                        "training time (a fixed time budget; not bit-reproducible)")
    g.add_argument("--freeze-updates", type=int, default=0,
                   help="updates during which only the CTC head trains (fairseq freeze_finetune_updates)")
    g.add_argument("--feature-grad-scale", type=float, default=0.0,
                   help="0 freezes the convolutional feature encoder (recipe); 1 trains it (from scratch)")
    g.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (raise it for random: inits)")
    g.add_argument("--schedule", choices=("tri_stage", "polynomial", "constant"), default="tri_stage")
    g.add_argument("--tri-stage-ratios", type=float, nargs=3, default=(0.1, 0.4, 0.5),
                   metavar=("WARMUP", "HOLD", "DECAY"), help="fractions of --max-updates")
    g.add_argument("--init-lr-scale", type=float, default=0.01)
    g.add_argument("--final-lr-scale", type=float, default=0.05)
    g.add_argument("--warmup-updates", type=int, default=1000, help="polynomial/constant schedules only")
    g.add_argument("--max-tokens", type=float, default=3.2e6,
                   help="audio samples per batch (padded; 3.2e6 = 200 s)")
    g.add_argument("--max-batch-size", type=int, default=None)
    g.add_argument("--accum-steps", type=int, default=1, help="micro-batches per update (fairseq update_freq)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--eps", type=float, default=1e-8, help="Adam epsilon")
    g.add_argument("--clip-norm", type=float, default=0.0, help="0: no clipping")

    g = p.add_argument_group("regularisation")
    g.add_argument("--mask-prob", type=float, default=0.075,
                   help="time masking: mask_prob*frames/mask_length spans per utterance (~fraction masked)")
    g.add_argument("--mask-length", type=int, default=10)
    g.add_argument("--mask-min-masks", type=int, default=2)
    g.add_argument("--mask-channel-prob", type=float, default=0.1,
                   help="channel masking of the projected features: prob*hidden/length spans per utterance")
    g.add_argument("--mask-channel-length", type=int, default=64)
    g.add_argument("--layerdrop", type=float, default=0.05)
    for name in ("hidden-dropout", "attention-dropout", "activation-dropout", "feat-proj-dropout", "final-dropout"):
        g.add_argument(f"--{name}", type=float, default=None, help="default: the --init model's value")
    g.add_argument("--loss-norm", choices=("sentences", "tokens"), default="sentences",
                   help="divide the summed CTC loss by utterances (fairseq sentence_avg) or characters")

    g = p.add_argument_group("run")
    g.add_argument("--valid-interval", type=int, default=500, help="updates between validations")
    g.add_argument("--valid-batch-seconds", type=float, default=200.0)
    g.add_argument("--save-interval", type=int, default=1000, help="updates between checkpoints")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints kept (best/ is kept apart)")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    g.add_argument("--device", default="auto")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--num-workers", type=int, default=0, help="data loader processes")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--tensorboard", action="store_true")


def configs(args):
    """(FinetuneConfig, TrainConfig, regularisation) from the arguments; a ConfigError lists every bad value."""
    from ..config import ConfigError
    from ..finetune import FinetuneConfig
    from ..trainer import TrainConfig

    case = None if args.case == "keep" else args.case
    built, problems = [], []
    for make in (
        lambda: FinetuneConfig(
            case=case, freeze_updates=args.freeze_updates, feature_grad_scale=args.feature_grad_scale,
            mask_prob=args.mask_prob, mask_length=args.mask_length, mask_min_masks=args.mask_min_masks,
            mask_channel_prob=args.mask_channel_prob, mask_channel_length=args.mask_channel_length,
            loss_norm=args.loss_norm, valid_interval=args.valid_interval,
            valid_batch_seconds=args.valid_batch_seconds),
        lambda: TrainConfig(
            lr=args.lr, schedule=args.schedule, warmup_updates=args.warmup_updates,
            tri_stage_ratios=tuple(args.tri_stage_ratios), init_lr_scale=args.init_lr_scale,
            final_lr_scale=args.final_lr_scale, max_updates=args.max_updates, accum_steps=args.accum_steps,
            max_minutes=args.max_minutes, schedule_clock=args.schedule_clock,
            clip_norm=args.clip_norm, eps=args.eps, weight_decay=args.weight_decay, precision=args.precision,
            log_interval=args.log_interval, save_interval=args.save_interval, keep_last=args.keep_last,
            seed=args.seed, device=args.device, progress=not args.no_progress, tensorboard=args.tensorboard),
    ):
        try:
            built.append(make())
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError(problems)
    ft, tc = built
    reg = {"layerdrop": args.layerdrop, "hidden_dropout": args.hidden_dropout,
           "attention_dropout": args.attention_dropout, "activation_dropout": args.activation_dropout,
           "feat_proj_dropout": args.feat_proj_dropout, "final_dropout": args.final_dropout}
    return ft, tc, reg


def run(args) -> int:
    from ..cli import UserError
    from ..config import PRESETS, ConfigError
    from ..finetune import finetune, read_data
    from ..trainer import last_checkpoint

    out = Path(args.out)
    if not args.resume and out.exists() and last_checkpoint(out) is not None:
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    problems = []  # every problem with the options and manifests, reported together before anything is written
    try:
        ft, tc, reg = configs(args)
    except ConfigError as e:
        problems += e.problems
    name = args.init.split(":", 1)[1] if args.init.startswith("random:") else None
    if name is not None and name.endswith(".json"):
        try:
            from ..config import ModelConfig
            with open(name, encoding="utf-8") as f:
                ModelConfig.from_dict(json.load(f))
        except (OSError, ValueError, TypeError) as e:
            problems.append(f"--init {args.init}: cannot use it as a model configuration ({e})")
    elif name is not None and name not in PRESETS:
        problems.append(f"--init {args.init}: unknown preset; use random:{' or random:'.join(PRESETS)}")
    try:
        read_data(args.train, args.valid)
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)
    summary = finetune(args.init, args.train, args.valid, out, ft, tc, max_tokens=int(args.max_tokens),
                       max_batch_size=args.max_batch_size, num_workers=args.num_workers, regularisation=reg,
                       resume=args.resume)
    wer = summary.get("best_wer")
    print(f"{out}: {summary['step']} updates" + ("" if wer is None else
          f"; best valid WER {100 * wer:.2f}% at update {summary['best_update']} -> {summary['best']}"))
    return 0
