"""Seeded noise bank shared by all calls of one backend.

Sampling noise for a 256x256 VDVAE-SR tile is hundreds of thousands of numbers;
drawing it per call would cost more than some backends' inference. Instead a
bank of `rows` noise vectors is drawn once and each tile gets a row keyed by
its position, so that

* neighbouring tiles (horizontal, vertical, diagonal) never share a row (shared
  noise prints a periodic texture with the tile stride), and
* a batch of consecutive tiles uses consecutive rows, stored wrap-extended so
  that any batch is one contiguous slice `[start, start + n)` of the bank: GPU
  backends bind a pointer into the device-resident bank and copy no noise.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sr_runtime.model import NoiseLevel

#: Rows drawn per bank at temperature > 0 (4x4 tile pattern before any repeat).
DEFAULT_ROWS = 16
#: Below this many rows, no row multiplier keeps all 8 neighbours distinct.
MIN_ROWS = 4
#: Memory the bank may take before it gets fewer rows (a large model's noise is ~18 MB a row).
MAX_BANK_BYTES = 512 * 2**20


@dataclass(frozen=True)
class NoiseBank:
    """`data` has `rows + max_batch - 1` rows: row `rows + j` repeats row `j`."""

    data: np.ndarray
    rows: int
    max_batch: int

    @classmethod
    def create(
        cls,
        noise_dim: int,
        *,
        temperature: float,
        seed: int,
        max_batch: int,
        rows: int = DEFAULT_ROWS,
        max_bytes: int = MAX_BANK_BYTES,
    ) -> NoiseBank:
        """Draw the bank once: standard normal times `temperature`, or zeros at temperature 0.

        Where `rows` rows would take more than `max_bytes`, fewer are drawn
        (never fewer than MIN_ROWS); `rows` on the result says how many.
        """
        if temperature < 0 or not np.isfinite(temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        if temperature == 0:
            # Every row would be zero: one row is enough and keeps batches unconstrained.
            return cls(np.zeros((max_batch, noise_dim), np.float32), 1, max_batch)
        if rows < MIN_ROWS:
            raise ValueError(f"a noise bank needs at least {MIN_ROWS} rows, got {rows}")
        row_bytes = noise_dim * np.dtype(np.float32).itemsize
        rows = max(MIN_ROWS, min(rows, max_bytes // row_bytes - (max_batch - 1)))
        rng = np.random.default_rng(seed)
        base = rng.standard_normal((rows, noise_dim), dtype=np.float32)
        base *= np.float32(temperature)
        extra = base[np.arange(max_batch - 1) % rows]
        return cls(np.ascontiguousarray(np.concatenate([base, extra])), rows, max_batch)

    def tile_rows(self, grid: tuple[int, int], sample: int = 0) -> np.ndarray:
        """Row index of every tile of a `(rows, cols)` grid in raster order, for one sample.

        Row = (col + m * row + sample) mod R. With m = cols mod R the rows of a
        raster run are consecutive (so whole grid rows batch together); m must
        avoid 0 and +-1 mod R or a vertical/diagonal neighbour would repeat.
        Different samples shift every tile to a different row while sample < R.
        """
        n_rows, n_cols = grid
        r = self.rows
        if r == 1:
            return np.zeros(n_rows * n_cols, np.int64)
        if sample >= r:
            raise ValueError(f"at most {r} distinct samples fit this noise bank, asked for #{sample + 1}")
        m = n_cols % r
        if m in (0, 1, r - 1):
            m = max(2, r // 2 - 2)
        ty, tx = np.divmod(np.arange(n_rows * n_cols), n_cols)
        return (tx + m * ty + sample) % r

    def batches(self, tile_rows: np.ndarray, batch_size: int) -> list[tuple[int, int, int]]:
        """Split tiles (raster order) into `(first_tile, count, bank_start)` runs of consecutive rows."""
        limit = min(batch_size, self.max_batch)
        out: list[tuple[int, int, int]] = []
        start = 0
        n = len(tile_rows)
        for i in range(1, n + 1):
            breaks = i == n or i - start == limit or tile_rows[i] != (tile_rows[i - 1] + 1) % self.rows
            if breaks:
                out.append((start, i - start, int(tile_rows[start])))
                start = i
        return out

    def slice(self, start: int, count: int) -> np.ndarray:
        """The `[count, noise_dim]` noise of a batch: a view, no copy."""
        return self.data[start : start + count]


# ---------------------------------------------------------------------------
# Position-keyed noise for fully convolutional models
# ---------------------------------------------------------------------------

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
#: Coordinates and channels are packed into one 64-bit counter: x and y below 2**24, channel below 2**16.
_MAX_COORD = 1 << 24
_MASK64 = 2**64 - 1
_MAX_CHANNELS = 1 << 16


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 whose outputs look independent for counters."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def _splitmix64_int(z: int) -> int:
    """The same finaliser on a Python int (numpy warns on scalar uint64 overflow)."""
    z = ((z ^ (z >> 30)) * int(_MIX1)) & _MASK64
    z = ((z ^ (z >> 27)) * int(_MIX2)) & _MASK64
    return z ^ (z >> 31)


def position_noise(seed: int, stream: int, channels: int, y0: int, x0: int, height: int, width: int) -> np.ndarray:
    """Standard normal noise `[channels, height, width]` float32, a pure function of
    `(seed, stream, channel, y0 + i, x0 + j)`.

    Fully convolutional models take one noise map per latent level whose value
    at a pixel must not depend on how the frame is cut: a tile reads the window
    of the frame's noise it covers, so tiled and whole-frame results agree, and
    every frame of one shape gets the same noise (no flicker in video). A
    counter-based hash gives that without drawing the whole frame: each value
    hashes its own coordinates (SplitMix64), and two 32-bit halves feed
    Box-Muller.
    """
    if not (y0 >= 0 and x0 >= 0 and y0 + height <= _MAX_COORD and x0 + width <= _MAX_COORD):
        raise ValueError(f"noise window ({y0}, {x0}, {height}, {width}) outside [0, {_MAX_COORD})")
    if not 0 < channels <= _MAX_CHANNELS:
        raise ValueError(f"channels must be in [1, {_MAX_CHANNELS}], got {channels}")
    key = np.uint64(_splitmix64_int((seed * int(_GOLDEN) + stream) & _MASK64))
    rows = (np.arange(y0, y0 + height, dtype=np.uint64) << np.uint64(24))[:, None]
    cols = np.arange(x0, x0 + width, dtype=np.uint64)[None, :]
    plane = rows | cols
    out = np.empty((channels, height, width), np.float32)
    two_pi = 2.0 * np.pi
    for c in range(channels):  # one channel at a time bounds the float64 temporaries
        h = _splitmix64(plane ^ (np.uint64(c) << np.uint64(48)) ^ key)
        u1 = ((h >> np.uint64(32)).astype(np.float64) + 0.5) * (1.0 / 2**32)
        u2 = ((h & np.uint64(0xFFFFFFFF)).astype(np.float64) + 0.5) * (1.0 / 2**32)
        out[c] = np.sqrt(-2.0 * np.log(u1)) * np.cos(two_pi * u2)
    return out


#: A sample's noise streams sit this far apart, so sample k never reuses another sample's maps.
SAMPLE_STREAM_STRIDE = 1 << 8


#: Frame noise maps kept at most: entries (frame shape, sample, seed, temperature) and bytes (a 640x480 LR
#: frame's maps of fc-256 take ~150 MB). The most recent entry is kept whatever its size.
FRAME_NOISE_ENTRIES = 4
FRAME_NOISE_BYTES = 512 * 2**20


class FrameNoise:
    """Per-level noise maps of whole frames, generated once per (frame shape, sample, seed, temperature) and kept.

    Values come from `position_noise` keyed by (seed, level stream, absolute
    LR-frame position) times the temperature, so a tile reads a window of the
    same maps, and every frame of one shape gets the same noise (texture that
    does not flicker in video). Sample k (for `samples=K`) uses streams offset
    by k x SAMPLE_STREAM_STRIDE; sample 0 is what `VDVAESR.make_level_noise`
    draws. Seed and temperature are arguments, not state, so one model serves
    any of them; the most recent maps stay cached, at most `keep` entries and
    `max_bytes` (the newest always). Safe to share between threads.

    The maps are read-only and a whole-frame window returns the cached arrays
    themselves, so a device backend can tell by identity that it already holds
    them and upload a frame shape's noise once, not once per frame.
    """

    def __init__(
        self, levels: Sequence[NoiseLevel], keep: int = FRAME_NOISE_ENTRIES, max_bytes: int = FRAME_NOISE_BYTES
    ) -> None:
        if keep < 1:
            raise ValueError(f"the frame noise cache needs at least one entry, got {keep}")
        self.levels = tuple(levels)
        self._keep = keep
        self._max_bytes = max_bytes
        self._cache: dict[tuple[int, int, int, int, float], list[np.ndarray]] = {}  # oldest first
        self._lock = threading.Lock()  # guards the cache only; maps are drawn outside it

    def maps(self, frame: tuple[int, int], seed: int, temperature: float, sample: int = 0) -> list[np.ndarray]:
        """Read-only [1, C, h * scale, w * scale] float32 per level for an LR frame of (h, w) at the origin."""
        if temperature < 0 or not np.isfinite(temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        key = (frame[0], frame[1], sample, seed, float(temperature))
        with self._lock:
            cached = self._cache.pop(key, None)
            if cached is not None:
                self._cache[key] = cached  # most recent last
                return cached
        drawn = []
        for level in self.levels:
            h, w = level.size(*frame)
            noise = position_noise(seed, level.stream + sample * SAMPLE_STREAM_STRIDE, level.channels, 0, 0, h, w)
            noise *= np.float32(temperature)
            noise = noise[None]
            noise.setflags(write=False)  # shared by every frame of the shape, and recognised by identity
            drawn.append(noise)
        with self._lock:
            self._cache[key] = drawn
            while len(self._cache) > 1 and (len(self._cache) > self._keep or self.cached_bytes > self._max_bytes):
                self._cache.pop(next(iter(self._cache)))
        return drawn

    @property
    def cached_bytes(self) -> int:
        """Bytes the cached maps take."""
        return sum(m.nbytes for maps in list(self._cache.values()) for m in maps)

    def __len__(self) -> int:
        return len(self._cache)

    def window(
        self, frame: tuple[int, int], seed: int, temperature: float, sample: int, y0: int, x0: int, h: int, w: int
    ) -> dict[str, np.ndarray]:
        """The noise inputs `{noise_<res>: [1, C, h*s, w*s]}` of a tile at LR (y0, x0) of size (h, w).

        A window covering the whole frame is the cached array itself, so the
        frames of a stream pass the same objects and a GPU backend, which
        compares them by identity, uploads the maps once per shape.
        """
        out = {}
        for level, full in zip(self.levels, self.maps(frame, seed, temperature, sample), strict=True):
            (ty, tx), (th, tw) = level.size(y0, x0), level.size(h, w)
            whole = (ty, tx) == (0, 0) and (th, tw) == full.shape[2:]
            out[level.name] = full if whole else np.ascontiguousarray(full[:, :, ty : ty + th, tx : tx + tw])
        return out
