"""Training data in the forms people have, all feeding the same stream of :class:`w2v2.data.Entry`.

    NeMo JSON lines, Hugging Face datasets (save_to_disk folders, Parquet), Lhotse cut manifests
        -> :mod:`.manifests` readers -> entries (spans and table rows as addresses, :mod:`.sources`)
    tar shards (WebDataset layout: ``KEY.flac`` + ``KEY.json``/``KEY.txt``), local or any fsspec URL
        -> :mod:`.shards` (reading, catalog), :mod:`.stream`: shuffled in a buffer, batched by length, resumable
    ``w2v2 prepare`` -> :mod:`.prepare`: any input above -> sorted, length-annotated shards

:func:`read_entries` is the dispatch :func:`w2v2.data.list_entries` consults for each input, by
suffix and folder shape; the libraries (``datasets``, ``pyarrow``, ``lhotse``, ``fsspec``) are
imported only when an input needs them (``pip install 'w2v2[data]'``).
"""

from __future__ import annotations

import os
from pathlib import Path

JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
INDEX_NAME = "shards.json"  # beside the shards: each shard's keys, durations and texts (w2v2 prepare writes it)


def is_shard_input(item: str | os.PathLike) -> bool:
    """Tar shards: a ``.tar`` path or URL (brace patterns allowed), a ``shards.json`` index, or a
    folder holding one (what ``w2v2 prepare`` writes)."""
    item = str(item)
    return item.endswith((".tar", INDEX_NAME)) or (os.path.isdir(item) and os.path.isfile(os.path.join(item, INDEX_NAME)))


def read_entries(item: str, require_text: bool = False) -> tuple[list, list[str]] | None:
    """``(rows, problems)`` of one input in a format of this package (rows: :class:`.manifests.Row`,
    the fields of :class:`w2v2.data.Entry`), or None when the input is none of them (a ``.tsv``
    manifest, a folder of audio, an audio file: :mod:`w2v2.data`'s)."""
    from . import manifests

    path = Path(item)
    if is_shard_input(item):
        return [], [f"{item}: tar shards are read as a stream, by 'w2v2 pretrain', 'w2v2 finetune --train' and "
                    "'w2v2 prepare'; give them on their own"]
    if item.endswith(".parquet"):
        found = manifests.read_parquet(path) if path.is_file() else ([], [f"{item}: no such Parquet file"])
    elif item.endswith(JSON_SUFFIXES):
        found = _read_json_lines(path)
    elif path.is_dir() and any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json")):
        found = manifests.read_hf_disk(path)
    else:
        return None
    entries, problems = found
    if require_text and entries:
        missing = sum(e.text is None for e in entries)
        if missing:
            problems = problems + [f"{item}: {missing} of {len(entries)} entries have no text (transcripts are "
                                   "needed here)"]
    if not entries and not problems:
        problems = [f"{item}: no entries"]
    return entries, problems


def _read_json_lines(path: Path) -> tuple[list, list[str]]:
    from . import manifests

    if not path.is_file():
        return [], [f"{path}: no such manifest"]
    record = manifests.first_record(path)
    if record is None:
        return [], [f"{path}: not a JSON-lines manifest (the first line is not a JSON object)"]
    if "audio_filepath" in record:
        return manifests.read_nemo(path)
    if "recording" in record or str(record.get("type", "")).endswith("Cut"):
        return manifests.read_lhotse(path)
    return [], [f"{path}: a JSON manifest of unknown kind (fields {', '.join(list(record)[:6])}); expected NeMo "
                "lines with 'audio_filepath' or a Lhotse cut manifest"]
