"""The benchmark scripts run end to end in their dry modes (tiny models on the CPU), so that a GPU
session's one prepared call does not die on a script error, and their tables hold numbers."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from .conftest import ROOT

pytest.importorskip("transformers")


def run(*args: str, timeout: float = 600) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell}")]


def test_cuda_check_dry_run_prints_every_table():
    out = run("benchmarks/cuda_check.py", "--dry", "--quick")
    diffs = [float(m) for m in re.findall(r"fp32 max\|Δlogit\| vs transformers: (\S+)", out)]
    grads = [float(m) for m in re.findall(r"gradients vs transformers: worst relative diff (\S+)", out)]
    assert len(diffs) == 2 and max(diffs) < 1e-4, out
    assert len(grads) == 2 and max(grads) < 1e-3, out
    assert len(table_rows(out, "1 x 10 s")) == 2  # inference, compile
    assert len(table_rows(out, "CTC")) == 11 and len(table_rows(out, "pretraining")) == 6  # 10 + compiled update
    compiled_update = table_rows(out, "CTC BASE frozen")
    assert len(compiled_update) == 1 and compiled_update[0][-1].endswith("%)"), out
    cold = {r[0]: r[1:] for r in table_rows(out, "tf ") + table_rows(out, "ours ")}
    assert set(cold) == {"tf fp32", "tf bf16", "ours fp32", "ours bf16", "ours bf16 channels-last"}
    assert all(c.endswith(" ms") for cells in cold.values() for c in cells), cold
    assert "First call on a new shape (40 s), ours bf16" in out


def test_pretrain_benchmark_dry_run():
    out = run("benchmarks/pretrain.py", "--dry", "--quick")
    rows = table_rows(out, "base") + table_rows(out, "small")
    assert len(rows) == 4 and all(r[4].endswith("x") and "failed" not in r for r in rows), out


def test_overhead_benchmark_quick_run():
    out = run("benchmarks/overhead.py", "--repeats", "3")
    rows = {r[0]: r[1:] for r in table_rows(out, "transformers") + table_rows(out, "ours")}
    assert set(rows) == {"transformers fp32", "transformers bf16 autocast", "ours fp32", "ours fast"}, out
    assert all(float(r[0]) > 0 and int(r[2]) > 100 for r in rows.values()), out


def test_serve_load_quick_run_prints_both_phases(data_dir):
    pytest.importorskip("fastapi")
    out = run("benchmarks/serve_load.py", "--quick", "--seconds", "4", "--threads", "1")
    rows = {r[0]: r for r in table_rows(out, "1 ") + table_rows(out, "2 ")}
    assert set(rows) == {"1", "2"}, out
    for r in rows.values():
        assert int(r[1]) > 0 and r[2] == "0" and float(r[3]) > 0 and r[-1] == "0", out
