"""Atomic file writes: readers see the old file or the complete new one, never a partial one.

The data goes to a temporary file in the target's directory, is flushed and fsynced, then
``os.replace`` puts it in place. If anything fails before that, the temporary file is removed
and the target is untouched. Used by the output writers and by training checkpoints
(``with atomic_open(path, "wb") as f: torch.save(state, f)``).

A temporary is named ``.<target name>.<random>.<pid>@<host>.tmp``. A writer killed before it
could clean up leaves one behind; ``remove_stale_temporaries(folder)`` removes those whose
writer is gone, and never a running writer's.

Checksums: ``write_checksums(dir)`` records the SHA-256 of a directory's files in
``checksums.json``; ``verify_checksums(dir)`` finds a file that was truncated or changed since.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import socket
import tempfile
import time
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


# ---------------------------------------------------------------------------- temporaries
_NAME_BYTES = 120  # of the target's name kept in its temporary's name: the whole stays under NAME_MAX (255)
# ours: .<name>.<8 mkstemp characters>.<pid>@<host>.tmp; older versions wrote .<name>.<8 characters>.tmp
_OURS = re.compile(r"\..+\.[a-z0-9_]{8}\.(\d+)@([A-Za-z0-9-]+)\.tmp")
_LEGACY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
# A temporary lives for one write: data streams in and it is renamed or removed at once. One left
# untouched this long, whose writer cannot be looked up (another host, or a version that did not
# record its pid), is not being written any more; a day leaves room for any slow or paused write.
STALE_AFTER_SECONDS = 24 * 3600


@functools.cache
def _host() -> str:
    """This machine's name as it appears in temporary names (letters, digits and '-' only)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


def _make_temporary(path: Path) -> tuple[int, str]:
    """Create the temporary beside ``path`` (``mkstemp``: unique, mode 0600); (fd, its path)."""
    name = os.fsdecode(os.fsencode(path.name)[:_NAME_BYTES])
    return tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=f".{os.getpid()}@{_host()}.tmp")


def _writer_is_gone(name: str, mtime: float) -> bool:
    """Whether the temporary called ``name`` belongs to no running writer."""
    ours = _OURS.fullmatch(name)
    if ours and ours[2] == _host():
        pid = int(ours[1])
        if pid == os.getpid():  # this process: maybe another thread's write in progress
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # e.g. another user's process: alive
            return False
        return False  # alive (or its pid reused since: kept until that process ends too)
    if ours or _LEGACY.fullmatch(name):
        return time.time() - mtime > STALE_AFTER_SECONDS
    return False


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that ``atomic_open`` left in ``folder`` (not below it) when its
    writer was killed; returns their paths. A temporary of this host is stale when the process
    named in it no longer runs; one of another host (a shared file system) or of an older
    version, which names no process, when it has not changed for ``STALE_AFTER_SECONDS``.
    Regular files only; whatever cannot be read or removed is left as it is."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if _writer_is_gone(entry.name, entry.stat(follow_symlinks=False).st_mtime):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str = "utf-8") -> Iterator[IO]:
    """Open a temporary file for writing that replaces ``path`` when the block exits cleanly.

    ``mode`` is ``"w"`` (text, ``encoding``) or ``"wb"``. On an exception the temporary file is
    deleted and ``path`` keeps its previous content (or stays absent).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    fd, tmp = _make_temporary(path)
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
