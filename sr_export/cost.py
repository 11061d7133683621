"""What an export of a fixed-size model will cost, said before it starts.

A paper-size model (276 GMAC per tile) takes minutes per forward pass on a
small CPU and the export runs dozens of them, so `sr-export` first times one
PyTorch forward pass of the model at batch 1 and counts the passes its
checks will make. From those it estimates the wall time and the peak memory
(the model's weights in PyTorch, several in-memory copies of the ONNX graph
while the FP16 graph is made, and three images' activations), and refuses to
start where the peak would not fit in the memory available (`--force` runs
anyway) and warns where it would take long.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sr_train.info import model_info
from sr_train.model import VDVAESR

#: Models above this many GMAC per tile get fewer FP16 calibration and check crops: each pass costs minutes.
HEAVY_GMAC = 50.0
#: Photo crops per source photo for the FP16 range measurement and its held-out check: (normal, heavy).
CALIBRATION_CROPS = (2, 1)
CHECK_CROPS = (3, 1)
#: Source photos (sr_export.calibration.PHOTOS) and extreme images (black, white, noise) in every feed set.
SOURCE_PHOTOS = 3
EXTREME_IMAGES = 3
#: Copies of the generation path's weights alive at once while the FP16 graph is made and checked:
#: the FP32 graph, its renamed copy, the shape-inferred copy, the derived graph, its bytes and two sessions.
GRAPH_COPIES = 7
#: Batch of the largest check case (parity and FP16 checks run photo crops in threes).
LARGEST_BATCH = 3
#: An export estimated longer than this prints a warning before it starts.
LONG_EXPORT_S = 30 * 60
PROC_STATUS = Path("/proc/self/status")
PROC_MEMINFO = Path("/proc/meminfo")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def is_heavy(gmac_per_tile: float) -> bool:
    return gmac_per_tile > HEAVY_GMAC


def calibration_crops(heavy: bool) -> int:
    """Crops per source photo the FP16 range measurement runs on."""
    return CALIBRATION_CROPS[heavy]


def check_crops(heavy: bool) -> int:
    """Crops per source photo the FP16 graph is checked on."""
    return CHECK_CROPS[heavy]


@dataclass(frozen=True)
class ExportCost:
    """The estimate, with what it was made of."""

    gmac_per_tile: float
    heavy: bool
    torch_images: int  # images through PyTorch (parity)
    ort_images: int  # images through ONNX Runtime, at least (one more FP16 check per extra island tried)
    forward_seconds: float  # one image through PyTorch, measured here
    forward_bytes: int  # its activations' peak, measured here (0 where the peak cannot be reset)
    seconds: float
    peak_bytes: int
    available_bytes: int | None

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.peak_bytes <= self.available_bytes

    def lines(self) -> list[str]:
        available = "unknown" if self.available_bytes is None else f"{self.available_bytes / 1e9:.1f} GB"
        return [
            f"estimate: one PyTorch forward pass here took {self.forward_seconds:.1f} s and "
            f"{self.forward_bytes / 1e9:.2f} GB; the checks run {self.torch_images} images through PyTorch and "
            f">= {self.ort_images} through ONNX Runtime",
            f"estimate: ~{_duration(self.seconds)} and ~{self.peak_bytes / 1e9:.1f} GB peak "
            f"(available now: {available}); the ONNX export itself adds to the time",
        ]


def ort_images(heavy: bool, calibration_temperatures: int, check_temperatures: int, parity_images: int) -> int:
    """Images the export pushes through ONNX Runtime when the first FP32 island passes."""
    calibration = (SOURCE_PHOTOS * calibration_crops(heavy) + EXTREME_IMAGES) * calibration_temperatures
    check = SOURCE_PHOTOS * check_crops(heavy) * check_temperatures + EXTREME_IMAGES * 2
    return parity_images + calibration + 3 * check  # FP32 references, rounding simulation, the FP16 file


def estimate_cost(
    model: VDVAESR, fp16: bool, parity_images: int, calibration_temperatures: int, check_temperatures: int
) -> ExportCost:
    """Time one forward pass of ``model`` here and scale it to the export's passes (fixed-size models)."""
    cfg = model.config
    info = model_info(cfg)
    heavy = is_heavy(info.gmac_per_tile)
    seconds, activations = measure_forward(model)
    passes = ort_images(heavy, calibration_temperatures, check_temperatures, parity_images) if fp16 else parity_images
    weights = info.params["generation_path"] * 4
    graph_copies = GRAPH_COPIES if fp16 else 3  # parity only: the graph, its bytes, one session
    peak = current_rss() + graph_copies * weights + LARGEST_BATCH * activations
    return ExportCost(
        gmac_per_tile=info.gmac_per_tile,
        heavy=heavy,
        torch_images=parity_images,
        ort_images=passes,
        forward_seconds=seconds,
        forward_bytes=activations,
        seconds=seconds * (parity_images + passes),  # an unoptimised ONNX Runtime pass costs about a PyTorch one
        peak_bytes=peak,
        available_bytes=available_memory(),
    )


@torch.no_grad()
def measure_forward(model: VDVAESR) -> tuple[float, int]:
    """Seconds and peak activation bytes of one sampling pass at batch 1 (bytes 0 where Linux cannot tell)."""
    cfg = model.config
    lr = torch.from_numpy(np.full((1, 3, cfg.lr_size, cfg.lr_size), 0.5, np.float32))
    noise = model.make_noise(1, 0.8, 0)
    before = current_rss()
    reset = _reset_peak()
    started = time.perf_counter()
    model.eval().sample(lr, noise)
    seconds = time.perf_counter() - started
    return seconds, max(0, _status_bytes("VmHWM") - before) if reset else 0


def current_rss() -> int:
    """This process's resident bytes (0 where /proc is missing)."""
    return _status_bytes("VmRSS")


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), None where unknown."""
    try:
        for line in PROC_MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _status_bytes(key: str) -> int:
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return 0


def _reset_peak() -> bool:
    """Reset VmHWM so the next reading covers what follows (Linux >= 4.0)."""
    try:
        PROC_CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
