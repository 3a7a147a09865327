#!/usr/bin/env bash
# GPU checks for transcription, in one call on a machine with a CUDA GPU and no network:
# the CUDA tests (skipped elsewhere), the benchmark on the GPU in fp32 and bf16, and the CPU
# benchmark on that machine's idle cores. Results go to $OUT (or ./device-out).
#
# Prepare on a machine with network, in the repository root (both folders are git-ignored):
#   pip download av soundfile soxr --python-version 3.12 --only-binary=:all: --no-deps \
#       --platform manylinux_2_28_x86_64 -d .whl        # audio dependencies missing from a CUDA image
#   python -c "..."  # or copy ~2 minutes of 16 kHz speech wavs into build/clips/
# then run it there with .whl and build carried along.
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}; mkdir -p "$OUT"
echo "checkout: $(git rev-parse --abbrev-ref HEAD 2>/dev/null) $(git log --oneline -1 2>/dev/null)"
if ls .whl/*.whl >/dev/null 2>&1; then python3 -m pip install --no-deps --no-index -q .whl/*.whl 2>&1 | tail -2; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
CLIPS=${CLIPS:-build/clips}
python3 -m pytest -q -p no:cacheprovider tests/test_emissions.py tests/test_transcribe.py -k cuda -rs 2>&1 \
  | tail -6 | tee "$OUT/pytest_cuda.txt"
for prec in fp32 bf16; do
  python3 benchmarks/transcribe.py --device cuda --precision $prec --sizes 60s,20min,60min --audio-dir "$CLIPS" 2>&1 \
    | grep -v -E "Writing|Loading" | tee "$OUT/gpu_$prec.txt"
done
python3 benchmarks/transcribe.py --sizes 10s,60s,20min --audio-dir "$CLIPS" 2>&1 \
  | grep -v -E "Writing|Loading" | tee "$OUT/cpu.txt"
