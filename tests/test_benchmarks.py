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


def test_forward_ops_benchmark_tiny_run():
    out = run("benchmarks/forward_ops.py", "--preset", "tiny", "--lengths", "1", "--repeats", "1", "--transformers")
    kernels = table_rows(out, "1 s")[:4]
    assert [r[1:3] for r in kernels] == [["bf16", "flash (SDPA)"], ["bf16", "blocked oneDNN"], ["fp32", "flash (SDPA)"],
                                         ["fp32", "blocked oneDNN"]], out
    ops = [r for r in table_rows(out, "1 s") if r[1] in ("bf16", "fp32") and r[2] not in ("flash (SDPA)", "blocked oneDNN")]
    assert len(ops) == 20 and sum(float(r[3]) for r in ops) > 0, out
    assert "transformers fp32, one profiled pass" in out


def test_serve_load_quick_run_prints_both_phases(data_dir):
    pytest.importorskip("fastapi")
    out = run("benchmarks/serve_load.py", "--quick", "--seconds", "4", "--threads", "1")
    rows = {r[0]: r for r in table_rows(out, "1 ") + table_rows(out, "2 ")}
    assert set(rows) == {"1", "2"}, out
    for r in rows.values():
        assert int(r[1]) > 0 and r[2] == "0" and float(r[3]) > 0 and r[-1] == "0", out


def test_scale_costs_quick_run_counts_what_a_hand_computation_gives():
    out = run("benchmarks/scale_costs.py", "--quick")
    counted = {r[1]: r for r in table_rows(out, "BASE (tiny)")}

    def conv_frames(samples: int) -> list[int]:  # the standard feature encoder: 20 ms frames, 25 ms field
        out = []
        for k, s in zip((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)):
            samples = (samples - k) // s + 1
            out.append(samples)
        return out

    def frames(samples: int) -> int:
        return conv_frames(samples)[-1]

    # One layer's FFN in the tiny preset: two products frames x 32 x 64, 2 FLOPs per multiply-add; a
    # training step adds the backward's two products per product (input and weight gradients), and
    # with the Transformer frozen (the recipe's first updates) the backward does not reach it.
    for step, samples, passes in (("inference 30 s", 480_000, 1), ("inference 10 s", 160_000, 1),
                                  ("fine-tuning", 240_000, 3), ("fine-tuning, Transformer frozen", 240_000, 1),
                                  ("pretraining", 250_000, 3)):
        ffn = passes * 2 * (2 * frames(samples) * 32 * 64)
        assert float(counted[step][6]) == pytest.approx(ffn / 1e9, rel=1e-3), (step, out)
    # The counted inference forward is harness.forward_flops' analytic count of the same model.
    for step in ("inference 10 s", "inference 30 s"):
        assert float(counted[step][3]) == pytest.approx(float(counted[step][5]), rel=2e-3), out
    # A fine-tuning step: the forward, and twice the forward of all but the frozen feature encoder (32
    # channels) in the backward. Also holds for the grouped positional convolution, whose weight
    # gradient PyTorch's own formula counts 4x (groups) too high in the tiny preset.
    widths = zip(conv_frames(240_000), (1, 32, 32, 32, 32, 32, 32), (10, 3, 3, 3, 3, 2, 2))
    encoder = sum(2 * t * 32 * cin * k for t, cin, k in widths)
    forward = float(counted["fine-tuning"][5]) * 1e9
    assert float(counted["fine-tuning"][3]) * 1e9 == pytest.approx(3 * forward - 2 * encoder, rel=1e-3), out

    jobs = {(r[0], r[1]): r for r in table_rows(out, "pretrain") + table_rows(out, "fine-tune")
            + table_rows(out, "transcribe")}
    assert len(jobs) == 12, out
    # The update count, not the corpus, sets pretraining cost; epochs = updates x 1.4 M x 64 samples / corpus.
    assert jobs[("pretrain, 960 h", "BASE")][5] == jobs[("pretrain, 60 k h", "BASE")][5]
    assert float(jobs[("pretrain, 960 h", "BASE")][4]) == pytest.approx(400_000 * 1.4e6 * 64 / 16000 / 3600 / 960,
                                                                       rel=1e-2)
    # 10 min of labels is 9.6 M samples: one update fills 3 GPUs of 3.2 M samples, however many there are.
    assert jobs[("fine-tune, 10 min", "BASE")][3] == "600 s" and "(3 busy)" in jobs[("fine-tune, 10 min", "BASE")][-2]
    # Transcription: 10 k hours in 30 s chunks every 20 s, at the counted FLOPs per second of a 30 s chunk.
    per_second = float(counted["inference 30 s"][4]) * 1e9
    assert float(jobs[("transcribe, 10 k h", "BASE")][5]) == pytest.approx(10_000 * 3600 * 1.5 * per_second / 1e18,
                                                                          rel=1e-2), out


def test_manifest_scale_quick_run(data_dir):
    out = run("benchmarks/manifest_scale.py", "--sizes", "1200", "--quick", "--workers", "1", "--files", "3",
              "--data", str(data_dir / "librispeech-unlabeled"))
    rows = table_rows(out, "1200")
    assert len(rows) == 1 and float(rows[0][4]) > 0 and float(rows[0][5]) > 0 and rows[0][7], out


def test_data_formats_quick_run_prints_both_sources(data_dir):
    out = run("benchmarks/data_formats.py", "--data", str(data_dir), "--limit", "40", "--workers", "1")
    rows = {r[0]: r for r in table_rows(out, "files") + table_rows(out, "tar")}
    assert set(rows) == {"files (TSV)", "tar shards"}, out
    assert rows["files (TSV)"][3] == rows["tar shards"][3] == "40"  # every utterance, once, from either source


def test_shard_plan_quick_run():
    out = run("benchmarks/shard_plan.py", "--utterances", "20000")
    rows = table_rows(out, "1 x 4") + table_rows(out, "8 x 4")
    assert len(rows) == 2 and int(rows[0][2]) > 7 * int(rows[1][2]), out  # 8 ranks share the batches
