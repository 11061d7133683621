#!/usr/bin/env bash
# GPU check in one call: `pytest -m gpu`, then whole frames of the shipped fully convolutional model
# (FC_MODEL, default sr_runtime/models/vdvae-sr-256; 960x540 -> 3840x2160 through Upscaler, steady state;
# a 4K stream's frames/s; ONNX Runtime CUDA fp16, fp16 + prefer_nhwc and fp32; beside them its tiled
# path, a fixed-size model's tiles when FIXED_MODEL names one, and the same model in PyTorch + CUDA
# graph from its checkpoint; GFLOP/s against a matmul peak
# measured in the same run; peak GPU memory), then first GPU figures of sr-serve and sr-upscale --ray.
# Every stage has its own time limit inside GPU_CHECK_BUDGET_S (default 480 s), so a stage that hangs
# still leaves the others' results.
#
#   OUT=out/gpu_check bash scripts/gpu_check.sh          # on a GPU machine
#   GPU_CHECK_DRY=1 OUT=/tmp/dry bash scripts/gpu_check.sh   # every stage on the CPU at tiny sizes
#
# The dry run proves the script before device time is spent on it (tests/test_gpu_check.py runs it):
# same stages, same result files, CPU backends, a 64x48 frame, a few iterations; GPU_CHECK_STAGE_S
# raises its per-stage limits on a busy machine.
#
# Needs a venv with the dev extras plus the gpu extra (`EXTRAS=dev,gpu bash scripts/setup.sh`; PYTHON
# picks the interpreter, default .venv/bin/python, else python3). Ray (the cluster extra) for the last
# two stages; without it they fail alone, with the reason in their log.
#
# Writes under $OUT: benchmarks/results/*.json + .md (one pair per benchmark stage), a log per stage,
# pytest_gpu.xml, and gpu_check.json (each stage: command, exit status, seconds, log, result files and
# whether they were written; the benchmark JSONs inlined) + gpu_check.md (the stage table and every
# benchmark page).
#
# SR_GPU_PACK=1: for a GPU machine reached by a remote-call tool, without a package index and returning
# only a few files. Missing packages are installed first from packs of wheels made beforehand on a
# machine with an index: GPU_PACK_DIR (default .gpu; several, space-separated, e.g. ".gpu .gpu-ray")
# each hold parts p1..pN, the last with an executable `install` script (it installs into /tmp/site,
# which goes on PYTHONPATH) and optionally extra/*.whl; earlier parts are copied to /tmp/parts by
# earlier calls. onnxruntime-gpu's pack: the steering repo's tools/gpu-pack; Ray's:
# `bash scripts/pack_gpu_wheels.sh .gpu-ray "ray[serve]==2.60.0" -- NAMES-THE-IMAGE-HAS`.
# Everything but gpu_check.json/.md is then packed into $OUT/results.tar.gz (8 files come back at most).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
DRY=${GPU_CHECK_DRY:-0}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
PACK=${GPU_PACK_DIR:-.gpu}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PACK_MODE=${SR_GPU_PACK:-0}
FC_MODEL=${FC_MODEL:-sr_runtime/models/vdvae-sr-256}
RESULTS=$OUT/benchmarks/results
DAY=$(date +%Y%m%d)
START=$(date +%s)
mkdir -p "$RESULTS"
: > "$OUT/steps.tsv"

if [ "$DRY" = 1 ]; then  # the CPU backends at tiny sizes: proves every stage, measures nothing
    DEVICE=cpu DEVICE_NAME=dry-run-cpu IMAGE=64x48 ITERS=1 STREAM=2 TILED_ITERS=1 PEAK=512,3
    SERVE_ARGS=(--clients 1 --requests 2 --sizes 32,48 --batching on --direct 1 --cpus 2)
    BATCH_ARGS=(--images 2 --size 32 --workers 1)
    LIMIT_ENV=${GPU_CHECK_STAGE_S:-60} LIMIT_PYTEST=${GPU_CHECK_STAGE_S:-180}
    LIMIT_FRAMES=${GPU_CHECK_STAGE_S:-240} LIMIT_RAY=${GPU_CHECK_STAGE_S:-180}
else
    DEVICE=cuda IMAGE=960x540 ITERS=20 STREAM=30 TILED_ITERS=3 PEAK=8192,10
    DEVICE_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
    DEVICE_NAME=${DEVICE_NAME:-cuda}
    SERVE_ARGS=(--clients 1,4,16 --requests 24 --sizes 128,256 --batching on --direct 8 --cpus 8)
    BATCH_ARGS=(--images 16 --size 512 --workers 1)
    LIMIT_ENV=30 LIMIT_PYTEST=120 LIMIT_FRAMES=110 LIMIT_RAY=75
fi
SLUG=$(echo "$DEVICE_NAME" | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-|-$//g')

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# step NAME MAX_SECONDS RESULT_GLOB COMMAND...: runs COMMAND cut at min(MAX_SECONDS, time left - 10 s),
# logs to $OUT/NAME.log; RESULT_GLOB (under $OUT, '-' for none) names the files the stage must write.
step() {
    local name=$1 max=$2 expect=$3; shift 3
    local limit=$(( $(left) - 10 )); (( limit > max )) && limit=$max
    if (( limit < 5 )); then
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" "skipped: out of time" 0 "$expect" "$*" >> "$OUT/steps.tsv"; return
    fi
    echo "== $name (up to ${limit}s): $*" >&2
    local t0=$(date +%s)
    PYTHONUNBUFFERED=1 timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" $(( $(date +%s) - t0 )) "$expect" "$*" >> "$OUT/steps.tsv"
    tail -n 3 "$OUT/$name.log" >&2
}

install_missing() {  # every pack named in $PACK (space-separated), each through its last part's `install`
    local dir last status=0
    for dir in $PACK; do
        last=$(ls -d "$dir"/p* 2>/dev/null | sort -V | tail -n 1)
        if [[ -z "$last" || ! -x "$last/install" ]]; then
            echo "no $dir/pN/install: make that pack first"; status=1; continue
        fi
        bash "$last/install" || status=1
        if compgen -G "$last/extra/*.whl" > /dev/null; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$last"/extra/*.whl || status=1
        fi
    done
    PYTHONPATH=/tmp/site:$PYTHONPATH "$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
    PYTHONPATH=/tmp/site:$PYTHONPATH "$PY" -c "import ray; print('ray', ray.__version__)" || echo "no ray: serve and ray_batch will fail"
    return $status
}

environment() {
    if [ "$DRY" = 1 ]; then echo "dry run: no GPU used"; else nvidia-smi; fi
    "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    for module in onnxruntime onnx pytest PIL safetensors tqdm ray; do
        "$PY" -c "import $module" 2>/dev/null && echo "have $module" || echo "MISSING $module"
    done
    "$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
    "$PY" -c "from sr_runtime.backends.engine_identity import engine_unavailable_reason as why
print('TensorRT engines:', why() or 'can be built here')"
}

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PACK PY DRY
export SR_ENGINE_CACHE=${SR_ENGINE_CACHE:-$OUT/engines}
if [ "$PACK_MODE" = 1 ]; then
    export PYTHONPATH="/tmp/site:$PYTHONPATH" SR_ENGINE_CACHE=/tmp/sr_engines
fi
export -f environment install_missing
# The GPU tests of whole frames run on the shipped fully convolutional model (no export needed).
export SR_TEST_FC_MODEL=$FC_MODEL

[ "$PACK_MODE" = 1 ] && step install 120 - bash -c install_missing
step environment "$LIMIT_ENV" - bash -c environment
step pytest_gpu "$LIMIT_PYTEST" pytest_gpu.xml "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" tests
FC_CONFIG=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['model_config']['name'])" \
    "$FC_MODEL/manifest.json" 2>/dev/null || echo unknown)
frames() {  # frames NAME PRECISION [EXTRA ARGS...]: one benchmarks.frames page under $RESULTS
    local name=$1 precision=$2; shift 2
    local tag=${name//_/-}
    step "$name" "$LIMIT_FRAMES" "benchmarks/results/frames-$SLUG-$tag-$FC_CONFIG-$DAY.json" \
        "$PY" -m benchmarks.frames --model "$FC_MODEL" --device "$DEVICE" --image "$IMAGE" --precision "$precision" \
        --iters "$ITERS" --tiled-iters "$TILED_ITERS" --stream "$STREAM" --peak-size "$PEAK" \
        --device-name "$SLUG-$tag" --out "$RESULTS" "$@"
}
FIXED=()
[ -z "${FIXED_MODEL:-}" ] || FIXED=(--fixed-model "$FIXED_MODEL")
frames frames_fp16 fp16 --torch "${FIXED[@]}"
frames frames_fp16_nhwc fp16 --nhwc --iters "$(( (ITERS + 1) / 2 ))" --stream "$(( (STREAM + 1) / 2 ))"
frames frames_fp32 fp32 --torch "${FIXED[@]}"
# The service and the batch job on Ray, small and bounded: their first GPU figures.
step serve "$LIMIT_RAY" "benchmarks/results/cluster-serve-$SLUG-$DAY.json" "$PY" -m benchmarks.cluster_serve \
    "${SERVE_ARGS[@]}" --out "$RESULTS/cluster-serve-$SLUG-$DAY.json"
step ray_batch "$LIMIT_RAY" "benchmarks/results/cluster-batch-$SLUG-$DAY.json" "$PY" -m benchmarks.cluster_batch \
    "${BATCH_ARGS[@]}" --out "$RESULTS/cluster-batch-$SLUG-$DAY.json"

"$PY" - "$OUT" "$START" "$DRY" <<'EOF'
import json, pathlib, sys, time
out, start, dry = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
steps, pages = [], []
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, seconds, expect, command = line.split("\t", 4)
    files = [] if expect == "-" else sorted(str(p.relative_to(out)) for p in out.glob(expect))
    steps.append({"step": name, "exit_status": status, "seconds": int(seconds), "command": command,
                  "log": f"{name}.log", "expects": None if expect == "-" else expect, "results": files,
                  "ok": status == "0" and (expect == "-" or bool(files))})
results = {}
for page in sorted((out / "benchmarks" / "results").glob("*.json")):
    results[str(page.relative_to(out))] = json.loads(page.read_text())
    md = page.with_suffix(".md")
    if md.is_file():
        pages.append(md.read_text())
summary = {"schema": "vdvae-sr-gpu-check/2", "dry_run": dry, "total_seconds": int(time.time()) - start,
           "steps": steps, "results": results}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
title = "# GPU check (dry run on the CPU: proves the script, measures nothing)" if dry else "# GPU check"
lines = [title, "", "| stage | exit status | seconds | result files |", "|---|---|---|---|"]
lines += [f"| {s['step']} | {s['exit_status']} | {s['seconds']} | {', '.join(s['results']) or '-'} |" for s in steps]
for page in pages:
    lines += ["", page]
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines[: 4 + len(steps)]))
EOF
if [ "$PACK_MODE" = 1 ]; then  # the remote call returns few files: pack the rest
    (cd "$OUT" && tar czf results.tar.gz --exclude=results.tar.gz --exclude=gpu_check.json --exclude=gpu_check.md \
        --exclude=engines . && find . -mindepth 1 -maxdepth 1 ! -name results.tar.gz ! -name gpu_check.json \
        ! -name gpu_check.md -exec rm -rf {} +)
fi
find "$OUT" -type f -not -path "*/engines/*" | sort
