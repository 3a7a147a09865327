"""Atomic file writes: readers see the old file or the complete new one, never a partial one.

The data goes to a temporary file in the target's directory, is flushed and fsynced, then
``os.replace`` puts it in place. If anything fails before that, the temporary file is removed
and the target is untouched. Used by the output writers and by training checkpoints
(``with atomic_open(path, "wb") as f: torch.save(state, f)``).

Checksums: ``write_checksums(dir)`` records the SHA-256 of a directory's files in
``checksums.json``; ``verify_checksums(dir)`` finds a file that was truncated or changed since.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@functools.cache
def _default_mode() -> int:
    """Permissions a plain ``open(path, "w")`` would give: 0o666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); silently skipped where directories can't be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str = "utf-8") -> Iterator[IO]:
    """Open a temporary file for writing that replaces ``path`` when the block exits cleanly.

    ``mode`` is ``"w"`` (text, ``encoding``) or ``"wb"``. On an exception the temporary file is
    deleted and ``path`` keeps its previous content (or stays absent).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        kwargs = {"encoding": encoding, "newline": ""} if mode == "w" else {}
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (newlines written as given, not translated)."""
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)


# ---------------------------------------------------------------------------- checksums
CHECKSUMS = "checksums.json"  # {"sha256": {file name: hex digest}} for the files beside it


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: str | os.PathLike) -> None:
    """Record the SHA-256 of every file in ``directory`` in ``checksums.json`` (safetensors and
    ``torch.save`` files carry no checksum of their data: a flipped bit would load silently)."""
    directory = Path(directory)
    sums = {p.name: sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    with atomic_open(directory / CHECKSUMS) as f:
        json.dump({"sha256": sums}, f, indent=2)


def verify_checksums(directory: str | os.PathLike, names: list[str] | None = None) -> None:
    """Check the files ``checksums.json`` lists (only ``names`` among them, if given) against their
    recorded SHA-256; ``ValueError`` naming the first missing or changed file. No checksum file:
    nothing to check."""
    directory = Path(directory)
    if not (directory / CHECKSUMS).exists():
        return
    try:
        sums = json.loads((directory / CHECKSUMS).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{directory / CHECKSUMS}: unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(sums, dict):
        raise ValueError(f"{directory / CHECKSUMS}: unreadable (no file table)")
    for name, digest in sums.items():
        if names is not None and name not in names:
            continue
        if not (directory / name).is_file():
            raise ValueError(f"{directory / name}: missing (listed in {CHECKSUMS})")
        if sha256(directory / name) != digest:
            raise ValueError(f"{directory / name}: corrupted (its SHA-256 differs from the one recorded when it was saved)")
