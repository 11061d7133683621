"""Pins PSNR-Y / SSIM-Y to values known independently of sr_train.metrics."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sr_train import metrics
from sr_train.degrade import degrade_bicubic_x4, upscale_bicubic_x4


def _photo() -> np.ndarray:
    """A real photo (scikit-image's astronaut ships inside its wheel)."""
    skimage_data = pytest.importorskip("skimage.data")
    return np.ascontiguousarray(skimage_data.astronaut()[:256, 128:384])


def test_rgb_to_y_matches_bt601_endpoints_and_formula() -> None:
    px = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [10, 200, 30]]], np.uint8)
    y = metrics.rgb_to_y(px)
    assert y[0, 0] == pytest.approx(16.0)
    assert y[0, 1] == pytest.approx(235.0)
    assert y[0, 2] == pytest.approx(16.0 + 65.481)
    assert y[0, 3] == pytest.approx(16.0 + (65.481 * 10 + 128.553 * 200 + 24.966 * 30) / 255)


def test_identical_images_give_inf_psnr_and_ssim_one() -> None:
    img = _photo()
    assert metrics.psnr_y(img, img.copy()) == math.inf
    assert metrics.ssim_y(img, img.copy()) == pytest.approx(1.0, abs=1e-12)


def test_constant_offset_psnr_by_hand() -> None:
    # Every channel +10 moves Y by 10 * (65.481 + 128.553 + 24.966) / 255
    # = 2190 / 255, so MSE = (2190/255)^2 and PSNR = 20 log10(255^2 / 2190)
    # = 20 log10(29.6918) = 29.4528 dB.
    a = np.full((32, 32, 3), 100, np.uint8)
    b = a + np.uint8(10)
    assert metrics.psnr_y(a, b) == pytest.approx(29.4528, abs=1e-4)
    # On a textured image the offset is the same everywhere: same PSNR.
    img = np.clip(_photo().astype(int), 0, 245).astype(np.uint8)
    assert metrics.psnr_y(img, img + np.uint8(10)) == pytest.approx(29.4528, abs=1e-4)


def test_ssim_constant_images_by_hand() -> None:
    # Flat images: variances and covariance vanish, the map is
    # (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1) everywhere.
    a = np.full((20, 20, 3), 100, np.uint8)
    b = np.full((20, 20, 3), 110, np.uint8)
    ya, yb, c1 = metrics.rgb_to_y(a)[0, 0], metrics.rgb_to_y(b)[0, 0], (0.01 * 255) ** 2
    expected = (2 * ya * yb + c1) / (ya**2 + yb**2 + c1)
    assert metrics.ssim_y(a, b) == pytest.approx(expected, abs=1e-12)


def test_ssim_matches_scikit_image_on_a_real_photo_pair() -> None:
    skm = pytest.importorskip("skimage.metrics")
    hr = _photo()
    sr = upscale_bicubic_x4(degrade_bicubic_x4(hr))
    ref = skm.structural_similarity(
        metrics.rgb_to_y(hr),
        metrics.rgb_to_y(sr),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
    )
    ours = metrics.ssim_y(hr, sr)
    assert 0.5 < ours < 0.99  # a real, imperfect reconstruction
    assert ours == pytest.approx(ref, abs=1e-4)


def test_psnr_matches_scikit_image_on_a_real_photo_pair() -> None:
    skm = pytest.importorskip("skimage.metrics")
    hr = _photo()
    sr = upscale_bicubic_x4(degrade_bicubic_x4(hr))
    ref = skm.peak_signal_noise_ratio(metrics.rgb_to_y(hr), metrics.rgb_to_y(sr), data_range=255)
    assert metrics.psnr_y(hr, sr) == pytest.approx(ref, abs=1e-9)


def test_crop_border_ignores_the_edges() -> None:
    a = _photo()
    b = a.copy()
    b[:4] = 0  # damage only the top 4 rows
    assert metrics.psnr_y(a, b) < 40
    assert metrics.psnr_y(a, b, crop_border=4) == math.inf
    assert metrics.ssim_y(a, b, crop_border=4) == pytest.approx(1.0)


def test_rejects_mismatched_or_non_uint8_inputs() -> None:
    a = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError):
        metrics.psnr_y(a, np.zeros((16, 17, 3), np.uint8))
    with pytest.raises(ValueError):
        metrics.ssim_y(a, a.astype(np.float32))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        metrics.rgb_to_y(np.asarray(Image.new("L", (4, 4))))


def test_metrics_module_does_not_import_torch() -> None:
    code = "import sys, sr_train.metrics; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
