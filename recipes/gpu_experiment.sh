#!/usr/bin/env bash
# The low-resource experiment and the default model, in one ~9-minute run on one GPU.
#
# Jobs share the GPU (small models leave most of it idle on their own):
#   P          pretrain `small` on the unlabeled audio (train-all audio + librispeech-unlabeled;
#              dev and test audio are left out), PRETRAIN_MIN minutes
#   S          the default-model candidate: recipes/configs/default_model.json from scratch on
#              train-all, DEFAULT_MIN minutes (starts with P, runs through)
#   F-<split>  fine-tune P on train-10min / train-1h / train-all     } start when P ends,
#   R-<split>  the same splits from random init (`small` preset)      } FINETUNE_MIN minutes each
# then greedy WER/CER of every best model on dev and test-ljspeech and fp16 exports of S, F-all
# and P (`w2v2 plot RUN_DIR` draws the curves afterwards).
# Every schedule runs on a time clock (--schedule-clock time): a fixed budget, whatever the speed.
#
#   SPLITS=runs/splits RESULTS=/tmp/exp recipes/gpu_experiment.sh
#
# SPLITS holds the manifests of recipes/make_splits.py; their paths start with DATA_FROM, which is
# rewritten to DATA (default: the same; DATA_FROM defaults to $W2V2_DATA, else ../shared/data), so that the data may travel. SCALE multiplies all times
# (a dry run on a CPU: SCALE=0.05 DEVICE=cpu).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SPLITS=${SPLITS:?folder of the split manifests}
DATA_FROM=${DATA_FROM:-${W2V2_DATA:-$(realpath -m ../shared/data)}}
DATA=${DATA:-$DATA_FROM}
RESULTS=${RESULTS:?output folder}
DEVICE=${DEVICE:-cuda}
SCALE=${SCALE:-1}
PRETRAIN_MIN=$(python3 -c "print(3.3 * $SCALE)")
DEFAULT_MIN=$(python3 -c "print(7.2 * $SCALE)")
FINETUNE_MIN=$(python3 -c "print(3.3 * $SCALE)")
PRECISION=${PRECISION:-bf16}
WORKERS=${WORKERS:-2}
EVAL_LIMIT=${EVAL_LIMIT:+--limit $EVAL_LIMIT}  # dry runs: evaluate the first N utterances only
mkdir -p "$RESULTS/manifests" "$RESULTS/logs"
for f in "$SPLITS"/*.tsv; do sed "s#$DATA_FROM#$DATA#" "$f" >"$RESULTS/manifests/$(basename "$f")"; done
M=$RESULTS/manifests
COMMON=(--device "$DEVICE" --precision "$PRECISION" --no-progress --schedule-clock time)
stamp() { echo "[$(date +%T)] $*"; }

cat >"$RESULTS/pretrain.json" <<EOF
{"train": {"lr": 1.5e-3, "max_updates": 10000, "warmup_updates": 800, "clip_norm": 10.0, "save_interval": 400,
           "keep_last": 1, "log_interval": 25},
 "loss": {"diversity_weight": 0.5, "gumbel_decay": 0.9995},
 "data": {"max_tokens": 1600000, "max_samples": 250000, "min_samples": 16000}}
EOF

stamp "P: pretraining small for $PRETRAIN_MIN min"
$PY -m w2v2 pretrain "$M/train-all.tsv" "$DATA/librispeech-unlabeled/manifest.tsv" --out "$RESULTS/P" \
    --preset small --config "$RESULTS/pretrain.json" --max-minutes "$PRETRAIN_MIN" --num-workers "$WORKERS" \
    --device "$DEVICE" --precision "$PRECISION" --no-progress --schedule-clock time >"$RESULTS/logs/P.log" 2>&1 &
P_PID=$!

stamp "S: default model from scratch for $DEFAULT_MIN min"
$PY -m w2v2 finetune --init random:recipes/configs/default_model.json --train "$M/train-all.tsv" \
    --valid "$M/dev-3spk.tsv" --out "$RESULTS/S" --max-minutes "$DEFAULT_MIN" --max-updates 100000 \
    --feature-grad-scale 1 --lr 1e-3 --clip-norm 5 --loss-norm tokens --max-tokens 3200000 \
    --mask-prob 0.4 --mask-length 10 --mask-channel-prob 0.2 --mask-channel-length 32 --layerdrop 0.05 \
    --valid-interval 300 --save-interval 100000 --num-workers "$WORKERS" "${COMMON[@]}" >"$RESULTS/logs/S.log" 2>&1 &
S_PID=$!

wait $P_PID; stamp "P ended (exit $?)"
pids=()
for split in 10min 1h all; do
    # pretrained: the fine-tuning recipe (frozen feature encoder, head alone first)
    $PY -m w2v2 finetune --init "$RESULTS/P" --train "$M/train-$split.tsv" --valid "$M/dev-3spk.tsv" \
        --out "$RESULTS/F-$split" --max-minutes "$FINETUNE_MIN" --max-updates 100000 --freeze-updates 150 \
        --lr 5e-4 --clip-norm 5 --loss-norm tokens --max-tokens 1600000 --mask-prob 0.5 \
        --mask-channel-prob 0.1 --mask-channel-length 32 --valid-interval 250 --save-interval 100000 \
        --num-workers 1 "${COMMON[@]}" >"$RESULTS/logs/F-$split.log" 2>&1 &
    pids+=($!)
    # random init: what from-scratch training needs (trainable feature encoder, higher rate)
    $PY -m w2v2 finetune --init random:small --train "$M/train-$split.tsv" --valid "$M/dev-3spk.tsv" \
        --out "$RESULTS/R-$split" --max-minutes "$FINETUNE_MIN" --max-updates 100000 --feature-grad-scale 1 \
        --lr 1e-3 --clip-norm 5 --loss-norm tokens --max-tokens 1600000 --mask-prob 0.5 \
        --mask-channel-prob 0.1 --mask-channel-length 32 --valid-interval 250 --save-interval 100000 \
        --num-workers 1 "${COMMON[@]}" >"$RESULTS/logs/R-$split.log" 2>&1 &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done; stamp "fine-tuning runs ended"
wait $S_PID; stamp "S ended (exit $?)"

stamp "evaluating"
for run in S F-10min F-1h F-all R-10min R-1h R-all; do
    [ -d "$RESULTS/$run/best" ] || { echo "$run: no best/ model" >>"$RESULTS/logs/eval.log"; continue; }
    $PY -m w2v2 evaluate --model "$RESULTS/$run/best" --data "$M/dev.tsv" "$M/test-ljspeech.tsv" \
        --device "$DEVICE" --out "$RESULTS/eval/$run" $EVAL_LIMIT >"$RESULTS/logs/eval-$run.log" 2>&1 &
done
wait
stamp "exporting"
mkdir -p "$RESULTS/export"
for run in S F-all; do
    [ -d "$RESULTS/$run/best" ] && $PY -m w2v2 export --fp16 "$RESULTS/$run/best" "$RESULTS/export/$run" \
        >>"$RESULTS/logs/export.log" 2>&1
done
$PY -m w2v2 export --fp16 --keep-quantizer "$RESULTS/P" "$RESULTS/export/P" >>"$RESULTS/logs/export.log" 2>&1
stamp "done"
