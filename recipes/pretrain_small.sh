#!/usr/bin/env bash
# Pretrain the `small` preset on all the audio under /work/shared/data (transcripts unused), on CPU,
# for a fixed wall-clock budget; then render the figures. Results: docs/pretraining.md.
#
#   recipes/pretrain_small.sh                      # 25 minutes into /work/runs/pretrain_small
#   MINUTES=60 OUT=/tmp/run recipes/pretrain_small.sh --lr 1e-3
#   recipes/pretrain_small.sh --resume             # continue an interrupted run (same directory)
#
# Extra arguments go to `w2v2 pretrain`. Ctrl-C (or SIGTERM) finishes the current update, saves a
# checkpoint and exits; the final model is RUN_DIR/checkpoint_last (a Hugging Face directory).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DATA=${DATA:-/work/shared/data}
OUT=${OUT:-/work/runs/pretrain_small}
MINUTES=${MINUTES:-25}

"$PYTHON" -m w2v2 pretrain "$DATA"/*/ --out "$OUT" --preset small --max-minutes "$MINUTES" --no-progress "$@"
"$PYTHON" -m w2v2 plot "$OUT"
