"""The ``w2v2`` command line: a thin dispatcher over one module per subcommand.

Each module in ``w2v2.commands`` defines ``add_arguments(parser)`` and ``run(args) -> int`` (the
exit status); its one-line description is here, in ``COMMANDS``. Modules are imported only when
their command runs, so ``w2v2 --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .commands._options import HelpFormatter
from .errors import UserError
from .fileio import OutputError

# subcommand -> module under w2v2.commands and its one-line description (listed without importing it)
COMMANDS = {
    "transcribe": ("transcribe", "transcribe audio and video files of any length, with word timestamps"),
    "align": ("align", "word timestamps for a known transcript (CTC forced alignment)"),
    "pretrain": ("pretrain", "self-supervised pretraining on unlabeled audio"),
    "finetune": ("finetune", "CTC fine-tuning on transcribed audio"),
    "evaluate": ("evaluate", "WER/CER of a model on a manifest"),
    "export": ("export", "export a checkpoint to Hugging Face format, or to ONNX"),
    "embed": ("embed", "extract representations to safetensors/npy"),
    "probe": ("probe", "linear probe accuracy per layer"),
    "plot": ("plot", "render training curves and diagnostics of a run directory"),
    "prepare": ("prepare", "turn manifests or folders into sorted, length-annotated tar shards"),
    "lm": ("lm", "build an n-gram language model (ARPA) from a text file"),
    "serve": ("serve", "serve OpenAI's transcription API and a web page"),
}


def build_parser(available: dict[str, str] | None = None) -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="w2v2", description="wav2vec 2.0 end to end",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"w2v2 {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        if available is not None and name not in available:
            continue
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def _load(module: str):
    return importlib.import_module(f"w2v2.commands.{module}")


def command_parser(name: str, module=None, debug: bool = False) -> argparse.ArgumentParser:
    """The parser of the subcommand ``name`` (``module``: its module, when already imported)."""
    module = module or _load(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"w2v2 {name}", description=COMMANDS[name][1], formatter_class=HelpFormatter)
    parser.add_argument("--debug", action="store_true", default=debug, help="show full tracebacks")
    module.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    top = build_parser()
    args, rest = top.parse_known_args(argv)
    if args.command is None:
        top.print_help()
        return 2
    module = _load(COMMANDS[args.command][0])
    sub_args = command_parser(args.command, module, debug=args.debug).parse_args(rest)
    try:
        return int(module.run(sub_args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `w2v2 align ... | head`: the reader has gone, as with any Unix tool
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        except (OSError, ValueError):  # stdout replaced (tests) or already closed
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a killed writer
    except Exception as e:  # user errors become one line; --debug shows the traceback
        if sub_args.debug:
            raise
        if isinstance(e, (UserError, ValueError, FileNotFoundError, PermissionError, ImportError, OutputError)):
            print(f"w2v2 {args.command}: error: {e}", file=sys.stderr)
            return getattr(e, "exit_status", 1)  # 2 for a usage error
        if "torch.distributed" in sys.modules:  # a collective failing because a peer died is no bug here
            from .distributed import peer_failure
            if (lost := peer_failure(e)) is not None:
                print(f"w2v2 {args.command}: error: {lost}", file=sys.stderr)
                return 1
        print(f"w2v2 {args.command}: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
