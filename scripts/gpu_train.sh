#!/usr/bin/env bash
# Time-boxed training of the shipped default's recipe (small-256, both stages) on a CUDA GPU.
#
#   bash scripts/gpu_train.sh [MINUTES] [RUN_ROOT]
#
# MINUTES (default 7) bounds the whole run: stage 1 is cheap on a GPU and
# finishes first, stage 2 takes the rest (bf16 autocast, batch 16). RUN_ROOT
# (default runs/gpu) holds stage1/ and stage2/ (latest/, ema/, logs) and the
# log gpu_train.log; re-running continues the run, on this GPU or, with
# `bash scripts/train_default.sh RUN_ROOT`, on a CPU.
# Env: DATA (data/photos/train, fetched when missing), VAL (data/photos/val;
#      empty = no periodic validation), PYTHON (.venv/bin/python, else python3),
#      NUM_WORKERS (data loader workers, 6).
#
# SR_GPU_PACK=1: for a GPU machine reached by a remote-call tool that copies a
# working tree in and files under $OUT back, with a size limit per file. Then
# the photos come from .gpudata/train (made beforehand by
# scripts/pack_gpu_data.py; a run to continue may be put in .gpudata/run), the
# run is made in a temporary folder, and $OUT receives gpu_train.log and
# run.tar.gz.part0, .part1, ... (split under SR_GPU_PART_BYTES, default
# 15000000). Back on the CPU machine:
#   mkdir -p runs/small256 && cat run.tar.gz.part* | tar xz -C runs/small256
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-7}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PACK=${SR_GPU_PACK:-0}
if [ "$PACK" = 1 ]; then
    OUT=${OUT:?SR_GPU_PACK=1: set OUT to the folder the results go to}
    ROOT=$(mktemp -d "${TMPDIR:-/tmp}/gpu_run.XXXXXX")
    DATA=.gpudata/train VAL=
    [ -d "$DATA" ] || { echo "gpu_train: $DATA missing (run scripts/pack_gpu_data.py)" >&2; exit 2; }
    [ -d .gpudata/run ] && cp -r .gpudata/run/. "$ROOT/"
    LOG_DIR=$OUT
else
    ROOT=${2:-runs/gpu}
    LOG_DIR=$ROOT
fi
mkdir -p "$ROOT" "$LOG_DIR"
LOG=$LOG_DIR/gpu_train.log
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'; \
print(torch.__version__, torch.cuda.get_device_name())"
# Rows already in each log: the steps/s below counts only this run's rows.
declare -A OLD_ROWS
for s in stage1 stage2; do
    OLD_ROWS[$s]=$( [ -f "$ROOT/$s/log.csv" ] && wc -l < "$ROOT/$s/log.csv" || echo 1 )
done
export PYTHONUNBUFFERED=1
start=$(date +%s)
STAGE1_BATCH=32 STAGE2_BATCH=16 STAGE2_STEPS=1000000 DATA=${DATA:-data/photos/train} VAL=${VAL-data/photos/val} \
MAX_MINUTES=$("$PY" -c "print(max(0.5, $MINUTES - 1.5))") SR_TRAIN="$PY -m sr_train.cli" \
    bash scripts/train_default.sh "$ROOT" --device cuda --precision bf16 --num-workers "${NUM_WORKERS:-6}" \
    --log-every 50 2>&1 | tr '\r' '\n' | grep -v '^train:' | tee -a "$LOG" || true
echo "gpu_train: $(( $(date +%s) - start )) s wall" | tee -a "$LOG"
for s in stage1 stage2; do
    [ -f "$ROOT/$s/log.csv" ] && "$PY" - "$ROOT/$s/log.csv" "${OLD_ROWS[$s]}" <<'PY' | tee -a "$LOG"
import csv
import sys

rows = list(csv.DictReader(open(sys.argv[1])))[max(0, int(sys.argv[2]) - 1):]  # this run's rows only
if len(rows) > 1:
    a, b = rows[0], rows[-1]
    rate = (int(b["step"]) - int(a["step"])) / max(1e-9, float(b["seconds"]) - float(a["seconds"]))
    print(f"{sys.argv[1]}: steps {a['step']}..{b['step']}, {rate:.2f} steps/s")
else:
    print(f"{sys.argv[1]}: no step run this time")
PY
done
if [ "$PACK" = 1 ]; then
    tar czf - -C "$ROOT" . | split -b "${SR_GPU_PART_BYTES:-15000000}" -d -a 1 - "$OUT/run.tar.gz.part"
    rm -rf "$ROOT"
    ls -la "$OUT"
else
    echo "gpu_train: run in $ROOT (log $LOG)"
fi
