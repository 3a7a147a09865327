"""Transcript output formats: a registry of tiny writer classes (txt, srt, vtt, json, tsv).

A result is a plain dict::

    {"text": str,
     "segments": [{"start": s, "end": s, "text": str,
                   "words": [{"word", "start", "end", "confidence"}]}],
     "words": [...],          # optional
     "language": str,         # optional
     "metadata": {...}}       # model name, options

``get_writer(fmt, output_dir)(result, audio_path)`` writes ``<output_dir>/<stem>.<fmt>``
atomically and returns the path (a list of paths for ``"all"``, written all or nothing).

Naming in a batch (``output_names``): an input named directly is written as ``<stem>.<fmt>``; a
file found in a folder given as input keeps its place under that folder (``in/a/talk.flac`` ->
``<output_dir>/a/talk.<fmt>``); inputs that would share a name keep their extension
(``talk.flac.txt``, ``talk.wav.txt``); any clash left is refused before any work.

Subtitle cues follow ``decoding.segments.subtitle_cues``: no cue flashes by (at least 1 s where
the neighbours leave room, short ones merged into a near neighbour), lines of at most 42 characters.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Callable, TextIO

from .decoding.segments import subtitle_cues
from .fileio import atomic_open, atomic_write_files, make_folder


def format_timestamp(seconds: float, decimal_marker: str = ".") -> str:
    """``1.5 -> "00:00:01.500"``; hours are always written and may exceed 99."""
    if seconds < 0:
        raise ValueError(f"timestamp must be non-negative, got {seconds}")
    ms = round(seconds * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def output_stem(audio_path: str | os.PathLike) -> str:
    """Base name of the output files: the input's stem, ``"stdin"`` for ``"-"``."""
    audio_path = os.fspath(audio_path)
    if audio_path == "-":
        return "stdin"
    return Path(audio_path.rstrip("/")).stem or "output"


def output_name(item: str, root: str | None = None) -> str:
    """Name of an input's outputs without the format's extension, relative to the output folder:
    its stem (``"stdin"`` for ``"-"``), or, for a file found in the folder ``root``, its path
    under ``root`` without the extension (the subfolders are mirrored)."""
    if root is None:
        return output_stem(item)
    return os.fspath(Path(os.path.relpath(item, root)).with_suffix(""))


def output_names(items: list[tuple[str, str | None]]) -> list[str]:
    """``output_name`` of each ``(input, root)``; inputs that would share a name keep their
    extension in it (``talk.flac``, ``talk.wav``). ``ValueError`` naming two inputs that would
    still write the same files."""
    names = [output_name(item, root) for item, root in items]
    shared = {n for n in names if names.count(n) > 1}
    names = [_with_extension(item, root) if name in shared else name
             for (item, root), name in zip(items, names)]
    first: dict[str, str] = {}
    for (item, _), name in zip(items, names):
        if name in first:
            raise ValueError(f"{first[name]} and {item} would both write {name}.* in the output folder; give "
                             "their common folder as the input (its subfolders are mirrored) or run them separately")
        first[name] = item
    return names


def _with_extension(item: str, root: str | None) -> str:
    if item == "-":
        return output_stem(item)
    return os.fspath(Path(os.path.relpath(item, root))) if root is not None else Path(item.rstrip("/")).name


def write_outputs(result: dict, output_dir: str | os.PathLike, name: str, formats: list[str]) -> list[Path]:
    """Write ``result`` as ``<output_dir>/<name>.<fmt>`` for every format, all or nothing
    (``fileio.atomic_write_files``); creates the folders ``name`` holds."""
    paths = [Path(output_dir) / f"{name}.{fmt}" for fmt in formats]
    make_folder(paths[0].parent)
    atomic_write_files({path: functools.partial(WRITERS[fmt](output_dir).write_result, result)
                        for path, fmt in zip(paths, formats)})
    return paths


def printable(name: str | os.PathLike) -> str:
    """A path as text any stream can take: bytes of a name that are not UTF-8 show as ``\\udcxx``."""
    return _escape_surrogates(os.fspath(name))


def _escape_surrogates(text: str) -> str:
    """Lone surrogates (from file names that are not UTF-8) as ``\\udcxx``, which UTF-8 cannot hold
    but JSON reads back as the same string."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _one_line(text: str) -> str:
    """Collapse whitespace (newlines, tabs) so that a cue or a TSV row stays one line."""
    return " ".join(text.split())


class ResultWriter:
    extension: str

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)

    def __call__(self, result: dict, audio_path: str | os.PathLike) -> Path:
        make_folder(self.output_dir)
        path = self.output_dir / f"{output_stem(audio_path)}.{self.extension}"
        with atomic_open(path, "w") as f:
            self.write_result(result, f)
        return path

    def write_result(self, result: dict, file: TextIO) -> None:
        raise NotImplementedError


class WriteTXT(ResultWriter):
    """One line per segment (the whole text when there are no segments)."""

    extension = "txt"

    def write_result(self, result: dict, file: TextIO) -> None:
        segments = result.get("segments") or []
        lines = [s["text"].strip() for s in segments] if segments else [result["text"].strip()]
        for line in lines:
            print(line, file=file)


class SubtitlesWriter(ResultWriter):
    decimal_marker: str

    def iterate_cues(self, result: dict) -> list[tuple[str, str, str]]:
        """(start, end, text) of every cue: segments with text, by the display rules of
        ``decoding.segments.subtitle_cues`` (no flashes, lines of at most 42 characters)."""
        duration = (result.get("metadata") or {}).get("duration")
        return [
            (format_timestamp(start, self.decimal_marker), format_timestamp(end, self.decimal_marker),
             "\n".join(line.replace("-->", "->") for line in lines))
            for start, end, lines in subtitle_cues(result.get("segments") or [], duration)
        ]


class WriteSRT(SubtitlesWriter):
    extension = "srt"
    decimal_marker = ","

    def write_result(self, result: dict, file: TextIO) -> None:
        for i, (start, end, text) in enumerate(self.iterate_cues(result), start=1):
            file.write(f"{i}\n{start} --> {end}\n{text}\n\n")


class WriteVTT(SubtitlesWriter):
    extension = "vtt"
    decimal_marker = "."

    def write_result(self, result: dict, file: TextIO) -> None:
        file.write("WEBVTT\n\n")
        for start, end, text in self.iterate_cues(result):
            file.write(f"{start} --> {end}\n{text}\n\n")


class WriteTSV(ResultWriter):
    """``start_ms<TAB>end_ms<TAB>text`` per segment, integer milliseconds, with a header row."""

    extension = "tsv"

    def write_result(self, result: dict, file: TextIO) -> None:
        file.write("start_ms\tend_ms\ttext\n")
        for s in result.get("segments") or []:
            file.write(f"{round(s['start'] * 1000)}\t{round(s['end'] * 1000)}\t{_one_line(s['text'])}\n")


class WriteJSON(ResultWriter):
    """The whole result, UTF-8, non-ASCII characters kept as they are."""

    extension = "json"

    def write_result(self, result: dict, file: TextIO) -> None:
        file.write(_escape_surrogates(json.dumps(result, ensure_ascii=False, indent=2, default=_json_default)) + "\n")


def _json_default(value):
    """numpy scalars/arrays and paths that may slip into a result."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"result contains a value JSON cannot hold: {type(value).__name__} {value!r}")


WRITERS: dict[str, type[ResultWriter]] = {
    "txt": WriteTXT,
    "srt": WriteSRT,
    "vtt": WriteVTT,
    "json": WriteJSON,
    "tsv": WriteTSV,
}


def get_writer(fmt: str, output_dir: str | os.PathLike) -> Callable[[dict, str], Path | list[Path]]:
    """A callable ``(result, audio_path)`` writing format ``fmt`` (or every format for ``"all"``)."""
    if fmt == "all":
        return lambda result, audio_path: write_outputs(result, output_dir, output_stem(audio_path), list(WRITERS))
    if fmt not in WRITERS:
        raise ValueError(f"unknown output format {fmt!r}; choose one of: {', '.join([*WRITERS, 'all'])}")
    return WRITERS[fmt](output_dir)
