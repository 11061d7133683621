"""Inference backends and the `auto` choice: TensorRT, then ONNX Runtime CUDA, then CPU.

A backend owns its session and its copy of the noise bank (device-resident on
GPUs) and runs one batch: `run(lr [N, 3, h, w] float32, noise_start) -> hr`,
where the batch's noise is rows `[noise_start, noise_start + N)` of the bank;
`release_memory=True` on the last batch of a large image lets it give back
what it kept for intermediate tensors (ONNX Runtime CPU's arena).

GPU backends take fixed shapes only (docs/design.md, Runtime contract): they
are prepared at load for a few batch sizes, the buckets, and list them in `batch_sizes`; the caller pads
a batch to the smallest bucket that holds it. A new shape would make ONNX
Runtime's CUDA provider re-plan its convolutions and could not replay a
captured CUDA graph. The CPU backend has no per-shape set-up and takes any N
(`batch_sizes` None), so it never computes padding.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol

import numpy as np

from sr_runtime.backends.common import PRECISIONS
from sr_runtime.errors import BackendUnavailable, SRModelError
from sr_runtime.model import ModelSpec
from sr_runtime.noise import NoiseBank
from sr_runtime.tiling import FrameBounds

log = logging.getLogger("sr_runtime")

AUTO_ORDER = ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")
ALIASES = {
    "auto": "auto",
    "tensorrt": "tensorrt",
    "trt": "tensorrt",
    "cuda": "onnxruntime-cuda",
    "onnxruntime-cuda": "onnxruntime-cuda",
    "cpu": "onnxruntime-cpu",
    "onnxruntime-cpu": "onnxruntime-cpu",
}


class Backend(Protocol):
    """One loaded model on one device."""

    name: str
    precision: str

    @property
    def batch_sizes(self) -> tuple[int, ...] | None:
        """The batch sizes `run` accepts, ascending; None: any."""

    def run(self, lr: np.ndarray, noise_start: int, release_memory: bool = False) -> np.ndarray:
        """One batch; `release_memory`: the last of a large image, so memory kept for intermediates may go back."""

    def close(self) -> None: ...


Factory = Callable[[ModelSpec, str, NoiseBank, tuple[int, ...]], Backend]


def batch_buckets(spec: ModelSpec, batch_size: int) -> tuple[int, ...]:
    """The batch sizes GPU backends are prepared for: the profile's min/opt/max below `batch_size`, and it.

    They match the engine's optimisation profile (its opt is what TensorRT
    tuned for), so a 1-tile remainder is not padded to 16 where the profile
    has a 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    profile = (spec.batch_min, spec.batch_opt, spec.batch_max)
    return tuple(sorted({b for b in profile if b < batch_size} | {batch_size}))


def bucket_for(count: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding `count` tiles."""
    for size in buckets:
        if size >= count:
            return size
    raise ValueError(f"a batch of {count} tiles exceeds the largest bucket {buckets[-1]}")


def _factory(name: str, cpu_threads: int | None) -> Factory:
    """Import a backend module only when asked: tensorrt / cuda-python may be absent."""
    if name == "tensorrt":
        from sr_runtime.backends.trt_engine import TensorRTBackend

        return TensorRTBackend
    from sr_runtime.backends.onnxrt import OrtCpuBackend, OrtCudaBackend

    if name == "onnxruntime-cuda":
        return OrtCudaBackend
    return functools.partial(OrtCpuBackend, threads=cpu_threads)


def _ort_errors() -> tuple[type[Exception], ...]:
    """Every exception type ONNX Runtime's bindings raise (they share no base class, and vary by version)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))


def _load(
    name: str, cpu_threads: int | None, spec: ModelSpec, precision: str, bank: NoiseBank, buckets: tuple[int, ...]
) -> Backend:
    """One backend; ONNX Runtime failing on a file that passed its sha256 check is the model's fault."""
    try:
        return _factory(name, cpu_threads)(spec, precision, bank, buckets)
    except _ort_errors() as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise SRModelError(
            f"model {spec.name!r} in {spec.directory}: ONNX Runtime cannot load its ONNX file "
            f"(broken or not an ONNX model): {reason}"
        ) from None


def create_backend(
    spec: ModelSpec,
    backend: str,
    precision: str,
    bank: NoiseBank,
    buckets: tuple[int, ...],
    cpu_threads: int | None = None,
) -> Backend:
    """The requested backend, or with "auto" the first of AUTO_ORDER that works here.

    `buckets` are the batch sizes a GPU backend prepares (and warms up) at load;
    the largest must not exceed the bank's `max_batch`. `cpu_threads` are the
    intra-op threads of the CPU backend (default: one per core).

    A named backend that cannot run raises BackendUnavailable; `auto` logs a
    one-line reason per skipped backend and moves on.
    """
    name = ALIASES.get(backend)
    if name is None:
        raise ValueError(f"backend must be one of {sorted(ALIASES)}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not buckets or buckets[-1] > bank.max_batch:
        raise ValueError(f"batch buckets {buckets} must be non-empty and fit the noise bank's {bank.max_batch} rows")
    if name != "auto":
        chosen = _load(name, cpu_threads, spec, precision, bank, buckets)
        log.info("sr_runtime: backend %s (%s)", chosen.name, chosen.precision)
        return chosen
    for candidate in AUTO_ORDER:
        try:
            chosen = _load(candidate, cpu_threads, spec, precision, bank, buckets)
        except BackendUnavailable as exc:
            log.info("sr_runtime: skipping %s: %s", candidate, exc)
            continue
        log.info("sr_runtime: backend %s (%s)", chosen.name, chosen.precision)
        return chosen
    raise BackendUnavailable("no backend could run the model (not even onnxruntime-cpu)")


class FrameBackend(Protocol):
    """A fully convolutional model on one device: `run(lr [N, 3, H, W], noise by input name) -> hr`."""

    name: str
    precision: str
    device: str
    deterministic: bool

    @property
    def frame_bounds(self) -> FrameBounds | None:
        """LR (h, w) min and max one call takes (a TensorRT profile); None: any multiple of the stride."""

    @property
    def uint8_io(self) -> bool:
        """Whether `run_u8` works: the model ships the uint8 conversion graphs and they were loaded."""

    def run(self, lr: np.ndarray, noise: dict[str, np.ndarray]) -> np.ndarray: ...

    def run_u8(self, u8: np.ndarray, padded: tuple[int, int], noise: dict[str, np.ndarray]) -> tuple[np.ndarray, bool]:
        """uint8 [1, h, w, 3] -> (uint8 [1, 4h, 4w, 3], all finite), padded and cropped back inside the graphs."""

    def submit_u8(
        self, u8: np.ndarray, padded: tuple[int, int], noise: dict[str, np.ndarray]
    ) -> Future[tuple[np.ndarray, bool]]:
        """`run_u8` whose result may still be on its way to the host: a stream's next frame can start meanwhile."""

    def release_memory(self) -> None:
        """Hand memory kept for reuse between calls back to the system, where the backend can."""

    def close(self) -> None: ...


#: Backends that run fully convolutional models, tried by `auto` in this order. TensorRT runs them only
#: when named (`backend="tensorrt"`): its engine is built for a range of frame sizes, minutes per profile.
FRAME_AUTO_ORDER = ("onnxruntime-cuda", "onnxruntime-cpu")


def create_frame_backend(
    spec: ModelSpec,
    backend: str,
    precision: str,
    deterministic: bool,
    cpu_threads: int | None = None,
    prefer_nhwc: bool = False,
    cpu_uint8_io: bool = False,
) -> FrameBackend:
    """A frame backend for a fully convolutional model; `auto` logs why it skips one, as `create_backend`.

    GPU backends load the model's uint8 conversion graphs when it has them; the
    CPU backend only with `cpu_uint8_io` (numpy converts as fast there).
    """
    from sr_runtime.backends.onnxrt import OrtCpuFrameBackend, OrtCudaFrameBackend

    name = ALIASES.get(backend)
    if name is None:
        raise ValueError(f"backend must be one of {sorted(ALIASES)}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")

    def make(which: str) -> FrameBackend:
        if which == "tensorrt":
            from sr_runtime.backends.trt_engine import TensorRTFrameBackend

            return TensorRTFrameBackend(spec, precision, deterministic)
        if which == "onnxruntime-cuda":
            return OrtCudaFrameBackend(spec, precision, deterministic, prefer_nhwc=prefer_nhwc)
        return OrtCpuFrameBackend(spec, precision, deterministic, threads=cpu_threads, uint8_io=cpu_uint8_io)

    for candidate in FRAME_AUTO_ORDER if name == "auto" else (name,):
        try:
            chosen = make(candidate)
        except BackendUnavailable as exc:
            if name != "auto":
                raise
            log.info("sr_runtime: skipping %s: %s", candidate, exc)
            continue
        log.info("sr_runtime: backend %s (%s, whole frames)", chosen.name, chosen.precision)
        return chosen
    raise BackendUnavailable("no backend could run the model (not even onnxruntime-cpu)")
