"""sr_runtime against the shipped model (sr_runtime/models/vdvae-sr-256, or $SR_MODEL_DIR)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from doubles import photo_lr
from PIL import Image

from sr_runtime import RunStats, Upscaler
from sr_runtime.model import default_model_dir

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
def test_shipped_model_runs_a_photo_in_one_call(shipped: Upscaler) -> None:
    """Fully convolutional: a whole photo is one backend call, no tiles to blend."""
    stats = RunStats()
    out = shipped.run(photo_lr(150, "gravel"), stats=stats)
    assert shipped.spec.fully_convolutional and stats.batches == 1 and out.shape == (600, 600, 3)


@pytest.mark.slow
def test_shipped_model_samples_carry_texture_near_the_mean(shipped: Upscaler) -> None:
    """At a low temperature the latents change the image (they are not collapsed), by a few levels."""
    photo = photo_lr(64, "gravel")
    mean = shipped.run(photo).astype(np.float64)
    a = shipped.run(photo, temperature=0.1, seed=1).astype(np.float64)
    b = shipped.run(photo, temperature=0.1, seed=2).astype(np.float64)
    spread = np.abs(a - b).mean()
    assert 0.3 < spread < 4.0, spread
    assert np.abs(a - mean).mean() < 4.0
