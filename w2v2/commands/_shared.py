"""Arguments and helpers shared by the commands that run a model (transcribe, align, evaluate, embed, probe)."""

from __future__ import annotations

import argparse
import sys

from ..transcribe import TranscribeOptions
from ..writers import WRITERS, get_writer
from ._options import add_fields, add_shared, field_values


# help of the flags built from TranscribeOptions fields (their defaults are the fields'; the keys are the fields
# that flags set)
FIELD_HELP = {
    "batch_size": "chunks per forward pass, across files; None: 1 on CPU, 8 on GPU",
    "chunk_seconds": "long audio runs in chunks of this length",
    "stride_seconds": "context on each side of a chunk, dropped after the model",
    "lm": "n-gram language model for beam search (ARPA or KenLM binary; see: w2v2 lm)",
    "alpha": "LM weight (beam search)",
    "beta": "word insertion bonus (beam search)",
    "beam_width": "beam search width; None: greedy, or 100 with --lm",
    "max_segment_chars": "subtitle segments: at most this many characters",
    "max_segment_seconds": "subtitle segments: at most this long",
    "pause_seconds": "a longer silence between words starts a segment",
}


def add_model_arguments(parser: argparse.ArgumentParser, help: dict[str, str] | None = None) -> None:
    """--model, --device, --precision and the chunking flags; ``help`` replaces FIELD_HELP's text
    where a command gives a field another meaning (the server batches across requests)."""
    g = parser.add_argument_group("model and inference")
    add_shared(g, "--model", "--device", "--precision")
    add_fields(g, TranscribeOptions, ("batch_size", "chunk_seconds", "stride_seconds"), help={**FIELD_HELP, **(help or {})})


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
    from ..emissions import resolve_device

    model = load_model(args.model, device=resolve_device(args.device), **kwargs)
    notice = default_model_notice() if args.model is None else None
    if notice:
        print(notice, file=sys.stderr)
    return model


def add_output_arguments(parser: argparse.ArgumentParser, default_format: str) -> None:
    g = parser.add_argument_group("output")
    g.add_argument("--format", "-f", choices=[*WRITERS, "all"], default=default_format,
                   help="output format; without --output-dir it is printed to standard output")
    g.add_argument("--output-dir", "-o", default=None, help="write <input name>.<format> files here; None: print to standard output")
    add_fields(g, TranscribeOptions, ("max_segment_chars", "max_segment_seconds", "pause_seconds"), help=FIELD_HELP)


def check_output_arguments(args: argparse.Namespace) -> None:
    if args.output_dir is None and args.format == "all":
        raise ValueError("--format all writes several files: give an --output-dir")


def emit(result: dict, name: str, args: argparse.Namespace, header: bool = False) -> None:
    """Write ``result`` for input ``name`` to --output-dir, or print it (with a header line if asked)."""
    if args.output_dir is not None:
        get_writer(args.format, args.output_dir)(result, name)
        return
    if header:
        print(f"==> {name} <==")
    WRITERS[args.format](".").write_result(result, sys.stdout)
    sys.stdout.flush()


def failure_line(name: str, exc: BaseException) -> str:
    """One line, the input's name first (AudioError messages already start with it)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    name = name or repr(name)  # an empty name shows as ''
    return text if text.startswith(f"{name}:") else f"{name}: {text}"
