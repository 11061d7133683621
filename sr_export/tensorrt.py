"""TensorRT engine build and engine cache, written against TensorRT 10.x / 11's Python API.

Thin and composable in polygraphy's loader style::

    builder, network, parser = network_from_onnx(path, strongly_typed, logger)
    blob = build_serialized_engine(builder, network, config_for(builder, network, ...))

``build_engine(onnx_path, cache_dir, precision=..., batch=...)`` is what the
runtime calls lazily; it returns a cached engine only when its sidecar
manifest matches the ONNX sha256, TensorRT version, GPU, precision and batch
profile, otherwise it builds a new one. The cache-key functions at the top are
pure Python: ``tensorrt`` and ``cuda-python`` are imported only inside the
functions that need them, and never torch.

Precision lives in the network: on TensorRT >= 10.12 (and 11, which has no
FP16 builder flag) the network is created STRONGLY_TYPED, so the FP16 ONNX's
Casts and FP32 islands are obeyed exactly. Older 10.x builds the FP32-typed
parse with ``BuilderFlag.FP16`` for precision "fp16".
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sr_export.files import atomic_write_bytes, atomic_write_json, sha256_file
from sr_runtime.backends.trt_engine import untrusted_location

if TYPE_CHECKING:
    import tensorrt as trt

ENGINE_FORMAT = "vdvae-sr-engine/1"
ENGINE_CACHE_ENV = "SR_ENGINE_CACHE"  # shared with sr_runtime, so pre-built engines are found
PRECISIONS = ("fp32", "fp16")
STRONGLY_TYPED_SINCE = (10, 12)
MIN_TENSORRT = (10, 0)
Batch = tuple[int, int, int]


class EngineUnavailable(RuntimeError):
    """No engine can be built here (no tensorrt, no cuda-python, no GPU); the message says which."""


@dataclass(frozen=True)
class GpuInfo:
    """The device an engine is built for; names are cudaGetDeviceProperties' (like sr_runtime)."""

    name: str
    compute_capability: str  # "9.0"


# ---------------------------------------------------------------------------
# Pure-Python cache logic (tested without TensorRT)
# ---------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$SR_ENGINE_CACHE``, else ``~/.cache/sr_runtime/engines``: where sr_runtime looks too."""
    env = os.environ.get(ENGINE_CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sr_runtime" / "engines"


def parse_version(version: str) -> tuple[int, int]:
    """'10.13.0.35' -> (10, 13)."""
    parts = [int(p) for p in version.split(".")[:2] if p.isdigit()]
    if len(parts) < 2:
        raise ValueError(f"unrecognised TensorRT version {version!r}")
    return parts[0], parts[1]


def uses_strongly_typed(trt_version: str) -> bool:
    """DESIGN §5: strongly typed from 10.12 on (TensorRT 11 has no FP16 flag at all)."""
    return parse_version(trt_version) >= STRONGLY_TYPED_SINCE


def check_batch(batch: tuple[int, ...]) -> Batch:
    """Validate (min, opt, max): 1 <= min <= opt <= max."""
    if len(batch) != 3 or not all(isinstance(b, int) for b in batch):
        raise ValueError(f"batch must be three ints (min, opt, max), got {batch!r}")
    lo, opt, hi = batch
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"batch must satisfy 1 <= min <= opt <= max, got {batch!r}")
    return lo, opt, hi


def build_identity(
    onnx_sha256: str, precision: str, batch: tuple[int, ...], gpu: GpuInfo, trt_version: str
) -> dict[str, Any]:
    """Everything an engine depends on; any change means a different engine."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    lo, opt, hi = check_batch(batch)
    return {
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "batch": {"min": lo, "opt": opt, "max": hi},
        "gpu_name": gpu.name,
        "compute_capability": gpu.compute_capability,
        "tensorrt_version": trt_version,
        "strongly_typed": uses_strongly_typed(trt_version),
    }


def engine_cache_key(
    onnx_sha256: str, precision: str, batch: tuple[int, ...], gpu: GpuInfo, trt_version: str
) -> str:
    """Directory name under the cache: readable prefix + hash of the full build identity."""
    ident = build_identity(onnx_sha256, precision, batch, gpu, trt_version)
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    b = ident["batch"]
    return f"{precision}-b{b['min']}-{b['opt']}-{b['max']}-sm{gpu.compute_capability.replace('.', '')}-{digest}"


def stale_reasons(
    manifest: Mapping[str, Any],
    onnx_sha256: str,
    precision: str,
    batch: tuple[int, ...],
    gpu: GpuInfo,
    trt_version: str,
) -> list[str]:
    """Why an engine manifest does not fit this ONNX/GPU/TensorRT/profile; empty when it does."""
    want = build_identity(onnx_sha256, precision, batch, gpu, trt_version)
    reasons = []
    if manifest.get("format") != ENGINE_FORMAT:
        reasons.append(f"format is {manifest.get('format')!r}, need {ENGINE_FORMAT!r}")
    for key, value in want.items():
        if manifest.get(key) != value:
            reasons.append(f"{key} is {manifest.get(key)!r}, need {value!r}")
    return reasons


def is_engine_current(
    manifest: Mapping[str, Any],
    onnx_sha256: str,
    precision: str,
    batch: tuple[int, ...],
    gpu: GpuInfo,
    trt_version: str,
) -> bool:
    """True only when the engine was built from this ONNX for this GPU, TensorRT and profile."""
    return not stale_reasons(manifest, onnx_sha256, precision, batch, gpu, trt_version)


def engine_paths(cache_dir: Path, key: str, precision: str) -> tuple[Path, Path]:
    """(engine, sidecar manifest): ``<key>/model.<precision>.engine`` and ``...engine.json`` (sr_runtime's names)."""
    engine = cache_dir / key / f"model.{precision}.engine"
    return engine, engine.with_name(engine.name + ".json")


def timing_cache_path(cache_dir: Path, gpu: GpuInfo, trt_version: str) -> Path:
    """One timing cache per TensorRT version and GPU, beside the engines, reused by every build there."""
    safe = "".join(c if c.isalnum() else "_" for c in gpu.name)
    return cache_dir / f"trt{trt_version}-sm{gpu.compute_capability.replace('.', '')}-{safe}.timing.cache"


def cached_engine(
    cache_dir: Path, onnx_sha256: str, precision: str, batch: tuple[int, ...], gpu: GpuInfo, trt_version: str
) -> tuple[Path | None, list[str]]:
    """The cached engine if its manifest is current and its bytes match; else None and why."""
    key = engine_cache_key(onnx_sha256, precision, batch, gpu, trt_version)
    engine, sidecar = engine_paths(cache_dir, key, precision)
    if not engine.is_file() or not sidecar.is_file():
        return None, [f"no engine at {engine}"]
    unsafe = untrusted_location(cache_dir, engine) or untrusted_location(cache_dir, sidecar)
    if unsafe is not None:
        return None, [unsafe]
    try:
        manifest = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, [f"unreadable manifest {sidecar}: {exc}"]
    if not isinstance(manifest, dict):
        return None, [f"{sidecar} is not a JSON object"]
    reasons = stale_reasons(manifest, onnx_sha256, precision, batch, gpu, trt_version)
    if not reasons and manifest.get("engine_sha256") != sha256_file(engine):
        reasons.append("engine file does not match the sha256 in its manifest")
    return (None, reasons) if reasons else (engine, [])


# ---------------------------------------------------------------------------
# Device and TensorRT (imported lazily)
# ---------------------------------------------------------------------------


def import_tensorrt_version() -> str:
    """Version of the real ``tensorrt`` (>= 10.0), or EngineUnavailable; its type stubs alone do not count."""
    try:
        module = importlib.import_module("tensorrt")
    except ImportError as exc:
        raise EngineUnavailable(f"TensorRT is not installed ({exc})") from None
    if not hasattr(module, "Builder"):
        raise EngineUnavailable("TensorRT is not installed (only its type stubs are)")
    version = str(module.__version__)
    if parse_version(version) < MIN_TENSORRT:
        raise EngineUnavailable(f"TensorRT {version} is older than 10.0")
    return version


def query_gpu(device: int = 0) -> GpuInfo:
    """Name and compute capability of ``device`` via cuda-python (never torch)."""
    cudart: Any = None
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            cudart = importlib.import_module(name)
            break
        except ImportError:
            continue
    if cudart is None:
        raise EngineUnavailable("cuda-python is not installed (pip install cuda-python)")
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count <= device:
        raise EngineUnavailable(f"no CUDA GPU found (cudaGetDeviceCount: {err}, {count})")
    err, props = cudart.cudaGetDeviceProperties(device)
    if err != cudart.cudaError_t.cudaSuccess:
        raise EngineUnavailable(f"cudaGetDeviceProperties failed: {err}")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name=name.rstrip("\x00"), compute_capability=f"{props.major}.{props.minor}")


def engine_unavailable_reason() -> str | None:
    """One line saying why no engine can be built here, or None when TensorRT and a GPU exist."""
    try:
        import_tensorrt_version()
        query_gpu()
    except EngineUnavailable as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------------------
# The build, as small composable steps
# ---------------------------------------------------------------------------


def network_from_onnx(
    onnx_path: Path, strongly_typed: bool, logger: trt.ILogger
) -> tuple[trt.Builder, trt.INetworkDefinition, trt.OnnxParser]:
    """Parse the ONNX file into a (strongly typed) network; the parser must outlive the network."""
    import tensorrt as trt

    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    return builder, network, parser


def config_for(
    builder: trt.Builder,
    network: trt.INetworkDefinition,
    precision: str,
    batch: Batch,
    strongly_typed: bool,
    timing_cache: bytes,
) -> trt.IBuilderConfig:
    """Builder config: batch profile on every input's axis 0, timing cache, FP16 flag only before 10.12."""
    import tensorrt as trt

    config = builder.create_builder_config()
    if precision == "fp16" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        # TF32 is on by default; an "fp32" engine is the accurate reference, so keep it true FP32.
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = [tensor.shape[d] for d in range(1, len(tensor.shape))]
        lo, opt, hi = (trt.Dims([b, *rest]) for b in batch)
        profile.set_shape(tensor.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    config.set_timing_cache(config.create_timing_cache(timing_cache), ignore_mismatch=False)
    return config


def build_serialized_engine(
    builder: trt.Builder, network: trt.INetworkDefinition, config: trt.IBuilderConfig
) -> bytes:
    """builder.build_serialized_network, with a clear error instead of a None."""
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError("TensorRT failed to build the engine (see its log above)")
    return bytes(memoryview(blob))


def build_engine(
    onnx_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    precision: str,
    batch: tuple[int, ...] = (1, 4, 16),
    model_config: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Return a current engine for ``onnx_path`` from ``cache_dir/<key>/``, building it if needed.

    ``precision`` names the ONNX file's precision ("fp16" for model.fp16.onnx).
    A stale or foreign engine is never returned: its key differs, or its
    manifest/bytes fail the check, and a fresh one is built beside it.
    """
    onnx_file = Path(onnx_path)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    lo_opt_hi = check_batch(tuple(batch))
    version = import_tensorrt_version()
    gpu = query_gpu()
    onnx_sha = sha256_file(onnx_file)
    found, why = cached_engine(cache, onnx_sha, precision, lo_opt_hi, gpu, version)
    if found is not None:
        log(f"engine: reusing {found}")
        return found
    log(f"engine: building ({'; '.join(why)})")

    import tensorrt as trt

    key = engine_cache_key(onnx_sha, precision, lo_opt_hi, gpu, version)
    engine_path, sidecar = engine_paths(cache, key, precision)
    strongly_typed = uses_strongly_typed(version)
    timing = timing_cache_path(cache, gpu, version)
    started = time.perf_counter()
    builder, network, _parser = network_from_onnx(onnx_file, strongly_typed, trt.Logger(trt.Logger.WARNING))
    config = config_for(builder, network, precision, lo_opt_hi, strongly_typed,
                        timing.read_bytes() if timing.is_file() else b"")
    blob = build_serialized_engine(builder, network, config)
    seconds = time.perf_counter() - started
    atomic_write_bytes(timing, bytes(memoryview(config.get_timing_cache().serialize())))
    atomic_write_bytes(engine_path, blob)
    manifest = {
        "format": ENGINE_FORMAT,
        **build_identity(onnx_sha, precision, lo_opt_hi, gpu, version),
        "key": key,
        "engine_file": engine_path.name,
        "engine_sha256": sha256_file(engine_path),
        "engine_bytes": len(blob),
        "onnx_file": str(onnx_file.resolve()),
        "fp16_builder_flag": precision == "fp16" and not strongly_typed,
        "tf32": precision != "fp32",
        "timing_cache": str(timing),
        "build_seconds": round(seconds, 2),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model_config": dict(model_config) if model_config is not None else _sibling_model_config(onnx_file),
    }
    atomic_write_json(sidecar, manifest)  # last: an engine without its manifest is never loaded
    log(f"engine: wrote {engine_path} ({len(blob) / 1e6:.1f} MB, {seconds:.0f} s)")
    return engine_path


def _sibling_model_config(onnx_file: Path) -> dict[str, Any] | None:
    """model_config from the manifest.json beside the ONNX file (sr-export's layout), if any."""
    try:
        manifest = json.loads((onnx_file.parent / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    config = manifest.get("model_config") if isinstance(manifest, dict) else None
    return config if isinstance(config, dict) else None
