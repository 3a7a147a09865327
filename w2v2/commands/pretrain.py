"""``w2v2 pretrain DATA... --out RUN_DIR``: self-supervised wav2vec 2.0 pretraining."""

from __future__ import annotations

import argparse
import json
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
        "train": {"max_updates": args.max_updates, "lr": args.lr, "warmup_updates": args.warmup_updates,
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


def run(args) -> int:
    from .. import pretrain
    from ..checkpoint import load_model
    from ..trainer import dist_info

    run_dir = Path(args.out)
    saved = run_dir / pretrain.RECIPE_FILE
    if args.config:
        spec = json.loads(Path(args.config).read_text()) if Path(args.config).exists() else None
        if spec is None:
            raise FileNotFoundError(f"{args.config}: no such config file")
    elif args.resume and args.preset is None and saved.exists():
        spec = json.loads(saved.read_text())  # the run's own recipe
    else:
        spec = {}
    spec = _merge(spec, _overrides(args))
    rec = pretrain.recipe(args.preset or spec.get("preset", "base"), spec)
    rec.data.inputs = [str(Path(p).resolve()) for p in args.data]
    main = dist_info().is_main

    good, bad = pretrain.prepare_data(args.data, rec)
    if main:
        report_bad(bad)
        hours = sum(e.seconds for e in good) / 3600
        log.info("%d files (%.2f h) to train on, %d skipped", len(good), hours, len(bad))
    model = load_model(args.init, with_quantizer=True).train() if args.init else None
    if model is not None:
        rec.model = model.config
    trainer = pretrain.build_trainer(good, run_dir, rec, model=model)
    result = trainer.train(resume=args.resume)
    if main:
        how = "stopped early" if result["stopped_early"] else "done"
        log.info("%s at update %d; checkpoint %s", how, result["step"], result["checkpoint"])
    return 0
