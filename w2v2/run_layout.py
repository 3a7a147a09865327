"""The names in a training run directory: numbered checkpoints and ``checkpoint_last``.

The one place that knows how a checkpoint directory is named and how checkpoints are ordered;
both :mod:`w2v2.runs` (which writes them) and :mod:`w2v2.checkpoint` (which loads a run directory
as a model) read them from here.
"""

from __future__ import annotations

import os
from pathlib import Path

CHECKPOINT_PREFIX = "checkpoint_"
LAST = "checkpoint_last"


def checkpoint_name(step: int) -> str:
    """``checkpoint_0000100``: seven digits, so that listings of runs up to 10 million updates
    sort by step too (the code never relies on that: see :func:`checkpoint_step`)."""
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def checkpoint_step(name: str) -> int | None:
    """The update number a checkpoint directory's name holds, None for any other name."""
    digits = name[len(CHECKPOINT_PREFIX):]
    if name.startswith(CHECKPOINT_PREFIX) and digits.isascii() and digits.isdigit():
        return int(digits)
    return None


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint_<step>`` directories of a run as ``run_dir/<name>``, oldest first by update
    number (not by name: ``checkpoint_10000000`` comes after ``checkpoint_9999999``). Links,
    files, set-aside (``.corrupt``) and foreign names are not checkpoints."""
    run_dir = Path(run_dir)
    try:
        entries = list(os.scandir(run_dir))
    except OSError:
        return []
    found = [(step, run_dir / e.name) for e in entries
             if (step := checkpoint_step(e.name)) is not None and e.is_dir(follow_symlinks=False)]
    return [path for _, path in sorted(found)]
