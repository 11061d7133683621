"""TensorRT backend: a cached engine, device buffers, pinned host buffers, one stream.

Written against the TensorRT 10.x Python API (name-based I/O,
`set_input_shape` / `set_tensor_address` / `execute_async_v3`, also TensorRT
11) with device memory from `cuda-python`, never torch. `tensorrt` and
`cuda-python` are imported only here and only when this backend is tried.

Engine cache: an engine `<stem>.engine` counts only with a sidecar
`<stem>.engine.json` that names the ONNX sha256, TensorRT version, GPU name,
compute capability, precision and batch profile it was built for, and the
engine's own sha256 (required: the other fields are public or guessable); a
stale or foreign engine is never loaded blindly, nor one reached through a
symlink or lying in a directory another user owns or may write. Engines are looked up under the model directory and the cache
directory (`$SR_ENGINE_CACHE`, else `~/.cache/sr_runtime/engines`), at any
depth: `sr_export` writes `<cache>/<key>/model.<precision>.engine`. Where no
engine matches and `sr_export` is installed, one is built through
`sr_export.tensorrt.build_engine(onnx_path, cache_dir, precision=..., batch=...)`.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sr_runtime.backends import resolve_precision
from sr_runtime.errors import BackendUnavailable
from sr_runtime.model import ModelSpec, sha256_file
from sr_runtime.noise import NoiseBank

if TYPE_CHECKING:  # checked against tensorrt-stubs; imported for real only in TensorRTBackend
    import tensorrt as trt

ENGINE_CACHE_ENV = "SR_ENGINE_CACHE"
log = logging.getLogger("sr_runtime")


def engine_cache_dir() -> Path:
    """Where built engines go: `$SR_ENGINE_CACHE`, else the user cache directory."""
    env = os.environ.get(ENGINE_CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sr_runtime" / "engines"


@dataclass(frozen=True)
class EngineTarget:
    """What a cached engine must have been built for to be loaded here."""

    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    batch: int

    def mismatch(self, meta: dict[str, Any]) -> str | None:
        """Why an engine's sidecar manifest does not fit this target, or None when it does."""
        cc = meta.get("compute_capability")
        if isinstance(cc, (list, tuple)):
            cc = ".".join(str(v) for v in cc)
        found = {
            "onnx_sha256": meta.get("onnx_sha256"),
            "tensorrt_version": meta.get("tensorrt_version"),
            "gpu_name": meta.get("gpu_name"),
            "compute_capability": None if cc is None else str(cc),
            "precision": meta.get("precision"),
        }
        for key, value in found.items():
            if value != getattr(self, key):
                return f"{key} is {value!r}, need {getattr(self, key)!r}"
        batch_max = meta.get("batch", {}).get("max") if isinstance(meta.get("batch"), dict) else None
        if not isinstance(batch_max, int) or batch_max < self.batch:
            return f"built for batch max {batch_max!r}, need {self.batch}"
        return None


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
        except FileNotFoundError:  # nothing there to trust; reading it fails with its own reason
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


def find_engine(directories: list[Path], target: EngineTarget) -> tuple[Path | None, list[str]]:
    """First engine in `directories` whose sidecar manifest matches, and why the others did not."""
    rejected: list[str] = []
    for directory in directories:
        for engine in sorted(directory.rglob("*.engine")):  # sr_export caches in <cache>/<key>/
            sidecar = engine.with_name(engine.name + ".json")
            unsafe = untrusted_location(directory, engine) or untrusted_location(directory, sidecar)
            if unsafe is not None:
                rejected.append(f"{engine.name}: {unsafe}")
                continue
            try:
                meta = json.loads(sidecar.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                rejected.append(f"{engine.name}: no readable manifest ({exc.__class__.__name__})")
                continue
            reason = target.mismatch(meta) if isinstance(meta, dict) else "manifest is not an object"
            if reason is None and meta.get("engine_sha256") != sha256_file(engine):
                reason = "engine file does not match the sha256 in its manifest (or it names none)"
            if reason is None:
                return engine, rejected
            rejected.append(f"{engine.name}: {reason}")
    return None, rejected


def _import_cudart() -> Any:
    """cuda-python's runtime module (new layout first, then the pre-12.8 one)."""
    for module in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(module)
        except ImportError:
            continue
    raise BackendUnavailable("cuda-python is not installed (pip install cuda-python)")


def _text(value: bytes | str) -> str:
    """cuda-python gives C strings as bytes (NUL-padded) in some versions, str in others."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return text.rstrip("\x00")


class _Cuda:
    """The few cudart calls used here, with errors turned into exceptions."""

    def __init__(self, cudart: Any) -> None:
        self.rt = cudart

    def __call__(self, result: tuple[Any, ...]) -> Any:
        err, *rest = result
        if err != self.rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA error: {_text(self.rt.cudaGetErrorString(err)[1])}")
        return rest[0] if len(rest) == 1 else rest


class TensorRTBackend:
    """A deserialised TensorRT engine with buffers for the largest batch, allocated once."""

    name = "tensorrt"

    def __init__(self, spec: ModelSpec, precision: str, bank: NoiseBank) -> None:
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise BackendUnavailable(f"tensorrt is not installed ({exc})") from None
        if not hasattr(trt, "Runtime"):  # the type stubs alone import as an empty namespace package
            raise BackendUnavailable("tensorrt is not installed (only its type stubs are)")
        cudart = _import_cudart()
        cuda = _Cuda(cudart)
        err, count = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess or count < 1:
            raise BackendUnavailable("no CUDA GPU found")
        self.precision = resolve_precision(spec, precision, gpu=True)
        props = cuda(cudart.cudaGetDeviceProperties(0))
        onnx_path = spec.verify(self.precision)
        target = EngineTarget(
            onnx_sha256=spec.onnx_sha256.get(self.precision) or sha256_file(onnx_path),
            tensorrt_version=str(trt.__version__),
            gpu_name=_text(props.name),
            compute_capability=f"{props.major}.{props.minor}",
            precision=self.precision,
            batch=bank.max_batch,
        )
        engine_path = self._locate_engine(spec, target, onnx_path)
        self._cuda = cuda
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)
        engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if engine is None:
            raise BackendUnavailable(f"TensorRT could not deserialize {engine_path}")
        self._engine: trt.ICudaEngine = engine
        self._context: trt.IExecutionContext = engine.create_execution_context()
        self._lr_shape = (3, *spec.lr_size)
        self._hr_shape = (3, *spec.hr_size)
        self._noise_dim = spec.noise_dim
        self._row_bytes = spec.noise_dim * np.dtype(np.float32).itemsize
        self._allocs: list[tuple[str, int]] = []
        self._stream: Any = None
        try:
            self._allocate(bank)
        except Exception:
            self.close()
            raise

    def _allocate(self, bank: NoiseBank) -> None:
        """Buffers for the largest batch, once; the noise bank is copied to the GPU for good."""
        rt, cuda, n = self._cuda.rt, self._cuda, bank.max_batch
        f32 = np.dtype(np.float32).itemsize
        lr_bytes = n * int(np.prod(self._lr_shape)) * f32
        hr_bytes = n * int(np.prod(self._hr_shape)) * f32
        self._stream = cuda(rt.cudaStreamCreate())
        self._d_lr = self._alloc("device", lr_bytes)
        self._d_hr = self._alloc("device", hr_bytes)
        self._d_noise = self._alloc("device", bank.data.nbytes)
        self._h_lr = self._pinned(lr_bytes, (n, *self._lr_shape))
        self._h_hr = self._pinned(hr_bytes, (n, *self._hr_shape))
        cuda(rt.cudaMemcpy(self._d_noise, bank.data.ctypes.data, bank.data.nbytes,
                           rt.cudaMemcpyKind.cudaMemcpyHostToDevice))

    def _locate_engine(self, spec: ModelSpec, target: EngineTarget, onnx_path: Path) -> Path:
        cache = engine_cache_dir()
        engine, rejected = find_engine([spec.directory, cache], target)
        if engine is not None:
            return engine
        try:
            builder = importlib.import_module("sr_export.tensorrt")
        except ImportError:
            why = "; ".join(rejected) or "none cached"
            raise BackendUnavailable(f"no matching TensorRT engine ({why}) and sr_export is not installed") from None
        build = getattr(builder, "build_engine", None)
        if build is None:
            raise BackendUnavailable("sr_export.tensorrt has no build_engine(); cannot build an engine")
        try:
            built = Path(build(onnx_path, cache, precision=target.precision,
                               batch=(spec.batch_min, spec.batch_opt, spec.batch_max),
                               log=lambda msg: log.info("sr_runtime: %s", msg)))
        except Exception as exc:
            raise BackendUnavailable(f"building a TensorRT engine failed: {exc}") from exc
        engine, rejected = find_engine([built.parent], target)
        if engine is None:
            raise BackendUnavailable(f"the engine just built does not match ({'; '.join(rejected)})")
        return engine

    def _alloc(self, kind: str, nbytes: int) -> int:
        rt = self._cuda.rt
        ptr = int(self._cuda(rt.cudaMalloc(nbytes) if kind == "device" else rt.cudaMallocHost(nbytes)))
        self._allocs.append((kind, ptr))
        return ptr

    def _pinned(self, nbytes: int, shape: tuple[int, ...]) -> np.ndarray:
        """A numpy view of page-locked host memory, so copies to/from the GPU run at full speed."""
        ptr = self._alloc("host", nbytes)
        buf = (ctypes.c_float * (nbytes // 4)).from_address(ptr)
        return np.ctypeslib.as_array(buf).reshape(shape)

    def run(self, lr: np.ndarray, noise_start: int) -> np.ndarray:
        rt, cuda, ctx = self._cuda.rt, self._cuda, self._context
        n = lr.shape[0]
        self._h_lr[:n] = lr
        stream = self._stream
        cuda(rt.cudaMemcpyAsync(self._d_lr, self._h_lr.ctypes.data, lr.nbytes,
                                rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
        ok = (
            ctx.set_input_shape("lr", (n, *self._lr_shape))
            and ctx.set_input_shape("noise", (n, self._noise_dim))
            and ctx.set_tensor_address("lr", self._d_lr)
            and ctx.set_tensor_address("noise", self._d_noise + noise_start * self._row_bytes)
            and ctx.set_tensor_address("hr", self._d_hr)
        )
        if not ok:
            raise RuntimeError(f"TensorRT engine rejected a batch of {n} (shapes or tensor names lr/noise/hr)")
        if not ctx.execute_async_v3(int(stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        out_bytes = n * self._h_hr[0].nbytes
        cuda(rt.cudaMemcpyAsync(self._h_hr.ctypes.data, self._d_hr, out_bytes,
                                rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
        cuda(rt.cudaStreamSynchronize(stream))
        return self._h_hr[:n].copy()

    def close(self) -> None:
        """Free device and pinned memory and the stream (idempotent)."""
        rt = self._cuda.rt
        while self._allocs:
            kind, ptr = self._allocs.pop()
            (rt.cudaFree if kind == "device" else rt.cudaFreeHost)(ptr)
        if self._stream is not None:
            rt.cudaStreamDestroy(self._stream)
            self._stream = None
