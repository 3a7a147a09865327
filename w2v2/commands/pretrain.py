"""``w2v2 pretrain DATA... --out RUN_DIR``: self-supervised wav2vec 2.0 pretraining."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

HELP = "self-supervised pretraining on unlabeled audio"
log = logging.getLogger("w2v2.pretrain")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="+", metavar="DATA",
                        help="manifests (.tsv with a 'path' column), folders of audio, or audio files")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory: checkpoints and metrics")
    parser.add_argument("--preset", default=None, choices=["tiny", "small", "base", "large"],
                        help="model + recipe preset (default: base, or the run's own config with --resume)")
    parser.add_argument("--config", metavar="FILE",
                        help="JSON with sections model/train/loss/data overriding the preset")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint_last if present")
    parser.add_argument("--init", metavar="MODEL", help="start from this model's weights (it must have a quantizer)")
    g = parser.add_argument_group("overrides (win over preset and config)")
    g.add_argument("--max-updates", type=int)
    g.add_argument("--max-minutes", type=float, help="stop (and save) after this many minutes of training")
    g.add_argument("--schedule-clock", choices=("updates", "time"),
                   help="run the learning-rate schedule over --max-updates (default) or over --max-minutes "
                        "of training time (a fixed time budget; not bit-reproducible)")
    g.add_argument("--max-tokens", type=int, help="samples per batch and process")
    g.add_argument("--max-samples", type=int, help="crop longer files to this many samples")
    g.add_argument("--lr", type=float)
    g.add_argument("--warmup-updates", type=int)
    g.add_argument("--accum-steps", type=int, help="micro-batches per update")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    g.add_argument("--num-workers", type=int, help="DataLoader processes decoding audio")
    g.add_argument("--save-interval", type=int)
    g.add_argument("--keep-last", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--tensorboard", action="store_true", default=None)
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar (log lines only)")


def _overrides(args) -> dict:
    sections = {
        "train": {"max_updates": args.max_updates, "max_minutes": args.max_minutes,
                  "schedule_clock": args.schedule_clock, "lr": args.lr, "warmup_updates": args.warmup_updates,
                  "accum_steps": args.accum_steps, "precision": args.precision, "save_interval": args.save_interval,
                  "keep_last": args.keep_last, "seed": args.seed, "device": args.device,
                  "tensorboard": args.tensorboard, "progress": args.progress},
        "data": {"max_tokens": args.max_tokens, "max_samples": args.max_samples, "num_workers": args.num_workers},
    }
    return {s: {k: v for k, v in d.items() if v is not None} for s, d in sections.items()}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for section, values in extra.items():
        out[section] = {**out.get(section, {}), **values}
    return out


def report_bad(bad, examples: int = 3) -> None:
    """List unusable files on stderr; files that are merely too short are counted, with a few examples."""
    short = [(e, r) for e, r in bad if r.startswith("too short")]
    for entry, reason in bad:
        if not reason.startswith("too short"):
            print(f"skipping {entry.path}: {reason}", file=sys.stderr)
    for entry, reason in short[:examples]:
        print(f"skipping {entry.path}: {reason}", file=sys.stderr)
    if len(short) > examples:
        print(f"skipping {len(short) - examples} more files that are too short", file=sys.stderr)


def _recipe(args, run_dir: Path):
    """The run's recipe: --config (or, resuming without --preset, the run's own), then the flags."""
    from .. import pretrain

    saved = run_dir / pretrain.RECIPE_FILE
    if args.config:
        spec = pretrain.read_config_file(args.config)
    elif args.resume and args.preset is None and saved.exists():
        spec = pretrain.read_config_file(saved)  # the run's own recipe
    else:
        spec = {}
    spec = _merge(spec, _overrides(args))
    return pretrain.recipe(args.preset or spec.get("preset", "base"), spec)


def run(args) -> int:
    from ..checkpoint import load_model
    from ..config import ConfigError
    from ..data import list_entries, validate_entries
    from ..pretrain import build_trainer
    from ..trainer import checkpoint_dirs, dist_info

    run_dir = Path(args.out)
    problems, rec, entries = [], None, []
    if not args.resume and checkpoint_dirs(run_dir):
        problems.append(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    try:  # every problem with the options and the data listing, reported together, before anything is written
        rec = _recipe(args, run_dir)
    except ConfigError as e:
        problems += e.problems
    try:
        entries = list_entries(args.data)
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)
    rec.data.inputs = [str(Path(p).resolve()) for p in args.data]
    main = dist_info().is_main

    good, bad = validate_entries(entries, min_seconds=rec.data.min_samples / rec.model.sampling_rate)
    if main:
        report_bad(bad)
        hours = sum(e.seconds for e in good) / 3600
        log.info("%d files (%.2f h) to train on, %d skipped", len(good), hours, len(bad))
    model = load_model(args.init, with_quantizer=True).train() if args.init else None
    if model is not None:
        rec.model = model.config
    trainer = build_trainer(good, run_dir, rec, model=model)
    result = trainer.train(resume=args.resume)
    if main:
        how = "stopped early" if result["stopped_early"] else "done"
        log.info("%s at update %d; checkpoint %s", how, result["step"], result["checkpoint"])
    return 0
