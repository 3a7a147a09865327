"""A training run's directory: checkpoints, metric files and the RNG state that makes resuming exact.

    RUN_DIR/
      train_config.json          the TrainConfig of the (last) invocation
      metrics.jsonl, metrics.csv one row per update
      checkpoint_0000100/        model (Hugging Face layout for a Wav2Vec2) + trainer_state.pt
                                 + checksums.json (the SHA-256 of every file in it)
      checkpoint_last -> checkpoint_0000100

A checkpoint is written into a temporary directory, fsynced, then renamed into place, and
``checkpoint_last`` is repointed with an atomic rename: a crash leaves the previous checkpoint
intact and never a half-written one under a checkpoint's name. :func:`read_checkpoint` checks
the recorded checksums, so a damaged checkpoint (disk error, truncation) is detected on resume
(the trainer then falls back to the previous one). ``trainer_state.pt`` holds only tensors,
numbers, strings, lists and dicts, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .fileio import _fsync_dir, atomic_open, verify_checksums, write_checksums

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint_"
LAST = "checkpoint_last"
STATE_FILE = "trainer_state.pt"
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


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint_NNNNNNN`` directories of a run, oldest first."""
    found = [p for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*")
             if p.is_dir() and not p.is_symlink() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def last_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``checkpoint_last`` points to (or the newest complete one), else None."""
    link = Path(run_dir) / LAST
    if link.is_symlink() and (link.resolve() / STATE_FILE).exists():
        return link.resolve()
    complete = [p for p in checkpoint_dirs(run_dir) if (p / STATE_FILE).exists()]
    return complete[-1] if complete else None


def save_model_weights(model: nn.Module, directory: Path) -> None:
    """A :class:`Wav2Vec2` via ``save_pretrained`` (Hugging Face layout); other modules as safetensors."""
    from .checkpoint import save_pretrained
    from .model import Wav2Vec2

    if isinstance(model, Wav2Vec2):
        save_pretrained(model, directory)
    else:
        from safetensors.torch import save_file
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(directory / "model.safetensors"))


def read_model_weights(model: nn.Module, directory: Path) -> dict[str, Tensor]:
    """The state dict written by :func:`save_model_weights` for a model like ``model`` (not loaded into it)."""
    from .checkpoint import load_model
    from .model import Wav2Vec2

    if isinstance(model, Wav2Vec2):
        return load_model(directory).state_dict()
    from safetensors.torch import load_file
    return load_file(str(directory / "model.safetensors"))


def load_model_weights(model: nn.Module, directory: Path) -> None:
    """Load weights written by :func:`save_model_weights` into ``model`` in place (exactly)."""
    model.load_state_dict(read_model_weights(model, directory), strict=True)


def write_checkpoint(run_dir: Path, step: int, model: nn.Module, state: Callable[[], dict], keep_last: int = 0,
                     resumed_from: Path | None = None) -> Path:
    """Write ``run_dir/checkpoint_<step>`` atomically (temp dir, checksums, fsync, rename): the
    model and ``state()`` (the trainer state, asked for after the weights are written) as
    ``trainer_state.pt``. Then repoint ``checkpoint_last`` and drop the oldest checkpoints beyond
    ``keep_last`` (0 keeps all). ``resumed_from``: the checkpoint the run resumed from; if it is
    this step's, nothing happened since and it is only repointed."""
    final = run_dir / f"{CHECKPOINT_PREFIX}{step:07d}"
    if final == resumed_from:  # nothing happened since the resume: it is this very state
        _point_last(run_dir, final)
        return final
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{final.name}."))
    try:
        save_model_weights(model, tmp)
        with atomic_open(tmp / STATE_FILE, "wb") as f:
            torch.save(state(), f)
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
    if keep_last > 0:
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            _remove_dir(old)
    log.info("saved %s", final)
    return final


def read_checkpoint(path: str | os.PathLike, model: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    """(trainer state, model weights) of a checkpoint directory, checked against its recorded
    checksums. Raises :class:`w2v2.checkpoint.CheckpointError` naming the file for anything
    missing, truncated or corrupted; changes nothing (``model`` only says how weights are stored)."""
    from .checkpoint import CheckpointError

    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path}: not a training checkpoint (no {STATE_FILE})")
    try:
        verify_checksums(path)  # checkpoints of older versions have none: nothing to verify
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # truncation and corruption surface as many exception types
        raise CheckpointError(f"{path / STATE_FILE}: truncated or corrupted ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
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
