# Sourced by the train_*.sh recipes: ROOT (first argument, else $1 default given as
# DEFAULT_ROOT), SR_TRAIN, DATA (fetched when missing) and VAL_FLAGS (periodic
# validation at temperature 0 every VAL_EVERY steps; VAL empty = none).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
read -r -a SR_TRAIN <<< "${SR_TRAIN:-.venv/bin/sr-train}"
DATA=${DATA:-data/photos/train}
VAL=${VAL-data/photos/val}
[ -d "$DATA" ] || "${SR_TRAIN[@]}" fetch-data
VAL_FLAGS=()
[ -z "$VAL" ] || VAL_FLAGS=(--val-images "$VAL" --val-every "${VAL_EVERY:-250}" --val-temperature 0)
