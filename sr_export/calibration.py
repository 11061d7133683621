"""Real and extreme LR inputs for parity, FP16 range measurement and FP16 verification.

Real photos are scikit-image's bundled samples (astronaut, coffee, chelsea):
actual camera images that ship inside a package, so no download. LR crops are
made by the project's one degradation (Pillow bicubic x4, sr_train.degrade),
exactly like training and evaluation LR.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sr_train.degrade import SCALE, degrade_bicubic_x4

PHOTOS = ("astronaut", "coffee", "chelsea")


def _photo(name: str) -> np.ndarray:
    """HxWx3 uint8 from skimage.data (imported lazily: only the export needs it)."""
    from skimage import data

    return np.asarray(getattr(data, name)())[..., :3]


def _crops(img: np.ndarray, size: int, per_photo: int) -> list[np.ndarray]:
    """``per_photo`` size x size crops spread along the diagonal (upscaled first if the photo is small)."""
    h, w = img.shape[:2]
    if min(h, w) < size:
        f = size / min(h, w)
        target = (max(size, round(w * f)), max(size, round(h * f)))
        img = np.asarray(Image.fromarray(img).resize(target, Image.Resampling.BICUBIC))
        h, w = img.shape[:2]
    out = []
    for k in range(per_photo):
        frac = (k + 0.5) / per_photo
        y, x = round((h - size) * frac), round((w - size) * frac)
        out.append(img[y : y + size, x : x + size])
    return out


def photo_lr_batch(lr_size: int, per_photo: int = 2) -> np.ndarray:
    """[3 * per_photo, 3, lr, lr] float32 in [0, 1]: bicubic-x4 LR of real photo crops."""
    lrs = [
        degrade_bicubic_x4(np.ascontiguousarray(crop))
        for name in PHOTOS
        for crop in _crops(_photo(name), lr_size * SCALE, per_photo)
    ]
    return (np.stack(lrs).astype(np.float32) / 255.0).transpose(0, 3, 1, 2).copy()


def extreme_lr_batch(lr_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """All black, all white and uniform noise LR images, each [1, 3, lr, lr] float32."""
    shape = (1, 3, lr_size, lr_size)
    rng = np.random.default_rng(seed)
    return {
        "black": np.zeros(shape, np.float32),
        "white": np.ones(shape, np.float32),
        "uniform_noise": rng.random(shape, dtype=np.float32),
    }
