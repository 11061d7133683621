"""PSNR and SSIM on the Y channel, as the SR literature reports them; the Frechet distance FID takes.

numpy only (no torch, no scipy) so that benchmarks and the torch-free runtime's
users can import it. Conventions, stated because papers differ on them:

- Y is ITU-R BT.601 as MATLAB ``rgb2ycbcr``: Y = 16 + 65.481 R + 128.553 G +
  24.966 B for RGB in [0, 1], i.e. in [16, 235] on the 0..255 scale. It is kept
  in float64; MATLAB rounds it to uint8 for uint8 input, which moves PSNR by
  hundredths of a dB at most.
- Peak value 255 for PSNR and L = 255 for SSIM.
- SSIM as Wang et al.'s ``ssim_index.m``: 11x11 Gaussian window, sigma 1.5,
  K1 = 0.01, K2 = 0.03, 'valid' filtering (no padding), mean of the map, no
  automatic downsampling (the later ``ssim.m`` downsamples by
  round(min(H, W) / 256), which is 1 for the 256x256 protocol crops anyway).
- ``crop_border`` pixels are removed from every edge first; the default is 0
  (no crop): the evaluation protocol of docs/design.md.
"""

from __future__ import annotations

import numpy as np

_Y_WEIGHTS = np.array([65.481, 128.553, 24.966]) / 255.0
_SSIM_WIN = 11
_SSIM_SIGMA = 1.5
_K1, _K2, _L = 0.01, 0.03, 255.0


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    """Refuse silently meaningless comparisons (other dtypes, shapes, layouts)."""
    for x in (a, b):
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3:
            raise ValueError(f"expected HxWx3 uint8 RGB, got {x.dtype} {x.shape}")
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")


def _crop(y: np.ndarray, border: int) -> np.ndarray:
    if border < 0:
        raise ValueError(f"crop_border must be >= 0, got {border}")
    return y[border : y.shape[0] - border, border : y.shape[1] - border] if border else y


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> HxW float64 Y in [16, 235] (BT.601, MATLAB rgb2ycbcr)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected HxWx3 uint8 RGB, got {rgb.dtype} {rgb.shape}")
    return 16.0 + rgb.astype(np.float64) @ _Y_WEIGHTS


def psnr_y(a: np.ndarray, b: np.ndarray, crop_border: int = 0) -> float:
    """PSNR in dB between the Y channels of two uint8 RGB images; inf if identical."""
    _check_pair(a, b)
    diff = _crop(rgb_to_y(a), crop_border) - _crop(rgb_to_y(b), crop_border)
    mse = float(np.mean(diff * diff))
    return float("inf") if mse == 0.0 else 10.0 * float(np.log10(255.0**2 / mse))


def _gaussian_1d(size: int = _SSIM_WIN, sigma: float = _SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian; its outer product is MATLAB's fspecial('gaussian')."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation with the window g (x) g (symmetric, so = convolution)."""
    n = g.size
    h, w = img.shape
    rows = np.zeros((h - n + 1, w))
    for k in range(n):
        rows += g[k] * img[k : h - n + 1 + k, :]
    out = np.zeros((h - n + 1, w - n + 1))
    for k in range(n):
        out += g[k] * rows[:, k : w - n + 1 + k]
    return out


def ssim_y(a: np.ndarray, b: np.ndarray, crop_border: int = 0) -> float:
    """Mean SSIM between the Y channels of two uint8 RGB images (Wang et al. 2004)."""
    _check_pair(a, b)
    x = _crop(rgb_to_y(a), crop_border)
    y = _crop(rgb_to_y(b), crop_border)
    if min(x.shape) < _SSIM_WIN:
        raise ValueError(f"SSIM needs at least {_SSIM_WIN}x{_SSIM_WIN} pixels, got {x.shape}")
    g = _gaussian_1d()
    mu_x, mu_y = _filter_valid(x, g), _filter_valid(y, g)
    var_x = _filter_valid(x * x, g) - mu_x * mu_x
    var_y = _filter_valid(y * y, g) - mu_y * mu_y
    cov = _filter_valid(x * y, g) - mu_x * mu_y
    c1, c2 = (_K1 * _L) ** 2, (_K2 * _L) ** 2
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return float(np.mean(num / den))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two [N, D] feature sets (numpy only).

    tr(sqrtm(S1 S2)) is the sum of the square roots of the eigenvalues of
    S1 S2, which are >= 0 in exact arithmetic: no scipy needed.
    """
    m = float(np.sum((a.mean(0) - b.mean(0)) ** 2))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2).real.clip(min=0.0)
    return m + float(np.trace(s1) + np.trace(s2) - 2.0 * np.sqrt(eig).sum())
