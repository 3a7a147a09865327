"""``w2v2 lm TEXT_FILE OUT.arpa``: an n-gram language model for beam search (``transcribe --lm``)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", metavar="TEXT_FILE", help="UTF-8 text, one sentence per line")
    parser.add_argument("out", metavar="OUT.arpa", help="where to write the ARPA model")
    parser.add_argument("--order", type=int, default=3, help="n-gram order (at least 2)")
    parser.add_argument("--case", choices=["upper", "lower", "keep"], default="upper",
                        help="case of the words; match the model's vocabulary (wav2vec 2.0 models: upper)")


def run(args: argparse.Namespace) -> int:
    from ..decoding import build_ngram_lm
    from ._shared import check_output_target

    check_output_target(args.out, option="OUT.arpa")
    path = build_ngram_lm(args.text, args.out, order=args.order, case=None if args.case == "keep" else args.case)
    print(f"wrote {path}", file=sys.stderr)
    return 0
