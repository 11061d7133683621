"""ONNX Runtime backends: CUDA (IO binding, device-resident noise) and CPU (tuned threads)."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from sr_runtime.backends import resolve_precision
from sr_runtime.errors import BackendUnavailable, SRModelError
from sr_runtime.model import ModelSpec
from sr_runtime.noise import NoiseBank


def cpu_cores() -> int:
    """Cores this process may use (affinity-aware where the OS tells)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def session_options() -> ort.SessionOptions:
    """All graph optimisations, one intra-op thread per core, no inter-op fan-out (a single chain)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = cpu_cores()
    opts.inter_op_num_threads = 1
    return opts


def _check_io(session: ort.InferenceSession, spec: ModelSpec) -> None:
    """Fail at load time, not mid-image, if the graph does not follow the export contract."""
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    if set(inputs) != {"lr", "noise"} or "hr" not in outputs:
        raise SRModelError(f"ONNX graph of {spec.name} has inputs {sorted(inputs)} / outputs {sorted(outputs)}, "
                           "expected lr, noise -> hr")
    if list(inputs["lr"][1:]) != [3, *spec.lr_size] or inputs["noise"][1:] != [spec.noise_dim]:
        raise SRModelError(f"ONNX input shapes {inputs} do not match the manifest "
                           f"(lr [N, 3, {spec.lr_size[0]}, {spec.lr_size[1]}], noise [N, {spec.noise_dim}])")
    if list(outputs["hr"][1:]) != [3, *spec.hr_size]:
        raise SRModelError(f"ONNX output shape {outputs['hr']} does not match the manifest's scale {spec.scale} "
                           f"(hr [N, 3, {spec.hr_size[0]}, {spec.hr_size[1]}])")


class OrtCpuBackend:
    """ONNX Runtime on the CPU; the noise bank stays a host array and batches take views of it."""

    name = "onnxruntime-cpu"

    def __init__(self, spec: ModelSpec, precision: str, bank: NoiseBank) -> None:
        self.precision = resolve_precision(spec, precision, gpu=False)
        path = spec.verify(self.precision)
        self._session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
        _check_io(self._session, spec)
        self._bank = bank

    def run(self, lr: np.ndarray, noise_start: int) -> np.ndarray:
        noise = self._bank.slice(noise_start, lr.shape[0])
        out: np.ndarray = self._session.run(["hr"], {"lr": lr, "noise": noise})[0]
        return out

    def close(self) -> None:
        """Nothing to free by hand: the session goes with the object."""


class OrtCudaBackend:
    """ONNX Runtime with CUDAExecutionProvider; the bank is uploaded once and bound by pointer."""

    name = "onnxruntime-cuda"

    def __init__(self, spec: ModelSpec, precision: str, bank: NoiseBank) -> None:
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
        self.precision = resolve_precision(spec, precision, gpu=True)
        path = spec.verify(self.precision)
        providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        try:
            self._session = ort.InferenceSession(str(path), session_options(), providers=providers)
        except Exception as exc:
            raise BackendUnavailable(f"CUDA session failed: {str(exc).splitlines()[0]}") from exc
        if self._session.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendUnavailable("CUDAExecutionProvider did not load (CUDA/cuDNN libraries missing?)")
        _check_io(self._session, spec)
        self._noise = ort.OrtValue.ortvalue_from_numpy(bank.data, "cuda", 0)
        self._noise_dim = spec.noise_dim
        self._row_bytes = spec.noise_dim * np.dtype(np.float32).itemsize

    def run(self, lr: np.ndarray, noise_start: int) -> np.ndarray:
        binding = self._session.io_binding()
        binding.bind_cpu_input("lr", lr)
        binding.bind_input(
            "noise", "cuda", 0, np.float32, [lr.shape[0], self._noise_dim],
            self._noise.data_ptr() + noise_start * self._row_bytes,
        )
        binding.bind_output("hr", "cuda", 0)
        self._session.run_with_iobinding(binding)
        out: np.ndarray = binding.copy_outputs_to_cpu()[0]
        return out

    def close(self) -> None:
        """Nothing to free by hand: the session and the device bank go with the object."""
