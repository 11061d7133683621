#!/usr/bin/env bash
# The fc-256 recipe as the shipped weights were trained, resumable: re-running it
# continues whichever phase is unfinished. All phases: the ELBO with free bits
# (0.05 nats per latent channel and position), HR crops of 128 (LR 32), batch 8,
# AdamW lr 6e-4, EMA 0.998.
#   phase 1: a new fc-256 whose LR encoder, HR encoder and skip upsampler come
#            from a small-256 checkpoint (--init-transfer), 800 steps;
#   phase 2: from phase 1's raw weights, plus the L1 of the temperature-0 output
#            (--prior-l1-weight 30) to step 780, then at weight 150 (phase 3).
# Usage: bash scripts/train_fc.sh [RUN_ROOT] [extra sr-train flags for every phase...]
# Env: INIT (engines/vdvae-sr-256/checkpoint), PHASE1_STEPS (800), PHASE2_STEPS (780),
#      PHASE3_STEPS (total steps of the last phase's run, 2000), DATA, VAL, SR_TRAIN.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs/fc256}
shift || true
read -r -a SR_TRAIN <<< "${SR_TRAIN:-.venv/bin/sr-train}"
DATA=${DATA:-data/photos/train}
VAL=${VAL-data/photos/val}
[ -d "$DATA" ] || "${SR_TRAIN[@]}" fetch-data
VAL_FLAGS=()
[ -z "$VAL" ] || VAL_FLAGS=(--val-images "$VAL" --val-every 200 --val-temperature 0)
COMMON=(--data "$DATA" "${VAL_FLAGS[@]}" --batch-size 8 --crop-size 128 --free-bits 0.05 --lr 6e-4
        --ema-rate 0.998 --save-every 50 --log-every 10)
"${SR_TRAIN[@]}" train --preset fc-256 --init-transfer "${INIT:-engines/vdvae-sr-256/checkpoint}" \
    --run-dir "$ROOT/phase1" --steps "${PHASE1_STEPS:-800}" --warmup-steps 100 "${COMMON[@]}" "$@"
PHASE2=()
[ -f "$ROOT/phase2/latest/train_state.json" ] || PHASE2+=(--init-checkpoint "$ROOT/phase1/latest")
"${SR_TRAIN[@]}" train "${PHASE2[@]}" --run-dir "$ROOT/phase2" --steps "${PHASE2_STEPS:-780}" \
    --warmup-steps 50 --prior-l1-weight 30 "${COMMON[@]}" "$@"
"${SR_TRAIN[@]}" train --run-dir "$ROOT/phase2" --steps "${PHASE3_STEPS:-2000}" \
    --warmup-steps 50 --prior-l1-weight 150 "${COMMON[@]}" "$@"
