"""What a TensorRT engine was built for, where it lives, and whether it may be loaded here.

The one rule set for the engine cache, used by the runtime's TensorRT backend
and by `sr-export` alike. An engine depends on its ONNX file (sha256), the
precision, the batch profile (min, opt, max), the GPU (name and compute
capability), the TensorRT version and whether the network was strongly
typed; all of these go into its identity. The cache key is a hash of the
identity, so an engine is opened by key, never found by scanning, and its
sidecar manifest is checked field by field before it is loaded.

Pure Python except `import_tensorrt` and `query_gpu`, which import
`tensorrt` / `cuda-python` only when called. Never torch.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from sr_runtime.errors import BackendUnavailable

ENGINE_FORMAT = "vdvae-sr-engine/1"
ENGINE_CACHE_ENV = "SR_ENGINE_CACHE"
PRECISIONS = ("fp32", "fp16")
STRONGLY_TYPED_SINCE = (10, 12)
MIN_TENSORRT = (10, 0)
Batch = tuple[int, int, int]


class EngineUnavailable(BackendUnavailable):
    """No engine can be built or loaded here (no tensorrt, no cuda-python, no GPU); the message says which."""


@dataclass(frozen=True)
class GpuInfo:
    """The device an engine is built for, as cudaGetDeviceProperties names it."""

    name: str
    compute_capability: str  # "9.0"


def engine_cache_dir() -> Path:
    """`$SR_ENGINE_CACHE`, else `~/.cache/sr_runtime/engines`."""
    env = os.environ.get(ENGINE_CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sr_runtime" / "engines"


def parse_version(version: str) -> tuple[int, int]:
    """'10.13.0.35' -> (10, 13)."""
    parts = [int(p) for p in version.split(".")[:2] if p.isdigit()]
    if len(parts) < 2:
        raise ValueError(f"unrecognised TensorRT version {version!r}")
    return parts[0], parts[1]


def uses_strongly_typed(trt_version: str) -> bool:
    """Strongly typed from 10.12 on: TensorRT 11 has no FP16 flag (docs/design.md, Export contract)."""
    return parse_version(trt_version) >= STRONGLY_TYPED_SINCE


def check_batch(batch: tuple[int, ...]) -> Batch:
    """Validate (min, opt, max): 1 <= min <= opt <= max."""
    if len(batch) != 3 or not all(isinstance(b, int) for b in batch):
        raise ValueError(f"batch must be three ints (min, opt, max), got {batch!r}")
    lo, opt, hi = batch
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"batch must satisfy 1 <= min <= opt <= max, got {batch!r}")
    return lo, opt, hi


FrameShapes = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def check_frame_shapes(shapes: FrameShapes, multiple: int) -> FrameShapes:
    """Validate LR (h, w) min/opt/max: each a positive multiple of `multiple`, min <= opt <= max per axis."""
    if len(shapes) != 3 or any(len(s) != 2 for s in shapes):
        raise ValueError(f"frame profile must be three (h, w) pairs, got {shapes!r}")
    for h, w in shapes:
        if h < multiple or w < multiple or h % multiple or w % multiple:
            raise ValueError(f"frame sizes must be positive multiples of {multiple}, got {h}x{w}")
    lo, opt, hi = shapes
    if not all(lo[i] <= opt[i] <= hi[i] for i in (0, 1)):
        raise ValueError(f"frame profile must satisfy min <= opt <= max per axis, got {shapes!r}")
    return shapes


@dataclass(frozen=True)
class EngineIdentity:
    """Everything an engine depends on; any change means a different engine."""

    onnx_sha256: str
    precision: str
    batch: Batch
    gpu: GpuInfo
    tensorrt_version: str
    #: LR frame profile ((h, w) min, opt, max) of a fully convolutional model's engine; None: fixed-size model.
    frame: FrameShapes | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        check_batch(self.batch)

    @property
    def strongly_typed(self) -> bool:
        return uses_strongly_typed(self.tensorrt_version)

    def fields(self) -> dict[str, Any]:
        """The identity as the sidecar manifest stores it (and as the cache key hashes it)."""
        lo, opt, hi = self.batch
        return {
            "onnx_sha256": self.onnx_sha256,
            "precision": self.precision,
            "batch": {"min": lo, "opt": opt, "max": hi},
            "gpu_name": self.gpu.name,
            "compute_capability": self.gpu.compute_capability,
            "tensorrt_version": self.tensorrt_version,
            "strongly_typed": self.strongly_typed,
            # Only frame engines carry the key, so every fixed-size engine keeps its key.
            **(
                {}
                if self.frame is None
                else {"frame": {k: list(v) for k, v in zip(("min", "opt", "max"), self.frame, strict=True)}}
            ),
        }

    def key(self) -> str:
        """Directory name under the cache: a readable prefix + a hash of the full identity."""
        digest = hashlib.sha256(json.dumps(self.fields(), sort_keys=True).encode()).hexdigest()[:16]
        lo, opt, hi = self.batch
        sm = self.gpu.compute_capability.replace(".", "")
        return f"{self.precision}-b{lo}-{opt}-{hi}-sm{sm}-{digest}"

    def paths(self, cache_dir: Path) -> tuple[Path, Path]:
        """(engine, sidecar manifest): `<cache>/<key>/model.<precision>.engine` and `...engine.json`."""
        engine = cache_dir / self.key() / f"model.{self.precision}.engine"
        return engine, engine.with_name(engine.name + ".json")

    def stale_reasons(self, manifest: Mapping[str, Any]) -> list[str]:
        """Why an engine's sidecar manifest does not fit this identity; empty when it does."""
        reasons = []
        if manifest.get("format") != ENGINE_FORMAT:
            reasons.append(f"format is {manifest.get('format')!r}, need {ENGINE_FORMAT!r}")
        for name, value in self.fields().items():
            if manifest.get(name) != value:
                reasons.append(f"{name} is {manifest.get(name)!r}, need {value!r}")
        return reasons

    def cached_engine(self, cache_dir: Path) -> tuple[Path | None, list[str]]:
        """The engine under this identity's key if its manifest is current and its bytes match; else None and why."""
        blob, reasons = self.load_engine(cache_dir)
        return (self.paths(cache_dir)[0], []) if blob is not None else (None, reasons)

    def load_engine(self, cache_dir: Path) -> tuple[bytes | None, list[str]]:
        """The bytes of the engine under this identity's key, checked; else None and why.

        The file is read once and its sha256 checked on those very bytes, which
        are the ones to deserialise: a file replaced after the check cannot slip in.
        """
        engine, sidecar = self.paths(cache_dir)
        unsafe = untrusted_location(cache_dir, engine) or untrusted_location(cache_dir, sidecar)
        if unsafe is not None:
            return None, [unsafe]
        if not engine.is_file() or not sidecar.is_file():
            return None, [f"no engine at {engine}"]
        try:
            manifest = json.loads(read_trusted(sidecar).decode("utf-8"))
        except (OSError, ValueError) as exc:
            return None, [f"unreadable manifest {sidecar}: {exc}"]
        if not isinstance(manifest, dict):
            return None, [f"{sidecar} is not a JSON object"]
        reasons = self.stale_reasons(manifest)
        if reasons:
            return None, reasons
        try:
            blob = read_trusted(engine)
        except OSError as exc:
            return None, [f"unreadable engine {engine}: {exc}"]
        if manifest.get("engine_sha256") != hashlib.sha256(blob).hexdigest():
            return None, ["engine file does not match the sha256 in its manifest"]
        return blob, []


def read_trusted(path: Path) -> bytes:
    """A file's bytes, refusing (OSError) a symlink put in its place after `untrusted_location` looked."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def read_timing_cache(cache_dir: Path, path: Path) -> tuple[bytes, str | None]:
    """The timing cache's bytes under the engine cache's rules (no symlink, ours, not world-writable).

    (b"", why) when it is missing or untrusted: a build then starts from an empty cache.
    """
    unsafe = untrusted_location(cache_dir, path)
    if unsafe is not None:
        return b"", f"timing cache ignored: {unsafe}"
    if not path.is_file():
        return b"", None
    try:
        return read_trusted(path), None
    except OSError as exc:
        return b"", f"timing cache ignored: {exc}"


def untrusted_location(root: Path, path: Path) -> str | None:
    """Why `path` (at or under `root`) may have been planted by someone else, or None.

    Every step from `root` down to `path` must be no symlink, owned by this user
    (or root) and not writable by others: a deserialised engine runs code.
    """
    uid = os.getuid() if hasattr(os, "getuid") else None
    current = path
    while True:
        try:
            info = current.lstat()
        except FileNotFoundError:  # nothing there to trust; the lookup reports it missing
            return None
        except OSError as exc:
            return f"{current}: cannot stat ({exc.strerror or exc})"
        if stat.S_ISLNK(info.st_mode):
            return f"{current} is a symlink"
        if info.st_mode & stat.S_IWOTH:
            return f"{current} is writable by other users"
        if uid is not None and info.st_uid not in (uid, 0):
            return f"{current} belongs to another user (uid {info.st_uid})"
        if current == root or current.parent == current:
            return None
        current = current.parent


def timing_cache_path(cache_dir: Path, gpu: GpuInfo, trt_version: str) -> Path:
    """One timing cache per TensorRT version and GPU, beside the engines, shared by every build there."""
    safe = "".join(c if c.isalnum() else "_" for c in gpu.name)
    return cache_dir / f"trt{trt_version}-sm{gpu.compute_capability.replace('.', '')}-{safe}.timing.cache"


def import_tensorrt() -> ModuleType:
    """The real `tensorrt` (>= 10.0), or EngineUnavailable; its type stubs alone import as an empty package."""
    try:
        module = importlib.import_module("tensorrt")
    except ImportError as exc:
        raise EngineUnavailable(f"TensorRT is not installed ({exc})") from None
    if not hasattr(module, "Builder") or not hasattr(module, "Runtime"):
        raise EngineUnavailable("TensorRT is not installed (only its type stubs are)")
    if parse_version(str(module.__version__)) < MIN_TENSORRT:
        raise EngineUnavailable(f"TensorRT {module.__version__} is older than 10.0")
    return module


def import_cudart() -> Any:
    """cuda-python's runtime module (the 12.8+ layout first, then the older one)."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise EngineUnavailable("cuda-python is not installed (pip install cuda-python)")


def c_string(value: bytes | str) -> str:
    """cuda-python gives C strings as NUL-padded bytes in some versions, str in others."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return text.rstrip("\x00")


def query_gpu(device: int = 0) -> GpuInfo:
    """Name and compute capability of `device` via cuda-python (never torch)."""
    cudart = import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count <= device:
        raise EngineUnavailable(f"no CUDA GPU found (cudaGetDeviceCount: {err}, {count})")
    err, props = cudart.cudaGetDeviceProperties(device)
    if err != cudart.cudaError_t.cudaSuccess:
        raise EngineUnavailable(f"cudaGetDeviceProperties failed: {err}")
    return GpuInfo(name=c_string(props.name), compute_capability=f"{props.major}.{props.minor}")


def engine_unavailable_reason() -> str | None:
    """One line saying why no engine can be built here, or None when TensorRT and a GPU exist."""
    try:
        import_tensorrt()
        query_gpu()
    except EngineUnavailable as exc:
        return str(exc).splitlines()[0]
    return None
