"""TensorRT engine build into the engine cache, written against TensorRT 10.x / 11's Python API.

Thin and composable in polygraphy's loader style::

    builder, network, parser = network_from_onnx(path, strongly_typed, logger)
    blob = build_serialized_engine(builder, network, config_for(builder, network, ...))

`build_engine(onnx_path, cache_dir, precision=..., batch=...)` is what the
runtime calls lazily and `sr-export` calls eagerly; it returns the engine
under the identity's key when that one is current, otherwise builds it.
Torch-free: `tensorrt` and `cuda-python` are imported only when a build runs.

Precision lives in the network: on TensorRT >= 10.12 (and 11, which has no
FP16 builder flag) the network is created STRONGLY_TYPED, so the FP16 ONNX's
Casts and FP32 islands are obeyed exactly. Older 10.x builds the FP32-typed
parse with `BuilderFlag.FP16` for precision "fp16".
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sr_runtime.backends.engine_identity import (
    ENGINE_FORMAT,
    Batch,
    EngineIdentity,
    FrameShapes,
    check_batch,
    check_frame_shapes,
    engine_cache_dir,
    import_tensorrt,
    query_gpu,
    read_timing_cache,
    timing_cache_path,
)
from sr_runtime.files import atomic_write_bytes, atomic_write_json, file_lock, sha256_file

if TYPE_CHECKING:
    import tensorrt as trt


class EngineBuildFailed(RuntimeError):
    """TensorRT could not parse the ONNX file or build an engine from it (its log says more)."""


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
        raise EngineBuildFailed(f"TensorRT could not parse {onnx_path}: {errors}")
    return builder, network, parser


def config_for(
    builder: trt.Builder,
    network: trt.INetworkDefinition,
    precision: str,
    batch: Batch,
    strongly_typed: bool,
    timing_cache: bytes,
    frame: FrameShapes | None = None,
    frame_scales: Mapping[str, float] | None = None,
) -> trt.IBuilderConfig:
    """Builder config: batch profile on every input's axis 0, timing cache, FP16 flag only before 10.12.

    A fully convolutional model's engine also spans the LR frame size: `frame`
    is its (h, w) min/opt/max and `frame_scales` each input's size relative to
    the LR frame (noise levels; `lr` is 1). min = opt = max builds a fixed-size
    video engine, the fastest where every frame has one shape.
    """
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
        if frame is not None:
            # [N, C, h, w] with h, w = the LR frame x the input's scale (1 for lr, the level's for noise_<res>)
            scale = frame_scales.get(tensor.name, 1.0) if frame_scales is not None else 1.0
            channels = tensor.shape[1]
            dims = [
                trt.Dims([b, channels, round(h * scale), round(w * scale)])
                for b, (h, w) in zip(batch, frame, strict=True)
            ]
            profile.set_shape(tensor.name, *dims)
            continue
        rest = [tensor.shape[d] for d in range(1, len(tensor.shape))]
        lo, opt, hi = (trt.Dims([b, *rest]) for b in batch)
        profile.set_shape(tensor.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    config.set_timing_cache(config.create_timing_cache(timing_cache), ignore_mismatch=False)
    return config


def build_serialized_engine(builder: trt.Builder, network: trt.INetworkDefinition, config: trt.IBuilderConfig) -> bytes:
    """builder.build_serialized_network, with a clear error instead of a None."""
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise EngineBuildFailed("TensorRT failed to build the engine (see its log above)")
    return bytes(memoryview(blob))


def save_timing_cache(cache_dir: Path, path: Path, config: trt.IBuilderConfig) -> None:
    """Merge this build's timing cache into the one on disk, under a lock, so concurrent builds lose nothing.

    An untrusted one on disk (see `read_timing_cache`) is replaced, not merged.
    """
    ours = config.get_timing_cache()
    with file_lock(path):
        on_disk, _ = read_timing_cache(cache_dir, path)
        if on_disk:
            merged = config.create_timing_cache(on_disk)
            merged.combine(ours, ignore_mismatch=True)
            ours = merged
        atomic_write_bytes(path, bytes(memoryview(ours.serialize())))


def build_engine(
    onnx_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    precision: str,
    batch: tuple[int, ...] = (1, 4, 16),
    model_config: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
    frame: FrameShapes | None = None,
    frame_scales: Mapping[str, float] | None = None,
) -> Path:
    """Return a current engine for `onnx_path` from `cache_dir/<key>/`, building it if needed.

    `frame` / `frame_scales`: the LR frame profile of a fully convolutional model (see `config_for`).

    `precision` names the ONNX file's precision ("fp16" for model.fp16.onnx).
    A stale or foreign engine is never returned: its key differs, or its
    manifest/bytes fail the check, and a fresh one is built in its place.
    """
    onnx_file = Path(onnx_path)
    cache = Path(cache_dir) if cache_dir is not None else engine_cache_dir()
    trt = import_tensorrt()
    identity = EngineIdentity(
        sha256_file(onnx_file), precision, check_batch(tuple(batch)), query_gpu(), str(trt.__version__), frame
    )
    found, why = identity.cached_engine(cache)
    if found is not None:
        log(f"engine: reusing {found}")
        return found
    log(f"engine: building ({'; '.join(why)})")

    engine_path, sidecar = identity.paths(cache)
    timing = timing_cache_path(cache, identity.gpu, identity.tensorrt_version)
    started = time.perf_counter()
    builder, network, _parser = network_from_onnx(onnx_file, identity.strongly_typed, trt.Logger(trt.Logger.WARNING))
    timing_bytes, timing_skipped = read_timing_cache(cache, timing)
    if timing_skipped:
        log(f"engine: {timing_skipped}")
    config = config_for(
        builder, network, precision, identity.batch, identity.strongly_typed, timing_bytes, frame, frame_scales
    )
    blob = build_serialized_engine(builder, network, config)
    seconds = time.perf_counter() - started
    save_timing_cache(cache, timing, config)
    atomic_write_bytes(engine_path, blob)
    manifest = {
        "format": ENGINE_FORMAT,
        **identity.fields(),
        "key": identity.key(),
        "engine_file": engine_path.name,
        "engine_sha256": sha256_file(engine_path),
        "engine_bytes": len(blob),
        "onnx_file": str(onnx_file.resolve()),
        "fp16_builder_flag": precision == "fp16" and not identity.strongly_typed,
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


#: Largest LR frame of the default frame profile: a 4K output (3840x2160) at x4, rounded up to the stride.
DEFAULT_MAX_FRAME_LR = (540, 960)


def frame_profile(res: int, multiple: int, frame: tuple[int, int] | None = None) -> FrameShapes:
    """LR (h, w) min/opt/max of a frame engine.

    `frame` is the input (LR) frame's (width, height): it fixes all three, rounded up to the stride, for a
    video engine whose frames all have one shape; otherwise min is one stride, opt the LR side of the HR
    tile `res` (res / 4, square) and max DEFAULT_MAX_FRAME_LR (so one profile covers tiles to 4K frames).
    """

    def up(n: int) -> int:
        return -(-n // multiple) * multiple

    if frame is not None:
        w, h = frame
        fixed = (up(h), up(w))
        return check_frame_shapes((fixed, fixed, fixed), multiple)
    opt = up(max(multiple, res // 4))
    hi = (max(opt, up(DEFAULT_MAX_FRAME_LR[0])), max(opt, up(DEFAULT_MAX_FRAME_LR[1])))
    return check_frame_shapes(((multiple, multiple), (opt, opt), hi), multiple)
