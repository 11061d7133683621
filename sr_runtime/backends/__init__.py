"""Inference backends and the `auto` choice: TensorRT, then ONNX Runtime CUDA, then CPU.

A backend owns its session and its copy of the noise bank (device-resident on
GPUs) and runs one batch: `run(lr [N, 3, h, w] float32, noise_start) -> hr`,
where the batch's noise is rows `[noise_start, noise_start + N)` of the bank.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import numpy as np

from sr_runtime.errors import BackendUnavailable
from sr_runtime.model import ModelSpec
from sr_runtime.noise import NoiseBank

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
PRECISIONS = ("auto", "fp32", "fp16")


class Backend(Protocol):
    """One loaded model on one device."""

    name: str
    precision: str

    def run(self, lr: np.ndarray, noise_start: int) -> np.ndarray: ...

    def close(self) -> None: ...


Factory = Callable[[ModelSpec, str, NoiseBank], Backend]


def resolve_precision(spec: ModelSpec, precision: str, gpu: bool) -> str:
    """"auto" means fp16 on GPUs when the model ships an fp16 ONNX, fp32 otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        spec.onnx_path(precision)  # SRModelError now rather than a fallback later
        return precision
    fp16 = spec.onnx_files.get("fp16")
    return "fp16" if gpu and fp16 is not None and fp16.is_file() else "fp32"


def _factory(name: str) -> Factory:
    """Import a backend module only when asked: tensorrt / cuda-python may be absent."""
    if name == "tensorrt":
        from sr_runtime.backends.trt_engine import TensorRTBackend

        return TensorRTBackend
    from sr_runtime.backends.onnxrt import OrtCpuBackend, OrtCudaBackend

    return OrtCudaBackend if name == "onnxruntime-cuda" else OrtCpuBackend


def create_backend(spec: ModelSpec, backend: str, precision: str, bank: NoiseBank) -> Backend:
    """The requested backend, or with "auto" the first of AUTO_ORDER that works here.

    A named backend that cannot run raises BackendUnavailable; `auto` logs a
    one-line reason per skipped backend and moves on.
    """
    name = ALIASES.get(backend)
    if name is None:
        raise ValueError(f"backend must be one of {sorted(ALIASES)}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if name != "auto":
        chosen = _factory(name)(spec, precision, bank)
        log.info("sr_runtime: backend %s (%s)", chosen.name, chosen.precision)
        return chosen
    for candidate in AUTO_ORDER:
        try:
            chosen = _factory(candidate)(spec, precision, bank)
        except BackendUnavailable as exc:
            log.info("sr_runtime: skipping %s: %s", candidate, exc)
            continue
        log.info("sr_runtime: backend %s (%s)", chosen.name, chosen.precision)
        return chosen
    raise BackendUnavailable("no backend could run the model (not even onnxruntime-cpu)")
