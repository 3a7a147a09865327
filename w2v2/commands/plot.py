"""``w2v2 plot RUN_DIR``: training curves and diagnostics of a run as PNG files."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (holds metrics.jsonl)")
    parser.add_argument("--out", metavar="DIR", help="where to write the PNGs; None: RUN_DIR/plots")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="render only these figures")
    parser.add_argument("--audio", nargs="+", metavar="FILE",
                        help="audio for the checkpoint figures; None: files from the run's data")
    parser.add_argument("--dpi", type=int, default=110, help="resolution of the PNGs, in dots per inch")


def run(args) -> int:
    from ..plot import render

    for path in render(args.run_dir, args.out, names=args.only, audio=args.audio, dpi=args.dpi):
        print(path)
    return 0
