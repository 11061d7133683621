#!/usr/bin/env bash
# Creates .venv and installs the package with every extra a developer needs.
# torch: where the venv has none yet, install the pinned CPU wheel (it lies on
# the CI/dev machines' disk; elsewhere it comes from the PyTorch CPU index).
# A torch that is already there (say a CUDA build) is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    "$VPY" -m pip install -q "torch==2.13.0" 2>/dev/null \
        || "$VPY" -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
# The dev extra includes playwright (the browser test of sr-serve's page); it drives the system's
# chromium (.ci/run installs Debian's), so `playwright install` is never run.
"$VPY" -m pip install -q -e ".[${EXTRAS:-dev}]"
# Type stubs for the TensorRT code; the stubs' own requirement on tensorrt is
# a placeholder that cannot install without NVIDIA's index, hence --no-deps.
case ",${EXTRAS:-dev}," in *,dev,*) "$VPY" -m pip install -q --no-deps "tensorrt-stubs>=10.0" ;; esac
"$VPY" -c "import sr_train, sr_export, sr_runtime" 
echo "setup: .venv ready ($("$VPY" -c 'import torch; print("torch", torch.__version__)'))"
