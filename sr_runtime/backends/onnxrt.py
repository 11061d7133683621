"""ONNX Runtime backends: CUDA (fixed shapes, IO binding, CUDA graphs, device-resident noise) and CPU."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import (
    EPFail,
    Fail,
    InvalidArgument,
    RuntimeException,
)

from sr_runtime.backends import resolve_precision
from sr_runtime.errors import BackendUnavailable, SRModelError
from sr_runtime.model import ModelSpec
from sr_runtime.noise import NoiseBank

log = logging.getLogger("sr_runtime")
#: What ONNX Runtime raises for a session it cannot create or run (its errors share no base class).
ORT_ERRORS = (EPFail, Fail, InvalidArgument, RuntimeException)
#: Regular runs ONNX Runtime makes before it captures a graph (for its allocations), plus the capture.
CUDA_GRAPH_WARMUP_RUNS = 3
#: Several CUDA graphs per session (`gpu_graph_id`) since 1.18; before, every run would replay the first one.
MULTI_GRAPH_SINCE = (1, 18)


def version_tuple(version: str) -> tuple[int, ...]:
    """'1.31.1' -> (1, 31, 1); stops at the first part that is not a number ('1.19.0.dev' -> (1, 19, 0))."""
    parts: list[int] = []
    for part in version.split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def cpu_cores() -> int:
    """Cores this process may use (affinity-aware where the OS tells)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """All graph optimisations, `threads` intra-op threads (default one per core), no inter-op fan-out.

    Several sessions sharing a machine (one per Ray worker) each take their share
    of the cores; one per core each would oversubscribe it.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = cpu_cores() if threads is None else threads
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
    """ONNX Runtime on the CPU; the noise bank stays a host array and batches take views of it.

    Any batch size is fine here (no per-shape set-up worth a padded batch), so
    `buckets` is not used and `batch_sizes` is None.
    """

    name = "onnxruntime-cpu"
    batch_sizes = None

    def __init__(self, spec: ModelSpec, precision: str, bank: NoiseBank, buckets: tuple[int, ...],
                 threads: int | None = None) -> None:
        self.precision = resolve_precision(spec, precision, gpu=False)
        path = spec.verify(self.precision)
        self._session = ort.InferenceSession(str(path), session_options(threads),
                                             providers=["CPUExecutionProvider"])
        _check_io(self._session, spec)
        self._bank = bank

    def run(self, lr: np.ndarray, noise_start: int) -> np.ndarray:
        noise = self._bank.slice(noise_start, lr.shape[0])
        out: np.ndarray = self._session.run(["hr"], {"lr": lr, "noise": noise})[0]
        return out

    def close(self) -> None:
        """Nothing to free by hand: the session goes with the object."""


class BucketBindings:
    """Fixed-shape IO binding of one session: buffers per bucket bound once, one binding per (bucket, noise start).

    `lr` and `hr` live on `device` in one buffer pair per bucket; the noise
    bank is uploaded once and each batch binds a pointer into it, so a call
    copies only the tiles in and the result out. With `cuda_graphs` every
    (bucket, noise start) pair is its own CUDA graph (`gpu_graph_id`), because
    a captured graph replays the addresses it was captured with.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        spec: ModelSpec,
        bank: NoiseBank,
        buckets: tuple[int, ...],
        device: str,
        cuda_graphs: bool,
    ) -> None:
        self._session = session
        self._device = device
        self._cuda_graphs = cuda_graphs
        self._bank = ort.OrtValue.ortvalue_from_numpy(bank.data, device, 0)
        self._noise_dim = spec.noise_dim
        self._row_bytes = spec.noise_dim * np.dtype(np.float32).itemsize
        self._lr = {b: ort.OrtValue.ortvalue_from_shape_and_type([b, 3, *spec.lr_size], np.float32, device, 0)
                    for b in buckets}
        self._hr = {b: ort.OrtValue.ortvalue_from_shape_and_type([b, 3, *spec.hr_size], np.float32, device, 0)
                    for b in buckets}
        self._bindings: dict[tuple[int, int], tuple[ort.IOBinding, ort.RunOptions]] = {}

    def _binding(self, bucket: int, noise_start: int) -> tuple[ort.IOBinding, ort.RunOptions]:
        key = (bucket, noise_start)
        if key not in self._bindings:
            binding = self._session.io_binding()
            binding.bind_ortvalue_input("lr", self._lr[bucket])
            binding.bind_input("noise", self._device, 0, np.float32, [bucket, self._noise_dim],
                               self._bank.data_ptr() + noise_start * self._row_bytes)
            binding.bind_ortvalue_output("hr", self._hr[bucket])
            options = ort.RunOptions()
            if self._cuda_graphs:  # ORT reserves graph id 0 and reads -1 as "no graph"
                options.add_run_config_entry("gpu_graph_id", str(len(self._bindings) + 1))
            self._bindings[key] = (binding, options)
        return self._bindings[key]

    def run(self, lr: np.ndarray, noise_start: int) -> np.ndarray:
        """Run a batch whose size is one of the buckets; returns a fresh host array."""
        bucket = lr.shape[0]
        if bucket not in self._lr:
            raise ValueError(f"batch of {bucket} is not one of the prepared sizes {sorted(self._lr)}")
        binding, options = self._binding(bucket, noise_start)
        self._lr[bucket].update_inplace(np.ascontiguousarray(lr, np.float32))
        self._session.run_with_iobinding(binding, options)
        out: np.ndarray = self._hr[bucket].numpy()
        return out

    def warm_up(self, runs: int) -> None:
        """`runs` calls per bucket at noise start 0: the per-shape set-up (cuDNN search, graph capture) is paid here."""
        for lr in self._lr.values():
            zeros = np.zeros(lr.shape(), np.float32)
            for _ in range(runs):
                self.run(zeros, 0)


class OrtCudaBackend:
    """ONNX Runtime with CUDAExecutionProvider at fixed batch shapes, replayed as CUDA graphs where it can.

    At load, per bucket: cuDNN's exhaustive algorithm search (once per shape)
    and the CUDA graph capture for noise start 0, which is every graph a
    temperature-0 run needs. At temperature > 0 a batch at another noise
    start captures its graph on first use (at most buckets x noise rows).
    A model ONNX Runtime cannot capture (a node on the CPU, say) runs the
    same fixed shapes without graphs, with a WARNING saying why.
    """

    name = "onnxruntime-cuda"

    def __init__(self, spec: ModelSpec, precision: str, bank: NoiseBank, buckets: tuple[int, ...]) -> None:
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
        self.precision = resolve_precision(spec, precision, gpu=True)
        self.batch_sizes = buckets
        path = spec.verify(self.precision)
        attempts = (True, False) if version_tuple(ort.__version__) >= MULTI_GRAPH_SINCE else (False,)
        if attempts == (False,):
            log.warning("sr_runtime: onnxruntime %s keeps one CUDA graph per session; running fixed shapes "
                        "without graphs", ort.__version__)
        failure = ""
        for cuda_graphs in attempts:
            try:
                self._bound = self._load(path, spec, bank, cuda_graphs)
            except ORT_ERRORS as exc:
                failure = str(exc).splitlines()[0]
                if cuda_graphs:
                    log.warning("sr_runtime: onnxruntime-cuda runs without CUDA graphs: %s", failure)
                continue
            self.cuda_graphs = cuda_graphs
            return
        raise BackendUnavailable(f"CUDA session failed: {failure}")

    def _load(self, path: Path, spec: ModelSpec, bank: NoiseBank, cuda_graphs: bool) -> BucketBindings:
        cuda = {"device_id": "0", "cudnn_conv_algo_search": "EXHAUSTIVE", "enable_cuda_graph": str(int(cuda_graphs))}
        session = ort.InferenceSession(str(path), session_options(),
                                       providers=[("CUDAExecutionProvider", cuda), "CPUExecutionProvider"])
        if session.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendUnavailable("CUDAExecutionProvider did not load (CUDA/cuDNN libraries missing?)")
        _check_io(session, spec)
        bound = BucketBindings(session, spec, bank, self.batch_sizes, "cuda", cuda_graphs)
        bound.warm_up(CUDA_GRAPH_WARMUP_RUNS if cuda_graphs else 1)
        return bound

    def run(self, lr: np.ndarray, noise_start: int) -> np.ndarray:
        return self._bound.run(lr, noise_start)

    def close(self) -> None:
        """Nothing to free by hand: the session, its graphs and the device buffers go with the object."""
