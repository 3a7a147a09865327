"""Arguments and helpers shared by the commands that run a model (transcribe, align, evaluate, embed, probe)."""

from __future__ import annotations

import argparse
import errno
import io
import os
import sys
from pathlib import Path

from ..errors import UsageError
from ..fileio import (OutputError, check_writable, file_in_the_way, is_stream, make_folder,
                      remove_stale_temporaries)
from ..transcribe import TranscribeOptions
from ..writers import WRITERS, output_stem, printable, write_outputs
from ._options import add_fields, add_shared, field_values


# help of the flags built from TranscribeOptions fields (their defaults are the fields'; the keys are the fields
# that flags set)
FIELD_HELP = {
    "batch_size": "a forward pass holds the padded samples of this many chunks, across files (more short files "
                  "fit); None: 1 on CPU, 8 on GPU",
    "chunk_seconds": "long audio runs in chunks of this length",
    "stride_seconds": "context on each side of a chunk, dropped after the model",
    "lm": "n-gram language model for beam search (ARPA or KenLM binary; see: w2v2 lm)",
    "alpha": "LM weight (beam search)",
    "beta": "word insertion bonus (beam search)",
    "beam_width": "beam search width; None: greedy, or 100 with --lm",
    "max_segment_chars": "subtitle segments: at most this many characters",
    "max_segment_seconds": "subtitle segments: at most this long",
    "pause_seconds": "a longer silence between words starts a segment",
    "vad": "run the model on the speech regions Silero VAD finds, not the whole recording: silence costs nothing, "
           "segments never span a pause between regions (needs: pip install 'w2v2[vad]')",
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --device, --precision and the chunking flags."""
    g = parser.add_argument_group("model and inference")
    add_shared(g, "--model", "--device", "--precision")
    add_fields(g, TranscribeOptions, ("batch_size", "chunk_seconds", "stride_seconds"), help=FIELD_HELP)


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("decoding (greedy unless --lm or --beam-width)")
    add_fields(g, TranscribeOptions, ("lm", "alpha", "beta", "beam_width"), help=FIELD_HELP)


def transcribe_options(args: argparse.Namespace) -> TranscribeOptions:
    """The TranscribeOptions of the parsed flags (those the command has; the others keep their defaults)."""
    names = [n for n in FIELD_HELP if hasattr(args, n)]
    return TranscribeOptions(device=args.device, precision=args.precision,
                             **field_values(TranscribeOptions, args, names))


def load_cli_model(args: argparse.Namespace, **kwargs):
    """The model of --model on --device (``kwargs`` go to ``load_model``); the embedded default
    when none is named, with a line on stderr saying what that model is and how accurate (its
    model card)."""
    from ..checkpoint import default_model_notice, load_model
    from ..distributed import dist_info
    from ..precision import resolve_device

    model = load_model(args.model, device=resolve_device(args.device), **kwargs)
    notice = default_model_notice() if args.model is None else None
    if notice and dist_info().is_main:  # under torchrun, once per job
        print(notice, file=sys.stderr)
    return model


def add_output_arguments(parser: argparse.ArgumentParser, default_format: str) -> None:
    g = parser.add_argument_group("output")
    g.add_argument("--format", "-f", choices=[*WRITERS, "all"], default=default_format,
                   help="output format; without --output-dir it is printed to standard output")
    g.add_argument("--output-dir", "-o", default=None, type=output_folder,
                   help="write <input name>.<format> files here; None: print to standard output")
    add_fields(g, TranscribeOptions, ("max_segment_chars", "max_segment_seconds", "pause_seconds"), help=FIELD_HELP)


def output_folder(value: str) -> str:
    """argparse type of --output-dir: a folder (it may not exist yet), not a file, nor below one."""
    problem = path_problem(value, folder=True)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def path_problem(value: str, folder: bool) -> str | None:
    """Why ``value`` can never be an output folder (``folder``) or file: a file is in the way, or
    an output file's path is a folder. None if it can."""
    path = Path(value)
    if not folder and path.is_dir():
        return f"{value} is a folder, not a file"
    in_the_way = file_in_the_way(path if folder else path.parent)
    if in_the_way is None:
        return None
    if in_the_way == path:
        return f"{value} is a file, not a folder"
    return f"{value}: {in_the_way} is a file, not a folder"


def check_output_target(value: str, folder: bool = False, option: str | None = None) -> None:
    """Before any work: ``UsageError`` (exit 2) if ``value`` can never be an output folder or
    file; ``OutputError`` (exit 1) if the folder cannot take new files (created if missing, for
    ``folder``). Stale temporaries of killed runs are removed from it. ``option`` names the
    argument in the message."""
    problem = path_problem(value, folder)
    if problem:
        raise UsageError(f"{option}: {problem}" if option else problem)
    if not folder and is_stream(value):  # /dev/null, /dev/stdout, a FIFO: written in place
        return
    where = Path(value) if folder else Path(value).parent
    if folder:
        make_folder(where)
    check_writable(where)
    remove_stale_temporaries(where)


def check_output_arguments(args: argparse.Namespace) -> None:
    if args.output_dir is None and args.format == "all":
        raise ValueError("--format all writes several files: give an --output-dir")


def output_formats(args: argparse.Namespace) -> list[str]:
    return list(WRITERS) if args.format == "all" else [args.format]


def prepare_output_dir(args: argparse.Namespace) -> None:
    """Before any work: --output-dir exists and takes new files (``OutputError`` naming it), and
    temporaries that killed runs left there are gone; without it, standard output is open."""
    if args.output_dir is not None:
        check_output_target(args.output_dir, folder=True)
    elif sys.stdout is None:  # started with its descriptor closed (`>&-`)
        raise OutputError(errno.EBADF, "it is closed", "standard output", "cannot write to")


def nothing_more_can_be_written(e: OutputError, previous: OutputError | None) -> bool:
    """Whether a batch should stop after ``e``: standard output failed, the file system is
    read-only, or the disk was full for two outputs in a row (the first may just have been too big
    for what was left)."""
    no_space = (errno.ENOSPC, errno.EDQUOT)
    return (e.filename == "standard output" or e.errno == errno.EROFS
            or (e.errno in no_space and previous is not None and previous.errno in no_space))


def output_problem(args: argparse.Namespace, name: str) -> str | None:
    """Why the outputs called ``name`` cannot be written in --output-dir (checked before the input is
    transcribed), or None. Stale temporaries in a subfolder they go to are removed."""
    folder = Path(args.output_dir)
    for fmt in output_formats(args):
        path = folder / f"{name}.{fmt}"
        size = len(os.fsencode(path.name))
        if size > _name_max(folder):
            return f"output name {printable(path)} is too long for the file system ({size} bytes)"
        if path.is_dir():
            return f"output {printable(path)} is a folder; it is not replaced"
    if path.parent != folder:
        in_the_way = file_in_the_way(path.parent)
        if in_the_way is not None:
            return f"cannot create the folder {printable(path.parent)}: {printable(in_the_way)} is a file, not a folder"
        remove_stale_temporaries(path.parent)
    return None


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def emit(result: dict, name: str, args: argparse.Namespace, header: bool = False,
         output_name: str | None = None) -> None:
    """Write ``result`` for input ``name`` to --output-dir as ``output_name`` (default: its stem), every
    format all or nothing; or print it (with a header line if asked). ``OutputError`` if it cannot be."""
    if args.output_dir is not None:
        write_outputs(result, args.output_dir, output_name or output_stem(name), output_formats(args))
        return
    text = io.StringIO()  # rendered first: a result that fails to format prints nothing
    if header:
        print(f"==> {printable(name)} <==", file=text)
    WRITERS[args.format](".").write_result(result, text)
    try:
        sys.stdout.write(text.getvalue())
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        raise OutputError(e.errno, e.strerror or type(e).__name__, "standard output", "cannot write to") from e


def failure_line(name: str, exc: BaseException) -> str:
    """One line, the input's name first (AudioError messages already start with it)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    name = {"": repr(""), "-": "<stdin>"}.get(name, name)  # the names AudioError gives them
    return printable(text if text.startswith(f"{name}:") else f"{name}: {text}")
