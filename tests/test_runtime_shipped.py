"""sr_runtime against the shipped model (sr_runtime/models/vdvae-sr-256, or $SR_MODEL_DIR)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from doubles import photo_lr, seam_ratio
from PIL import Image

from sr_runtime import Upscaler
from sr_runtime.model import default_model_dir
from sr_runtime.tiling import plan_tiles

REPO = Path(__file__).resolve().parent.parent
SHIPPED = default_model_dir()
SAMPLE = REPO / "assets" / "sample.png"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


@pytest.fixture(scope="module")
def shipped() -> Upscaler:
    return Upscaler(SHIPPED, backend="cpu")


@pytest.mark.slow
def test_shipped_model_upscales_the_bundled_sample(shipped: Upscaler) -> None:
    lr = Image.open(SAMPLE).convert("RGB")
    out = shipped.run(lr)
    assert out.size == (4 * lr.width, 4 * lr.height) and out.mode == "RGB"
    # A super-resolved image, scaled back down, must look like its input.
    back = out.resize(lr.size, Image.Resampling.BICUBIC)
    assert psnr(np.asarray(back), np.asarray(lr)) > 25


@pytest.mark.slow
def test_shipped_model_is_deterministic_at_temperature_zero(shipped: Upscaler) -> None:
    img = photo_lr(48)
    assert np.array_equal(shipped.run(img), shipped.run(img))


@pytest.mark.slow
def test_shipped_model_leaves_no_seams_on_a_real_photo(shipped: Upscaler) -> None:
    # 4x4 tiles of 64. Gravel is a real but stationary photo: with this few tile borders a
    # portrait's ratio is mostly where its edges happen to fall (an untiled bicubic x4 of
    # the astronaut at 192 px scores 1.2 at these columns; gravel scores 1.01).
    size = 192
    photo = photo_lr(size, "gravel")
    hr = shipped.run(photo)
    plan = plan_tiles(size, size, shipped.spec.lr_size, shipped.tile_overlap)
    assert abs(seam_ratio(hr, plan) - 1.0) <= 0.10
