"""Arguments and helpers shared by ``w2v2 transcribe`` and ``w2v2 align``."""

from __future__ import annotations

import argparse
import sys

from ..precision import PRECISIONS
from ..writers import WRITERS, get_writer


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and inference")
    g.add_argument("--model", default=None,
                   help="a local directory, a fairseq .pt file or a Hugging Face id; "
                        "None: the model embedded in the package")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None, help="None: cuda when available, else cpu")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 where the hardware multiplies it natively (CUDA GPUs with bf16, CPUs with "
                        "AVX512-BF16 or AMX), else fp32; fp32: reference numerics")
    g.add_argument("--batch-size", type=int, default=None,
                   help="chunks per forward pass, across files; None: 1 on CPU, 8 on GPU")
    g.add_argument("--chunk-seconds", type=float, default=30.0, help="long audio runs in chunks of this length")
    g.add_argument("--stride-seconds", type=float, default=5.0,
                   help="context on each side of a chunk, dropped after the model")


def load_cli_model(args: argparse.Namespace):
    """The model of --model on --device; the embedded default when none is named, with a line on
    stderr saying what that model is and how accurate (its model card)."""
    from ..checkpoint import default_model_notice, load_model
    from ..emissions import resolve_device

    model = load_model(args.model, device=resolve_device(args.device))
    notice = default_model_notice() if args.model is None else None
    if notice:
        print(notice, file=sys.stderr)
    return model


def add_output_arguments(parser: argparse.ArgumentParser, default_format: str) -> None:
    g = parser.add_argument_group("output")
    g.add_argument("--format", "-f", choices=[*WRITERS, "all"], default=default_format,
                   help="output format; without --output-dir it is printed to standard output")
    g.add_argument("--output-dir", "-o", default=None, help="write <input name>.<format> files here; None: print to standard output")
    g.add_argument("--max-segment-chars", type=int, default=80, help="subtitle segments: at most this many characters")
    g.add_argument("--max-segment-seconds", type=float, default=10.0, help="subtitle segments: at most this long")
    g.add_argument("--pause-seconds", type=float, default=0.5, help="a longer silence between words starts a segment")


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
