"""Training inputs listed: manifests, folders and files -> one compact table of entries.

    inputs (manifest .tsv files, folders of audio, audio files)
      -> list_entries   -> EntryTable: every bad line of every manifest raises one ManifestError
                           that lists them all
      -> check_entries  -> (good EntryTable, bad [(Entry, reason)]): files without a duration are
                           probed now; files with one are probed now when few (UPFRONT_LIMIT),
                           else checked when first read (``data.AudioDataset``)

An :class:`EntryTable` holds a corpus in a few numpy arrays (paths and transcripts as one UTF-8
buffer each with offsets, durations as float64, speakers as codes), about 40 bytes per entry
plus its text, not a Python object per entry: a million-file corpus lists in seconds, and
DataLoader workers forked from the trainer share its pages (no reference counts to touch).
It is a sequence of :class:`Entry`, each made when asked for.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from array import array
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE, AudioError, audio_duration, is_stream_path, list_audio_files, load_audio
from .config import ConfigError

log = logging.getLogger("w2v2.data")  # the logger these messages always came from

MANIFEST_SUFFIXES = (".tsv",)

# Training probes every file before the first update when the inputs give at most this many
# durations (a few seconds of header reads); past it, a manifest's ``seconds`` are trusted for
# batching and each file is checked when it is first read (docs/scale.md).
UPFRONT_LIMIT = 10_000


@dataclass(frozen=True)
class Entry:
    """One utterance: an audio path (absolute or relative to the working directory) and what is known of it."""

    path: str
    seconds: float | None = None
    speaker: str | None = None
    text: str | None = None


class ManifestError(ConfigError):
    """Problems with training inputs (manifests, folders), all found before training: ``problems``
    lists them one per line, ``<manifest>:<line>: <problem>``."""


# ---------------------------------------------------------------------------- the table


def _encode(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")  # file names that are not UTF-8 keep their bytes


def _decode(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _gather(buffer: np.ndarray, offsets: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The variable-length items ``index`` of (buffer, offsets), as a new (buffer, offsets).
    Copies runs of consecutive items at once: selecting all but a few costs a few copies."""
    new_offsets = np.zeros(len(index) + 1, np.int64)
    if not len(index):
        return np.zeros(0, np.uint8), new_offsets
    np.cumsum(offsets[index + 1] - offsets[index], out=new_offsets[1:])
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate([[0], breaks]).astype(np.int64)
    ends = np.concatenate([breaks, [len(index)]]).astype(np.int64)
    parts = [buffer[offsets[index[a]]:offsets[index[b - 1] + 1]] for a, b in zip(starts.tolist(), ends.tolist())]
    return np.concatenate(parts), new_offsets


class EntryTable(Sequence):
    """Entries in columns: ``table[i]`` is an :class:`Entry`, ``table[a:b]`` and
    ``table.select(index_or_mask)`` are tables, ``table.seconds`` is a float64 array (NaN where
    unknown). Build one with :class:`EntryTableBuilder`, :meth:`from_entries` or :meth:`concat`.

    A path is ``str(Path(root) / rel)`` for entries of a manifest (the manifest's folder is
    stored once, not per entry), else ``rel`` as given."""

    def __init__(self, roots: list[str], root: np.ndarray, path_bytes: np.ndarray, path_offsets: np.ndarray,
                 seconds: np.ndarray, speakers: list[str], speaker: np.ndarray, text_bytes: np.ndarray,
                 text_offsets: np.ndarray, has_text: np.ndarray):
        self.roots, self.root = roots, root  # root: int32 index into roots, -1: the path is whole
        self.path_bytes, self.path_offsets = path_bytes, path_offsets  # uint8, int64 (n + 1)
        self.seconds = seconds  # float64, NaN: unknown
        self.speakers, self.speaker = speakers, speaker  # speaker: int32 index into speakers, -1: None
        self.text_bytes, self.text_offsets, self.has_text = text_bytes, text_offsets, has_text
        self._root_paths = [Path(r) for r in roots]

    @classmethod
    def from_entries(cls, entries: Iterable[Entry]) -> "EntryTable":
        """The table of any iterable of :class:`Entry` (what other readers of manifests yield)."""
        if isinstance(entries, EntryTable):
            return entries
        builder = EntryTableBuilder()
        builder.add_entries(entries)
        return builder.build()

    @classmethod
    def concat(cls, tables: Sequence["EntryTable"]) -> "EntryTable":
        """One table holding the entries of ``tables``, in order."""
        tables = [t for t in tables if len(t)] or list(tables[:1]) or [EntryTableBuilder().build()]
        if len(tables) == 1:
            return tables[0]
        roots, speakers, root_cols, speaker_cols = [], [], [], []
        for t in tables:
            shift = np.asarray(len(roots), np.int32)
            root_cols.append(np.where(t.root < 0, t.root, t.root + shift))
            roots += t.roots
            codes = {s: i for i, s in enumerate(speakers)}
            remap = np.array([codes.setdefault(s, len(codes)) for s in t.speakers] + [-1], np.int32)
            speakers = list(codes)
            speaker_cols.append(remap[t.speaker])  # -1 indexes the appended -1

        def offsets(cols: list[np.ndarray]) -> np.ndarray:
            starts = np.cumsum([0] + [c[-1] for c in cols[:-1]])
            return np.concatenate([np.zeros(1, np.int64)] + [c[1:] + s for c, s in zip(cols, starts)])

        return cls(roots, np.concatenate(root_cols), np.concatenate([t.path_bytes for t in tables]),
                   offsets([t.path_offsets for t in tables]), np.concatenate([t.seconds for t in tables]), speakers,
                   np.concatenate(speaker_cols), np.concatenate([t.text_bytes for t in tables]),
                   offsets([t.text_offsets for t in tables]), np.concatenate([t.has_text for t in tables]))

    def __len__(self) -> int:
        return len(self.seconds)

    def path(self, i: int) -> str:
        rel = _decode(self.path_bytes[self.path_offsets[i]:self.path_offsets[i + 1]].tobytes())
        r = self.root[i]
        return rel if r < 0 else str(self._root_paths[r] / rel)

    def text(self, i: int) -> str | None:
        if not self.has_text[i]:
            return None
        return _decode(self.text_bytes[self.text_offsets[i]:self.text_offsets[i + 1]].tobytes())

    def texts(self) -> Iterator[str | None]:
        return (self.text(i) for i in range(len(self)))

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self.select(np.arange(len(self))[key])
        i = int(key)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"entry {key} of {len(self)}")
        seconds = float(self.seconds[i])
        code = self.speaker[i]
        return Entry(self.path(i), None if math.isnan(seconds) else seconds,
                     None if code < 0 else self.speakers[code], self.text(i))

    def __iter__(self) -> Iterator[Entry]:
        return (self[i] for i in range(len(self)))

    def select(self, index) -> "EntryTable":
        """The entries at ``index`` (an array of positions, or a boolean mask), in that order."""
        index = np.asarray(index)
        index = np.flatnonzero(index) if index.dtype == bool else index.astype(np.int64)
        paths, path_offsets = _gather(self.path_bytes, self.path_offsets, index)
        texts, text_offsets = _gather(self.text_bytes, self.text_offsets, index)
        return EntryTable(self.roots, self.root[index], paths, path_offsets, self.seconds[index].copy(),
                          self.speakers, self.speaker[index], texts, text_offsets, self.has_text[index])

    def with_seconds(self, seconds: np.ndarray) -> "EntryTable":
        """The same entries (sharing their arrays) with other durations (NaN: unknown)."""
        return EntryTable(self.roots, self.root, self.path_bytes, self.path_offsets, np.asarray(seconds, np.float64),
                          self.speakers, self.speaker, self.text_bytes, self.text_offsets, self.has_text)

    def total_seconds(self) -> float:
        """The summed known durations."""
        return float(np.nansum(self.seconds))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.root, self.path_bytes, self.path_offsets, self.seconds, self.speaker,
                                      self.text_bytes, self.text_offsets, self.has_text))

    def __repr__(self) -> str:
        return f"EntryTable({len(self)} entries, {self.nbytes} bytes)"


class EntryTableBuilder:
    """Appends entries column by column (growing arrays, no object per entry), then :meth:`build`."""

    def __init__(self):
        self.roots: dict[str, int] = {}
        self.speakers: dict[str, int] = {}
        self.root, self.speaker = array("i"), array("i")
        self.paths, self.texts = bytearray(), bytearray()
        self.path_ends, self.text_ends = array("q"), array("q")
        self.seconds, self.has_text = array("d"), bytearray()

    def __len__(self) -> int:
        return len(self.seconds)

    def add(self, path: str, seconds: float | None = None, speaker: str | None = None, text: str | None = None,
            root: str | None = None) -> None:
        """One entry; ``root``: the folder ``path`` is relative to (a manifest's), None when it is whole."""
        self.root.append(-1 if root is None else self.roots.setdefault(root, len(self.roots)))
        self.paths += _encode(path)
        self.path_ends.append(len(self.paths))
        self.seconds.append(math.nan if seconds is None else seconds)
        self.speaker.append(-1 if speaker is None else self.speakers.setdefault(speaker, len(self.speakers)))
        if text is not None:
            self.texts += _encode(text)
        self.text_ends.append(len(self.texts))
        self.has_text.append(text is not None)

    def add_entries(self, entries: Iterable[Entry]) -> None:
        """Every :class:`Entry` of ``entries``, or row with its fields (what the readers of other manifest
        formats return), one at a time."""
        for e in entries:
            self.add(e.path, e.seconds, e.speaker, e.text)

    def relative_path(self, i: int) -> str:
        start = self.path_ends[i - 1] if i else 0
        return _decode(bytes(self.paths[start:self.path_ends[i]]))

    def build(self) -> EntryTable:
        def offsets(ends):
            out = np.zeros(len(ends) + 1, np.int64)
            out[1:] = np.frombuffer(ends, np.int64) if len(ends) else 0
            return out
        return EntryTable(list(self.roots), np.array(self.root, np.int32), np.frombuffer(bytes(self.paths), np.uint8),
                          offsets(self.path_ends), np.array(self.seconds, np.float64), list(self.speakers),
                          np.array(self.speaker, np.int32), np.frombuffer(bytes(self.texts), np.uint8),
                          offsets(self.text_ends), np.frombuffer(bytes(self.has_text), np.bool_).copy())


# ---------------------------------------------------------------------------- manifests


def read_manifest(path: str | os.PathLike, require_text: bool = False) -> list[Entry]:
    """A manifest's entries (see :func:`read_rows`): optional columns ``seconds``, ``speaker``,
    ``text`` (required when ``require_text``). Raises :class:`ManifestError` listing every bad line."""
    builder = EntryTableBuilder()
    problems = _read_manifest(Path(path), require_text, builder)
    if problems:
        raise ManifestError(problems)
    return list(builder.build())


def read_rows(path: str | os.PathLike, required: Sequence[str] = ("path",)) -> list[dict[str, str]]:
    """The rows of a manifest, as ``{column: text}`` dicts, every value exactly as written.

    The one manifest format of w2v2, read here for every command, recipe and test: UTF-8 text
    (a leading byte order mark is allowed), a header line naming the columns, then one row per
    line, fields separated by tabs. There is no quoting: a ``"`` is an ordinary character, so a
    field holds anything but a tab or a line break (as in fairseq's manifests). ``path`` is
    relative to the manifest's folder, or absolute; ``seconds``, when given, is a non-negative
    number. Blank lines are skipped; a row repeating an earlier row's ``path`` is kept with a
    warning. Raises :class:`ManifestError` listing every problem of the file, one per line."""
    path = Path(path)
    rows: list[dict] = []
    repeats = _Repeats()
    problems = _scan_rows(path, required, rows.append, repeats)
    repeats.warn(path, lambda i: rows[i]["path"])
    if problems:
        raise ManifestError(problems)
    return rows


class _Repeats:
    """Rows repeating an earlier row's path, found from 64-bit hashes of the normalised paths
    (8 + 4 bytes a row while reading, not a dictionary of strings)."""

    def __init__(self):
        self.hashes, self.lines = array("q"), array("i")

    def add(self, line: int, path: str) -> None:
        self.hashes.append(hash(os.path.normpath(path)))
        self.lines.append(line)

    def warn(self, manifest: Path, path_of) -> None:
        """Log the repeats (``path_of(row)``: the row's path as written)."""
        if len(self.hashes) < 2:
            return
        hashes = np.frombuffer(self.hashes, np.int64)
        order = np.argsort(hashes, kind="stable")  # a path's first row comes first among its repeats
        ordered = hashes[order]
        rows = np.sort(order[1:][ordered[1:] == ordered[:-1]])
        del order, ordered
        if not len(rows):
            return
        first = {r: int(np.flatnonzero(hashes == hashes[r])[0]) for r in rows[:3].tolist()}
        shown = "; ".join(f"line {self.lines[r]} repeats line {self.lines[first[r]]}: {path_of(r)}"
                          for r in rows[:3].tolist()) + ("; ..." if len(rows) > 3 else "")
        log.warning("%s: warning: %d row(s) repeat the path of an earlier row (%s); each counts as often as it "
                    "is listed", manifest, len(rows), shown)


def _scan_rows(path: Path, required: Sequence[str], on_row, repeats: _Repeats) -> list[str]:
    """Call ``on_row(row)`` for each good row of one manifest, one at a time; returns the problems."""
    problems: list[str] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = reader.fieldnames
            if header is None or "path" not in header:
                return [f"{path}: a manifest needs a tab-separated header with a 'path' column "
                        f"(got {header}); expected e.g. 'path<TAB>seconds<TAB>speaker<TAB>text'"]
            if len(set(header)) < len(header):
                problems.append(f"{path}:1: repeated column names in the header {header}")
            problems += [f"{path}: no {c!r} column (the header is {' '.join(header)})" for c in required
                         if c not in header]
            for row in reader:
                problem = _row_problem(row, len(header))
                if problem:
                    problems.append(f"{path}:{reader.line_num}: {problem}")
                else:
                    repeats.add(reader.line_num, row["path"])
                    on_row(row)
    except UnicodeDecodeError as e:
        problems.append(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); is it really a manifest?")
    except OSError as e:
        problems.append(f"{path}: cannot read ({e.strerror or e})")
    except csv.Error as e:
        problems.append(f"{path}: not a tab-separated manifest ({e})")
    return problems


def _read_manifest(path: Path, require_text: bool, builder: EntryTableBuilder) -> list[str]:
    """Append a manifest's entries to ``builder``; returns its problems."""
    first = len(builder)
    root = str(path.parent)
    repeats = _Repeats()

    def add(row: dict) -> None:
        seconds = row.get("seconds")
        builder.add(row["path"], float(seconds) if seconds else None, row.get("speaker") or None, row.get("text"),
                    root=root)

    problems = _scan_rows(path, ("path", "text") if require_text else ("path",), add, repeats)
    repeats.warn(path, lambda i: builder.relative_path(first + i))
    if len(builder) == first and not problems:
        problems.append(f"{path}: no rows (the manifest holds only its header)")
    return problems


def _row_problem(row: dict, columns: int) -> str | None:
    """What is wrong with one manifest row (from ``csv.DictReader``), or None."""
    extra, missing = row.get(None), [k for k, v in row.items() if k is not None and v is None]
    if extra or missing:
        got = columns + len(extra or []) - len(missing)
        return f"{got} tab-separated fields, the header has {columns}"
    if not row["path"]:
        return "empty path"
    seconds = row.get("seconds")
    if seconds:
        try:
            value = float(seconds)
        except ValueError:
            return f"seconds must be a number, got {seconds!r}"
        if not math.isfinite(value) or value < 0:
            return f"seconds must be a non-negative number, got {seconds!r}"
    return None


def list_entries(inputs: Sequence[str | os.PathLike], require_text: bool = False) -> EntryTable:
    """Manifests (``*.tsv``), folders (searched recursively for audio; a folder holding a
    ``manifest.tsv`` uses it, so its transcripts come along) and single audio files -> entries.

    ``require_text``: every input must be a manifest with a ``text`` column. Raises
    :class:`ManifestError` listing every problem of every input. NeMo JSON lines, Hugging Face
    datasets (``save_to_disk`` folders, ``.parquet``) and Lhotse cut manifests are read by
    :func:`w2v2.formats.read_entries`."""
    from .formats import read_entries

    builder = EntryTableBuilder()
    problems: list[str] = []
    for item in map(str, inputs):
        found = read_entries(item, require_text)  # NeMo, Hugging Face, Lhotse manifests (w2v2.formats)
        if found is not None:
            builder.add_entries(found[0])
            problems.extend(found[1])
            continue
        manifest = None
        if item.endswith(MANIFEST_SUFFIXES):
            if not os.path.isfile(item):
                problems.append(f"{item}: no such manifest")
                continue
            manifest = item
        elif os.path.isdir(item) and os.path.isfile(os.path.join(item, "manifest.tsv")):
            manifest = os.path.join(item, "manifest.tsv")
        elif require_text:
            problems.append(f"{item}: not a manifest with transcripts (a .tsv file with 'path' and 'text' columns, "
                            "or a folder holding one as manifest.tsv)")
            continue
        if manifest is not None:
            problems.extend(_read_manifest(Path(manifest), require_text, builder))
        elif os.path.isdir(item):
            found = list_audio_files([item])
            if not found:
                problems.append(f"{item}: no audio files found in this folder")
            for p in found:
                builder.add(p)
        else:
            builder.add(item)
    if problems:
        raise ManifestError(problems)
    return builder.build()


# ---------------------------------------------------------------------------- checking files


def check_file(entry: Entry, min_seconds: float) -> tuple[Entry, str | None]:
    """``(entry with the file's own duration, None)``, or ``(entry, why it cannot be used)``."""
    if is_stream_path(entry.path):
        return entry, "a named pipe or device, not a regular file (training data is read many times)"
    try:
        seconds = audio_duration(entry.path)
        if seconds is None:  # no duration in the header: decode to measure it
            seconds = len(load_audio(entry.path)) / SAMPLE_RATE
    except AudioError as e:
        return entry, str(e).removeprefix(f"{entry.path}: ")
    except OSError as e:
        return entry, f"cannot read ({e.strerror or e})"
    if seconds < min_seconds:
        return entry, f"too short ({seconds:.3f} s < {min_seconds:.3f} s)"
    return replace(entry, seconds=seconds), None


def validate_entries(entries: Sequence[Entry], min_seconds: float = 0.0,
                     threads: int = 8) -> tuple[list[Entry], list[tuple[Entry, str]]]:
    """Check every file before training: it exists, is readable, has a decodable header, and
    lasts at least ``min_seconds``. Returns ``(good, bad)``: good entries carry the duration read
    from the file (which replaces a manifest's ``seconds``); bad ones come with the reason."""
    good, bad = check_entries(entries, min_seconds, upfront_limit=len(entries), threads=threads)  # every file
    return list(good), bad


def check_entries(entries: Sequence[Entry], min_seconds: float = 0.0, upfront_limit: int = UPFRONT_LIMIT,
                  threads: int = 8) -> tuple[EntryTable, list[tuple[Entry, str]]]:
    """What training checks before its first update: ``(good, bad)`` like :func:`validate_entries`.

    Files without a duration are probed (batching needs their length). Files with one are
    probed too when there are at most ``upfront_limit`` of them; past that, their duration is
    trusted, only those it says are shorter than ``min_seconds`` are dropped here, and the rest
    are checked as they are read (:class:`w2v2.data.AudioDataset` skips, logs and counts a bad one)."""
    table = EntryTable.from_entries(entries)
    known = ~np.isnan(table.seconds)
    probe = np.flatnonzero(~known) if known.sum() > upfront_limit else np.arange(len(table))
    keep = np.ones(len(table), bool)
    seconds = table.seconds.copy()
    bad: list[tuple[Entry, str]] = []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for i, (entry, reason) in zip(probe.tolist(), pool.map(lambda i: check_file(table[i], min_seconds),
                                                               probe.tolist())):
            if reason:
                keep[i] = False
                bad.append((entry, reason))
            else:
                seconds[i] = entry.seconds
    trusted = known.copy()
    trusted[probe] = False
    for i in np.flatnonzero(trusted & (seconds < min_seconds)).tolist():
        keep[i] = False
        bad.append((table[i], f"too short ({seconds[i]:.3f} s < {min_seconds:.3f} s, says the manifest)"))
    good = (table if keep.all() else table.select(keep)).with_seconds(seconds[keep])
    if len(probe) < len(table):
        log.info("%d files are checked when first read (their durations come from the manifests)",
                 int((trusted & keep).sum()))
    return good, bad
