"""``w2v2 pretrain DATA... --out RUN_DIR``: self-supervised wav2vec 2.0 pretraining."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..config import PRESETS
from ..pretrain import DataConfig
from ..trainer import TrainConfig
from ._options import add_fields, add_shared, field_values

log = logging.getLogger("w2v2.pretrain")


# the fields of the run's train and data sections that flags override
TRAIN = ("max_updates", "max_minutes", "schedule_clock", "lr", "warmup_updates", "accum_steps", "precision",
         "fsdp", "save_interval", "keep_last", "seed", "device", "tensorboard", "progress")
DATA = ("max_tokens", "max_samples", "num_workers")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="+", metavar="DATA",
                        help="manifests (.tsv with a 'path' column, NeMo .json/.jsonl, Lhotse cuts .jsonl.gz, Hugging Face "
                             ".parquet or save_to_disk folders), folders of audio, audio files; or tar shards "
                             "(local or fsspec URLs, brace patterns, a w2v2 prepare folder)")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory: checkpoints and metrics")
    parser.add_argument("--preset", default=None, choices=PRESETS,
                        help="model and training preset; None: base, or the run's own configuration with --resume")
    parser.add_argument("--config", metavar="FILE",
                        help="JSON with sections model/train/loss/data overriding the preset")
    add_shared(parser, "--resume")
    parser.add_argument("--init", metavar="MODEL", help="start from this model's weights (it must have a quantizer)")
    g = parser.add_argument_group("overrides (win over preset and config; without them, the preset's or "
                                  "--config's values)")
    add_fields(g, TrainConfig, TRAIN, defaults=False)
    add_fields(g, DataConfig, DATA, defaults=False)


def _overrides(args) -> dict:
    return {"train": field_values(TrainConfig, args, TRAIN, given_only=True),
            "data": field_values(DataConfig, args, DATA, given_only=True)}


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


def _run_config(args, run_dir: Path):
    """The run's configuration: --config (or, resuming without --preset, the run's own), then the flags."""
    from .. import pretrain

    saved = run_dir / pretrain.CONFIG_FILE
    if args.config:
        spec = pretrain.read_config_file(args.config)
    elif args.resume and args.preset is None and saved.exists():
        spec = pretrain.read_config_file(saved)  # the run's own configuration
    else:
        spec = {}
    spec = _merge(spec, _overrides(args))
    return pretrain.preset_config(args.preset or spec.get("preset", "base"), spec)


def run(args) -> int:
    from ..checkpoint import load_model
    from ..config import ConfigError
    from ..data import check_entries, list_entries
    from ..formats import is_shard_input
    from ..formats.shards import load_catalog
    from ..pretrain import build_trainer
    from ..distributed import dist_info, restart_hint
    from ..trainer import checkpoint_dirs

    run_dir = Path(args.out)
    problems, cfg, entries = [], None, []
    if not args.resume and checkpoint_dirs(run_dir):
        problems.append(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
                        + restart_hint())
    try:  # every problem with the options and the data listing, reported together, before anything is written
        cfg = _run_config(args, run_dir)
    except ConfigError as e:
        problems += e.problems
    shards = all(map(is_shard_input, args.data))
    try:
        entries = load_catalog(args.data) if shards else list_entries(args.data)
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)
    cfg.data.inputs = [p if "://" in p else str(Path(p).resolve()) for p in args.data]
    main = dist_info().is_main

    if shards:  # checked by w2v2 prepare; an utterance that fails to decode is logged and left out
        good = entries
        if main:
            log.info("%d utterances (%.2f h) in %d shards", len(good), sum(s.sum() for s in good.seconds) / 3600,
                     len(good.urls))
    else:
        good, bad = check_entries(entries, min_seconds=cfg.data.min_samples / cfg.model.sampling_rate)
        if main:
            report_bad(bad)
            hours = good.total_seconds() / 3600
            log.info("%d files (%.2f h) to train on, %d skipped", len(good), hours, len(bad))
    model = load_model(args.init, with_quantizer=True).train() if args.init else None
    if model is not None:
        cfg.model = model.config
    trainer = build_trainer(good, run_dir, cfg, model=model)
    result = trainer.train(resume=args.resume)
    if main:
        how = "stopped early" if result["stopped_early"] else "done"
        log.info("%s at update %d; checkpoint %s", how, result["step"], result["checkpoint"])
    return 0
