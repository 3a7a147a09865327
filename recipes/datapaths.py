"""Where this repository's recipes find the real speech and put their runs.

The data folder is ``$W2V2_DATA`` if set, else ``../shared/data`` beside the checkout; runs go
under ``runs/`` in the checkout (git-ignored). Recipes take both as arguments too; these are only
their defaults, kept in one place.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """The real-speech folder: ``$W2V2_DATA``, else ``../shared/data`` beside the checkout."""
    return Path(os.environ.get("W2V2_DATA") or ROOT.parent / "shared" / "data")


def runs_dir() -> Path:
    """The folder recipes write runs and splits into by default: ``runs/`` in the checkout."""
    return ROOT / "runs"
