"""The generative measures: diversity by region, high-frequency energy, std-map/error
correlation and KID, each checked on sample functions whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from sr_train import evaluate as ev
from sr_train import generative as gen


def _pairs(n: int = 3, size: int = 128) -> tuple[list[np.ndarray], np.ndarray]:
    skimage_data = pytest.importorskip("skimage.data")
    pool = [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea()]
    pairs = [ev.prepare_eval_pair(pool[i % 3], size) for i in range(n)]
    return [hr for hr, _ in pairs], np.stack([lr for _, lr in pairs])


def test_bicubic_as_the_model_has_no_diversity_and_bicubic_energy() -> None:
    hrs, lrs = _pairs()
    result = gen.evaluate_generative(ev.bicubic_sample_fn, hrs, lrs, [0.0, 0.6], seed=0, samples=3)
    t0, t6 = result["model"]
    assert (t0["temperature"], t6["temperature"]) == (0.0, 0.6)
    assert t6["diversity_textured"] < 1e-9 and t6["diversity_flat"] < 1e-9
    assert t6["hf_ratio"] == pytest.approx(result["bicubic"]["hf_ratio"])
    assert 0.05 < result["bicubic"]["hf_ratio"] < 0.6  # bicubic is smooth


def test_an_oracle_that_is_unsure_where_texture_is_shows_it_in_every_measure() -> None:
    hrs, lrs = _pairs()
    truth = {lr.tobytes(): hr for hr, lr in zip(hrs, lrs, strict=True)}

    def unsure_oracle(lr: np.ndarray, temperature: float, seed: int) -> np.ndarray:
        """Bicubic at t=0; at t>0 the HR image plus noise scaled by local texture."""
        out = []
        rng = np.random.default_rng(seed)
        for x in lr:
            if temperature == 0:
                out.append(ev.bicubic_sample_fn(x[None], 0, 0)[0])
                continue
            hr = truth[x.tobytes()].astype(np.float64)
            textured, _ = gen.texture_masks(truth[x.tobytes()])
            noise = rng.standard_normal(hr.shape[:2])[..., None] * (1 + 6 * textured[..., None]) * temperature
            out.append(np.clip(hr + noise, 0, 255).round().astype(np.uint8))
        return np.stack(out)

    result = gen.evaluate_generative(unsure_oracle, hrs, lrs, [0.0, 0.8], seed=0, samples=4)
    row = result["model"][1]
    assert row["diversity_textured"] > 3 * row["diversity_flat"] > 0
    assert row["std_error_r"] > 0.3  # bicubic's error is largest where texture is
    assert row["hf_ratio"] > result["model"][0]["hf_ratio"]
    assert row["psnr_y"] > result["model"][0]["psnr_y"]
    table = gen.markdown_table(result, "oracle")
    assert "| oracle | 0.8 |" in table and "| bicubic | - |" in table


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    assert abs(gen.kid(a, b)) < 0.05
    assert gen.kid(a, b + 1.0) > 10 * abs(gen.kid(a, b))


def test_patches_tile_each_image_at_the_stride() -> None:
    img = np.zeros((256, 320, 3), np.uint8)
    assert len(gen.patches([img])) == 3 * 4
    assert gen.patches([img])[0].shape == (gen.PATCH, gen.PATCH, 3)
