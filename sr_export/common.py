"""What both export pipelines (fixed-size and whole-frame) share: options, report, file names, the
failure they raise and step timing. A leaf module, so each pipeline imports it instead of the other.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sr_export.fp16 import Fp16Result
from sr_export.onnx_export import OPSET, LintResult
from sr_export.parity import ParityCase

FP32_FILE, FP16_FILE, MANIFEST_FILE = "model.fp32.onnx", "model.fp16.onnx", "manifest.json"
PARITY_TOLERANCE = 1e-4
FP16_TARGET_PSNR_DB = 40.0


class ExportCheckFailed(RuntimeError):
    """A check the export contract requires failed (docs/design.md); nothing was installed."""


@dataclass(frozen=True)
class ExportOptions:
    """What to write where; ``fp16`` False skips the calibration and the FP16 graph."""

    out_dir: Path
    name: str
    batch: tuple[int, int, int] = (1, 4, 16)
    fp16: bool = True
    opset: int = OPSET
    parity_tolerance: float = PARITY_TOLERANCE
    fp16_target_psnr_db: float = FP16_TARGET_PSNR_DB
    seed: int = 0


@dataclass
class ExportReport:
    """Everything the CLI prints and the tests assert on."""

    manifest: dict[str, Any]
    files: dict[str, Path]
    parity: list[ParityCase]
    lint: LintResult
    fp16: Fp16Result | None
    seconds: dict[str, float] = field(default_factory=dict)


@contextmanager
def timed(seconds: dict[str, float], step: str) -> Iterator[None]:
    """Record the block's wall time as `seconds[step]` (the manifest's export_seconds)."""
    started = time.perf_counter()
    yield
    seconds[step] = time.perf_counter() - started
