#!/usr/bin/env bash
# GPU check: `pytest -m gpu`, the whole-frame benchmark of the fully convolutional
# cost model (benchmarks/frames.py: 960x540 -> 3840x2160 whole vs tiled, a 4K
# stream's frames/s, PyTorch + CUDA graph), the latency harness' GPU rows and the
# whole-image rows, all within GPU_CHECK_BUDGET_S (default 570 s), results into $OUT.
#
#   OUT=out/gpu_check bash scripts/gpu_check.sh
#
# Needs a CUDA GPU and a venv with the dev extras plus the gpu extra
# (`EXTRAS=dev,gpu bash scripts/setup.sh`; PYTHON picks the interpreter,
# default .venv/bin/python, else python3).
#
# Writes: $OUT/gpu_check.json (each step: command, exit status, seconds, log
# file), $OUT/gpu_check.md (the steps and every benchmark page), the benchmark
# JSON and markdown under $OUT/bench/, a log per step and the pytest junit XML.
# Every step is cut at the time left, so a slow step cannot lose the others'
# results; a step that fails is recorded and the next one runs.
#
# SR_GPU_PACK=1: for a GPU machine reached by a remote-call tool, without a
# package index and returning only a few files. Missing packages are installed
# first from a pack of wheels made beforehand on a machine with an index:
# GPU_PACK_DIR (default .gpu) holds parts p1..pN, the last with an executable
# `install` script (it installs into /tmp/site, which goes on PYTHONPATH) and
# optionally extra/*.whl; earlier parts may be copied to /tmp/parts by earlier
# calls. The logs, the junit XML and the benchmark markdown are then packed
# into $OUT/logs.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
BUDGET_S=${GPU_CHECK_BUDGET_S:-570}
PACK=${GPU_PACK_DIR:-.gpu}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PACK_MODE=${SR_GPU_PACK:-0}
START=$(date +%s)
mkdir -p "$OUT/bench"
: > "$OUT/steps.tsv"

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# step NAME MAX_SECONDS COMMAND...: runs COMMAND cut at min(MAX_SECONDS, time left - 10 s), logs to $OUT/NAME.log.
step() {
    local name=$1 max=$2; shift 2
    local limit=$(( $(left) - 10 )); (( limit > max )) && limit=$max
    if (( limit < 5 )); then
        printf '%s\t%s\t%s\t%s\n' "$name" "skipped: out of time" 0 "$*" >> "$OUT/steps.tsv"; return
    fi
    echo "== $name (up to ${limit}s): $*" >&2
    local t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $(( $(date +%s) - t0 )) "$*" >> "$OUT/steps.tsv"
    tail -n 3 "$OUT/$name.log" >&2
}

install_missing() {
    if "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
        echo "onnxruntime-gpu already importable"; return 0
    fi
    local last
    last=$(ls -d "$PACK"/p* 2>/dev/null | sort -V | tail -n 1)
    [[ -n "$last" && -x "$last/install" ]] || { echo "no $PACK/pN/install: make the wheel pack first"; return 1; }
    bash "$last/install" || return 1
    if compgen -G "$last/extra/*.whl" > /dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$last"/extra/*.whl
    fi
}

environment() {
    nvidia-smi
    "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, torch.cuda.get_device_name(0))"
    for module in onnxruntime onnx pytest PIL skimage safetensors tqdm; do
        "$PY" -c "import $module" 2>/dev/null && echo "have $module" || echo "MISSING $module"
    done
    "$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
    "$PY" -c "from sr_runtime.backends.engine_identity import engine_unavailable_reason as why
print('TensorRT engines:', why() or 'can be built here')"
}

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PACK PY
export SR_ENGINE_CACHE=${SR_ENGINE_CACHE:-$OUT/engines}
if [ "$PACK_MODE" = 1 ]; then
    export PYTHONPATH="/tmp/site:$PYTHONPATH" SR_ENGINE_CACHE=/tmp/sr_engines
fi
export -f environment install_missing
DEVICE_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
DEVICE_NAME=${DEVICE_NAME:-cuda}

[ "$PACK_MODE" = 1 ] && step install 120 bash -c install_missing
step environment 30 bash -c environment
# The fully convolutional cost model (fc-256, random weights), exported once for the GPU test and the frame bench.
FC_MODEL=${FC_MODEL:-/tmp/sr_bench_cache/fc-256-random}
step export_fc 120 "$PY" -c "import sys; from sr_export.cli import main; sys.exit(main(sys.argv[1:]))" \
    --preset fc-256 --random-weights --out "$FC_MODEL" --engine off
export SR_TEST_FC_MODEL=$FC_MODEL
step pytest_gpu 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" tests
# Whole frames: 960x540 -> 3840x2160 through Upscaler, steady state (p50 of 20), frames/s of a 30-frame 4K
# stream, whole vs tiled (512x512 LR pixels per call), ORT CUDA fp16, and PyTorch fp16 + CUDA graph; then
# the same with prefer_nhwc and at fp32.
step bench_frames 120 "$PY" -m benchmarks.frames --model "$FC_MODEL" --device cuda --image 960x540 \
    --precision fp16 --iters 20 --tiled-iters 3 --stream 30 --torch --device-name "$DEVICE_NAME" --out "$OUT/bench"
step bench_frames_nhwc 60 "$PY" -m benchmarks.frames --model "$FC_MODEL" --device cuda --image 960x540 \
    --precision fp16 --nhwc --iters 20 --tiled-iters 1 --stream 30 --device-name "$DEVICE_NAME-nhwc" \
    --out "$OUT/bench"
step bench_frames_fp32 60 "$PY" -m benchmarks.frames --model "$FC_MODEL" --device cuda --image 960x540 \
    --precision fp32 --iters 10 --tiled-iters 1 --stream 10 --device-name "$DEVICE_NAME-fp32" --out "$OUT/bench"
# Per tile (default model at batch 1/4/16) and whole images, 960x540 -> 3840x2160 among them, at batch 16.
step bench_default 150 "$PY" -m benchmarks.latency --models default --devices cuda \
    --backends pytorch-eager,pytorch-cudagraph,onnxruntime-cuda,tensorrt --batches 1,4,16 \
    --image 256x256,640x480,960x540 --image-batches 16 --iters 30 --budget-s 15 --out "$OUT/bench"
# paper-256 (random weights, heavy): batch 1 and 16 per tile, no whole image.
step bench_paper 90 "$PY" -m benchmarks.latency --models paper-256 --devices cuda \
    --backends pytorch-eager,pytorch-cudagraph,onnxruntime-cuda,tensorrt --heavy-batches 1,16 --heavy-iters 10 \
    --no-image --budget-s 15 --cache /tmp/sr_bench_cache --out "$OUT/bench"

"$PY" - "$OUT" "$START" <<'EOF'
import json, pathlib, sys, time
out, start = pathlib.Path(sys.argv[1]), int(sys.argv[2])
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, seconds, command = line.split("\t", 3)
    steps.append({"step": name, "exit_status": status, "seconds": int(seconds), "command": command,
                  "log": f"{name}.log"})
pages = sorted((out / "bench").glob("*.md"))
summary = {"schema": "vdvae-sr-gpu-check/1", "total_seconds": int(time.time()) - start, "steps": steps,
           "benchmarks": [str(p.relative_to(out)) for p in sorted((out / "bench").glob("*.json"))]}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
lines = ["# GPU check", "", "| step | exit status | seconds |", "|---|---|---|"]
lines += [f"| {s['step']} | {s['exit_status']} | {s['seconds']} |" for s in steps]
for page in pages:
    lines += ["", page.read_text()]
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines[:4 + len(steps)]))
EOF
if [ "$PACK_MODE" = 1 ]; then  # the remote call returns few files: pack the rest
    (cd "$OUT" && tar czf logs.tar.gz ./*.log steps.tsv pytest_gpu.xml bench/*.md 2>/dev/null; \
        rm -f ./*.log steps.tsv pytest_gpu.xml bench/*.md)
fi
find "$OUT" -type f | sort
