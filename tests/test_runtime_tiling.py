"""Tiling, blending and the noise bank: seams on a real photo, neighbour noise, tile plans."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from doubles import photo_lr, seam_ratio

from sr_runtime import Upscaler
from sr_runtime.noise import NoiseBank
from sr_runtime.tiling import Blender, plan_tiles, ramp


@pytest.mark.parametrize("name", ["astronaut", "gravel"])
def test_seams_on_a_real_photo_are_within_10_percent(double_model: Path, name: str) -> None:
    # 256 LR pixels give ~20 tile borders per axis: fewer make the ratio mostly photo content.
    photo = photo_lr(256, name)
    with Upscaler(double_model, backend="cpu") as up:
        hr = up.run(photo)
        plan = plan_tiles(256, 256, up.spec.lr_size, up.tile_overlap)
    assert min(plan.grid) >= 10  # the photo really is split into many tiles in each direction
    assert abs(seam_ratio(hr, plan) - 1.0) <= 0.10


@pytest.mark.parametrize("name", ["astronaut", "gravel"])
def test_seam_metric_detects_hard_tile_edges(double_model: Path, name: str) -> None:
    """Negative control: without overlap/blending, the same photo shows seams the metric catches."""
    photo = photo_lr(256, name)
    with Upscaler(double_model, backend="cpu", tile_overlap=0) as up:
        hr = up.run(photo)
        plan = plan_tiles(256, 256, up.spec.lr_size, 0)
    assert seam_ratio(hr, plan) > 1.10


@pytest.mark.parametrize("size", [1, 2, 5, 31, 32, 33, 47, 48, 100, 257])
def test_plan_covers_the_image_with_the_minimum_overlap(size: int) -> None:
    plan = plan_tiles(size, size + 3, (32, 32), 8)
    (ph, pw), (by, bx) = plan.padded_size, plan.pad_before
    assert ph >= size + 16 and pw >= size + 3 + 16 and by >= 8 and bx >= 8
    for starts, padded in ((plan.ys, ph), (plan.xs, pw)):
        assert starts[0] == 0 and starts[-1] + 32 == padded  # first and last tile touch the borders
        assert np.all(np.diff(starts) <= 32 - 8)  # neighbours share at least the overlap


def test_plan_rejects_an_overlap_of_half_a_tile() -> None:
    with pytest.raises(ValueError, match="tile overlap"):
        plan_tiles(100, 100, (32, 32), 16)


@pytest.mark.parametrize(("height", "width", "batch"), [(70, 45, 5), (1, 1, 1), (33, 200, 16), (100, 20, 3)])
def test_band_blending_equals_a_whole_image_weighted_average(height: int, width: int, batch: int) -> None:
    """Rows handed over band by band, each once and in order, equal normalising one whole-image accumulator."""
    plan = plan_tiles(height, width, (32, 32), 8)
    tiles = np.random.default_rng(0).random((plan.count, 3, 128, 128), dtype=np.float32) * 1.2 - 0.1
    window = np.outer(ramp(128, 32), ramp(128, 32))
    (ph, pw), (by, bx) = plan.padded_size, plan.pad_before
    total, weight = np.zeros((3, ph * 4, pw * 4)), np.zeros((ph * 4, pw * 4))
    for k in range(plan.count):
        y, x = (v * 4 for v in plan.origin(k))
        total[:, y : y + 128, x : x + 128] += tiles[k] * window
        weight[y : y + 128, x : x + 128] += window
    expected = np.clip(total / weight, 0, 1)[:, by * 4 : (by + height) * 4, bx * 4 : (bx + width) * 4]

    out = np.full((3, height * 4, width * 4), np.nan, np.float32)
    handed: list[tuple[int, int]] = []

    def sink(y0: int, rows: np.ndarray) -> None:
        handed.append((y0, rows.shape[1]))
        out[:, y0 : y0 + rows.shape[1]] = rows

    blender = Blender(plan, 3, 4, sink)
    for first in range(0, plan.count, batch):  # batches that straddle tile rows included
        blender.add(tiles[first : first + batch], first)
    blender.finish()
    assert [y0 for y0, _ in handed] == list(np.cumsum([0] + [n for _, n in handed[:-1]]))
    assert sum(n for _, n in handed) == height * 4
    np.testing.assert_allclose(out, expected, atol=2e-6)


def test_blender_takes_tiles_in_raster_order_only() -> None:
    plan = plan_tiles(70, 70, (32, 32), 8)
    tiles = np.zeros((plan.count, 3, 128, 128), np.float32)
    blender = Blender(plan, 3, 4, lambda y0, rows: None)
    with pytest.raises(ValueError, match="raster order"):
        blender.add(tiles[1:2], 1)
    blender.add(tiles[:2], 0)
    with pytest.raises(ValueError, match="never added"):
        blender.finish()


def test_ramp_is_smooth_positive_and_symmetric() -> None:
    w = ramp(128, 32)
    assert w.min() > 0 and w.max() == 1.0
    assert np.allclose(w, w[::-1])
    assert np.abs(np.diff(w)).max() < 0.06  # no step anywhere


@pytest.mark.parametrize("grid", [(1, 1), (1, 7), (3, 15), (4, 16), (5, 17), (6, 31), (9, 9), (2, 33)])
def test_noise_rows_differ_between_all_eight_neighbours(grid: tuple[int, int]) -> None:
    bank = NoiseBank.create(8, temperature=1.0, seed=0, max_batch=8)
    n_rows, n_cols = grid
    for sample in range(3):
        rows = bank.tile_rows(grid, sample).reshape(grid)
        for r in range(n_rows):
            for c in range(n_cols):
                for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):
                    if 0 <= r + dr < n_rows and 0 <= c + dc < n_cols:
                        assert rows[r, c] != rows[r + dr, c + dc], (grid, sample, r, c, dr, dc)


def test_samples_give_every_tile_a_different_row() -> None:
    bank = NoiseBank.create(8, temperature=1.0, seed=0, max_batch=4)
    per_sample = np.stack([bank.tile_rows((3, 5), s) for s in range(bank.rows)])
    assert all(len(set(col)) == bank.rows for col in per_sample.T)


def test_batches_are_contiguous_bank_slices() -> None:
    bank = NoiseBank.create(5, temperature=0.7, seed=3, max_batch=6)
    rows = bank.tile_rows((4, 16))
    batches = bank.batches(rows, 6)
    assert sum(n for _, n, _ in batches) == len(rows) and all(n <= 6 for _, n, _ in batches)
    for first, count, start in batches:
        expected = bank.data[rows[first : first + count]]
        assert np.array_equal(bank.slice(start, count), expected)


def test_noise_bank_is_seeded_scaled_and_zero_at_temperature_zero() -> None:
    a = NoiseBank.create(1000, temperature=0.5, seed=1, max_batch=4)
    b = NoiseBank.create(1000, temperature=0.5, seed=1, max_batch=4)
    c = NoiseBank.create(1000, temperature=0.5, seed=2, max_batch=4)
    assert np.array_equal(a.data, b.data) and not np.array_equal(a.data, c.data)
    assert abs(a.data[: a.rows].std() - 0.5) < 0.02
    zero = NoiseBank.create(1000, temperature=0.0, seed=1, max_batch=4)
    assert not zero.data.any()


def test_a_large_noise_bank_gets_fewer_rows_but_never_below_four() -> None:
    row = 1000 * 4  # bytes per row of 1000 float32
    assert NoiseBank.create(1000, temperature=1.0, seed=0, max_batch=4, max_bytes=10 * row).rows == 7
    assert NoiseBank.create(1000, temperature=1.0, seed=0, max_batch=4, max_bytes=2 * row).rows == 4
    assert NoiseBank.create(1000, temperature=1.0, seed=0, max_batch=4).rows == 16


def test_adjacent_tiles_of_a_flat_image_get_different_texture(double_model: Path) -> None:
    """At temperature > 0 a flat grey image must not repeat one texture with the tile stride."""
    flat = np.full((120, 120), 0.5, np.float32)
    with Upscaler(double_model, backend="cpu", temperature=1.0, seed=5) as up:
        hr = up.run(flat)
        plan = plan_tiles(120, 120, up.spec.lr_size, up.tile_overlap)
    assert hr.std() > 0.01  # the noise really shows as texture

    # Each tile's centre (16x16 HR pixels, far from any overlap) is that tile's noise alone.
    def centre(row: int, col: int) -> np.ndarray:
        y = (plan.ys[row] - plan.pad_before[0]) * 4 + 56
        x = (plan.xs[col] - plan.pad_before[1]) * 4 + 56
        return hr[y : y + 16, x : x + 16].ravel()

    n_rows, n_cols = plan.grid
    for r in range(n_rows - 1):
        for c in range(n_cols - 1):
            for dr, dc in ((0, 1), (1, 0), (1, 1)):
                corr = np.corrcoef(centre(r, c), centre(r + dr, c + dc))[0, 1]
                assert abs(corr) < 0.5, (r, c, dr, dc, corr)


def test_temperature_zero_is_deterministic_and_seed_free(double_model: Path) -> None:
    photo = photo_lr(40)
    with Upscaler(double_model, backend="cpu", seed=1) as a, Upscaler(double_model, backend="cpu", seed=2) as b:
        assert np.array_equal(a.run(photo), a.run(photo))
        assert np.array_equal(a.run(photo), b.run(photo))


def test_temperature_above_zero_depends_on_the_seed_only(double_model: Path) -> None:
    photo = photo_lr(40)
    runs: dict[int, list[np.ndarray]] = {}
    for seed in (1, 1, 2):
        with Upscaler(double_model, backend="cpu", temperature=0.8, seed=seed) as up:
            runs.setdefault(seed, []).append(up.run(photo))
    assert np.array_equal(runs[1][0], runs[1][1])
    assert not np.array_equal(runs[1][0], runs[2][0])
