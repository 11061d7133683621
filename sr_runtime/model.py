"""The model directory contract written by `sr_export` (manifest.json + ONNX files).

The runtime reads only files, never Python objects of the training/export code,
so this module is the single place that knows the manifest layout.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sr_runtime.errors import SRModelError
from sr_runtime.files import sha256_file

MANIFEST_FORMAT = "vdvae-sr-onnx/1"
DEFAULT_MODEL_NAME = "vdvae-sr-256"
MODEL_DIR_ENV = "SR_MODEL_DIR"


def default_model_dir() -> Path:
    """`$SR_MODEL_DIR`, else `<repo>/engines/vdvae-sr-256` next to this package."""
    env = os.environ.get(MODEL_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / "engines" / DEFAULT_MODEL_NAME


@dataclass(frozen=True)
class ModelSpec:
    """What the runtime needs to know about one exported model."""

    directory: Path
    name: str
    scale: int
    lr_size: tuple[int, int]
    noise_dim: int
    batch_min: int
    batch_opt: int
    batch_max: int
    onnx_files: dict[str, Path]
    onnx_sha256: dict[str, str]

    @property
    def hr_size(self) -> tuple[int, int]:
        return (self.lr_size[0] * self.scale, self.lr_size[1] * self.scale)

    def onnx_path(self, precision: str) -> Path:
        """Path of the ONNX file for `precision` ("fp32"/"fp16"); SRModelError if absent."""
        path = self.onnx_files.get(precision)
        if path is None or not path.is_file():
            raise SRModelError(f"model {self.name!r} has no {precision} ONNX file in {self.directory}")
        return path

    def verify(self, precision: str) -> Path:
        """Check the ONNX file against its manifest checksum, so a truncated copy fails loudly."""
        path = self.onnx_path(precision)
        expected = self.onnx_sha256.get(precision, "")
        if expected and sha256_file(path) != expected.lower():
            raise SRModelError(f"{path} does not match the sha256 in its manifest (corrupt or stale copy)")
        return path


def load_model_spec(model: str | os.PathLike[str] | None = None) -> ModelSpec:
    """Read and validate `manifest.json` from a model directory (or the manifest path itself)."""
    directory = default_model_dir() if model is None else Path(model).expanduser()
    manifest_path = directory if directory.is_file() else directory / "manifest.json"
    directory = manifest_path.parent
    if not manifest_path.is_file():
        hint = (
            f" (the shipped default; export one with `sr-export` or set {MODEL_DIR_ENV})"
            if model is None
            else ""
        )
        raise SRModelError(f"no model manifest at {manifest_path}{hint}")
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SRModelError(f"cannot read {manifest_path}: {exc}") from exc
    try:
        return _parse(raw, directory)
    except (KeyError, TypeError, ValueError) as exc:
        raise SRModelError(f"{manifest_path} is not a valid model manifest: {exc!r}") from exc


def _parse(raw: dict, directory: Path) -> ModelSpec:
    if raw.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"format is {raw.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    lr_h, lr_w = (int(v) for v in raw["lr_size"])
    scale = int(raw["scale"])
    noise_dim = int(raw["noise_dim"])
    batch = raw.get("batch", {})
    batch_max = int(batch.get("max", 1))
    if min(lr_h, lr_w, scale, noise_dim, batch_max) < 1:
        raise ValueError("sizes, scale, noise_dim and batch.max must be positive")
    if [int(v) for v in raw.get("hr_size", [lr_h * scale, lr_w * scale])] != [lr_h * scale, lr_w * scale]:
        raise ValueError("hr_size is not lr_size * scale")
    files: dict[str, Path] = {}
    sums: dict[str, str] = {}
    for precision, entry in raw["onnx"].items():
        files[precision] = directory / entry["file"]
        sums[precision] = str(entry.get("sha256", ""))
    if "fp32" not in files:
        raise ValueError("no fp32 entry under 'onnx'")
    return ModelSpec(
        directory=directory,
        name=str(raw.get("name", directory.name)),
        scale=scale,
        lr_size=(lr_h, lr_w),
        noise_dim=noise_dim,
        batch_min=int(batch.get("min", 1)),
        batch_opt=int(batch.get("opt", batch_max)),
        batch_max=batch_max,
        onnx_files=files,
        onnx_sha256=sums,
    )
