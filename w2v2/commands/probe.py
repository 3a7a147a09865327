"""``w2v2 probe``: linear-probe accuracy of every layer's mean-pooled features for one label.

Features of all files and all requested layers come from one pass of the model; then one
standardised logistic regression per layer is trained on the training split and scored on the
test split. Either give ``--train`` and ``--test`` manifests, or one ``--data`` manifest with
``--split-by speaker`` (held-out speakers: for word/digit recognition) or ``--split-by utterance``
(stratified by label: for speaker identification, ``--label-column speaker``).
"""

from __future__ import annotations

import json
import sys

from tqdm import tqdm

from ..errors import UserError
from ._options import add_shared
from ._shared import load_cli_model


def add_arguments(parser) -> None:
    add_shared(parser, "--model")
    parser.add_argument("--train", help="training manifest (.tsv with 'path' and the label column)")
    parser.add_argument("--test", help="test manifest")
    parser.add_argument("--data", help="one manifest, split with --split-by (instead of --train/--test)")
    parser.add_argument("--split-by", choices=["speaker", "utterance"],
                        help="speaker: test speakers unseen in training; utterance: stratified by label")
    parser.add_argument("--label-column", required=True, help="manifest column to predict, e.g. text or speaker")
    parser.add_argument("--speaker-column", default="speaker", help="column naming the speaker (--split-by speaker)")
    parser.add_argument("--test-fraction", type=float, default=0.25,
                        help="share of speakers (or of each label's utterances) held out for testing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of cross-validation folds")
    add_shared(parser, "--layers")
    parser.add_argument("--C", type=float, nargs="+", default=[1.0],
                        help="inverse L2 strength; several values pick one per layer by cross-validation")
    parser.add_argument("--cv-folds", type=int, default=3, help="folds for choosing C (when several --C)")
    add_shared(parser, "--batch-size", "--device")
    parser.add_argument("--json", help="write the results here (JSON)")
    parser.add_argument("--plot", help="write a PNG of accuracy by layer here")
    add_shared(parser, "--progress")


def load_split(args) -> tuple[list[dict], list[dict], dict]:
    """(train rows, test rows, description of the split) from --train/--test or --data/--split-by."""
    from ..embed import read_manifest
    from ..probe import split_rows

    if args.data:
        if args.train or args.test or not args.split_by:
            raise UserError("give either --data MANIFEST --split-by speaker|utterance, or --train and --test")
        rows = read_manifest(args.data)
        tr, te = split_rows(rows, args.split_by, label_column=args.label_column, speaker_column=args.speaker_column,
                            test_fraction=args.test_fraction, seed=args.seed)
        info = {"data": args.data, "split_by": args.split_by, "test_fraction": args.test_fraction, "seed": args.seed}
        if args.split_by == "speaker":
            info["test_speakers"] = sorted({rows[i][args.speaker_column] for i in te})
        return [rows[i] for i in tr], [rows[i] for i in te], info
    if not (args.train and args.test):
        raise UserError("give --train and --test manifests, or --data MANIFEST --split-by speaker|utterance")
    return read_manifest(args.train), read_manifest(args.test), {"train": args.train, "test": args.test}


def run(args) -> int:
    from ..embed import rows_to_items
    from ..probe import Panel, chance_accuracy, format_table, plot_accuracy, pooled_features, probe_layers
    from ._shared import check_output_target

    for option, path in (("--json", args.json), ("--plot", args.plot)):  # before any work
        if path:
            check_output_target(path, option=option)
    train_rows, test_rows, info = load_split(args)
    for name, rows in (("training", train_rows), ("test", test_rows)):
        if not rows:
            raise UserError(f"the {name} split is empty")
        if args.label_column not in rows[0]:
            raise UserError(f"no column {args.label_column!r} in the manifest; "
                            f"columns: {', '.join(k for k in rows[0] if k != 'audio')}")
    rows = train_rows + test_rows
    model = load_cli_model(args, with_quantizer=False)
    name = args.model or "default"
    bar = tqdm(total=len(rows), unit="file", disable=not args.progress or None, file=sys.stderr)

    def progress(e):
        bar.update(1)
        if not e.ok:
            tqdm.write(f"w2v2 probe: warning: {e.error} (skipped)", file=sys.stderr)

    x, layers, kept, errors = pooled_features(model, rows_to_items(rows), layers=args.layers,
                                              batch_size=args.batch_size, progress=progress)
    bar.close()
    labels = [rows[i][args.label_column] for i in kept]
    is_train = [i < len(train_rows) for i in kept]
    xtr, xte = x[[k for k, t in enumerate(is_train) if t]], x[[k for k, t in enumerate(is_train) if not t]]
    ytr = [y for y, t in zip(labels, is_train) if t]
    yte = [y for y, t in zip(labels, is_train) if not t]
    if not ytr or not yte:
        raise UserError("after skipping unreadable files, the training or test split is empty")
    groups = None
    if args.split_by == "speaker":  # choose C on held-out speakers too
        groups = [rows[i][args.speaker_column] for i, t in zip(kept, is_train) if t]
    results = probe_layers(xtr, ytr, xte, yte, layers=layers, Cs=args.C, cv_folds=args.cv_folds,
                           cv_groups=groups, seed=args.seed)
    chance = chance_accuracy(ytr, yte)
    print(f"{args.label_column}: {len(ytr)} train / {len(yte)} test files, {len(set(ytr))} classes, "
          f"model {name}")
    print(format_table(results, chance))
    report = {"model": name, "label_column": args.label_column, **info, "n_train": len(ytr),
              "n_test": len(yte), "classes": sorted(set(ytr) | set(yte)), "chance": chance,
              "layers": [r.to_dict() for r in results], "skipped": {rows[i]["audio"]: e for i, e in errors.items()}}
    if args.json:
        from ..fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    if args.plot:
        curve = {name: ([r.layer for r in results], [r.accuracy for r in results])}
        plot_accuracy({f"{args.label_column} probe": Panel(curve, chance=chance)}, args.plot)
    if errors:
        print(f"{len(errors)} files skipped (see above)", file=sys.stderr)
    return 0
