#!/usr/bin/env bash
# The shipped default's recipe (small-256), both stages, resumable: re-running
# it continues whichever stage is unfinished.
#   stage 1, conditioning warm-up: the LR encoder + learned upsampler alone on
#            the L1 of the LR skip (cheap: LR resolution only), batch 16;
#   stage 2, VDVAE-SR: the whole model on the ELBO, from stage 1's EMA weights.
# Usage: bash scripts/train_default.sh [RUN_ROOT] [extra sr-train flags...]
# Env: STAGE1_STEPS (2000), STAGE2_STEPS (20000), DATA (data/photos/train),
#      VAL (data/photos/val), SR_TRAIN (.venv/bin/sr-train).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs/small256}
shift || true
SR_TRAIN=${SR_TRAIN:-.venv/bin/sr-train}
DATA=${DATA:-data/photos/train}
VAL=${VAL:-data/photos/val}
[ -d "$DATA" ] || "$SR_TRAIN" fetch-data
"$SR_TRAIN" train --preset small-256 --objective skip --data "$DATA" --val-images "$VAL" \
    --run-dir "$ROOT/stage1" --steps "${STAGE1_STEPS:-2000}" --batch-size 16 --lr 1e-3 --warmup-steps 100 \
    --ema-rate 0.998 --val-every 250 --val-temperature 0 --save-every 100 "$@"
INIT=()
[ -f "$ROOT/stage2/latest/train_state.json" ] || INIT=(--init-checkpoint "$ROOT/stage1/ema")
"$SR_TRAIN" train --objective elbo --data "$DATA" --val-images "$VAL" "${INIT[@]}" \
    --run-dir "$ROOT/stage2" --steps "${STAGE2_STEPS:-20000}" --batch-size 4 --lr 5e-4 --warmup-steps 200 \
    --ema-rate 0.998 --val-every 250 --val-temperature 0 --save-every 100 "$@"
