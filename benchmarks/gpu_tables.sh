#!/usr/bin/env bash
# The speed tables of docs/performance.md on a CUDA GPU, in one call (the `device` tool: one
# prepared call, then give the machine back). Writes $OUT/*.txt, each step's output as it comes.
#
#   OUT=$OUT DEADLINE=560 benchmarks/gpu_tables.sh     # on the GPU machine, repository root
#
# Steps, most wanted first; each gets at most its own limit and what is left of DEADLINE seconds
# (default 560), and a step with under 20 s left is skipped, so a slow step costs the later ones,
# never the whole call (limits from the H200 run of 2026-11-27, benchmarks/results/):
#   cuda_check.py (correctness: fp32 parity, padded batch, auto -> bf16, gradients; the device's
#     matmul peak; inference 1 x 10 s, 1 x 60 s, 8 x 10 s in fp32 and bf16; CTC (frozen/trained)
#     and pretraining updates with GFLOP/s and model-FLOPs utilisation, also BASE at 4 x 22 s): ~75 s;
#   cuda_check.py --parts cold (first and second calls of each variant in a fresh process, on a
#     first and a new input shape, and a profile of a first call: the one-time cost of bf16, with
#     our convolutions channels first (now the GPU default) and channels-last (the first run's));
#   overhead.py --device cuda (host time and launches per call on a skinny BASE): ~15 s;
#   transcribe.py --device cuda --precision bf16 --warm (RTF and memory against transformers'
#     pipeline, setup timed apart, on real speech when a folder of clips is carried as .gpu/clips;
#     skipped otherwise): each engine and input is a fresh process, ~15-20 s each before any work;
#   pretrain.py --device cuda (update time and peak GPU memory, one process per variant);
#   transcribe.py --device cuda --precision fp32 --warm;
#   the CUDA tests of the test suite (skipped on machines without a GPU): ~12 s;
#   cuda_check.py --parts compile (ours in bf16, eager against torch.compile with CUDA graphs:
#     inference, ~25-30 s of compiling per input shape, then one CTC update, forward and backward
#     compiled).
# Wheels missing from the GPU image (soundfile, soxr, jiwer, ...) install from .gpu/whl when carried.
# Prepare both once, here (.gpu/ is git-ignored; carry .gpu/whl and .gpu/clips):
#   cp -r ../shared/data/librispeech-unlabeled .gpu/clips
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .gpu/whl soundfile soxr jiwer rapidfuzz cffi pycparser
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
DEADLINE=${DEADLINE:-560}
START=$SECONDS
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
LOG="$OUT/machine.txt"

step() {  # step NAME MAX_SECONDS COMMAND...: run it with what is left, its output to $OUT/NAME.txt
  local name=$1 max=$2; shift 2
  local left=$((DEADLINE - (SECONDS - START)))
  local limit=$((max < left ? max : left))
  if [ "$limit" -lt 20 ]; then echo "$name: skipped, ${left} s left" | tee -a "$LOG"; return; fi
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@" 2>&1 | grep --line-buffered -v -E "Writing|Loading" | tee "$OUT/$name.txt"
  echo "$name: exit ${PIPESTATUS[0]}, $((SECONDS - t0)) s (limit $limit s)" | tee -a "$LOG"
}

if ls .gpu/whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-deps --no-index .gpu/whl/*.whl 2>&1 | tail -2; fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  nproc; } | tee "$LOG"

step cuda_check 120 python3 benchmarks/cuda_check.py --parts correctness,inference,training
step cold 120 python3 benchmarks/cuda_check.py --parts cold
step overhead 40 python3 benchmarks/overhead.py --device cuda
if [ -d .gpu/clips ]; then
  step transcribe_bf16 150 python3 benchmarks/transcribe.py --device cuda --precision bf16 --warm \
    --sizes 60s,20min,60min --audio-dir .gpu/clips
fi
step pretrain 120 python3 benchmarks/pretrain.py --device cuda --repeats 5
if [ -d .gpu/clips ]; then
  step transcribe_fp32 100 python3 benchmarks/transcribe.py --device cuda --precision fp32 --warm \
    --sizes 60s,20min --audio-dir .gpu/clips
fi
step pytest_cuda 30 python3 -m pytest -q -p no:cacheprovider -rs -k cuda tests/test_emissions.py tests/test_transcribe.py
step compile 200 python3 benchmarks/cuda_check.py --parts compile
echo "total $((SECONDS - START)) s" | tee -a "$LOG"
