#!/usr/bin/env bash
# The fc-256 recipe as the committed weights (engines/vdvae-sr-fc-256/checkpoint)
# were trained, resumable: re-running it continues whichever phase is unfinished.
# A new fc-256 whose LR encoder, HR encoder and skip upsampler come from INIT
# (--init-transfer); its decoder starts fresh, set up so that the latents reach the
# output: the HR encoder reads the residual over the LR skip (--posterior-input
# residual), the posteriors start sure (--posterior-init-log-std -2) and the head
# at a usable scale (--head-init-std 0.05). HR crops of 128 (LR 32), batch 8,
# AdamW lr 6e-4, EMA 0.998, the L1 of the temperature-0 output at weight 150 and
# the likelihood's scales capped at exp(-4.5) in the loss.
#   phase 1: rate weight (beta) 0.001 to PHASE1_STEPS (2041 as run): the decoder
#            learns to read z while the KL costs next to nothing;
#   phase 2: beta ramped towards 0.05 (reached at step 3000) to PHASE2_STEPS (4027
#            as run): the prior learns to say what the posterior says.
# Usage: bash scripts/train_fc.sh [RUN_ROOT] [extra sr-train flags for every phase...]
# Env: INIT (where the encoders and skip upsampler come from; default small-256's
#      engines/vdvae-sr-small-256/checkpoint; the committed run took them from the
#      previous fc-256 weights, which had taken them from small-256 the same way),
#      PHASE1_STEPS, PHASE2_STEPS, DATA, VAL, SR_TRAIN.
ROOT=${1:-runs/fc256}
shift || true
# shellcheck source=scripts/train_common.sh
source "$(dirname "$0")/train_common.sh"
COMMON=(--data "$DATA" "${VAL_FLAGS[@]}" --batch-size 8 --crop-size 128 --lr 6e-4 --warmup-steps 100
        --ema-rate 0.998 --prior-l1-weight 150 --max-log-scale -4.5 --save-every 50 --log-every 10)
FRESH=()
[ -f "$ROOT/latest/train_state.json" ] || FRESH=(--preset fc-256 --init-transfer "${INIT:-engines/vdvae-sr-small-256/checkpoint}"
    --posterior-input residual --posterior-init-log-std -2 --head-init-std 0.05)
"${SR_TRAIN[@]}" train "${FRESH[@]}" --run-dir "$ROOT" --steps "${PHASE1_STEPS:-2041}" --rate-weight 0.001 \
    "${COMMON[@]}" "$@"
"${SR_TRAIN[@]}" train --run-dir "$ROOT" --steps "${PHASE2_STEPS:-4027}" --kl-warmup-steps 3000 --rate-weight 0.05 \
    "${COMMON[@]}" "$@"
