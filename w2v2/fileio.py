"""Atomic file writes: readers see the old file or the complete new one, never a partial one.

The data goes to a temporary file in the target's directory, is flushed and fsynced, then
``os.replace`` puts it in place. If anything fails before that, the temporary file is removed
and the target is untouched. Used by the output writers and by training checkpoints
(``with atomic_open(path, "wb") as f: torch.save(state, f)``).

``atomic_write_files`` writes several files all or nothing (an input's txt, srt, json...). Any
failure raises ``OutputError``, naming the target (or its folder), never the temporary. A target
that is a character device or a FIFO (``/dev/null``, a pipe) is written in place, and a symbolic
link is followed: neither is ever replaced by a file.

A temporary is named ``.<target name>.<random>.<pid>@<host>.tmp``. A writer killed before it
could clean up leaves one behind; ``remove_stale_temporaries(folder)`` removes those whose
writer is gone, and never a running writer's.

Checksums: ``write_checksums(dir)`` records the SHA-256 of a directory's files in
``checksums.json``; ``verify_checksums(dir)`` finds a file that was truncated or changed since.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Callable, Iterator
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
# ours: .<name>.<8 random characters>.<pid>@<host>.tmp; older versions wrote .<name>.<8 characters>.tmp
_OURS = re.compile(r"\..+\.[a-z0-9_]{8}\.(\d+)@([A-Za-z0-9-]+)\.tmp")
_LEGACY = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")
# A temporary lives for one write: data streams in and it is renamed or removed at once. One left
# untouched this long, whose writer cannot be looked up (another host, or a version that did not
# record its pid), is not being written any more; a day leaves room for any slow or paused write.
STALE_AFTER_SECONDS = 24 * 3600


@functools.cache
def _host() -> str:
    """This machine's name as it appears in temporary names (letters, digits and '-' only)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


def _temporary_name(path: Path) -> str:
    name = os.fsdecode(os.fsencode(path.name)[:_NAME_BYTES])
    return f".{name}.{secrets.token_hex(4)}.{os.getpid()}@{_host()}.tmp"


def _make_temporary(path: Path, doing: str | None = None) -> tuple[int, str]:
    """Create a new temporary beside ``path`` (mode 0600 until complete); (fd, its path). Failing,
    an ``OutputError`` names the folder: ``cannot create talk.txt in out: Read-only file system``."""
    doing = doing or f"cannot create {path.name} in"
    for _ in range(100):
        tmp = os.fspath(path.parent / _temporary_name(path))
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600), tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputError(e.errno, e.strerror or type(e).__name__, path.parent, doing) from e
    raise OutputError(errno.EEXIST, "no free temporary name", path.parent, doing)


def _writer_is_gone(folder: str | os.PathLike, name: str, mtime: float) -> bool:
    """Whether the temporary ``name`` in ``folder`` belongs to no running writer."""
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
    old = time.time() - mtime > STALE_AFTER_SECONDS
    if ours:
        return old
    legacy = _LEGACY.fullmatch(name)  # a common pattern: only beside the file it was for
    return old and bool(legacy) and os.path.lexists(os.path.join(folder, legacy[1]))


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that ``atomic_open`` left in ``folder`` (not below it) when its
    writer was killed; returns their paths. A temporary of this host is stale when the process
    named in it no longer runs; one of another host (a shared file system) or of an older
    version, which names no process, when it has not changed for ``STALE_AFTER_SECONDS`` (and,
    for the older version's ``.<name>.<random>.tmp``, a common pattern, only beside ``<name>``).
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
            if _writer_is_gone(folder, entry.name, entry.stat(follow_symlinks=False).st_mtime):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


class OutputError(OSError):
    """Writing an output failed: ``errno`` is the cause's, ``filename`` the path to report (the
    target, or its folder when nothing can be created there). Reads as one line,
    ``cannot write out/talk.txt: No space left on device``."""

    def __init__(self, code: int | None, reason: str, filename: str | os.PathLike, doing: str = "cannot write"):
        super().__init__(code, reason, os.fspath(filename))
        self.doing = doing

    def __str__(self) -> str:
        return f"{self.doing} {self.filename}: {self.strerror}"


@contextlib.contextmanager
def _reported_as(target: Path, tmp: str) -> Iterator[None]:
    """An OSError about the temporary (or about no file at all: a failed write) names ``target``."""
    try:
        yield
    except OutputError:
        raise
    except OSError as e:
        if e.filename not in (None, tmp):  # about another file the caller touched (tmp: or the stream)
            raise
        raise OutputError(e.errno, e.strerror or type(e).__name__, target) from e


def _unlink_quietly(path: str | os.PathLike) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


@contextlib.contextmanager
def _temporary_for(path: Path, mode: str, encoding: str) -> Iterator[tuple[IO, str | None, Path]]:
    """``(file, temporary, target)``: a file to fill, complete and fsynced in a temporary beside
    ``target`` when the block exits cleanly (not renamed yet: the caller does that); removed on an
    exception. ``target`` is ``path``, or where ``path`` links to (the link stays a link). A path
    that names a stream (a character device such as /dev/null or /dev/stdout, a FIFO) is written
    directly, temporary None: replacing it by a file would break it for everyone."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
    kwargs = {"encoding": encoding, "newline": ""} if mode == "w" else {}
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    if is_stream(target):
        with _reported_as(path, os.fspath(target)), open(target, mode, **kwargs) as f:
            yield f, None, target
        return
    fd, tmp = _make_temporary(target)
    try:
        with _reported_as(path, tmp):
            with os.fdopen(fd, mode, **kwargs) as f:
                yield f, tmp, target
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _default_mode())
    except BaseException:
        _unlink_quietly(tmp)
        raise


def is_stream(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a character device, a FIFO or a socket (written in place, never
    replaced); ``OutputError`` for a block device."""
    try:
        kind = os.stat(path).st_mode
    except OSError:
        return False
    if stat.S_ISBLK(kind):
        raise OutputError(errno.EINVAL, "a block device, not a file: not written", path, "cannot write")
    return stat.S_ISCHR(kind) or stat.S_ISFIFO(kind) or stat.S_ISSOCK(kind)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str = "utf-8") -> Iterator[IO]:
    """Open a temporary file for writing that replaces ``path`` when the block exits cleanly.

    ``mode`` is ``"w"`` (text, ``encoding``) or ``"wb"``. On an exception the temporary file is
    deleted and ``path`` keeps its previous content (or stays absent). A failure to create,
    write or rename the file raises ``OutputError`` naming ``path`` (or its folder).
    """
    with _temporary_for(Path(path), mode, encoding) as (f, tmp, target):
        yield f
    if tmp is None:  # a stream, written directly
        return
    try:
        _replace_all([(tmp, target)])
    except BaseException:
        _unlink_quietly(tmp)
        raise


def atomic_write_files(writes: dict[str | os.PathLike, Callable[[IO], None]], mode: str = "w",
                       encoding: str = "utf-8") -> None:
    """Write several files all or nothing: ``write(file)`` fills a temporary beside each path;
    only when every one is complete are they renamed into place. On a failure (a full disk, a
    read-only folder, a target that is a directory) every target keeps its previous content
    (or stays absent) and the error names the file. A crash during the renames themselves (no
    data is written then) can leave some targets new and some old. Streams (``/dev/null``, a
    FIFO) among the paths are written directly, in turn."""
    temps: list[tuple[str, Path]] = []
    try:
        for path, write in writes.items():
            with _temporary_for(Path(path), mode, encoding) as (f, tmp, target):
                write(f)
            if tmp is not None:
                temps.append((tmp, target))
        _replace_all(temps)
    except BaseException:
        for tmp, _ in temps:
            _unlink_quietly(tmp)
        raise


def _replace_all(temps: list[tuple[str, Path]]) -> None:
    """Rename each temporary onto its target; if one rename fails, the targets already replaced
    get their previous content back (kept aside as hard links until all renames are done)."""
    replaced: list[tuple[Path, str | None, bool]] = []  # (target, its previous content aside, existed)
    backups = []
    try:
        for tmp, path in temps:
            existed = os.path.lexists(path)
            backup = _link_aside(path) if existed else None
            if backup:
                backups.append(backup)
            with _reported_as(path, tmp):
                os.replace(tmp, path)
            replaced.append((path, backup, existed))
    except BaseException:
        for path, backup, existed in reversed(replaced):
            with contextlib.suppress(OSError):
                if backup:
                    os.replace(backup, path)
                elif not existed:
                    os.unlink(path)
        raise
    finally:
        for backup in backups:
            _unlink_quietly(backup)
    for folder in {path.parent for _, path in temps}:
        _fsync_dir(folder)


def _link_aside(path: Path) -> str | None:
    """A second name (a hard link, named like a temporary) for ``path``; None where links fail."""
    backup = os.fspath(path.parent / _temporary_name(path))
    try:
        os.link(path, backup, follow_symlinks=False)
    except OSError:
        return None
    return backup


def file_in_the_way(folder: str | os.PathLike) -> Path | None:
    """The first of ``folder`` and its parents that exists but is not a folder (so ``folder``
    can never be created), or None."""
    folder = Path(folder)
    return next((p for p in [folder, *folder.parents] if os.path.lexists(p) and not p.is_dir()), None)


def make_folder(path: str | os.PathLike) -> None:
    """``mkdir -p`` whose failure is an ``OutputError`` naming the folder and, where a file is in
    the way, that file."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        in_the_way = file_in_the_way(path)
        reason = f"{in_the_way} is a file, not a folder" if in_the_way else e.strerror or type(e).__name__
        raise OutputError(e.errno, reason, path, "cannot create the folder") from e


def check_writable(folder: str | os.PathLike) -> None:
    """Create and remove a temporary in ``folder``: ``OutputError`` naming it if that fails (a
    read-only folder or file system, no permission, no space for a new entry)."""
    fd, tmp = _make_temporary(Path(folder) / "probe", "cannot write in")
    os.close(fd)
    _unlink_quietly(tmp)


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
    if not (directory / CHECKSUMS).is_file():  # a FIFO would block the read, a device never end it
        raise ValueError(f"{directory / CHECKSUMS}: not a regular file")
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
