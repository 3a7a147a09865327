#!/usr/bin/env bash
# Pretrain the `small` preset on the unlabeled audio of $W2V2_DATA (default ../shared/data; speechocean762 training
# speakers + librispeech-unlabeled; dev/test audio left out, transcripts unused) on a CPU for a fixed
# wall-clock budget, then render the figures. Results: docs/pretraining.md (30 minutes on one thread:
# accuracy of the positive 0.03 -> 0.21, chance 0.01).
#
#   recipes/pretrain_small.sh                      # 30 minutes into runs/pretrain_cpu30
#   MINUTES=60 OUT=/tmp/run THREADS=2 recipes/pretrain_small.sh
#   recipes/pretrain_small.sh --resume             # continue an interrupted run (same directory)
#
# Extra arguments go to `w2v2 pretrain`. Ctrl-C (or SIGTERM) finishes the current update, saves a
# checkpoint and exits; the final model is RUN_DIR/checkpoint_last (a Hugging Face directory).
# Keep THREADS x (jobs running at once) <= cores: oversubscribed PyTorch threads spin and can make
# training tens of times slower.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DATA=${DATA:-${W2V2_DATA:-$(realpath -m ../shared/data)}}
SPLITS=${SPLITS:-runs/splits}
OUT=${OUT:-runs/pretrain_cpu30}
MINUTES=${MINUTES:-30}
export OMP_NUM_THREADS=${THREADS:-1}

[ -f "$SPLITS/train-all.tsv" ] || "$PYTHON" recipes/make_splits.py --data "$DATA" "$SPLITS"
"$PYTHON" -m w2v2 pretrain "$SPLITS/train-all.tsv" "$DATA/librispeech-unlabeled/manifest.tsv" --out "$OUT" \
    --config recipes/configs/pretrain_small_cpu.json --max-minutes "$MINUTES" --no-progress "$@"
"$PYTHON" -m w2v2 plot "$OUT"
