"""Reading model files that may be damaged or hostile: every failure is one line naming the file
(:class:`CheckpointError`), nothing in a file runs as code, nothing blocks (FIFOs, devices), and
memory stays bounded by the files' sizes, never by what they declare."""

from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
from pathlib import Path

import torch

MAX_JSON_BYTES = 64 << 20  # config, vocabulary and preprocessor files are kilobytes


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


def regular_file(path: Path) -> Path:
    """``path`` when it is a regular file: a FIFO would block, a device would never end."""
    try:
        if path.is_file():
            return path
        path.stat()
    except OSError as e:
        raise CheckpointError(f"{path}: {os.strerror(e.errno) if e.errno else e}") from None
    raise CheckpointError(f"{path}: not a regular file")


def read_json(path: Path) -> object:
    """A small JSON file; every failure is one line naming the file."""
    regular_file(path)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes, too large for a settings file")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start})") from e
    except ValueError as e:  # JSONDecodeError, and numbers too long to convert
        raise CheckpointError(f"{path}: invalid JSON: {e}") from e
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deeply") from None


def torch_load(path: Path, allowed: list | None = None) -> object:
    """``torch.load`` with ``weights_only=True`` (plus the ``allowed`` classes), so that no code in the
    file runs. A zip archive (what torch.save writes) is checked first: what its directory declares
    must fit in the file, so that nothing is inflated to more memory than the file's size; its
    tensors are then mapped, not read, and only those used are read (not an optimizer's state)."""
    regular_file(path)
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        _check_zip(path)
    try:
        with torch.serialization.safe_globals(allowed or []), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on odd pickles: the error below says what is wrong
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as e:  # truncation and corruption surface as many exception types
        # pickle.UnpicklingError: the weights-only unpickler met something else than data (the
        # pickle module itself stays out of the code: nothing here unpickles on its own)
        found = re.search(r"GLOBAL (\S+)", str(e)) if type(e).__name__ == "UnpicklingError" else None
        if found and found.group(1).startswith("omegaconf.") and not _has_omegaconf():
            raise CheckpointError(f"{path}: its options are an omegaconf DictConfig (fairseq of 2020-2021); "
                                  f"pip install omegaconf to read them") from None
        if found:
            raise CheckpointError(f"{path}: not a safe weights file: it holds pickled {found.group(1)}, beyond "
                                  f"tensors and plain data, which loading could run as code; refused") from None
        detail = re.search(r"WeightsUnpickler error: (.*)", str(e))  # torch's one useful line of many
        if detail:
            raise CheckpointError(f"{path}: corrupted, or not a weights file ({detail.group(1)})") from None
        raise CheckpointError(f"{path}: corrupted or truncated ({type(e).__name__}: {first_line(e)})") from e


def _check_zip(path: Path) -> None:
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            entries = z.infolist()
    except Exception as e:  # a damaged directory surfaces as many types (BadZipFile, NotImplementedError, ...)
        raise CheckpointError(f"{path}: corrupted or truncated ({type(e).__name__}: {first_line(e)})") from e
    packed = [i.filename for i in entries if i.compress_type != zipfile.ZIP_STORED]
    if packed:  # torch.save stores; an entry that inflates could be of any size
        raise CheckpointError(f"{path}: {packed[0]} is compressed, which torch.save never does; refused "
                              f"(unpacking it could take unbounded memory)")
    declared = sum(i.file_size for i in entries)
    if declared > size:
        raise CheckpointError(f"{path}: its zip directory declares {declared} bytes of contents in a {size}-byte "
                              f"file; refused")


def _has_omegaconf() -> bool:
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        return False
    return True


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
