"""Training data: random HR crops of any image folder and their x4 bicubic LR.

Each image is decoded once into RAM (uint8) so that a crop costs a slice, a
flip/rotation and one small Pillow resize: far below a VDVAE step's cost, with
or without DataLoader workers.

The dataset is indexed by the global sample number (0, 1, 2, ... over the
whole run, any int >= 0) and crop ``i`` depends only on ``(seed, i)``. So the
data never depends on the number of workers, and a run resumed at step ``k``
sees exactly the crops an uninterrupted one would: feed it
``CropSampler(start=k * batch_size * world_size, ...)``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from sr_train.degrade import SCALE, degrade_bicubic_x4, list_images, load_rgb


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> float32 [3, H, W] in [0, 1], values exactly k / 255."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)


def augment_dihedral(img: np.ndarray, flip: bool, rotations: int) -> np.ndarray:
    """One of the 8 flips/90-degree rotations of an HxWxC array (a view, no copy)."""
    out = img[:, ::-1] if flip else img
    return np.rot90(out, k=rotations, axes=(0, 1))


class RandomCropDataset(Dataset[dict[str, torch.Tensor]]):
    """``{"hr": [3,S,S], "lr": [3,S/4,S/4]}`` float32 crops in [0, 1] from a folder.

    Images are picked with probability proportional to the number of crop
    positions they offer, i.e. crops are uniform over all pixels of the set.
    Images smaller than the tile, and files that do not decode, are skipped
    with a warning naming them: one bad file must not stop a training run.

    ``scale_range=(lo, hi)`` (0 < lo <= hi <= 1; default off) is scale
    augmentation: each crop is a window of about ``hr_size / s`` pixels, for a
    scale ``s`` drawn uniformly in the range, downscaled to ``hr_size`` (Pillow
    LANCZOS, exact filter), so the model sees the photos' textures at several
    frequencies. A window is never larger than the image (its scale then rises to
    fit). Off, crops are exactly those of earlier versions for the same seed.
    """

    def __init__(
        self,
        images: str | Path | Sequence[str | Path],
        hr_size: int = 256,
        seed: int = 0,
        augment: bool = True,
        scale_range: tuple[float, float] | None = None,
    ) -> None:
        if hr_size <= 0 or hr_size % SCALE:
            raise ValueError(f"hr_size must be a positive multiple of {SCALE}, got {hr_size}")
        if scale_range is not None:
            lo, hi = (float(v) for v in scale_range)
            if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi <= 1):
                raise ValueError(f"scale_range must be (lo, hi) with 0 < lo <= hi <= 1, got {scale_range}")
            scale_range = (lo, hi)
        self.scale_range = scale_range
        paths = list_images(images) if isinstance(images, (str, Path)) else list(map(Path, images))
        self.hr_size, self.seed, self.augment = hr_size, seed, augment
        self.paths: list[Path] = []
        self.images: list[np.ndarray] = []
        skipped = []
        unreadable = []
        for p in paths:
            try:
                img = load_rgb(p)
            except ValueError as exc:  # names the file
                unreadable.append(str(exc))
                continue
            if min(img.shape[:2]) < hr_size:
                skipped.append(p.name)
                continue
            self.paths.append(p)
            self.images.append(img)
        if skipped:
            warnings.warn(
                f"skipped {len(skipped)} images smaller than {hr_size}px: {skipped[:5]}",
                stacklevel=2,
            )
        for reason in unreadable:
            warnings.warn(f"skipped {reason}", stacklevel=2)
        if not self.images:
            raise ValueError(f"no image of at least {hr_size}x{hr_size} in {images}")
        positions = np.array(
            [(h - hr_size + 1) * (w - hr_size + 1) for h, w, _ in (i.shape for i in self.images)],
            dtype=np.float64,
        )
        self._weights = positions / positions.sum()

    @property
    def nbytes(self) -> int:
        """RAM held by the decoded-image cache."""
        return sum(i.nbytes for i in self.images)

    def crop_uint8(self, index: int) -> np.ndarray:
        """Crop number ``index`` as an SxSx3 uint8 array (a pure function of seed, index)."""
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, index])
        img = self.images[int(rng.choice(len(self.images), p=self._weights))]
        s = self.hr_size
        window = s
        if self.scale_range is not None:  # drawn only when on: crops without it are unchanged
            scale = float(rng.uniform(*self.scale_range))
            window = min(max(s, round(s / scale)), *img.shape[:2])
        y = int(rng.integers(0, img.shape[0] - window + 1))
        x = int(rng.integers(0, img.shape[1] - window + 1))
        crop = img[y : y + window, x : x + window]
        if window != s:
            crop = np.asarray(
                Image.fromarray(np.ascontiguousarray(crop)).resize((s, s), Image.Resampling.LANCZOS, reducing_gap=None)
            )
        if self.augment:
            crop = augment_dihedral(crop, bool(rng.integers(0, 2)), int(rng.integers(0, 4)))
        return np.ascontiguousarray(crop)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        hr = self.crop_uint8(index)
        return {"hr": to_tensor(hr), "lr": to_tensor(degrade_bicubic_x4(hr))}


class CropSampler(Sampler[int]):
    """Endless global sample numbers ``start + rank, start + rank + world_size, ...``.

    ``start`` counts samples already consumed by all ranks together, so resuming
    at step k with batch B per rank uses ``start = k * B * world_size``.
    """

    def __init__(self, start: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.start, self.rank, self.world_size = start, rank, world_size

    def __iter__(self) -> Iterator[int]:
        i = self.start + self.rank
        while True:
            yield i
            i += self.world_size


def benchmark_crops(dataset: RandomCropDataset, n: int = 1024, batch_size: int = 16, num_workers: int = 0) -> float:
    """Crops per second through a real DataLoader (collation included)."""
    loader = DataLoader(dataset, batch_size=batch_size, sampler=CropSampler(), num_workers=num_workers)
    batches = iter(loader)
    for _ in range(4):  # worker start-up and the allocator's first large blocks are not throughput
        next(batches)
    start = time.perf_counter()
    done = 0
    while done < n:
        done += next(batches)["hr"].shape[0]
    return done / (time.perf_counter() - start)
