"""The generative side of the evaluation: what temperature buys and costs.

A VDVAE-SR sample at temperature t > 0 should trade PSNR for texture. These
measures say whether it does, on the evaluation protocol's crops (numpy only,
plus an Inception network for the perceptual score):

- ``diversity``: per-pixel standard deviation of K samples, in 8-bit levels of
  Y, averaged over the HR crop's most textured quarter and its flattest quarter
  (local standard deviation of the HR luma in 9x9 windows). A model whose
  latents carry texture varies in the former and not in the latter.
- ``hf_ratio``: high-frequency energy of the output over the HR crop's
  (Y minus its 5x5 box blur, squared, summed over the set). Bicubic and
  regression models sit well below 1; HR-like texture is near 1.
- ``std_error_r``: Pearson correlation, per image then averaged, between the
  std map of K samples and the absolute Y error of the temperature-0 output,
  both smoothed over 8x8 windows: does the std map mark where the model is wrong?
- ``kid`` / ``fid``: KID (unbiased, polynomial kernel) and FID between Inception
  features of 128x128 patches (stride 64) of the HR crops and of the outputs.
  KID is the one to read at this sample size; FID is biased below 2048 samples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from sr_train.metrics import frechet_distance, psnr_y, rgb_to_y, ssim_y

SampleFn = Callable[[np.ndarray, float, int], np.ndarray]
#: uint8 [N, H, W, 3] images -> [N, D] float64 features
FeatureFn = Callable[[Sequence[np.ndarray]], np.ndarray]

PATCH, PATCH_STRIDE = 128, 64
TEXTURE_WINDOW = 9
SMOOTH_WINDOW = 8


def box_filter(img: np.ndarray, size: int) -> np.ndarray:
    """Mean over size x size windows ('same' output, edges replicated), by integral image."""
    pad_lo, pad_hi = size // 2, size - 1 - size // 2
    p = np.pad(img, ((pad_lo, pad_hi), (pad_lo, pad_hi)), mode="edge")
    c = np.pad(p.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = img.shape
    total = c[size : size + h, size : size + w] - c[:h, size : size + w] - c[size : size + h, :w] + c[:h, :w]
    return total / (size * size)


def texture_masks(hr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(textured, flat) boolean masks: the top and bottom quarter of the HR luma's local std."""
    y = rgb_to_y(hr)
    mean = box_filter(y, TEXTURE_WINDOW)
    local_std = np.sqrt(np.maximum(box_filter(y * y, TEXTURE_WINDOW) - mean * mean, 0.0))
    lo, hi = np.quantile(local_std, [0.25, 0.75])
    return local_std >= hi, local_std <= lo


def high_pass_energy(img: np.ndarray) -> float:
    """Sum of squared Y minus its 5x5 box blur (in 8-bit levels)."""
    y = rgb_to_y(img)
    return float(((y - box_filter(y, 5)) ** 2).sum())


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def patches(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """PATCH x PATCH crops at PATCH_STRIDE of every image (the perceptual score's samples)."""
    out = []
    for img in images:
        h, w = img.shape[:2]
        for y in range(0, h - PATCH + 1, PATCH_STRIDE):
            for x in range(0, w - PATCH + 1, PATCH_STRIDE):
                out.append(np.ascontiguousarray(img[y : y + PATCH, x : x + PATCH]))
    return out


def kid(a: np.ndarray, b: np.ndarray) -> float:
    """Kernel Inception Distance: unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3."""
    d = a.shape[1]
    kxx, kyy, kxy = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
    m, n = len(a), len(b)
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2 * kxy.mean())


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(a, b)


def evaluate_generative(
    sample_fn: SampleFn,
    hrs: Sequence[np.ndarray],
    lrs: np.ndarray,
    temperatures: Sequence[float],
    seed: int,
    samples: int = 8,
    batch_size: int = 8,
    features: FeatureFn | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Every measure above per temperature, plus the bicubic row, for prepared (hr, lr) pairs.

    Sample k of every image uses seed ``seed + k``; temperature 0 always comes
    first (its error is what the std maps are compared with) and draws one sample.
    """
    from sr_train.degrade import upscale_bicubic_x4

    if samples < 2:
        raise ValueError(f"diversity needs at least 2 samples, got {samples}")
    masks = [texture_masks(hr) for hr in hrs]
    hr_energy = sum(high_pass_energy(hr) for hr in hrs)
    hr_feats = features(patches(hrs)) if features is not None else None

    def run(t: float, s: int) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for i in range(0, len(lrs), batch_size):
            out.extend(sample_fn(lrs[i : i + batch_size], t, s))
        return out

    def quality(srs: Sequence[np.ndarray]) -> dict[str, float]:
        row = {
            "psnr_y": float(np.mean([psnr_y(h, s) for h, s in zip(hrs, srs, strict=True)])),
            "ssim_y": float(np.mean([ssim_y(h, s) for h, s in zip(hrs, srs, strict=True)])),
            "hf_ratio": sum(high_pass_energy(s) for s in srs) / hr_energy,
        }
        if hr_feats is not None and features is not None:
            feats = features(patches(srs))
            row |= {"kid": kid(hr_feats, feats), "fid": frechet(hr_feats, feats)}
        return row

    bicubic = [upscale_bicubic_x4(lr) for lr in lrs]
    result: dict[str, Any] = {"samples": samples, "seed": seed, "n_images": len(hrs), "bicubic": quality(bicubic)}
    temps = [0.0] + [float(t) for t in temperatures if t != 0]
    bar = tqdm(total=1 + (len(temps) - 1) * samples, desc="generative", disable=not progress)
    t0 = run(0.0, seed)
    bar.update()
    err0 = [np.abs(rgb_to_y(s) - rgb_to_y(h)) for s, h in zip(t0, hrs, strict=True)]
    rows = [
        {
            "temperature": 0.0,
            **quality(t0),
            "diversity_textured": 0.0,
            "diversity_flat": 0.0,
            "std_error_r": float("nan"),
        }
    ]
    for t in temps[1:]:
        draws = []
        for k in range(samples):
            draws.append(run(t, seed + k))
            bar.update()
        stds = [np.stack([rgb_to_y(d[i]) for d in draws]).std(axis=0) for i in range(len(hrs))]
        rows.append(
            {
                "temperature": t,
                **quality(draws[0]),
                "diversity_textured": float(np.mean([s[m].mean() for s, (m, _) in zip(stds, masks, strict=True)])),
                "diversity_flat": float(np.mean([s[m].mean() for s, (_, m) in zip(stds, masks, strict=True)])),
                "std_error_r": float(
                    np.mean(
                        [
                            pearson(box_filter(s, SMOOTH_WINDOW), box_filter(e, SMOOTH_WINDOW))
                            for s, e in zip(stds, err0, strict=True)
                        ]
                    )
                ),
            }
        )
    bar.close()
    result["model"] = rows
    return result


def markdown_table(result: Mapping[str, Any], label: str) -> str:
    """One row per temperature, bicubic first; '-' where a measure does not apply."""
    has_kid = "kid" in result["bicubic"]
    cols = ["PSNR-Y", "SSIM-Y", "HF energy / HR"] + (["KID x1000", "FID (patches)"] if has_kid else [])
    cols += ["std textured (levels)", "std flat (levels)", "r(std, error)"]
    lines = ["| method | t | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]

    def cells(r: Mapping[str, Any], generative: bool) -> str:
        vals = [f"{r['psnr_y']:.2f}", f"{r['ssim_y']:.4f}", f"{r['hf_ratio']:.3f}"]
        if has_kid:
            vals += [f"{1000 * r['kid']:.2f}", f"{r['fid']:.1f}"]
        if generative and r["temperature"] > 0:
            vals += [f"{r['diversity_textured']:.2f}", f"{r['diversity_flat']:.2f}", f"{r['std_error_r']:+.2f}"]
        else:
            vals += ["-", "-", "-"]
        return " | ".join(vals)

    lines.append(f"| bicubic | - | {cells(result['bicubic'], False)} |")
    for r in result["model"]:
        lines.append(f"| {label} | {r['temperature']:g} | {cells(r, True)} |")
    patches_note = f"; KID/FID over {PATCH}x{PATCH} patches at stride {PATCH_STRIDE}" if has_kid else ""
    lines += [
        "",
        f"{result['n_images']} images, {result['samples']} samples per temperature > 0, "
        f"seed {result['seed']}{patches_note}.",
    ]
    return "\n".join(lines) + "\n"
