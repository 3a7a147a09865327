#!/usr/bin/env bash
# The speed tables of docs/performance.md on a CUDA GPU, in one call of about 6-8 minutes (the
# `device` tool: one prepared call, then give the machine back). Writes $OUT/*.txt.
#
#   OUT=$OUT benchmarks/gpu_tables.sh                  # on the GPU machine, repository root
#
# 1. cuda_check.py: correctness (fp32 parity, padded batch, auto -> bf16, gradients), the device's
#    matmul peak, inference (1 x 10 s, 1 x 60 s, 8 x 10 s; fp32, bf16, bf16 + torch.compile) and
#    training updates (CTC frozen/trained, pretraining) with GFLOP/s and model-FLOPs utilisation;
# 2. pretrain.py --device cuda: pretraining update time and peak GPU memory, one process per variant;
# 3. transcribe.py --device cuda: RTF and memory against transformers' pipeline, bf16 and fp32,
#    on real speech when a folder of clips is carried as .gpu/clips (skipped otherwise).
# Wheels missing from the GPU image (soundfile, soxr, jiwer, ...) install from .gpu/whl when carried.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
if ls .gpu/whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-deps --no-index .gpu/whl/*.whl 2>&1 | tail -2; fi
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  git log --oneline -1 2>/dev/null; } | tee "$OUT/machine.txt"
timeout 300 python3 benchmarks/cuda_check.py --quick 2>&1 | grep -v -E "Writing|Loading" | tee "$OUT/cuda_check.txt"
timeout 150 python3 benchmarks/pretrain.py --device cuda --repeats 5 2>&1 | grep -v Writing | tee "$OUT/pretrain.txt"
if [ -d .gpu/clips ]; then
  for prec in bf16 fp32; do
    timeout 90 python3 benchmarks/transcribe.py --device cuda --precision $prec --sizes 60s,20min \
      --audio-dir .gpu/clips 2>&1 | grep -v -E "Writing|Loading" | tee "$OUT/transcribe_$prec.txt"
  done
fi
