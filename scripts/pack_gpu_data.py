"""Pack the training photos into a folder small enough to copy to a remote GPU machine.

For `SR_GPU_PACK=1 bash scripts/gpu_train.sh`: a remote-call tool that copies
the working tree (say at most 64 MiB) cannot take the ~76 MB of training PNGs.
Re-encoding lossily would teach the model JPEG artefacts, so instead each
photo is centre-cropped by the same area fraction until the PNGs fit the
budget: every photo stays represented, pixels stay exact. A GPU box of your
own needs none of this: it reads data/photos/train.

Usage: ``.venv/bin/python scripts/pack_gpu_data.py [--src data/photos/train]
[--out .gpudata/train] [--budget-mb 40]``. ``.gpudata/`` is git-ignored, so
the remote-call tool must be told to take it along.
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

from PIL import Image

MIN_SIDE = 256  # a crop must still hold one HR training tile


def pack(src: Path, out: Path, budget: int) -> int:
    """Write centre crops of every PNG under ``src`` into ``out``; returns the bytes written."""
    photos = sorted(src.glob("*.png"))
    if not photos:
        raise SystemExit(f"no PNG photos in {src} (run `sr-train fetch-data` first)")
    total = sum(p.stat().st_size for p in photos)
    fraction = min(1.0, budget / total)
    while True:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        side = math.sqrt(fraction)
        for p in photos:
            with Image.open(p) as im:
                w, h = im.size
                cw, ch = max(MIN_SIDE, round(w * side)), max(MIN_SIDE, round(h * side))
                left, top = (w - cw) // 2, (h - ch) // 2
                im.crop((left, top, left + cw, top + ch)).save(out / p.name, compress_level=9)
        written = sum(p.stat().st_size for p in out.iterdir())
        if written <= budget:
            return written
        fraction *= 0.95 * budget / written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", default="data/photos/train")
    parser.add_argument("--out", default=".gpudata/train")
    parser.add_argument("--budget-mb", type=float, default=40.0)
    args = parser.parse_args()
    written = pack(Path(args.src), Path(args.out), int(args.budget_mb * 1e6))
    print(f"packed {len(list(Path(args.out).iterdir()))} photos into {args.out}: {written / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
