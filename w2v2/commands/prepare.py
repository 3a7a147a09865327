"""``w2v2 prepare INPUT... OUT_DIR``: training data -> sorted, length-annotated tar shards (:mod:`w2v2.formats.prepare`)."""

from __future__ import annotations

import argparse
import os
import sys

from ._options import integer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="manifests (.tsv, NeMo .json/.jsonl, Lhotse .jsonl.gz cuts, .parquet), Hugging Face "
                             "save_to_disk folders, folders of audio")
    parser.add_argument("out", metavar="OUT_DIR", help="where the shards and their index (shards.json) go")
    parser.add_argument("--shard-size", type=float, default=256.0, metavar="MB",
                        help="target size of a shard in megabytes")
    parser.add_argument("--workers", type=integer, default=min(8, os.cpu_count() or 1),
                        help="shards written at the same time (processes)")
    parser.add_argument("--prefix", default="shard", help="shard names: PREFIX-000000.tar, ...")


def run(args: argparse.Namespace) -> int:
    from ..formats.prepare import prepare

    summary = prepare(args.inputs, args.out, args.shard_size, args.workers, args.prefix)
    for path, reason in summary.failed:
        print(f"skipping {path}: {reason}", file=sys.stderr)
    print(f"{summary.index}: {summary.shards} shards, {summary.utterances} utterances, "
          f"{summary.seconds / 3600:.2f} h; {len(summary.failed)} file(s) failed", file=sys.stderr)
    return 1 if summary.failed else 0
