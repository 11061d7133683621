#!/usr/bin/env bash
# Time-boxed training of the shipped default (small-256) on a lent GPU, in ONE device call.
#
# Here, on the CPU machine, first:
#   .venv/bin/python scripts/pack_gpu_data.py                # -> .gpudata/train (<= 40 MB, exact pixels)
#   (.gpudata/ is git-ignored, so only `carry` takes it to the device)
#   to continue a run: mkdir -p .gpudata/run && cp -r runs/small256/stage{1,2} .gpudata/run/
# Device call (the device tool): command "bash scripts/gpu_train.sh 7", carry [".gpudata"], timeout_s 600.
# It trains for MINUTES (default 7) with bf16 autocast, batch 16, then writes to $OUT:
#   run.tar.gz.part0, .part1, ... (stage1/ and stage2/: latest/, ema/, logs; what sr-train needs to
#   resume; split because the device returns no file over 16 MiB) and gpu_train.log.
# Back here: mkdir -p runs/small256 && cat <files_at>/run.tar.gz.part* | tar xz -C runs/small256
# then resume on the CPU with `bash scripts/train_default.sh` (same run root).
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-7}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
[ -d .gpudata/train ] || { echo "gpu_train: .gpudata/train missing (run scripts/pack_gpu_data.py and carry .gpudata)" >&2; exit 2; }
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'; print(torch.__version__, torch.cuda.get_device_name())"
ROOT=/tmp/gpu_run
rm -rf "$ROOT" && mkdir -p "$ROOT"
[ -d .gpudata/run ] && cp -r .gpudata/run/. "$ROOT/"
# rows already in each log: the steps/s below counts only this call's rows
declare -A OLD_ROWS
for s in stage1 stage2; do OLD_ROWS[$s]=$( [ -f "$ROOT/$s/log.csv" ] && wc -l < "$ROOT/$s/log.csv" || echo 1 ); done
export PYTHONUNBUFFERED=1
# Stage 1 is cheap: on a GPU it finishes in the first minutes; stage 2 takes the rest of the box.
start=$(date +%s)
STAGE1_BATCH=32 STAGE2_BATCH=16 STAGE2_STEPS=1000000 DATA=.gpudata/train VAL= \
MAX_MINUTES=$(python3 -c "print(max(0.5, $MINUTES - 1.5))") SR_TRAIN="python3 -m sr_train.cli" \
    bash scripts/train_default.sh "$ROOT" --device cuda --precision bf16 --num-workers 6 --log-every 50 \
    2>&1 | tr '\r' '\n' | grep -v '^train:' | tee "$OUT/gpu_train.log" || true
echo "gpu_train: $(( $(date +%s) - start )) s wall" | tee -a "$OUT/gpu_train.log"
for s in stage1 stage2; do
    [ -f "$ROOT/$s/log.csv" ] && python3 - "$ROOT/$s/log.csv" "${OLD_ROWS[$s]}" <<'PY' | tee -a "$OUT/gpu_train.log"
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))[max(0, int(sys.argv[2]) - 1):]  # this call's rows only
if len(rows) > 1:
    a, b = rows[0], rows[-1]
    rate = (int(b["step"]) - int(a["step"])) / max(1e-9, float(b["seconds"]) - float(a["seconds"]))
    print(f"{sys.argv[1]}: steps {a['step']}..{b['step']}, {rate:.2f} steps/s")
else:
    print(f"{sys.argv[1]}: no step run in this call")
PY
done
tar czf - -C "$ROOT" . | split -b 15000000 -d -a 1 - "$OUT/run.tar.gz.part"
ls -la "$OUT"
