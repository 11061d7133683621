#!/usr/bin/env bash
# mypy over sr_train, sr_export, sr_runtime and sr_cluster (settings in pyproject.toml).
#
#   bash scripts/typecheck.sh          # PYTHON picks the interpreter (default .venv/bin/python)
#
# The TensorRT code is typed against tensorrt-stubs, which mypy cannot use as
# installed: no py.typed, not a *-stubs package, and two syntax errors (a
# parameter named `in`, a non-default parameter after a default). A patched
# copy goes to .mypy_stubs/ (git-ignored, on mypy_path); errors inside the
# stubs themselves are ignored by the config. Without the stubs, TensorRT is
# an untyped import.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$PY" - <<'PY'
import importlib.util
import re
import shutil
from pathlib import Path

dest = Path(".mypy_stubs")
shutil.rmtree(dest, ignore_errors=True)
dest.mkdir()
spec = importlib.util.find_spec("tensorrt_bindings")
site = Path(next(iter(spec.submodule_search_locations))).parent if spec and spec.submodule_search_locations else None
if site is None or not (site / "tensorrt" / "__init__.pyi").is_file():
    print("typecheck: tensorrt-stubs not installed; TensorRT calls are not type-checked")
else:
    for pkg in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(site / pkg, dest / pkg, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    bindings = dest / "tensorrt_bindings" / "tensorrt.pyi"
    text = re.sub(r"\bin: ", "in_: ", bindings.read_text())
    text = text.replace("channel_axis: int) -> IScaleLayer", "channel_axis: int = ...) -> IScaleLayer")
    bindings.write_text(text)
PY
"$PY" -m mypy "$@"
