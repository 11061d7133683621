#!/usr/bin/env bash
# Builds the wheel from a clean copy of the working tree, installs it with the
# runtime dependencies only (no torch) in a fresh venv, and upscales the sample
# from a directory outside the checkout with the packaged default model.
#
#   bash scripts/check_wheel.sh            # uses python3 (or $PYTHON)
#
# Exits non-zero when the wheel misses a file, holds a foreign top-level
# package, or the installed sr-upscale does not write a 4x image.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sr-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# A clean copy (tracked and unignored files only): a stale build/ cannot leak in.
git ls-files -z --cached --others --exclude-standard | "$PY" -c '
import shutil, sys
from pathlib import Path
dst = Path(sys.argv[1])
for name in sys.stdin.buffer.read().decode().split("\0"):
    if name and Path(name).is_file():
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(name, dst / name)
' "$WORK/src"
"$PY" -m pip wheel -q --no-deps "$WORK/src" -w "$WORK/dist"
WHEEL=$(ls "$WORK"/dist/vdvae_sr-*.whl)
echo "check_wheel: built $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB)"

"$PY" - "$WHEEL" <<'EOF'
import sys
import zipfile

names = zipfile.ZipFile(sys.argv[1]).namelist()
top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
assert top == {"sr_runtime", "sr_export", "sr_train", "sr_cluster"}, f"top-level entries: {sorted(top)}"
for need in ("sr_runtime/backends/__init__.py", "sr_runtime/models/vdvae-sr-256/manifest.json",
             "sr_runtime/models/vdvae-sr-256/model.fp32.onnx", "sr_train/training_photos.tsv",
             "sr_cluster/page.html"):
    assert need in names, f"missing from the wheel: {need}"
assert not [n for n in names if n.endswith(".safetensors")], "a checkpoint is in the wheel"
EOF

"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "$WHEEL"
cp "$REPO/assets/sample.png" "$WORK/in.png"
mkdir "$WORK/outside"
cd "$WORK/outside"  # nothing of the checkout is importable from here
env -u SR_MODEL_DIR -u PYTHONPATH "$WORK/venv/bin/sr-upscale" "$WORK/in.png" -o "$WORK/out/"
env -u PYTHONPATH "$WORK/venv/bin/python" - "$WORK/in.png" "$WORK/out" <<'EOF'
import sys
from pathlib import Path

import sr_runtime
from PIL import Image

assert "site-packages" in sr_runtime.__file__, sr_runtime.__file__
try:
    import torch  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("the runtime wheel pulled in torch")
written = sorted(Path(sys.argv[2]).iterdir())
assert len(written) == 1, f"expected one output, found {written}"
src, out = Image.open(sys.argv[1]), Image.open(written[0])
assert out.size == (4 * src.width, 4 * src.height), (src.size, out.size)
print(f"check_wheel: ok: {written[0].name} {src.size} -> {out.size}, sr_runtime from {sr_runtime.__file__}")
EOF
