"""``w2v2 transcribe INPUT...``: files, directories, standard input or URLs -> text, subtitles, JSON."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path

from ._shared import (add_decoding_arguments, add_model_arguments, add_output_arguments, check_output_arguments,
                      emit, failure_line, load_cli_model, transcribe_options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="audio or video files, directories (searched recursively), - for standard input, "
                             "or http(s) URLs (needs yt-dlp: pip install 'w2v2[url]')")
    add_model_arguments(parser)
    add_output_arguments(parser, default_format="txt")
    add_decoding_arguments(parser)
    parser.add_argument("--skip-existing", action="store_true",
                        help="skip inputs whose output files all exist in --output-dir")


def run(args: argparse.Namespace) -> int:
    from ..audio import audio_duration, is_url, list_audio_files
    from ..transcribe import Transcriber

    check_output_arguments(args)
    if args.skip_existing and args.output_dir is None:
        raise ValueError("--skip-existing needs --output-dir")
    inputs = list_audio_files(args.inputs)
    if not inputs:
        raise ValueError(f"no audio or video files found in {' '.join(args.inputs)}")
    empty_dirs = [i for i in args.inputs if os.path.isdir(i) and not list_audio_files([i])]
    for folder in empty_dirs:  # a failure too, but the other inputs go on
        print(f"{folder}: no audio or video files in this directory", file=sys.stderr)
    failures = len(empty_dirs)
    if args.skip_existing:
        todo = [i for i in inputs if not _outputs_exist(i, args)]
        if len(todo) < len(inputs):
            print(f"skipping {len(inputs) - len(todo)} input(s) whose outputs exist", file=sys.stderr)
        inputs = todo
        if not inputs:
            return 1 if failures else 0
    _warn_same_names(inputs, args)
    options = transcribe_options(args)
    model = load_cli_model(args)
    transcriber = Transcriber(model, options, model_name=args.model or "default")
    durations = [None if i == "-" or is_url(i) else _duration(audio_duration, i) for i in inputs]
    total = None if None in durations else sum(durations)
    with tempfile.TemporaryDirectory(prefix="w2v2-url-") as tmp, _progress(total) as bar:
        names: dict[int, str] = {}  # input index -> name its outputs are called after

        def report(name: str, exc: BaseException) -> None:
            nonlocal failures
            failures += 1
            if args.debug and exc.__traceback__ is not None:
                bar.write("".join(traceback.format_exception(exc)).rstrip(), file=sys.stderr)
            bar.write(failure_line(name, exc), file=sys.stderr)

        sources = _sources(inputs, Path(tmp), names, report)
        for key, result in transcriber.transcribe_many(sources, on_progress=lambda _, s: bar.update(s)):
            if isinstance(result, BaseException):
                report(inputs[key], result)
                continue
            emit(result, names[key], args, header=len(inputs) > 1)
    if failures:
        print(f"{failures} of {len(inputs) + len(empty_dirs)} input(s) failed", file=sys.stderr)
    return 1 if failures else 0


def _sources(inputs: list[str], tmp: Path, names: dict[int, str], report) -> Iterator[tuple[int, str]]:
    """(index, path) per input; URLs are downloaded when their turn comes (a failure is reported)."""
    from ..audio import download_url, is_url

    for i, item in enumerate(inputs):
        if is_url(item):
            try:
                path = str(download_url(item, tmp / str(i)))
            except Exception as e:
                report(item, e)
                continue
            names[i] = path
            yield i, path
        else:
            names[i] = item
            yield i, item


def _outputs_exist(item: str, args: argparse.Namespace) -> bool:
    from ..audio import is_url
    from ..writers import WRITERS, output_stem

    if item == "-" or is_url(item):
        return False
    exts = list(WRITERS) if args.format == "all" else [args.format]
    stem = output_stem(item)
    return all((Path(args.output_dir) / f"{stem}.{ext}").exists() for ext in exts)


def _warn_same_names(inputs: list[str], args: argparse.Namespace) -> None:
    from ..writers import output_stem

    if args.output_dir is None:
        return
    seen: dict[str, str] = {}
    for item in inputs:
        stem = output_stem(item)
        if stem in seen:
            print(f"warning: {seen[stem]} and {item} both write {stem}.* in {args.output_dir}; the later one wins",
                  file=sys.stderr)
        seen[stem] = item


def _duration(audio_duration, path: str) -> float | None:
    try:
        return audio_duration(path)
    except Exception:  # reported when the file is transcribed
        return 0.0


def _progress(total: float | None):
    from tqdm import tqdm

    return tqdm(total=total, unit="s", unit_scale=False, desc="transcribing", file=sys.stderr, disable=None,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s audio [{elapsed}<{remaining}]"
                if total else "{desc}: {n:.0f} s audio [{elapsed}]")
