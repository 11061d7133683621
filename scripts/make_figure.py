"""Comparison picture for the README at 100% zoom: LR | bicubic | model t=0 | model t=T | std map | HR.

Usage: ``.venv/bin/python scripts/make_figure.py [--model DIR] [--images data/photos/val]
[--rows 3] [--temperature 0.6] [--out assets/comparison.png]``.

Rows are the validation photos with the most detail (lowest bicubic PSNR-Y),
cropped and degraded exactly as the evaluation protocol does (docs/design.md), and
upscaled by the runtime (ONNX Runtime on this machine), so the picture shows
what users get. The std map is the per-pixel standard deviation of 8 samples
at t = T, scaled so that 16 grey levels are white.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sr_runtime import Upscaler
from sr_train.evaluate import load_images, prepare_eval_pair
from sr_train.metrics import psnr_y

HR = 256
LABELS = ("LR (nearest)", "bicubic", "VDVAE-SR t=0", "VDVAE-SR t={t:g}", "std, 8 samples", "HR")
STD_WHITE = 16.0  # grey levels shown as white in the std map


def hardest(images: dict[str, np.ndarray], rows: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The ``rows`` crops where bicubic is worst: they show what a model adds."""
    pairs = [(name, *prepare_eval_pair(img, HR)) for name, img in images.items()]
    scored = []
    for name, hr, lr in pairs:
        bicubic = np.asarray(Image.fromarray(lr).resize((HR, HR), Image.Resampling.BICUBIC))
        scored.append((psnr_y(bicubic, hr), name, hr, lr))
    scored.sort(key=lambda row: row[0])
    return [(name, hr, lr) for _, name, hr, lr in scored[:rows]]


def panels(cold: Upscaler, hot: Upscaler, hr: np.ndarray, lr: np.ndarray) -> list[np.ndarray]:
    """The six panels of one row; `cold` runs at t = 0, `hot` at t = T."""
    det = cold.run(lr)
    sample = hot.run(lr)
    _, std = hot.run(lr, samples=8)  # in [0, 1] units
    std_img = np.clip(std * 255.0 * 255.0 / STD_WHITE, 0, 255).astype(np.uint8)
    return [
        np.asarray(Image.fromarray(lr).resize((HR, HR), Image.Resampling.NEAREST)),
        np.asarray(Image.fromarray(lr).resize((HR, HR), Image.Resampling.BICUBIC)),
        det,
        sample,
        np.repeat(std_img[..., None], 3, axis=2),
        hr,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: the shipped one)")
    parser.add_argument("--images", default="data/photos/val")
    parser.add_argument("--rows", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--out", default="assets/comparison.png")
    args = parser.parse_args()
    rows = hardest(load_images(args.images), args.rows)
    cold, hot = Upscaler(args.model, temperature=0.0), Upscaler(args.model, temperature=args.temperature, seed=1)
    label_h, gap = 18, 4
    width = len(LABELS) * (HR + gap) - gap
    sheet = Image.new("RGB", (width, label_h + len(rows) * (HR + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    for col, label in enumerate(LABELS):
        draw.text((col * (HR + gap) + 4, 3), label.format(t=args.temperature), fill="black")
    for r, (name, hr, lr) in enumerate(rows):
        for col, panel in enumerate(panels(cold, hot, hr, lr)):
            sheet.paste(Image.fromarray(panel), (col * (HR + gap), label_h + r * (HR + gap)))
        print(f"row {r}: {name}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out} ({sheet.size[0]}x{sheet.size[1]})")


if __name__ == "__main__":
    main()
