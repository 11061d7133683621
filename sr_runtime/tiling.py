"""Split an LR image into model-sized tiles and blend the upscaled tiles back.

The image is first reflection-padded by the overlap on every side (more where
it is smaller than a tile), so every real pixel lies where at least one tile
has full blending weight: image borders get context instead of a hard edge and
the weights never approach zero inside the crop. Tiles are spread evenly so all
overlaps are at least `overlap`; in the HR domain each tile is weighted by a
raised-cosine ramp over its overlap band and the sum is normalised by the total
weight, which leaves no step at tile borders.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one image go, in LR pixels of the padded image."""

    image_size: tuple[int, int]
    tile: tuple[int, int]
    overlap: int
    pad_before: tuple[int, int]
    padded_size: tuple[int, int]
    ys: np.ndarray
    xs: np.ndarray

    @property
    def grid(self) -> tuple[int, int]:
        return (len(self.ys), len(self.xs))

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    def origin(self, index: int) -> tuple[int, int]:
        """Top-left LR corner (padded coordinates) of tile `index` in raster order."""
        row, col = divmod(index, len(self.xs))
        return int(self.ys[row]), int(self.xs[col])


def _axis(size: int, tile: int, overlap: int) -> tuple[int, int, np.ndarray]:
    """Padding before/after and evenly spread tile starts along one axis."""
    padded = max(size + 2 * overlap, tile)
    before = (padded - size) // 2
    stride = tile - overlap
    n = 1 if padded <= tile else -(-(padded - tile) // stride) + 1
    starts = np.round(np.linspace(0, padded - tile, n)).astype(np.int64)
    return before, padded - size - before, starts


def plan_tiles(height: int, width: int, tile: tuple[int, int], overlap: int) -> TilePlan:
    """Plan tiles of size `tile` with at least `overlap` LR pixels shared between neighbours."""
    th, tw = tile
    if not 0 <= overlap < min(th, tw) // 2:
        raise ValueError(f"tile overlap must be in [0, {min(th, tw) // 2 - 1}] for {th}x{tw} tiles, got {overlap}")
    by, ay, ys = _axis(height, th, overlap)
    bx, ax, xs = _axis(width, tw, overlap)
    return TilePlan((height, width), tile, overlap, (by, bx), (height + by + ay, width + bx + ax), ys, xs)


def pad_image(chw: np.ndarray, plan: TilePlan) -> np.ndarray:
    """Pad a [C, H, W] image to the plan's padded size: reflect, or edge where too small to reflect."""
    h, w = plan.image_size
    (by, bx), (ph, pw) = plan.pad_before, plan.padded_size
    pads = ((0, 0), (by, ph - h - by), (bx, pw - w - bx))
    if min(h, w) > 1:
        return np.pad(chw, pads, mode="reflect")
    return np.pad(chw, pads, mode="edge")


def extract(padded: np.ndarray, plan: TilePlan, first: int, count: int, size: int) -> np.ndarray:
    """Tiles `first .. first+count-1` as one contiguous float32 [size, C, th, tw] batch, zero-padded to `size`."""
    if size < count:
        raise ValueError(f"a batch of size {size} cannot hold {count} tiles")
    th, tw = plan.tile
    out = np.empty((size, padded.shape[0], th, tw), np.float32)
    out[count:] = 0.0
    for k in range(count):
        y, x = plan.origin(first + k)
        out[k] = padded[:, y : y + th, x : x + tw]
    return out


def ramp(length: int, overlap: int) -> np.ndarray:
    """1-D weight: raised cosine over `overlap` samples at each end, 1 in between, never 0."""
    w = np.ones(length, np.float32)
    if overlap > 0:
        t = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        rise = 0.5 - 0.5 * np.cos(np.pi * t)
        w[:overlap] = rise
        w[length - overlap :] = rise[::-1]
    return w


#: Where a `Blender` hands finished rows: (first image row, float32 [C, n, W] in [0, 1]), a view valid during the call.
RowSink = Callable[[int, np.ndarray], None]


class Blender:
    """Blends one image's weighted HR tiles, added in raster order, into finished rows handed to `sink`.

    A row is final once the last tile row touching it is in, so only a band one
    tile high (and the padded image wide) is kept in float32, never the whole
    image: the caller turns each band into the output type and memory peaks at
    about the output itself. The window is separable and the tiles form a grid,
    so the total weight is the outer product of two 1-D sums, computed once.
    """

    def __init__(self, plan: TilePlan, channels: int, scale: int, sink: RowSink) -> None:
        self.plan = plan
        self.scale = scale
        self._sink = sink
        th, tw = plan.tile
        ph, pw = plan.padded_size
        (by, bx), (h, w) = plan.pad_before, plan.image_size
        wy = ramp(th * scale, plan.overlap * scale)
        wx = ramp(tw * scale, plan.overlap * scale)
        self._window = wy[:, None] * wx[None, :]
        sum_y = np.zeros(ph * scale, np.float32)
        sum_x = np.zeros(pw * scale, np.float32)
        for y in plan.ys:
            sum_y[y * scale : (y + th) * scale] += wy
        for x in plan.xs:
            sum_x[x * scale : (x + tw) * scale] += wx
        self._image_rows = (by * scale, (by + h) * scale)
        self._image_cols = slice(bx * scale, (bx + w) * scale)
        self._inv_y = 1.0 / sum_y
        self._inv_x = 1.0 / sum_x[self._image_cols]
        self._band = np.zeros((channels, th * scale, pw * scale), np.float32)
        self._top = 0  # padded HR row held by the band's first row
        self._row = 0  # tile row being added
        self._next = 0  # index of the next tile expected
        self._weighted = np.empty((channels, th * scale, tw * scale), np.float32)

    def add(self, hr: np.ndarray, first: int) -> None:
        """Add a batch `[N, C, th*s, tw*s]` of HR tiles starting at tile `first`; `hr` is left as it was."""
        if first != self._next:
            raise ValueError(f"tiles must be added in raster order: expected tile {self._next}, got {first}")
        if first + hr.shape[0] > self.plan.count:
            raise ValueError(f"tiles {first}..{first + hr.shape[0] - 1} exceed the plan's {self.plan.count}")
        s = self.scale
        hh, hw = hr.shape[2], hr.shape[3]
        for k in range(hr.shape[0]):
            row, col = divmod(first + k, len(self.plan.xs))
            if row != self._row:
                self._flush(int(self.plan.ys[row]) * s)
                self._row = row
            y = int(self.plan.ys[row]) * s - self._top
            x = int(self.plan.xs[col]) * s
            np.multiply(hr[k], self._window, out=self._weighted)
            self._band[:, y : y + hh, x : x + hw] += self._weighted
        self._next = first + hr.shape[0]

    def finish(self) -> None:
        """Hand over the rows still held; every tile of the plan must have been added."""
        if self._next != self.plan.count:
            raise ValueError(f"{self.plan.count - self._next} of {self.plan.count} tiles were never added")
        self._flush(self.plan.padded_size[0] * self.scale)

    def _flush(self, until: int) -> None:
        """Rows [top, until) are final: normalise and clip those inside the image, hand them over, slide up."""
        first, last = max(self._top, self._image_rows[0]), min(until, self._image_rows[1])
        if first < last:
            rows = self._band[:, first - self._top : last - self._top, self._image_cols]
            rows *= self._inv_y[first:last][:, None]
            rows *= self._inv_x[None, :]
            self._sink(first - self._image_rows[0], np.clip(rows, 0.0, 1.0, out=rows))
        done = until - self._top
        kept = self._band.shape[1] - done  # the overlap with the next tile row, never negative
        self._band[:, :kept] = self._band[:, done:]
        self._band[:, kept:] = 0.0
        self._top = until


# ---------------------------------------------------------------------------
# Fully convolutional models: whole frames, or large tiles that keep their valid centres
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FramePlan:
    """How one LR image runs through a fully convolutional model.

    The image is edge-padded at the bottom and right to `padded_size`
    (multiples of the model's stride), so its top-left pixel is the frame's
    origin and the position-keyed noise of a static region does not depend on
    the frame. One tile when it fits the memory budget; else tiles start at
    multiples of the stride and overlap by at least twice the receptive radius,
    and each keeps only `keep_y[i] x keep_x[j]` (frame LR coordinates), where
    every output pixel sees exactly what it would see in the whole frame.
    """

    image_size: tuple[int, int]
    padded_size: tuple[int, int]
    tile: tuple[int, int]
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    keep_y: tuple[tuple[int, int], ...]
    keep_x: tuple[tuple[int, int], ...]

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def whole(self) -> bool:
        return self.count == 1

    def tiles(self) -> list[tuple[int, int, tuple[int, int], tuple[int, int]]]:
        """(y0, x0, keep rows, keep cols) of every tile in raster order."""
        return [
            (y, x, ky, kx)
            for y, ky in zip(self.ys, self.keep_y, strict=True)
            for x, kx in zip(self.xs, self.keep_x, strict=True)
        ]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _frame_axis(
    length: int, tile: int, multiple: int, radius: int
) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """Tile starts (multiples of `multiple`) and the part each keeps, along one axis of `length`."""
    if length <= tile:
        return (0,), ((0, length),)
    step = (tile - 2 * radius) // multiple * multiple
    if step < multiple:
        raise ValueError(f"tile {tile} is too small for receptive radius {radius} (needs >= {2 * radius + multiple})")
    n = -(-(length - tile) // step) + 1
    starts = [(i * (length - tile) // (n - 1)) // multiple * multiple for i in range(n)]
    starts[-1] = length - tile
    cuts = [(starts[i + 1] + radius + starts[i] + tile - radius) // 2 for i in range(n - 1)]
    bounds = [0, *cuts, length]
    return tuple(starts), tuple((bounds[i], bounds[i + 1]) for i in range(n))


def min_frame_tile(multiple: int, radius: int) -> int:
    """The smallest tile side that leaves a valid centre: twice the radius plus one stride, rounded up."""
    return _round_up(2 * radius + multiple, multiple)


#: LR (h, w) min and max of one backend call, where the backend has them (a TensorRT profile).
FrameBounds = tuple[tuple[int, int], tuple[int, int]]


def plan_frame(
    height: int, width: int, multiple: int, radius: int, max_pixels: int, bounds: FrameBounds | None = None
) -> FramePlan:
    """Plan one image: the whole frame when its padded size has at most `max_pixels` LR pixels, else tiles.

    Tiles are as large as `max_pixels` allows (never below `min_frame_tile`,
    which may exceed the budget: a correct result first), so the overlap
    recomputed around each tile stays a small share. `bounds` (multiples of
    the stride) are the shapes one call accepts: a smaller image is padded up
    to the minimum, a larger one is tiled in calls no larger than the maximum.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    (lo_h, lo_w), (hi_h, hi_w) = bounds or ((multiple, multiple), (math.inf, math.inf))
    ph, pw = max(_round_up(height, multiple), lo_h), max(_round_up(width, multiple), lo_w)
    if ph * pw <= max_pixels and ph <= hi_h and pw <= hi_w:
        th, tw = ph, pw
    else:
        least = min_frame_tile(multiple, radius)
        side = max(least, math.isqrt(max_pixels) // multiple * multiple)
        th = int(max(lo_h, min(ph, side, hi_h)))
        tw = int(max(lo_w, min(pw, max(least, max_pixels // th // multiple * multiple), hi_w)))
        for axis, tile, length in (("height", th, ph), ("width", tw, pw)):
            if tile < length and tile < least:
                raise ValueError(
                    f"a {width}x{height} image needs tiles whose {axis} is at least {least} LR pixels (twice the "
                    f"receptive radius {radius} plus one stride), but one call takes at most {tile}"
                )
    ys, keep_y = _frame_axis(ph, th, multiple, radius)
    xs, keep_x = _frame_axis(pw, tw, multiple, radius)
    return FramePlan((height, width), (ph, pw), (th, tw), ys, xs, keep_y, keep_x)


def pad_frame(chw: np.ndarray, plan: FramePlan) -> np.ndarray:
    """Edge-pad a [C, h, w] image at the bottom and right to the plan's padded size (float32, contiguous)."""
    h, w = plan.image_size
    ph, pw = plan.padded_size
    out = np.pad(chw, ((0, 0), (0, ph - h), (0, pw - w)), mode="edge") if (ph, pw) != (h, w) else chw
    return np.ascontiguousarray(out, np.float32)
