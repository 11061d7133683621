#!/usr/bin/env bash
# small-256's recipe (the fixed-size default before fc-256-deep), both stages, resumable: re-running
# it continues whichever stage is unfinished.
#   stage 1, conditioning warm-up: the LR encoder + learned upsampler alone on
#            the L1 of the LR skip (cheap: LR resolution only);
#   stage 2, VDVAE-SR: the whole model on the ELBO, from stage 1's last raw weights
#            (its EMA lags while the LR path still improves fast),
#            the KL weight ramped 0 -> 1 over the first 200 steps.
# Usage: bash scripts/train_default.sh [RUN_ROOT] [extra sr-train flags for both stages...]
# Env: STAGE1_STEPS (5500), STAGE1_BATCH (16), STAGE2_STEPS (600), STAGE2_BATCH (4),
#      MAX_MINUTES (stage 2 stops and saves after this wall time; unset = no limit),
#      DATA (data/photos/train), VAL (data/photos/val; empty = no periodic validation),
#      SR_TRAIN (.venv/bin/sr-train).
ROOT=${1:-runs/small256}
shift || true
# shellcheck source=scripts/train_common.sh
source "$(dirname "$0")/train_common.sh"
"${SR_TRAIN[@]}" train --preset small-256 --objective skip --data "$DATA" "${VAL_FLAGS[@]}" \
    --run-dir "$ROOT/stage1" --steps "${STAGE1_STEPS:-5500}" --batch-size "${STAGE1_BATCH:-16}" --lr 1e-3 \
    --warmup-steps 100 --ema-rate 0.998 --save-every 100 "$@"
STAGE2=()
[ -f "$ROOT/stage2/latest/train_state.json" ] || STAGE2+=(--init-checkpoint "$ROOT/stage1/latest")
[ -z "${MAX_MINUTES:-}" ] || STAGE2+=(--max-minutes "$MAX_MINUTES")
"${SR_TRAIN[@]}" train --objective elbo --data "$DATA" "${VAL_FLAGS[@]}" "${STAGE2[@]}" \
    --run-dir "$ROOT/stage2" --steps "${STAGE2_STEPS:-600}" --batch-size "${STAGE2_BATCH:-4}" --lr 5e-4 \
    --warmup-steps 200 --kl-warmup-steps 200 --ema-rate 0.998 --save-every 100 "$@"
