"""``w2v2 finetune``: CTC fine-tuning on transcribed audio (see :mod:`w2v2.finetune`)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..checkpoint import find_model, random_init_config
from ..config import ConfigError
from ..distributed import restart_hint
from ..errors import UserError
from ..finetune import FinetuneConfig, FinetuneTrainConfig, finetune, read_data
from ..trainer import last_checkpoint
from ._options import add_fields, add_shared, field_values

log = logging.getLogger("w2v2.finetune")


# (title, options dataclass, the fields that get flags); each flag's default and help are its field's
GROUPS = (
    ("fine-tuning", FinetuneConfig, ("case", "freeze_updates", "feature_grad_scale")),
    ("schedule", FinetuneTrainConfig, ("max_updates", "max_minutes", "schedule_clock", "lr", "schedule",
                                       "tri_stage_ratios", "init_lr_scale", "final_lr_scale", "warmup_updates")),
    ("optimiser", FinetuneTrainConfig, ("accum_steps", "weight_decay", "eps", "clip_norm")),
    ("batches", FinetuneConfig, ("max_tokens", "max_batch_size", "num_workers")),
    ("regularisation", FinetuneConfig, ("mask_prob", "mask_length", "mask_min_masks", "mask_channel_prob",
                                        "mask_channel_length", "layerdrop", "hidden_dropout", "attention_dropout",
                                        "activation_dropout", "feat_proj_dropout", "final_dropout", "loss_norm")),
    ("validation", FinetuneConfig, ("valid_interval", "best_metric", "valid_batch_seconds")),
    ("run", FinetuneTrainConfig, ("save_interval", "keep_last", "log_interval", "precision", "device", "seed",
                                  "progress", "tensorboard")),
)


def add_arguments(p) -> None:
    g = p.add_argument_group("data and model")
    g.add_argument("--init", required=True,
                   help="pretrained model: our run or checkpoint dir, HF dir or hub id, fairseq .pt, "
                        "or random:PRESET (tiny, small, base, large) or random:CONFIG.json to train from scratch")
    g.add_argument("--train", required=True, nargs="+", help="manifest(s) with transcripts (.tsv path seconds speaker text; NeMo, "
                   "Lhotse, Hugging Face), or tar shards with texts (w2v2 prepare)")
    g.add_argument("--valid", required=True, nargs="+", help="validation manifest(s)")
    g.add_argument("--out", required=True, help="run directory (checkpoints, metrics, best/)")
    add_shared(g, "--resume")
    for title, cls, names in GROUPS:
        add_fields(p.add_argument_group(title), cls, names)


def configs(args) -> tuple[FinetuneConfig, FinetuneTrainConfig]:
    """The options dataclasses from the arguments; a ConfigError lists every bad value."""
    values, problems = {FinetuneConfig: {}, FinetuneTrainConfig: {}}, []
    for _, cls, names in GROUPS:
        values[cls].update(field_values(cls, args, names))
    built = []
    for cls, kwargs in values.items():
        try:
            built.append(cls(**kwargs))
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError(problems)
    return built[0], built[1]


def run(args) -> int:
    out = Path(args.out)
    if not args.resume and out.exists() and last_checkpoint(out) is not None:
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out"
                        + restart_hint())
    problems = []  # every problem with the options and manifests, reported together before anything is written
    try:
        ft, tc = configs(args)
    except ConfigError as e:
        problems += e.problems
    try:  # a mistyped local path is found here, with the other problems; a Hub id is fetched later
        if random_init_config(args.init) is None:
            find_model(args.init, download=False)
    except ValueError as e:
        problems.append(f"--init {e}")
    try:
        read_data(args.train, args.valid)
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)
    summary = finetune(args.init, args.train, args.valid, out, ft, tc, resume=args.resume)
    wer = summary.get("best_wer")
    print(f"{out}: {summary['step']} updates" + ("" if wer is None else
          f"; best valid WER {100 * wer:.2f}% at update {summary['best_update']} -> {summary['best']}"))
    return 0
