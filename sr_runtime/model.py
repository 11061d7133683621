"""The model directory contract written by `sr_export` (manifest.json + ONNX files).

The runtime reads only files, never Python objects of the training/export code,
so this module is the single place that knows the manifest layout.

Which model is used: the one named explicitly (`Upscaler(model=...)`,
`sr-upscale --model`), else `$SR_MODEL_DIR`, else the default shipped inside
the package (`sr_runtime/models/vdvae-sr-256`, package data of the wheel).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from sr_runtime.errors import SRModelError
from sr_runtime.files import sha256_file

MANIFEST_FORMAT = "vdvae-sr-onnx/1"
#: Fully convolutional models: symbolic frame size, per-level noise maps (an older runtime refuses them by name).
FRAME_MANIFEST_FORMAT = "vdvae-sr-onnx/2"
KIND_FIXED, KIND_FULLY_CONVOLUTIONAL = "fixed", "fully_convolutional"
#: Largest receptive radius (LR pixels) and per-pixel memory a manifest may state.
MAX_RADIUS = 1 << 14
MAX_BYTES_PER_PIXEL = 1 << 24
DEFAULT_MODEL_NAME = "vdvae-sr-256"
MODEL_DIR_ENV = "SR_MODEL_DIR"
#: Model directories shipped inside the package (package data of the wheel).
PACKAGED_MODELS_DIR = Path(__file__).resolve().parent / "models"
#: Largest batch a manifest may ask for: backends allocate buffers (and noise rows) for it.
MAX_BATCH = 256
#: Largest LR tile side a manifest may name (the shipped model's is 64).
MAX_TILE = 4096
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: The shipped manifest is a few tens of kB; anything far larger is not one (and is not read whole).
MAX_MANIFEST_BYTES = 16 << 20


def packaged_model_dir(name: str = DEFAULT_MODEL_NAME) -> Path:
    """`sr_runtime/models/<name>`: a model shipped with the package (manifest + ONNX files)."""
    return PACKAGED_MODELS_DIR / name


def default_model_dir() -> Path:
    """The model used when none is named: `$SR_MODEL_DIR`, else the packaged default."""
    env = os.environ.get(MODEL_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return packaged_model_dir()


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
    kind: str = KIND_FIXED
    lr_multiple: int = 1
    receptive_radius: int = 0
    noise_levels: tuple[NoiseLevel, ...] = ()
    #: The graphs without noise inputs (temperature 0), by precision; fully convolutional models only.
    deterministic_files: dict[str, Path] = field(default_factory=dict)
    deterministic_sha256: dict[str, str] = field(default_factory=dict)
    #: Peak backend memory per LR pixel of one call (measured at export); 0 = unknown.
    bytes_per_lr_pixel: int = 0
    #: uint8 conversion graphs ("pre", "post") a GPU backend runs on the device; optional.
    io_files: dict[str, Path] = field(default_factory=dict)
    io_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def fully_convolutional(self) -> bool:
        return self.kind == KIND_FULLY_CONVOLUTIONAL

    @property
    def hr_size(self) -> tuple[int, int]:
        return (self.lr_size[0] * self.scale, self.lr_size[1] * self.scale)

    def onnx_path(self, precision: str, deterministic: bool = False) -> Path:
        """Path of the ONNX file for `precision` ("fp32"/"fp16"); SRModelError if absent.

        `deterministic` picks a fully convolutional model's graph without noise inputs.
        """
        files = self.deterministic_files if deterministic else self.onnx_files
        path = files.get(precision)
        if path is None or not path.is_file():
            which = "deterministic " if deterministic else ""
            raise SRModelError(f"model {self.name!r} has no {which}{precision} ONNX file in {self.directory}")
        return path

    def verify(self, precision: str, deterministic: bool = False) -> Path:
        """Check the ONNX file against its manifest checksum, so a truncated copy fails loudly."""
        path = self.onnx_path(precision, deterministic)
        sums = self.deterministic_sha256 if deterministic else self.onnx_sha256
        if sha256_file(path) != sums[precision]:
            raise SRModelError(f"{path} does not match the sha256 in its manifest (corrupt or stale copy)")
        return path

    def verify_io(self, key: str) -> Path | None:
        """The uint8 conversion graph `key` ("pre"/"post") checked against its sha256; None if the model has none."""
        path = self.io_files.get(key)
        if path is None or not path.is_file():
            return None
        if sha256_file(path) != self.io_sha256[key]:
            raise SRModelError(f"{path} does not match the sha256 in its manifest (corrupt or stale copy)")
        return path


@dataclass(frozen=True)
class NoiseLevel:
    """One latent level of a fully convolutional model: input `name`, `channels` maps of `scale` x the LR size.

    `stream` keys `position_noise`; a frame cut at LR (y0, x0) reads the level from (y0 * scale, x0 * scale).
    """

    name: str
    channels: int
    scale: float
    stream: int

    def size(self, lr_h: int, lr_w: int) -> tuple[int, int]:
        """The map's (h, w) for an LR frame of (lr_h, lr_w) (multiples of the model's lr_multiple)."""
        return round(lr_h * self.scale), round(lr_w * self.scale)


def load_model_spec(model: str | os.PathLike[str] | None = None) -> ModelSpec:
    """Read and validate `manifest.json` from a model directory (or the manifest path itself)."""
    directory = default_model_dir() if model is None else Path(model).expanduser()
    manifest_path = directory if directory.is_file() else directory / "manifest.json"
    directory = manifest_path.parent
    if not manifest_path.is_file():
        hint = f" (the shipped default; export one with `sr-export` or set {MODEL_DIR_ENV})" if model is None else ""
        raise SRModelError(f"no model manifest at {manifest_path}{hint}")
    try:
        if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            raise SRModelError(f"{manifest_path} is not a model manifest: over {MAX_MANIFEST_BYTES} bytes")
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SRModelError(f"cannot read {manifest_path}: {exc}") from exc
    except RecursionError:
        raise SRModelError(f"{manifest_path} is not a valid model manifest: JSON nested too deeply") from None
    if not isinstance(raw, dict):
        raise SRModelError(f"{manifest_path} is not a valid model manifest: not a JSON object")
    try:
        return _parse(raw, directory)
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise SRModelError(f"{manifest_path} is not a valid model manifest: {exc!r}") from None


def _int(raw: object, what: str, low: int, high: int) -> int:
    """An integer manifest value in [low, high]: values are bounded before anything is allocated from them."""
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise TypeError(f"{what} must be an integer, got {raw!r}")
    if not low <= raw <= high:
        raise ValueError(f"{what} must be in [{low}, {high}], got {raw}")
    return raw


def _parse(raw: dict, directory: Path) -> ModelSpec:
    if raw.get("format") == FRAME_MANIFEST_FORMAT:
        return _parse_frame(raw, directory)
    if raw.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"format is {raw.get('format')!r}, expected {MANIFEST_FORMAT!r} or {FRAME_MANIFEST_FORMAT!r}")
    if raw.get("kind", KIND_FIXED) != KIND_FIXED:
        raise ValueError(f"kind {raw.get('kind')!r} needs format {FRAME_MANIFEST_FORMAT!r}")
    lr_h, lr_w = (_int(v, "lr_size", 1, MAX_TILE) for v in raw["lr_size"])
    scale = _int(raw["scale"], "scale", 1, 16)
    noise_dim = _int(raw["noise_dim"], "noise_dim", 1, 2**31 - 1)
    batch = raw.get("batch", {})
    if not isinstance(batch, dict):
        raise TypeError("batch must be an object")
    batch_max = _int(batch.get("max", 1), "batch.max", 1, MAX_BATCH)
    batch_opt = _int(batch.get("opt", batch_max), "batch.opt", 1, batch_max)
    batch_min = _int(batch.get("min", 1), "batch.min", 1, batch_opt)
    if list(raw.get("hr_size", [lr_h * scale, lr_w * scale])) != [lr_h * scale, lr_w * scale]:
        raise ValueError("hr_size is not lr_size * scale")
    files, sums = _onnx_entries(raw["onnx"], directory, "onnx")
    name = str(raw.get("name", directory.name))
    return ModelSpec(
        directory=directory,
        name="".join(c if c.isprintable() else "?" for c in name),  # it is printed: no terminal escapes
        scale=scale,
        lr_size=(lr_h, lr_w),
        noise_dim=noise_dim,
        batch_min=batch_min,
        batch_opt=batch_opt,
        batch_max=batch_max,
        onnx_files=files,
        onnx_sha256=sums,
    )


def _batch(raw: dict) -> tuple[int, int, int]:
    batch = raw.get("batch", {})
    if not isinstance(batch, dict):
        raise TypeError("batch must be an object")
    batch_max = _int(batch.get("max", 1), "batch.max", 1, MAX_BATCH)
    batch_opt = _int(batch.get("opt", batch_max), "batch.opt", 1, batch_max)
    batch_min = _int(batch.get("min", 1), "batch.min", 1, batch_opt)
    return batch_min, batch_opt, batch_max


def _onnx_entries(raw: object, directory: Path, where: str) -> tuple[dict[str, Path], dict[str, str]]:
    """{precision: file} and {precision: sha256} of one graph's entries; fp32 is required."""
    if not isinstance(raw, dict):
        raise TypeError(f"{where} must be an object of precision -> entry, got {type(raw).__name__}")
    files: dict[str, Path] = {}
    sums: dict[str, str] = {}
    for precision, entry in raw.items():
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"unknown precision {precision!r} under {where!r}")
        if not isinstance(entry, dict):
            raise TypeError(f"{where}.{precision} must be an object with file and sha256")
        files[precision] = _model_file(directory, entry["file"])
        sums[precision] = str(entry.get("sha256", "")).lower()
        if not _SHA256.fullmatch(sums[precision]):
            raise ValueError(f"{where}.{precision}.sha256 must be the file's 64-digit hex sha256")
    if "fp32" not in files:
        raise ValueError(f"no fp32 entry under {where!r}")
    return files, sums


def _parse_frame(raw: dict, directory: Path) -> ModelSpec:
    """A fully convolutional model: stride, receptive radius, noise levels, sampling and deterministic graphs."""
    if raw.get("kind") != KIND_FULLY_CONVOLUTIONAL:
        raise ValueError(f"format {FRAME_MANIFEST_FORMAT!r} needs kind {KIND_FULLY_CONVOLUTIONAL!r}")
    scale = _int(raw["scale"], "scale", 1, 16)
    multiple = _int(raw["lr_multiple"], "lr_multiple", 1, MAX_TILE)
    radius = _int(raw["receptive_radius"], "receptive_radius", 0, MAX_RADIUS)
    lr_h, lr_w = (_int(v, "lr_size", 1, MAX_TILE) for v in raw["lr_size"])
    batch_min, batch_opt, batch_max = _batch(raw)
    levels = []
    raw_levels = raw["noise_levels"]
    if not isinstance(raw_levels, list) or not raw_levels:
        raise TypeError("noise_levels must be a non-empty list")
    for k, entry in enumerate(raw_levels):
        level = NoiseLevel(
            name=str(entry["name"]),
            channels=_int(entry["channels"], "noise channels", 1, 1 << 16),
            scale=float(entry["scale"]),
            stream=_int(entry["stream"], "noise stream", 0, 1 << 16),
        )
        if not level.name.startswith("noise_") or not level.name.isidentifier():
            raise ValueError(f"noise_levels[{k}].name {level.name!r} is not a noise_<res> input name")
        if not (0 < level.scale <= 64) or (multiple * level.scale) != round(multiple * level.scale):
            raise ValueError(f"noise_levels[{k}].scale {level.scale} must make lr_multiple x scale an integer")
        levels.append(level)
    files, sums = _onnx_entries(raw["onnx"], directory, "onnx")
    det_files, det_sums = _onnx_entries(raw["onnx_deterministic"], directory, "onnx_deterministic")
    memory = raw.get("memory", {})
    per_px = (
        _int(memory.get("bytes_per_lr_pixel", 0), "memory.bytes_per_lr_pixel", 0, MAX_BYTES_PER_PIXEL)
        if isinstance(memory, dict)
        else 0
    )
    io_files: dict[str, Path] = {}
    io_sums: dict[str, str] = {}
    raw_io = raw.get("io_graphs", {})
    if not isinstance(raw_io, dict) or not set(raw_io) <= {"pre", "post"}:
        raise ValueError("io_graphs must be an object with 'pre' and 'post'")
    for key, entry in raw_io.items():
        io_files[key] = _model_file(directory, entry["file"])
        io_sums[key] = str(entry.get("sha256", "")).lower()
        if not _SHA256.fullmatch(io_sums[key]):
            raise ValueError(f"io_graphs.{key}.sha256 must be the file's 64-digit hex sha256")
    name = str(raw.get("name", directory.name))
    return ModelSpec(
        directory=directory,
        name="".join(c if c.isprintable() else "?" for c in name),
        scale=scale,
        lr_size=(lr_h, lr_w),
        noise_dim=0,
        batch_min=batch_min,
        batch_opt=batch_opt,
        batch_max=batch_max,
        onnx_files=files,
        onnx_sha256=sums,
        kind=KIND_FULLY_CONVOLUTIONAL,
        lr_multiple=multiple,
        receptive_radius=radius,
        noise_levels=tuple(levels),
        deterministic_files=det_files,
        deterministic_sha256=det_sums,
        bytes_per_lr_pixel=per_px,
        io_files=io_files,
        io_sha256=io_sums,
    )


def _model_file(directory: Path, name: object) -> Path:
    """A file named by the manifest, which must be a plain name inside the model directory."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"ONNX file {name!r} must be a plain file name inside the model directory")
    return directory / name
