"""Figures of a training run directory, rendered to PNG files (``w2v2 plot RUN_DIR``).

Each figure is a function ``(ctx: PlotContext) -> Figure | None`` registered by name with
``@register("name")`` (None: it does not apply to this run, e.g. no pretraining metrics); the
pretraining and fine-tuning figures register themselves when this package is imported, and
:func:`render` draws every applicable one. Figures are bare :class:`matplotlib.figure.Figure`
objects, never pyplot's, so the caller's matplotlib backend is left as it is.
"""

from . import finetuning, pretraining  # noqa: F401  (registers their figures)
from .core import FIGURES, PlotContext, curve, register, render, smooth, subplots

__all__ = ["FIGURES", "PlotContext", "curve", "register", "render", "smooth", "subplots"]
