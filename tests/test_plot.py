"""Plots of a run directory: every figure renders, the registry takes new figures, the CLI lists PNGs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from w2v2 import plot, pretrain
from w2v2.cli import main

from .helpers import write_clips


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot")
    write_clips(root / "clips", [1.0, 1.2, 1.4, 1.6])
    cfg = pretrain.preset_config("tiny", {"train": {"max_updates": 4, "progress": False},
                                          "data": {"max_tokens": 40_000, "inputs": [str(root / "clips")]}})
    good, _ = pretrain.prepare_data([root / "clips"], cfg)
    pretrain.build_trainer(good, root / "run", cfg).train()
    return root / "run"


def test_all_pretraining_figures_render(run_dir, tmp_path):
    paths = plot.render(run_dir, tmp_path)
    assert sorted(p.name for p in paths) == ["codebook.png", "codebook_usage.png", "losses.png", "utterance.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_registry_takes_new_figures_and_skips_inapplicable(run_dir, tmp_path):
    @plot.register("test_wer")
    def wer(ctx):
        if ctx.series("wer") is None:  # not a fine-tuning run: nothing to draw
            return None
        raise AssertionError("pretraining runs log no WER")

    @plot.register("test_lr")
    def lr(ctx):
        fig, ax = plot.subplots(figsize=(4, 3))
        ax.plot(*ctx.series("lr"))
        return fig

    try:
        paths = plot.render(run_dir, tmp_path, names=["test_wer", "test_lr"])
        assert [p.name for p in paths] == ["test_lr.png"]
    finally:
        del plot.FIGURES["test_wer"], plot.FIGURES["test_lr"]
    with pytest.raises(ValueError, match="unknown figures"):
        plot.render(run_dir, tmp_path, names=["nope"])


def test_cli_plot(run_dir, tmp_path, capsys):
    assert main(["plot", str(run_dir), "--out", str(tmp_path), "--only", "losses", "codebook"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "losses.png"), str(tmp_path / "codebook.png")]
    assert main(["plot", str(tmp_path / "nothing")]) == 1


def test_importing_and_plotting_leave_the_matplotlib_backend_alone(run_dir, tmp_path):
    """A notebook's backend survives ``import w2v2``, ``w2v2.plot`` and a rendered figure."""
    code = ("import matplotlib; matplotlib.use('svg'); import w2v2, w2v2.plot, w2v2.probe, w2v2.cli; "
            f"w2v2.plot.render({str(run_dir)!r}, {str(tmp_path)!r}, names=['losses']); "
            "print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split()[-1] == "svg"
