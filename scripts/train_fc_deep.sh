#!/usr/bin/env bash
# The fc-256-deep recipe, resumable: re-running it continues whichever phase is unfinished.
# fc-256-deep is fc-256 with 8 full-width residual blocks in the skip upsampler; it is
# grown from a trained fc-256 (INIT, default the committed engines/vdvae-sr-fc-256) with
# --init-grow, so it starts as exactly that model.
#   phase A ($ROOT/skip): the deterministic LR path alone (--objective skip: L1 of the
#            skip image; LR encoder and upsampler train), HR crops of 192, batch 16,
#            lr 5e-4, to PHASE_A_STEPS (3629 as run: 45 minutes);
#   phase B ($ROOT/elbo): everything, fc-256's second phase as it ended (beta 0.05, the
#            L1 of the temperature-0 output at weight 150, scales capped at exp(-4.5)),
#            HR crops of 128, batch 8, lr 1e-4 (3e-4 lost t = 0 PSNR-Y from step 500),
#            to PHASE_B_STEPS; best-ema/ keeps the step that validated best.
# FREEZE_LR_ENCODER=1 keeps the LR encoder (the prior's conditioning features) as fc-256
# left it in both phases: phase A then trains the upsampler alone.
# Usage: bash scripts/train_fc_deep.sh [RUN_ROOT] [extra sr-train flags for phase B...]
# Env: INIT, PHASE_A_STEPS, PHASE_B_STEPS, FREEZE_LR_ENCODER, DATA, VAL, VAL_EVERY, SR_TRAIN.
ROOT=${1:-runs/fc256deep}
shift || true
# shellcheck source=scripts/train_common.sh
source "$(dirname "$0")/train_common.sh"
FREEZE=()
[ "${FREEZE_LR_ENCODER:-0}" = 1 ] && FREEZE=(--freeze-lr-encoder)
GROW=()
[ -f "$ROOT/skip/latest/train_state.json" ] || GROW=(--preset fc-256-deep --init-grow "${INIT:-engines/vdvae-sr-fc-256/checkpoint}")
"${SR_TRAIN[@]}" train "${GROW[@]}" --run-dir "$ROOT/skip" --objective skip "${FREEZE[@]}" --data "$DATA" "${VAL_FLAGS[@]}" \
    --batch-size 16 --crop-size 192 --lr 5e-4 --warmup-steps 100 --ema-rate 0.998 --steps "${PHASE_A_STEPS:-3629}" \
    --save-every 100 --log-every 20
FROM=()
[ -f "$ROOT/elbo/latest/train_state.json" ] || FROM=(--init-checkpoint "$ROOT/skip/ema")
"${SR_TRAIN[@]}" train "${FROM[@]}" "${FREEZE[@]}" --run-dir "$ROOT/elbo" --data "$DATA" "${VAL_FLAGS[@]}" --rate-weight 0.05 \
    --prior-l1-weight 150 --max-log-scale -4.5 --batch-size 8 --crop-size 128 --lr 1e-4 --warmup-steps 100 \
    --ema-rate 0.998 --steps "${PHASE_B_STEPS:-6000}" --save-every 50 --log-every 10 "$@"
