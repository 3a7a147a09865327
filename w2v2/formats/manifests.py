"""Manifests of other tools -> rows ``(path, seconds, speaker, text)``, each read by its own library.

    NeMo JSON lines        {"audio_filepath", "duration", "text", ["offset"], ["speaker"]} per line (json)
    Hugging Face datasets  a ``save_to_disk`` folder (``datasets``) or a Parquet file (``pyarrow``)
                           with an audio column: bytes become ``TABLE#row=N&column=C`` addresses,
                           paths stay paths
    Lhotse cut manifests   a CutSet (``.jsonl.gz``, ``.jsonl``), read lazily by ``lhotse``; cuts are
                           ``RECORDING#t=START,END[&channel=N]`` spans (see :mod:`.sources`)

Every reader returns ``(rows, problems)``, problems one line each (``<file>:<line>: ...``);
:func:`w2v2.data.list_entries` makes each :class:`Row` an ``Entry`` (the fields are the same) and
reports every bad line of every input at once. (Rows, not entries: the manifest stage imports this
package, so this package does not import it.)
"""

from __future__ import annotations

import gzip
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

from .sources import Address, _require, format_address


class Row(NamedTuple):
    """What :class:`w2v2.data.Entry` holds, in its order."""

    path: str
    seconds: float | None = None
    speaker: str | None = None
    text: str | None = None

TEXT_COLUMNS = ("text", "sentence", "transcription", "transcript", "normalized_text")
SPEAKER_COLUMNS = ("speaker", "speaker_id", "client_id")
DURATION_COLUMNS = ("duration", "seconds")


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8-sig")


def first_record(path: Path) -> dict | None:
    """The first JSON object of a JSON-lines file (None when there is none or it is not JSON)."""
    try:
        with _open_text(path) as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    return record if isinstance(record, dict) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, EOFError):
        return None
    return None


def _seconds(value) -> float | None:
    """A non-negative finite number of seconds, or None; ValueError otherwise."""
    if value is None or value == "":
        return None
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"duration must be a non-negative number, got {value!r}")
    return seconds


def _local(folder: Path, path: str) -> str:
    return path if os.path.isabs(path) or "://" in path else str(folder / path)


# ---------------------------------------------------------------------------- NeMo


def read_nemo(path: Path) -> tuple[list[Row], list[str]]:
    """A NeMo manifest: one JSON object per line; ``audio_filepath`` relative to the manifest's
    folder or absolute; ``offset`` (seconds into the file) makes the entry a span."""
    entries, problems = [], []
    try:
        with _open_text(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    audio = record["audio_filepath"]
                    seconds, offset = _seconds(record.get("duration")), _seconds(record.get("offset")) or 0.0
                except json.JSONDecodeError as e:
                    problems.append(f"{path}:{number}: not JSON ({e.msg})")
                    continue
                except (KeyError, TypeError):
                    problems.append(f"{path}:{number}: no 'audio_filepath' field")
                    continue
                except ValueError as e:
                    problems.append(f"{path}:{number}: {e}")
                    continue
                audio = _local(path.parent, str(audio))
                if offset:
                    audio = format_address(Address(audio, offset, None if seconds is None else offset + seconds))
                speaker = record.get("speaker", record.get("speaker_id"))
                entries.append(Row(audio, seconds, None if speaker is None else str(speaker), record.get("text")))
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})")
    return entries, problems


# ---------------------------------------------------------------------------- Hugging Face


def _first_of(names, candidates) -> str | None:
    return next((c for c in candidates if c in names), None)


def _audio_column(names, features: dict | None) -> str | None:
    """The column declared as ``Audio`` in the dataset's features, else one called ``audio``."""
    declared = [k for k, v in (features or {}).items() if isinstance(v, dict) and v.get("_type") == "Audio"]
    return declared[0] if declared else ("audio" if "audio" in names else None)


def _hf_entries(source: str, n: int, columns: dict, audio: str, has_bytes) -> list[Row]:
    """Entries of a table whose columns are given as Python lists (audio: the ``path`` field)."""
    text, speaker, duration = (columns.get(k) for k in ("text", "speaker", "duration"))
    entries = []
    for i in range(n):
        path = columns["path"][i]
        if has_bytes(i) or not path:
            path = format_address(Address(source, row=i, column=audio))
        entries.append(Row(path, None if duration is None else _seconds(duration[i]),
                             None if speaker is None or speaker[i] is None else str(speaker[i]),
                             None if text is None else text[i]))
    return entries


def read_hf_disk(folder: Path) -> tuple[list[Row], list[str]]:
    """A ``datasets.Dataset.save_to_disk`` folder (memory-mapped, the audio bytes never copied)."""
    datasets = _require("datasets", "Hugging Face datasets")
    import pyarrow.compute as pc

    try:
        ds = datasets.load_from_disk(str(folder))
    except (OSError, ValueError, FileNotFoundError) as e:
        return [], [f"{folder}: cannot load as a Hugging Face dataset ({e})"]
    if isinstance(ds, datasets.DatasetDict):
        return [], [f"{folder}: a DatasetDict with splits {', '.join(ds)}; give one split's folder, "
                    f"e.g. {folder / next(iter(ds))}"]
    table = ds.data.table
    audio = _audio_column(table.column_names, ds.features.to_dict())
    if audio is None:
        return [], [f"{folder}: no audio column (columns: {', '.join(table.column_names)})"]
    cell = table.column(audio)
    fields = {f.name for f in cell.type} if hasattr(cell.type, "__iter__") else set()
    if "path" not in fields and "bytes" not in fields:
        return [], [f"{folder}: column {audio!r} holds no audio bytes or paths"]
    null = pc.is_null(pc.struct_field(cell, "bytes")).to_pylist() if "bytes" in fields else [True] * len(ds)
    columns = {"path": pc.struct_field(cell, "path").to_pylist() if "path" in fields else [None] * len(ds)}
    columns |= _named_columns(table, table.column_names)
    try:
        return _hf_entries(str(folder), len(ds), columns, audio, lambda i: not null[i]), []
    except ValueError as e:
        return [], [f"{folder}: {e}"]


def _named_columns(table, names) -> dict:
    found = {"text": _first_of(names, TEXT_COLUMNS), "speaker": _first_of(names, SPEAKER_COLUMNS),
             "duration": _first_of(names, DURATION_COLUMNS)}
    return {k: table.column(v).to_pylist() for k, v in found.items() if v is not None}


def read_parquet(path: Path) -> tuple[list[Row], list[str]]:
    """A Parquet file with an audio column (``struct<bytes, path>``, as ``datasets`` writes it).
    Only the small columns are read here: rows whose bytes are stored become row addresses,
    decoded one at a time by whoever trains on them."""
    pq = _require("pyarrow.parquet", "Parquet files")
    try:
        pf = pq.ParquetFile(path)
    except (OSError, ValueError) as e:
        return [], [f"{path}: not a readable Parquet file ({e})"]
    schema = pf.schema_arrow
    meta = json.loads((schema.metadata or {}).get(b"huggingface", b"{}") or b"{}")
    features = meta.get("info", {}).get("features")
    audio = _audio_column(schema.names, features)
    if audio is None:
        return [], [f"{path}: no audio column (columns: {', '.join(schema.names)})"]
    fields = {f.name for f in schema.field(audio).type} if hasattr(schema.field(audio).type, "__iter__") else set()
    if not fields & {"bytes", "path"}:
        return [], [f"{path}: column {audio!r} holds no audio bytes or paths"]
    small = [c for c in schema.names if c != audio]
    table = pf.read(columns=small + ([f"{audio}.path"] if "path" in fields else []))
    n = table.num_rows
    columns = {"path": table.column(audio).combine_chunks().field("path").to_pylist() if "path" in fields
               else [None] * n}
    columns |= _named_columns(table, small)
    try:
        return _hf_entries(str(path), n, columns, audio, _stored_bytes(pf, audio, fields)), []
    except ValueError as e:
        return [], [f"{path}: {e}"]


def _stored_bytes(pf, audio: str, fields: set):
    """row -> whether its bytes are stored, from each row group's null count (no audio read)."""
    if "bytes" not in fields:
        return lambda i: False
    meta, leaf = pf.metadata, f"{audio}.bytes"
    bounds, stored, start = [], [], 0
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        column = next((rg.column(c) for c in range(rg.num_columns) if rg.column(c).path_in_schema == leaf), None)
        stats = column.statistics if column is not None else None
        all_null = stats is not None and stats.has_null_count and stats.null_count == rg.num_rows
        start += rg.num_rows
        bounds.append(start)
        stored.append(not all_null)
    import bisect

    return lambda i: stored[bisect.bisect_right(bounds, i)]


# ---------------------------------------------------------------------------- Lhotse


def read_lhotse(path: Path) -> tuple[list[Row], list[str]]:
    """A Lhotse CutSet: every ``MonoCut`` becomes a span of its recording's file, its text the
    supervisions' texts joined, its speaker the first supervision's. Recordings that are not
    files (URLs, commands, in-memory audio) or carry transforms are reported, not guessed at."""
    lhotse = _require("lhotse", "Lhotse manifests")
    entries, problems = [], []
    try:
        cuts = lhotse.load_manifest_lazy(path)
        for number, cut in enumerate(cuts, 1):
            entry, problem = _cut_entry(cut)
            if problem:
                problems.append(f"{path}:{number}: cut {cut.id}: {problem}")
            else:
                entries.append(entry)
    except Exception as e:  # lhotse raises many kinds for a malformed manifest; report it in one line
        problems.append(f"{path}: not a Lhotse cut manifest ({type(e).__name__}: {e})")
    return entries, problems


def _cut_entry(cut) -> tuple[Row | None, str | None]:
    recording = getattr(cut, "recording", None)
    if recording is None or not hasattr(cut, "channel"):
        return None, f"a {type(cut).__name__} (only MonoCuts with a recording are read)"
    if recording.transforms:
        return None, "its recording has transforms (speed, volume, ...): apply them first"
    channel = cut.channel if isinstance(cut.channel, int) else None
    if channel is None and len(cut.channel) == 1:
        channel = cut.channel[0]
    sources = [s for s in recording.sources if channel is None or channel in s.channels]
    if len(sources) != 1 or sources[0].type != "file":
        kinds = ", ".join(s.type for s in sources) or "none"
        return None, f"its audio must come from one file (sources: {kinds})"
    source = sources[0]
    local = None if channel is None or len(source.channels) == 1 else source.channels.index(channel)
    whole = cut.start == 0 and abs(cut.duration - recording.duration) < 1e-6 and local is None
    path = source.source if whole else format_address(Address(source.source, cut.start, cut.end, local))
    texts = [s.text for s in cut.supervisions if s.text]
    speaker = next((s.speaker for s in cut.supervisions if s.speaker), None)
    return Row(path, float(cut.duration), speaker, " ".join(texts) if texts else None), None
