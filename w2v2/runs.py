"""A training run's directory: checkpoints, metric files and the RNG state that makes resuming exact.

    RUN_DIR/
      train_config.json          the TrainConfig of the (last) invocation
      metrics.jsonl, metrics.csv one row per update
      checkpoint_0000100/        model (Hugging Face layout for a Wav2Vec2) + trainer_state.pt
                                 + checksums.json (the SHA-256 of every file in it)
      checkpoint_last -> checkpoint_0000100
      checkpoint_0000050.corrupt/ a damaged checkpoint, set aside on resume (kept for inspection)
      .w2v2.lock                 locked (flock) by the process training in the directory

A checkpoint is written into a temporary directory, fsynced, then renamed into place, and
``checkpoint_last`` is repointed with an atomic rename: a crash leaves the previous checkpoint
intact and never a half-written one under a checkpoint's name. :func:`read_checkpoint` checks
the recorded checksums, so a damaged checkpoint (disk error, truncation) is detected on resume
(the trainer then falls back to the previous one). ``trainer_state.pt`` holds only tensors,
numbers, strings, lists and dicts, so it loads with ``torch.load(weights_only=True)``.

A checkpoint is found by its name alone (:func:`checkpoint_dirs`, :func:`last_checkpoint`), always
as ``RUN_DIR/<name>``, so that one checkpoint has one path whatever form ``RUN_DIR`` was given in.
One process at a time trains in a run directory (:class:`RunLock`); at its start it removes what
killed runs left behind (:func:`remove_stale_entries`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import random
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .fileio import CHECKSUMS, _fsync_dir, atomic_open, remove_stale_temporaries, verify_checksums, write_checksums
from .run_layout import CHECKPOINT_PREFIX, LAST, checkpoint_dirs, checkpoint_name, checkpoint_step  # noqa: F401

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "model.safetensors"
# without any of these a checkpoint is damaged (the weights' other files are listed in its checksums)
REQUIRED_FILES = (STATE_FILE, WEIGHTS_FILE, CHECKSUMS)
LOCK_FILE = ".w2v2.lock"
# hidden entries that only the process holding the run's lock creates: temporary checkpoint and
# best/ directories, checkpoints being deleted, the checkpoint_last link being replaced
_LOCKED_TEMPORARIES = (f".{CHECKPOINT_PREFIX}", ".best.")
STATE_KEYS = ("step", "epoch", "batches_in_epoch", "skipped", "optimizer", "scaler", "rng")


# ---------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) generator states, storable with weights_only=True."""
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- checkpoints


class RunError(ValueError):
    """A run directory that cannot be used or written (in use by another process, disk full); the
    message names the path. A ValueError so that commands report it as one line."""


def last_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``checkpoint_last`` names, else the newest one, else None (whether it is
    intact is for :func:`read_checkpoint` to say). A ``checkpoint_last`` that names anything but
    a checkpoint directory beside it is not followed: nothing outside the run is ever used."""
    run_dir = Path(run_dir)
    found = checkpoint_dirs(run_dir)
    try:
        target = os.readlink(run_dir / LAST)
    except OSError:  # absent, or not a link
        target = None
    if target is not None:
        if run_dir / target in found:
            return run_dir / target
        log.warning("%s names %s, which is no checkpoint directory of this run: not followed", run_dir / LAST, target)
    return found[-1] if found else None


def save_model_weights(model: nn.Module, directory: Path, weights: dict[str, Tensor] | None = None) -> None:
    """A :class:`Wav2Vec2` via ``save_pretrained`` (Hugging Face layout); other modules as safetensors.
    ``weights``: the model's state dict when the model does not hold it whole (sharded)."""
    from .checkpoint import save_pretrained
    from .model import Wav2Vec2

    if isinstance(model, Wav2Vec2):
        save_pretrained(model, directory, state_dict=weights)
    else:
        from safetensors.torch import save_file
        save_file({k: v.detach().cpu().contiguous() for k, v in (weights or model.state_dict()).items()},
                  str(directory / "model.safetensors"))


def read_model_weights(model: nn.Module, directory: Path) -> dict[str, Tensor]:
    """The state dict written by :func:`save_model_weights` for a model like ``model`` (not loaded into it)."""
    from .checkpoint import load_model
    from .model import Wav2Vec2

    if isinstance(model, Wav2Vec2):
        return load_model(directory).state_dict()
    from safetensors.torch import load_file
    return load_file(str(directory / "model.safetensors"))


def write_checkpoint(run_dir: Path, step: int, model: nn.Module, state: Callable[[], dict], keep_last: int = 0,
                     resumed_from: Path | None = None, weights: dict[str, Tensor] | None = None) -> Path:
    """Write ``run_dir/checkpoint_<step>`` atomically (temp dir, checksums, fsync, rename): the
    model and ``state()`` (the trainer state, asked for after the weights are written) as
    ``trainer_state.pt``. Then repoint ``checkpoint_last`` and drop the oldest checkpoints beyond
    ``keep_last`` (0 keeps all). ``resumed_from``: the checkpoint the run resumed from; if it is
    this step's, nothing happened since and it is only repointed. ``weights``: the model's state
    dict when the model holds only a shard of it (FSDP), gathered whole. A failed write (disk full)
    raises :class:`RunError` naming the checkpoint; the earlier checkpoints stay as they were."""
    final = run_dir / checkpoint_name(step)
    if resumed_from is not None and final.resolve() == resumed_from.resolve():  # nothing happened since
        _point_last(run_dir, final)
        return final
    try:
        tmp = temporary_dir(final)
        try:
            save_model_weights(model, tmp, weights)
            _save_state(state(), tmp / STATE_FILE)
            write_checksums(tmp)
            _fsync_tree(tmp)
            if final.exists():  # left by another run in this directory
                _remove_dir(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(run_dir)
        _point_last(run_dir, final)
    except OSError as e:
        raise RunError(f"{final}: cannot save the checkpoint ({e.strerror or e}); "
                       "the earlier checkpoints are intact") from e
    if keep_last > 0:
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            _remove_dir(old)
    log.info("saved %s", final)
    return final


def _save_state(state: dict, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        try:
            torch.save(state, f)
        except RuntimeError as e:  # torch's zip writer replaces a failed write's OSError (disk full) by its own
            if isinstance(e.__context__, OSError):
                raise e.__context__ from e
            raise


def temporary_dir(final: Path) -> Path:
    """An empty hidden directory beside ``final`` to write it in before renaming it into place.
    ``mkdir`` gives it the permissions the umask allows, like any directory the user makes
    (``tempfile.mkdtemp`` would give 0700); the process id keeps it apart from other writers'."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    if tmp.exists():  # this process's own, from a write that failed before removing it
        shutil.rmtree(tmp)
    tmp.mkdir(mode=0o777)
    return tmp


def set_aside(damaged: list[Path], instead: Path) -> list[Path]:
    """Rename each damaged checkpoint ``<name>.corrupt`` (or ``.corrupt-<time>`` if taken): kept
    for inspection, no longer a checkpoint of the run. Then point ``checkpoint_last`` at
    ``instead`` (the one resumed from), so that it never names a checkpoint set aside. Returns
    the new paths."""
    moved = []
    for checkpoint in damaged:
        aside = checkpoint.with_name(f"{checkpoint.name}.corrupt")
        if aside.exists():
            aside = checkpoint.with_name(f"{checkpoint.name}.corrupt-{time.time_ns()}")
        os.replace(checkpoint, aside)
        moved.append(aside)
    _point_last(instead.parent, instead)
    return moved


def read_checkpoint(path: str | os.PathLike, model: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    """(trainer state, model weights) of a checkpoint directory, checked against its recorded
    checksums. Raises :class:`w2v2.checkpoint.CheckpointError` naming the file for anything
    missing (any of :data:`REQUIRED_FILES` or of the files its checksums list), truncated or
    corrupted; changes nothing (``model`` only says how weights are stored)."""
    from .checkpoint import CheckpointError
    from .safeload import torch_load

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing (a training checkpoint holds {', '.join(REQUIRED_FILES)}; "
                                  "this one is incomplete or damaged)")
    try:
        verify_checksums(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    state = torch_load(path / STATE_FILE)  # the checks of every other torch file: no code, bounded memory
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise CheckpointError(f"{path / STATE_FILE}: not a trainer state (expected the keys {', '.join(STATE_KEYS)})")
    try:
        weights = read_model_weights(model, path)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the model weights ({type(e).__name__}: {e})") from e
    return state, weights


def _fsync_tree(directory: Path) -> None:
    for p in directory.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(directory)


def _remove_dir(directory: Path) -> None:
    """Rename, then delete: a crash midway leaves a hidden temporary name, never a half-deleted
    checkpoint that looks complete (removed at the next start)."""
    doomed = directory.with_name(f".{directory.name}.deleting-{os.getpid()}")
    os.replace(directory, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_stale_entries(run_dir: Path) -> None:
    """Remove what killed runs left in ``run_dir``: atomic writers' temporary files whose writer is
    gone (:func:`w2v2.fileio.remove_stale_temporaries`: a concurrent ``w2v2 plot`` writing there
    keeps its own), and the hidden directories and links of interrupted checkpoint saves and
    deletions, ``best/`` replacements and ``checkpoint_last`` updates: only the process holding
    the run's :class:`RunLock` makes those, so at its start every one is stale. Everything else
    in the directory, the user's files included, is left alone."""
    remove_stale_temporaries(run_dir)
    best, previous_best = run_dir / "best", run_dir / ".best.old"
    if previous_best.is_dir() and not best.exists():  # killed between the two renames of a best/ update
        os.replace(previous_best, best)
    for entry in os.scandir(run_dir):
        if not entry.name.startswith(_LOCKED_TEMPORARIES):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


class RunLock:
    """One training process per run directory: two would interleave checkpoints and metric rows,
    and each would take the other's temporaries for a killed run's. An exclusive ``flock`` on
    ``RUN_DIR/.w2v2.lock``, released by the system when the process ends however it ends (no
    stale lock after kill -9). The same process may take it again (counted), e.g. a Python
    session training one run after another. Where the file system has no locks, a warning."""

    _held: dict[Path, list] = {}  # lock file -> [file descriptor, holders] of this process

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir).resolve() / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        if self.held:
            return
        entry = RunLock._held.get(self.path)
        if entry is None:
            entry = RunLock._held[self.path] = [self._lock(), 0]
        entry[1] += 1
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        entry = RunLock._held[self.path]
        entry[1] -= 1
        if entry[1] == 0:
            del RunLock._held[self.path]
            if entry[0] is not None:
                os.close(entry[0])

    def _lock(self) -> int | None:
        try:
            import fcntl
        except ImportError:  # Windows: no flock
            return None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, host = os.read(fd, 200).decode(errors="replace").strip().partition("@")
            os.close(fd)
            raise RunError(f"{self.path.parent}: another process (pid {pid or '?'} on {host or '?'}) is training "
                           "in this run directory; wait for it to end, or choose another directory") from None
        except OSError as e:  # e.g. a network file system without locks
            log.warning("%s: cannot lock the run directory (%s); make sure no other process trains in it",
                        self.path.parent, e.strerror)
            os.close(fd)
            return None
        with contextlib.suppress(OSError):  # who holds it is for messages only (a full disk has no room)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode())
        return fd


def _point_last(run_dir: Path, target: Path) -> None:
    """Atomically repoint ``checkpoint_last`` (a relative symlink) at ``target``."""
    tmp = run_dir / f".{LAST}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(target.name, tmp)
    os.replace(tmp, run_dir / LAST)
    _fsync_dir(run_dir)


# ---------------------------------------------------------------------------- metric files


class MetricLog:
    """One row per update to ``metrics.jsonl`` and ``metrics.csv`` (columns fixed by the first
    row; later new keys go to the JSONL only), optionally TensorBoard. On resume, rows past the
    checkpoint's update (written by the interrupted run) are dropped first."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = False):
        self.jsonl, self.csv_path = run_dir / "metrics.jsonl", run_dir / "metrics.csv"
        self.columns: list[str] | None = None
        if resume_step is None:
            for p in (self.jsonl, self.csv_path):
                p.unlink(missing_ok=True)
        else:
            self._truncate(resume_step)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.warning("TensorBoard is not installed (pip install 'w2v2[tensorboard]'): not logging to it")

    def _truncate(self, step: int) -> None:
        rows = read_metrics(self.jsonl.parent) if self.jsonl.exists() else []
        rows = [r for r in rows if isinstance(r, dict) and r.get("update", 0) <= step]
        with atomic_open(self.jsonl) as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        if self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = reader.fieldnames
                kept = [r for r in reader  # a row torn by a crash lacks fields: dropped
                        if None not in r.values() and None not in r and float(r.get("update") or 0) <= step]
            with atomic_open(self.csv_path) as f:
                writer = csv.DictWriter(f, self.columns, extrasaction="ignore", restval="")
                writer.writeheader()
                writer.writerows(kept)

    def write(self, row: dict) -> None:
        try:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
            new = self.columns is None
            if new:
                self.columns = list(row)
            with open(self.csv_path, "a", newline="") as f:
                writer = csv.DictWriter(f, self.columns, extrasaction="ignore", restval="")
                if new:
                    writer.writeheader()
                writer.writerow(row)
        except OSError as e:  # disk full: a torn last row is dropped on resume
            raise RunError(f"{e.filename or self.jsonl}: cannot write the metrics ({e.strerror or e})") from e
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "update":
                    self.tb.add_scalar(k, v, row["update"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """All rows of a run's ``metrics.jsonl`` (a torn last line is ignored)."""
    rows = []
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows
