"""TensorRT backends: the engine for this model's key, fixed shapes, captured CUDA graphs.

`TensorRTBackend` runs fixed-size models (batches of tiles); `TensorRTFrameBackend`
runs fully convolutional ones (whole frames inside the engine's frame profile).

Written against the TensorRT 10.x Python API (name-based I/O,
`set_input_shape` / `set_tensor_address` / `execute_async_v3`, also TensorRT
11) with device memory and graphs from `cuda-python`, never torch.
`tensorrt` and `cuda-python` are imported only when this backend is tried.

The engine is the one under `EngineIdentity.key()` in the model directory or
the engine cache (`$SR_ENGINE_CACHE`), checked against its sidecar manifest
by `engine_identity`, the rule set `sr-export` uses too. Where none is
current, one is built (minutes, logged at WARNING) by `engine_build`.

Per bucket (batch size) there is one execution context with its input shapes
set once; all contexts share one activation scratch, since the caller runs
one batch at a time. Per (bucket, noise start) one CUDA graph of
`execute_async_v3` is captured, because a graph replays the tensor
addresses it was captured with and the noise is a pointer into the
device-resident bank; at load every bucket's graph for noise start 0 is
captured (all a temperature-0 run needs), others on first use.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sr_runtime.backends.common import resolve_precision
from sr_runtime.backends.engine_build import EngineBuildFailed, build_engine, frame_profile
from sr_runtime.backends.engine_identity import (
    EngineIdentity,
    EngineUnavailable,
    FrameShapes,
    c_string,
    engine_cache_dir,
    import_cudart,
    import_tensorrt,
    query_gpu,
)
from sr_runtime.errors import BackendUnavailable, SRInputError
from sr_runtime.files import sha256_file
from sr_runtime.model import ModelSpec
from sr_runtime.noise import NoiseBank
from sr_runtime.tiling import FrameBounds

if TYPE_CHECKING:  # checked against tensorrt-stubs; imported for real only through import_tensorrt()
    import tensorrt as trt

log = logging.getLogger("sr_runtime")


def locate_engine(
    spec: ModelSpec, identity: EngineIdentity, onnx_path: Path, frame_scales: dict[str, float] | None = None
) -> bytes:
    """The current engine's checked bytes for `identity` (model directory, then cache), else a fresh build's.

    `onnx_path` is the graph the identity's sha256 names; `frame_scales` the noise
    inputs' sizes relative to the LR frame, for a fully convolutional model's engine.
    """
    cache = engine_cache_dir()
    rejected: list[str] = []
    for root in (spec.directory, cache):
        blob, why = identity.load_engine(root)
        if blob is not None:
            return blob
        rejected += why
    log.warning(
        "sr_runtime: building a TensorRT engine for %s (%s); this can take minutes: %s",
        onnx_path.name,
        identity.key(),
        "; ".join(rejected),
    )
    try:
        build_engine(
            onnx_path,
            cache,
            precision=identity.precision,
            batch=identity.batch,
            log=lambda msg: log.warning("sr_runtime: %s", msg),
            frame=identity.frame,
            frame_scales=frame_scales,
        )
    except (EngineUnavailable, EngineBuildFailed) as exc:
        raise BackendUnavailable(
            f"no current TensorRT engine ({'; '.join(rejected)}) and building one failed: {exc}"
        ) from exc
    blob, why = identity.load_engine(cache)
    if blob is None:
        raise BackendUnavailable(f"the TensorRT engine just built cannot be loaded: {'; '.join(why)}")
    return blob


def deserialize(trt_module: Any, engine_bytes: bytes, key: str) -> tuple[trt.ILogger, trt.Runtime, trt.ICudaEngine]:
    """The engine with the logger and runtime that deserialised it (kept beside it: they must outlive it)."""
    logger = trt_module.Logger(trt_module.Logger.WARNING)
    runtime = trt_module.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise BackendUnavailable(f"TensorRT could not deserialize the engine {key}")
    return logger, runtime, engine


class _Cuda:
    """The few cudart calls used here, with errors turned into exceptions."""

    def __init__(self, cudart: Any) -> None:
        self.rt = cudart

    def __call__(self, result: tuple[Any, ...]) -> Any:
        err, *rest = result
        if err != self.rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA error: {c_string(self.rt.cudaGetErrorString(err)[1])}")
        return rest[0] if len(rest) == 1 else rest


class TensorRTBackend:
    """A deserialised TensorRT engine run at fixed batch shapes through captured CUDA graphs."""

    name = "tensorrt"

    def __init__(self, spec: ModelSpec, precision: str, bank: NoiseBank, buckets: tuple[int, ...]) -> None:
        trt_module = import_tensorrt()
        self.precision = resolve_precision(spec, precision, gpu=True)
        self.batch_sizes = buckets
        onnx_path = spec.verify(self.precision)
        identity = EngineIdentity(
            onnx_sha256=spec.onnx_sha256.get(self.precision) or sha256_file(onnx_path),
            precision=self.precision,
            batch=(spec.batch_min, spec.batch_opt, spec.batch_max),
            gpu=query_gpu(),
            tensorrt_version=str(trt_module.__version__),
        )
        if buckets[0] < spec.batch_min or buckets[-1] > spec.batch_max:
            raise BackendUnavailable(f"batch sizes {buckets} are outside the engine profile {identity.batch}")
        engine_bytes = locate_engine(spec, identity, onnx_path)
        self._cuda = _Cuda(import_cudart())
        self._trt_logger, self._runtime, self._engine = deserialize(trt_module, engine_bytes, identity.key())
        self._lr_shape = (3, *spec.lr_size)
        self._hr_shape = (3, *spec.hr_size)
        self._noise_dim = spec.noise_dim
        self._row_bytes = spec.noise_dim * np.dtype(np.float32).itemsize
        self._allocs: list[tuple[str, int]] = []
        self._graphs: dict[tuple[int, int], Any] = {}
        self._contexts: dict[int, trt.IExecutionContext] = {}
        self._stream: Any = None
        try:
            self._allocate(bank)
            self._create_contexts(trt_module)
            for bucket in buckets:
                self._graph(bucket, 0)
        except Exception:
            self.close()
            raise

    def _allocate(self, bank: NoiseBank) -> None:
        """Buffers for the largest bucket and the activation scratch, once; the noise bank goes to the GPU for good."""
        rt, cuda, n = self._cuda.rt, self._cuda, self.batch_sizes[-1]
        f32 = np.dtype(np.float32).itemsize
        lr_bytes = n * int(np.prod(self._lr_shape)) * f32
        hr_bytes = n * int(np.prod(self._hr_shape)) * f32
        self._stream = cuda(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))
        self._d_lr = self._alloc("device", lr_bytes)
        self._d_hr = self._alloc("device", hr_bytes)
        self._d_noise = self._alloc("device", bank.data.nbytes)
        self._scratch_bytes = int(self._engine.device_memory_size_v2)
        self._d_scratch = self._alloc("device", max(self._scratch_bytes, 1))
        self._h_lr = self._pinned(lr_bytes, (n, *self._lr_shape))
        self._h_hr = self._pinned(hr_bytes, (n, *self._hr_shape))
        cuda(
            rt.cudaMemcpy(
                self._d_noise, bank.data.ctypes.data, bank.data.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            )
        )

    def _create_contexts(self, trt_module: Any) -> None:
        """One context per bucket with its shapes and lr/hr addresses set once, all on the shared scratch."""
        for bucket in self.batch_sizes:
            context = self._engine.create_execution_context(trt_module.ExecutionContextAllocationStrategy.USER_MANAGED)
            context.set_device_memory(self._d_scratch, self._scratch_bytes)
            ok = (
                context.set_input_shape("lr", (bucket, *self._lr_shape))
                and context.set_input_shape("noise", (bucket, self._noise_dim))
                and context.set_tensor_address("lr", self._d_lr)
                and context.set_tensor_address("hr", self._d_hr)
            )
            if not ok:
                raise BackendUnavailable(f"the TensorRT engine rejected batch {bucket} or the tensor names lr/hr")
            self._contexts[bucket] = context

    def _graph(self, bucket: int, noise_start: int) -> Any:
        """The executable CUDA graph of one batch at one noise start, captured on first use."""
        key = (bucket, noise_start)
        if key in self._graphs:
            return self._graphs[key]
        context = self._contexts[bucket]
        if not context.set_tensor_address("noise", self._d_noise + noise_start * self._row_bytes):
            raise RuntimeError("the TensorRT engine has no input named noise")
        executable = capture_graph(self._cuda, context, self._stream, f"batch {bucket}")
        self._graphs[key] = executable
        return executable

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

    def run(self, lr: np.ndarray, noise_start: int, release_memory: bool = False) -> np.ndarray:
        """One batch whose size is a bucket: pinned copy in, graph replay, pinned copy out, on one stream.

        Its buffers are allocated once per shape, so `release_memory` has nothing to hand back.
        """
        rt, cuda, stream = self._cuda.rt, self._cuda, self._stream
        n = lr.shape[0]
        if n not in self._contexts:
            raise ValueError(f"batch of {n} is not one of the prepared sizes {self.batch_sizes}")
        executable = self._graph(n, noise_start)
        self._h_lr[:n] = lr
        cuda(
            rt.cudaMemcpyAsync(
                self._d_lr, self._h_lr.ctypes.data, lr.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream
            )
        )
        cuda(rt.cudaGraphLaunch(executable, stream))
        out_bytes = n * self._h_hr[0].nbytes
        cuda(
            rt.cudaMemcpyAsync(
                self._h_hr.ctypes.data, self._d_hr, out_bytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream
            )
        )
        cuda(rt.cudaStreamSynchronize(stream))
        return self._h_hr[:n].copy()  # the pinned buffer is reused by the next call

    def close(self) -> None:
        """Free graphs, device and pinned memory and the stream (idempotent)."""
        rt = self._cuda.rt
        while self._graphs:
            rt.cudaGraphExecDestroy(self._graphs.popitem()[1])
        self._contexts.clear()
        while self._allocs:
            kind, ptr = self._allocs.pop()
            (rt.cudaFree if kind == "device" else rt.cudaFreeHost)(ptr)
        if self._stream is not None:
            rt.cudaStreamDestroy(self._stream)
            self._stream = None


def capture_graph(cuda: _Cuda, context: trt.IExecutionContext, stream: Any, what: str) -> Any:
    """An executable CUDA graph of one `execute_async_v3` on `stream`, shapes and addresses as set now.

    One enqueue outside capture first: TensorRT defers shape- and address-dependent set-up to it.
    """
    rt = cuda.rt
    if not context.execute_async_v3(int(stream)):
        raise RuntimeError(f"TensorRT execute_async_v3 failed for {what}")
    cuda(rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
    captured = context.execute_async_v3(int(stream))
    graph = cuda(rt.cudaStreamEndCapture(stream))
    if not captured:
        cuda(rt.cudaGraphDestroy(graph))
        raise RuntimeError(f"TensorRT execute_async_v3 failed while capturing {what}")
    executable = cuda(rt.cudaGraphInstantiate(graph, 0))
    cuda(rt.cudaGraphDestroy(graph))
    return executable


class _FrameShape:
    """One LR frame shape of a frame engine: its execution context, buffers, noise on the device, CUDA graph."""

    def __init__(self) -> None:
        self.context: trt.IExecutionContext | None = None
        self.graph: Any = None
        self.d_lr = self.d_hr = 0
        self.d_noise: dict[str, int] = {}
        self.noise_src: dict[str, np.ndarray] = {}
        self.h_lr = self.h_hr = np.empty(0, np.float32)


class TensorRTFrameBackend:
    """A fully convolutional model's TensorRT engine: any LR frame inside its profile, one CUDA graph per shape.

    The engine is the one `sr-export` builds for the model's graph (the
    deterministic one at temperature 0) with a frame profile: `frame` (LR
    (h, w) min/opt/max), by default the profile `sr-export --res` writes
    (one stride up to 960x540 LR). Per frame shape: an execution context on
    the shared activation scratch with its input shapes and addresses set
    once, device buffers, the shape's noise maps uploaded once (a tile's
    window is copied in), pinned host buffers, and a captured CUDA graph.
    A call is a pinned copy in, a graph launch and a pinned copy out on one
    stream. `frame_bounds` tells the Upscaler the profile, so it pads smaller
    images up to it and tiles larger ones; the uint8 conversion graphs are not
    used here.
    """

    name = "tensorrt"
    device = "cuda"
    uint8_io = False

    def __init__(self, spec: ModelSpec, precision: str, deterministic: bool, frame: FrameShapes | None = None) -> None:
        trt_module = import_tensorrt()
        self.precision = resolve_precision(spec, precision, gpu=True)
        self.deterministic = deterministic
        onnx_path = spec.verify(self.precision, deterministic)
        sums = spec.deterministic_sha256 if deterministic else spec.onnx_sha256
        self.profile = frame or frame_profile(spec.hr_size[0], spec.lr_multiple)
        identity = EngineIdentity(
            onnx_sha256=sums.get(self.precision) or sha256_file(onnx_path),
            precision=self.precision,
            batch=(spec.batch_min, spec.batch_opt, spec.batch_max),
            gpu=query_gpu(),
            tensorrt_version=str(trt_module.__version__),
            frame=self.profile,
        )
        scales = {level.name: level.scale for level in spec.noise_levels}
        engine_bytes = locate_engine(spec, identity, onnx_path, None if deterministic else scales)
        self._spec = spec
        self._cuda = _Cuda(import_cudart())
        self._trt = trt_module
        self._trt_logger, self._runtime, self._engine = deserialize(trt_module, engine_bytes, identity.key())
        self._allocs: list[tuple[str, int]] = []
        self._shapes: dict[tuple[int, int], _FrameShape] = {}
        self._stream: Any = None
        try:
            rt = self._cuda.rt
            self._stream = self._cuda(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))
            self._scratch_bytes = int(self._engine.device_memory_size_v2)
            self._d_scratch = self._alloc("device", max(self._scratch_bytes, 1))
        except Exception:
            self.close()
            raise

    def _alloc(self, kind: str, nbytes: int) -> int:
        rt = self._cuda.rt
        ptr = int(self._cuda(rt.cudaMalloc(nbytes) if kind == "device" else rt.cudaMallocHost(nbytes)))
        self._allocs.append((kind, ptr))
        return ptr

    def _pinned(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 numpy view of page-locked host memory (full-speed copies to and from the GPU)."""
        count = int(np.prod(shape))
        buf = (ctypes.c_float * count).from_address(self._alloc("host", count * 4))
        return np.ctypeslib.as_array(buf).reshape(shape)

    @property
    def frame_bounds(self) -> FrameBounds | None:
        """The profile's min and max: the Upscaler plans every call within them."""
        return (self.profile[0], self.profile[2])

    def _in_profile(self, h: int, w: int) -> bool:
        (lo_h, lo_w), _, (hi_h, hi_w) = self.profile
        m = self._spec.lr_multiple
        return lo_h <= h <= hi_h and lo_w <= w <= hi_w and h % m == 0 and w % m == 0

    def _shape(self, h: int, w: int, noise: dict[str, np.ndarray]) -> _FrameShape:
        """The context, buffers and graph of an h x w LR frame, made on first use, holding `noise` on the device."""
        shape = self._shapes.get((h, w))
        if shape is None:
            shape = self._shapes[(h, w)] = self._new_shape(h, w, noise)
        self._use_noise(shape, noise)
        return shape

    def _new_shape(self, h: int, w: int, noise: dict[str, np.ndarray]) -> _FrameShape:
        s = self._spec.scale
        shape = _FrameShape()
        shape.h_lr, shape.h_hr = self._pinned((1, 3, h, w)), self._pinned((1, 3, h * s, w * s))
        shape.d_lr, shape.d_hr = self._alloc("device", shape.h_lr.nbytes), self._alloc("device", shape.h_hr.nbytes)
        context = self._engine.create_execution_context(self._trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        context.set_device_memory(self._d_scratch, self._scratch_bytes)
        ok = (
            context.set_input_shape("lr", (1, 3, h, w))
            and context.set_tensor_address("lr", shape.d_lr)
            and context.set_tensor_address("hr", shape.d_hr)
        )
        for level in self._spec.noise_levels if not self.deterministic else ():
            lh, lw = level.size(h, w)
            shape.d_noise[level.name] = self._alloc("device", level.channels * lh * lw * 4)
            ok = (
                ok
                and context.set_input_shape(level.name, (1, level.channels, lh, lw))
                and context.set_tensor_address(level.name, shape.d_noise[level.name])
            )
        if not ok:
            raise BackendUnavailable(f"the TensorRT engine rejected a {h}x{w} frame or its tensor names")
        shape.context = context
        self._use_noise(shape, noise)
        shape.graph = capture_graph(self._cuda, context, self._stream, f"a {h}x{w} frame")
        return shape

    def _use_noise(self, shape: _FrameShape, noise: dict[str, np.ndarray]) -> None:
        """Upload `noise` into the shape's device maps unless they already hold it (the same cached host arrays)."""
        if noise.keys() == shape.noise_src.keys() and all(noise[k] is shape.noise_src[k] for k in noise):
            return
        rt = self._cuda.rt
        for name, value in noise.items():
            host = np.ascontiguousarray(value, np.float32)
            self._cuda(
                rt.cudaMemcpy(
                    shape.d_noise[name], host.ctypes.data, host.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice
                )
            )
        shape.noise_src = dict(noise)

    def run(self, lr: np.ndarray, noise: dict[str, np.ndarray]) -> np.ndarray:
        """One frame [1, 3, h, w]: pinned copy in, graph launch, pinned copy out on one stream."""
        n, _, h, w = lr.shape
        if n != 1 or not self._in_profile(h, w):
            (lo_h, lo_w), _, (hi_h, hi_w) = self.profile
            raise SRInputError(
                f"a {w}x{h} LR frame (batch {n}) is outside the TensorRT engine's profile "
                f"({lo_w}x{lo_h} to {hi_w}x{hi_h}, batch 1): use onnxruntime-cuda, or build an engine for it "
                "with sr-export --frame"
            )
        rt, cuda, stream = self._cuda.rt, self._cuda, self._stream
        shape = self._shape(h, w, noise)
        shape.h_lr[...] = lr
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda(rt.cudaMemcpyAsync(shape.d_lr, shape.h_lr.ctypes.data, shape.h_lr.nbytes, h2d, stream))
        cuda(rt.cudaGraphLaunch(shape.graph, stream))
        cuda(rt.cudaMemcpyAsync(shape.h_hr.ctypes.data, shape.d_hr, shape.h_hr.nbytes, d2h, stream))
        cuda(rt.cudaStreamSynchronize(stream))
        return shape.h_hr.copy()  # the pinned buffer is the next call's

    def run_u8(self, u8: np.ndarray, padded: tuple[int, int], noise: dict[str, np.ndarray]) -> tuple[np.ndarray, bool]:
        raise RuntimeError("the TensorRT frame backend has no uint8 I/O graphs")

    def submit_u8(self, u8: np.ndarray, padded: tuple[int, int], noise: dict[str, np.ndarray]) -> Any:
        raise RuntimeError("the TensorRT frame backend has no uint8 I/O graphs")

    def release_memory(self) -> None:
        """Nothing: device and pinned memory stay bound to each frame shape's context and CUDA graph until `close`."""

    def close(self) -> None:
        """Free graphs, contexts, device and pinned memory and the stream (idempotent)."""
        rt = self._cuda.rt
        while self._shapes:
            shape = self._shapes.popitem()[1]
            if shape.graph is not None:
                rt.cudaGraphExecDestroy(shape.graph)
        while self._allocs:
            kind, ptr = self._allocs.pop()
            (rt.cudaFree if kind == "device" else rt.cudaFreeHost)(ptr)
        if self._stream is not None:
            rt.cudaStreamDestroy(self._stream)
            self._stream = None
