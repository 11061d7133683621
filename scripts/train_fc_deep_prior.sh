#!/usr/bin/env bash
# Prior catch-up for fc-256-deep, resumable: from a trained fc-256-deep (INIT, default the
# committed engines/vdvae-sr-256/checkpoint) the same joint loss as its phase B
# (prior-l1 150, scales capped at exp(-4.5), HR crops of 128, batch 8) with a larger rate
# weight (BETA, default 0.3 against phase B's 0.05) at a lower lr (LR, default 5e-5): the KL
# pulls the prior towards the posterior, so samples at t > 0 draw what the posterior would.
# best-ema/ keeps the step that validated best at temperature 0.
# Usage: bash scripts/train_fc_deep_prior.sh [RUN_ROOT] [extra sr-train flags...]
# Env: INIT, BETA, LR, STEPS, DATA, VAL, VAL_EVERY, SR_TRAIN.
ROOT=${1:-runs/fc256deep-prior}
shift || true
# shellcheck source=scripts/train_common.sh
source "$(dirname "$0")/train_common.sh"
FROM=()
[ -f "$ROOT/latest/train_state.json" ] || FROM=(--init-checkpoint "${INIT:-engines/vdvae-sr-256/checkpoint}")
"${SR_TRAIN[@]}" train "${FROM[@]}" --run-dir "$ROOT" --data "$DATA" "${VAL_FLAGS[@]}" --rate-weight "${BETA:-0.3}" \
    --prior-l1-weight 150 --max-log-scale -4.5 --batch-size 8 --crop-size 128 --lr "${LR:-5e-5}" --warmup-steps 50 \
    --ema-rate 0.998 --steps "${STEPS:-3000}" --save-every 50 --log-every 10 "$@"
