"""The x4 degradation and the image I/O that training and evaluation share.

Torch-free on purpose: the evaluation protocol and the benchmarks import it,
and the LR seen in training must be made by exactly the same code as the LR
the model is evaluated on (docs/design.md, Evaluation protocol). Pillow's BICUBIC downscale is
antialiased (its kernel widens with the scale, like MATLAB ``imresize``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from sr_runtime.imaging import RASTER_FORMATS

SCALE = 4
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _as_rgb_image(img: Image.Image | np.ndarray) -> Image.Image:
    """Accept a PIL image or an HxWx3 uint8 array; reject anything ambiguous."""
    if isinstance(img, Image.Image):
        return img if img.mode == "RGB" else img.convert("RGB")
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 array, got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr, mode="RGB")


def degrade_bicubic_x4(hr: Image.Image | np.ndarray) -> np.ndarray:
    """THE degradation: Pillow BICUBIC x4 downscale of an RGB image.

    Returns an (H/4)x(W/4)x3 uint8 array. H and W must be divisible by 4 so
    that LR and HR pixels line up exactly (the protocol crops first).
    """
    im = _as_rgb_image(hr)
    w, h = im.size
    if w % SCALE or h % SCALE:
        raise ValueError(f"HR size {w}x{h} is not divisible by {SCALE}")
    return np.asarray(im.resize((w // SCALE, h // SCALE), Image.Resampling.BICUBIC))


def upscale_bicubic_x4(lr: Image.Image | np.ndarray) -> np.ndarray:
    """The baseline every model is reported beside: Pillow BICUBIC x4 upscale."""
    im = _as_rgb_image(lr)
    w, h = im.size
    return np.asarray(im.resize((w * SCALE, h * SCALE), Image.Resampling.BICUBIC))


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to HxWx3 uint8 RGB, honouring its EXIF orientation.

    Only raster formats are tried (never a plugin that runs a program); any
    decoding failure is a ValueError naming the file.
    """
    try:
        with Image.open(path, formats=RASTER_FORMATS) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L"):
                # 16-bit greyscale: keep the top 8 bits instead of Pillow's clipping.
                im = Image.fromarray((np.asarray(im, dtype=np.uint32) >> 8).astype(np.uint8))
            return np.asarray(im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 -- hostile bytes raise anything; the caller needs the file name
        raise ValueError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None


def list_images(root: str | Path, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> list[Path]:
    """All image files under ``root`` (recursive), sorted so every run sees one order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    wanted = {s.lower() for s in suffixes}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in wanted)
