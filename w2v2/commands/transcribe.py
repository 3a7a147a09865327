"""``w2v2 transcribe INPUT...``: files, directories, standard input or URLs -> text, subtitles, JSON."""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path

from ..distributed import dist_info
from ..fileio import OutputError
from ..shard import gather, my_share, probe_seconds
from ..transcribe import TranscribeOptions
from ._options import add_fields, add_shared
from ._shared import (FIELD_HELP, UsageError, add_decoding_arguments, add_model_arguments, add_output_arguments,
                      check_output_arguments, emit, failure_line, load_cli_model, nothing_more_can_be_written,
                      output_formats, output_problem, prepare_output_dir, transcribe_options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="audio or video files, directories (searched recursively), - for standard input, "
                             "or http(s) URLs (needs yt-dlp: pip install 'w2v2[url]')")
    add_model_arguments(parser)
    add_output_arguments(parser, default_format="txt")
    add_decoding_arguments(parser)
    add_fields(parser, TranscribeOptions, ("vad",), help=FIELD_HELP)
    add_shared(parser, "--skip-existing")


def run(args: argparse.Namespace) -> int:
    from ..audio import is_url
    from ..shard import header_seconds
    from ..transcribe import Transcriber

    check_output_arguments(args)
    if args.skip_existing and args.output_dir is None:
        raise ValueError("--skip-existing needs --output-dir")
    if args.output_dir is None and dist_info().world_size > 1:
        raise UsageError("several processes write files, not standard output: give an --output-dir")
    inputs, out_names, failures, total_inputs = _plan(args)
    if not inputs:
        return _summary(failures, total_inputs)
    options = transcribe_options(args)
    model = load_cli_model(args)
    transcriber = Transcriber(model, options, model_name=args.model or "default")
    durations = [None if i == "-" or is_url(i) else header_seconds(i) for i in inputs]
    total = None if None in durations else sum(durations)
    with tempfile.TemporaryDirectory(prefix="w2v2-url-") as tmp, _progress(total) as bar:
        names: dict[int, str] = {}  # input index -> name its outputs are called after
        done = 0

        def report(name: str, exc: BaseException) -> None:
            nonlocal failures, done
            failures += 1
            done += 1
            if args.debug and exc.__traceback__ is not None:
                bar.write("".join(traceback.format_exception(exc)).rstrip(), file=sys.stderr)
            bar.write(failure_line(name, exc), file=sys.stderr)

        sources = _sources(inputs, Path(tmp), names, out_names if args.output_dir else None, report)
        results = transcriber.transcribe_many(sources, on_progress=lambda _, s: bar.update(s))
        previous = None  # the last write's failure, if it failed
        for key, result in results:
            if isinstance(result, BaseException):
                report(inputs[key], result)
                continue
            try:
                emit(result, names[key], args, header=len(inputs) > 1, output_name=out_names[key])
                done, previous = done + 1, None
            except OutputError as e:
                report(names[key], e)
                if nothing_more_can_be_written(e, previous):
                    results.close()
                    bar.write(f"stopping: nothing more can be written ({e.strerror}); "
                              f"{len(inputs) - done} input(s) not transcribed", file=sys.stderr)
                    failures += len(inputs) - done
                    break
                previous = e
    return _summary(failures, total_inputs)


def _plan(args: argparse.Namespace) -> tuple[list[str], list[str], int, int]:
    """Before any work: (inputs to transcribe, the name of each one's outputs, inputs failed already,
    inputs in all). Folders are expanded; an empty folder, or an input whose outputs cannot be
    written, fails here; with --skip-existing, inputs whose outputs exist are left out."""
    from ..audio import is_url, list_audio_files

    found = [(item, list_audio_files([item])) for item in args.inputs]
    pairs = [(f, None if files == [item] else item) for item, files in found for f in files]  # (input, its folder)
    if not pairs:
        raise ValueError(f"no audio or video files found in {' '.join(args.inputs)}")
    inputs, out_names = [f for f, _ in pairs], _output_names(pairs, args)
    share = my_share(inputs, probe_seconds)  # under torchrun: this rank's part (all inputs in one process)
    pairs, inputs, out_names = ([x[i] for i in share] for x in (pairs, inputs, out_names))
    empty_dirs = [item for item, files in found if not files] if dist_info().is_main else []  # counted once
    for folder in empty_dirs:  # a failure too, but the other inputs go on
        print(f"{folder}: no audio or video files in this directory", file=sys.stderr)
    prepare_output_dir(args)
    keep = range(len(inputs))
    if args.output_dir is not None:
        problems = {i: output_problem(args, out_names[i]) for i in keep if not is_url(inputs[i])}
        for i, problem in problems.items():
            if problem:
                print(failure_line(inputs[i], ValueError(problem)), file=sys.stderr)
        keep = [i for i in keep if not problems.get(i)]
    failures = len(empty_dirs) + len(inputs) - len(keep)
    if args.skip_existing:
        todo = [i for i in keep if not _outputs_exist(inputs[i], out_names[i], args)]
        if len(todo) < len(keep):
            print(f"skipping {len(keep) - len(todo)} input(s) whose outputs exist", file=sys.stderr)
        keep = todo
    return [inputs[i] for i in keep], [out_names[i] for i in keep], failures, len(pairs) + len(empty_dirs)


def _summary(failures: int, total: int) -> int:
    """The job's failures (over every rank under torchrun, said by rank 0) -> the exit status."""
    failures, total = (sum(n) for n in zip(*gather((failures, total))))
    if failures and dist_info().is_main:
        print(f"{failures} of {total} input(s) failed", file=sys.stderr)
    return 1 if failures else 0


def _output_names(pairs: list[tuple[str, str | None]], args: argparse.Namespace) -> list[str]:
    """Name of each input's outputs under --output-dir (``writers.output_names``); a clash is a usage
    error, found before any work."""
    from ..audio import is_url
    from ..writers import output_names

    names = [""] * len(pairs)  # URLs: named when downloaded (``_sources``)
    if args.output_dir is None:
        return names
    files = [i for i, (item, _) in enumerate(pairs) if not is_url(item)]
    try:
        for i, name in zip(files, output_names([pairs[i] for i in files])):
            names[i] = name
    except ValueError as e:
        raise UsageError(str(e)) from None
    return names


def _sources(inputs: list[str], tmp: Path, names: dict[int, str], out_names: list[str] | None,
             report) -> Iterator[tuple[int, str]]:
    """(index, path) per input; URLs are downloaded when their turn comes (a failure is reported).
    A download's outputs are named after the file it gave, unless another input has that name."""
    from ..audio import download_url, is_url
    from ..writers import output_stem

    taken = {n for item, n in zip(inputs, out_names or []) if not is_url(item)}
    for i, item in enumerate(inputs):
        if is_url(item):
            try:
                path = str(download_url(item, tmp / str(i)))
            except Exception as e:
                report(item, e)
                continue
            if out_names is not None:
                out_names[i] = output_stem(path)
                if out_names[i] in taken:
                    report(item, ValueError(f"downloaded as {Path(path).name}, whose outputs {out_names[i]}.* another "
                                            "input of this run writes; transcribe it in a separate run"))
                    continue
                taken.add(out_names[i])
            names[i] = path
            yield i, path
        else:
            names[i] = item
            yield i, item


def _outputs_exist(item: str, name: str, args: argparse.Namespace) -> bool:
    from ..audio import is_url

    if item == "-" or is_url(item):
        return False
    return all((Path(args.output_dir) / f"{name}.{fmt}").exists() for fmt in output_formats(args))




def _progress(total: float | None):
    from tqdm import tqdm

    return tqdm(total=total, unit="s", unit_scale=False, desc="transcribing", file=sys.stderr, disable=None,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s audio [{elapsed}<{remaining}]"
                if total else "{desc}: {n:.0f} s audio [{elapsed}]")
