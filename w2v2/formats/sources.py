"""Audio that is part of something bigger: a time span of a file, or a row of a table.

Manifests of other tools point at audio that is not one whole file: Lhotse cuts are spans
(offset, duration, channel) of a recording; a Hugging Face dataset keeps each clip's encoded
bytes in a column of an Arrow or Parquet table. Entries carry them in their ``path`` as an
address with a fragment, in the spirit of W3C media fragments:

    recording.flac#t=12.5,15.25          seconds 12.5 to 15.25 (``t=12.5,`` runs to the end)
    recording.wav#t=0,3&channel=1        ... of channel 1 only (else channels are averaged)
    train.parquet#row=17&column=audio    the audio bytes in row 17 of that column
    saved_dataset#row=17&column=audio    the same for a ``datasets.save_to_disk`` folder

:func:`w2v2.audio.load_audio` and :func:`w2v2.audio.audio_duration` parse such a path here when
no file bears that exact name (and decode what :func:`row_audio` finds), so every part of w2v2
that decodes an entry reads them. This module imports nothing of w2v2: the audio stage uses it.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

_FRAGMENT = re.compile(r"^(?P<base>.+)#(?P<fragment>(?:t|row)=[^#/]*)$")


@dataclass(frozen=True)
class Address:
    """A span of an audio file (``start``, ``end`` seconds, ``channel``) or a ``row`` of a table's ``column``."""

    base: str
    start: float = 0.0
    end: float | None = None
    channel: int | None = None
    row: int | None = None
    column: str = "audio"

    @property
    def name(self) -> str:
        return format_address(self)


def format_address(a: Address) -> str:
    if a.row is not None:
        return f"{a.base}#row={a.row}&column={a.column}"
    span = f"{a.base}#t={float(a.start)!r},{'' if a.end is None else repr(float(a.end))}"  # repr: every digit
    return span if a.channel is None else f"{span}&channel={a.channel}"


def parse_address(path: str) -> Address | None:
    """The :class:`Address` a path spells, or None for a plain path (or a file whose name has a ``#``);
    ValueError naming the path for a malformed address."""
    m = _FRAGMENT.match(path)
    if m is None or os.path.exists(path):
        return None
    values = dict(part.partition("=")[::2] for part in m["fragment"].split("&"))
    try:
        if "row" in values:
            return Address(m["base"], row=int(values["row"]), column=values.get("column") or "audio")
        start, _, end = values["t"].partition(",")
        channel = values.get("channel")
        a = Address(m["base"], start=float(start or 0), end=float(end) if end else None,
                    channel=int(channel) if channel else None)
    except (KeyError, ValueError):
        raise ValueError(f"{path}: cannot read the address after '#' (expected t=START,END[&channel=N] "
                         "or row=N[&column=NAME])") from None
    if a.start < 0 or (a.end is not None and a.end <= a.start):
        raise ValueError(f"{path}: the span must satisfy 0 <= start < end")
    return a


# ---------------------------------------------------------------------------- table rows


@functools.lru_cache(maxsize=4)
def _table(base: str):
    """(kind, handle) of a table, opened once per process: a memory-mapped Arrow table for a
    ``save_to_disk`` folder, a ``ParquetFile`` for Parquet (read one row group at a time)."""
    if os.path.isdir(base):
        datasets = _require("datasets", "Hugging Face datasets")
        return "arrow", datasets.load_from_disk(base).data.table
    pq = _require("pyarrow.parquet", "Parquet files")
    return "parquet", pq.ParquetFile(base)


@functools.lru_cache(maxsize=2)
def _row_group(base: str, group: int, column: str):
    return _table(base)[1].read_row_group(group, columns=[column]).column(0)


def _cell(a: Address):
    kind, table = _table(a.base)
    if kind == "arrow":
        if not 0 <= a.row < table.num_rows:
            raise ValueError(f"{a.name}: no such row (the table has {table.num_rows})")
        return table.column(a.column)[a.row].as_py()
    row, meta = a.row, table.metadata
    for group in range(meta.num_row_groups):
        rows = meta.row_group(group).num_rows
        if row < rows:
            return _row_group(a.base, group, a.column)[row].as_py()
        row -= rows
    raise ValueError(f"{a.name}: no such row (the table has {meta.num_rows})")


def row_audio(a: Address) -> tuple[bytes | None, str | None]:
    """(encoded audio bytes, or else a path) of a table row; ValueError naming the row."""
    try:
        cell = _cell(a)
    except (OSError, KeyError) as e:
        raise ValueError(f"{a.name}: cannot read the row ({e})") from None
    if isinstance(cell, bytes):
        return cell, None
    if isinstance(cell, dict) and (cell.get("bytes") or cell.get("path")):
        return cell.get("bytes") or None, cell.get("path")
    raise ValueError(f"{a.name}: the cell holds neither audio bytes nor a path")


def _require(module: str, what: str):
    """Import an optional dependency, or say in one line how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"reading {what} needs the package {module.split('.')[0]!r}: "
                          "pip install 'w2v2[data]'") from None
