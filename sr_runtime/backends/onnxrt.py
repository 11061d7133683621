"""ONNX Runtime backends: CUDA (fixed shapes, IO binding, CUDA graphs, device-resident noise) and CPU."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import (
    EPFail,
    Fail,
    InvalidArgument,
    RuntimeException,
)

from sr_runtime.backends.common import resolve_precision
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


def frame_session_options(threads: int | None = None) -> ort.SessionOptions:
    """`session_options` without ONNX Runtime's memory pattern, for frames of any size on the CPU.

    The pattern is planned per input shape on the first run and then
    allocated as one block beside what the arena already holds, so from the
    second frame of a shape on the peak is about twice the first run's; the
    arena alone reuses its blocks (benchmarks/frame_memory.py measures both).
    """
    opts = session_options(threads)
    opts.enable_mem_pattern = False
    return opts


def _check_io(session: ort.InferenceSession, spec: ModelSpec) -> None:
    """Fail at load time, not mid-image, if the graph does not follow the export contract."""
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    if set(inputs) != {"lr", "noise"} or "hr" not in outputs:
        raise SRModelError(
            f"ONNX graph of {spec.name} has inputs {sorted(inputs)} / outputs {sorted(outputs)}, "
            "expected lr, noise -> hr"
        )
    if list(inputs["lr"][1:]) != [3, *spec.lr_size] or inputs["noise"][1:] != [spec.noise_dim]:
        raise SRModelError(
            f"ONNX input shapes {inputs} do not match the manifest "
            f"(lr [N, 3, {spec.lr_size[0]}, {spec.lr_size[1]}], noise [N, {spec.noise_dim}])"
        )
    if list(outputs["hr"][1:]) != [3, *spec.hr_size]:
        raise SRModelError(
            f"ONNX output shape {outputs['hr']} does not match the manifest's scale {spec.scale} "
            f"(hr [N, 3, {spec.hr_size[0]}, {spec.hr_size[1]}])"
        )


class OrtCpuBackend:
    """ONNX Runtime on the CPU; the noise bank stays a host array and batches take views of it.

    Any batch size is fine here (no per-shape set-up worth a padded batch), so
    `buckets` is not used and `batch_sizes` is None.
    """

    name = "onnxruntime-cpu"
    batch_sizes = None

    def __init__(
        self, spec: ModelSpec, precision: str, bank: NoiseBank, buckets: tuple[int, ...], threads: int | None = None
    ) -> None:
        self.precision = resolve_precision(spec, precision, gpu=False)
        path = spec.verify(self.precision)
        self._session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
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
        self._lr = {
            b: ort.OrtValue.ortvalue_from_shape_and_type([b, 3, *spec.lr_size], np.float32, device, 0) for b in buckets
        }
        self._hr = {
            b: ort.OrtValue.ortvalue_from_shape_and_type([b, 3, *spec.hr_size], np.float32, device, 0) for b in buckets
        }
        self._bindings: dict[tuple[int, int], tuple[ort.IOBinding, ort.RunOptions]] = {}

    def _binding(self, bucket: int, noise_start: int) -> tuple[ort.IOBinding, ort.RunOptions]:
        key = (bucket, noise_start)
        if key not in self._bindings:
            binding = self._session.io_binding()
            binding.bind_ortvalue_input("lr", self._lr[bucket])
            binding.bind_input(
                "noise",
                self._device,
                0,
                np.float32,
                [bucket, self._noise_dim],
                self._bank.data_ptr() + noise_start * self._row_bytes,
            )
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
            log.warning(
                "sr_runtime: onnxruntime %s keeps one CUDA graph per session; running fixed shapes without graphs",
                ort.__version__,
            )
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
        session = ort.InferenceSession(
            str(path), session_options(), providers=[("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
        )
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


# ---------------------------------------------------------------------------
# Fully convolutional models: whole frames of any size
# ---------------------------------------------------------------------------


def _check_frame_io(session: ort.InferenceSession, spec: ModelSpec, deterministic: bool) -> None:
    """The graph takes `lr` [N, 3, H, W] (plus one map per noise level unless deterministic) -> `hr`."""
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    expected = {"lr"} if deterministic else {"lr", *(lv.name for lv in spec.noise_levels)}
    if set(inputs) != expected or "hr" not in outputs:
        raise SRModelError(
            f"ONNX graph of {spec.name} has inputs {sorted(inputs)} / outputs {sorted(outputs)}, "
            f"expected {sorted(expected)} -> hr"
        )
    if inputs["lr"][1] != 3 or any(isinstance(d, int) for d in inputs["lr"][2:]):
        raise SRModelError(f"ONNX input lr {inputs['lr']} is not [N, 3, H, W] with symbolic H and W")


def _io_sessions(spec: ModelSpec, providers: list[Any]) -> tuple[ort.InferenceSession, ort.InferenceSession] | None:
    """Sessions of the model's uint8 conversion graphs, or None when its manifest has none."""
    pre, post = spec.verify_io("pre"), spec.verify_io("post")
    if pre is None or post is None:
        return None
    opts = session_options(1)
    return (
        ort.InferenceSession(str(pre), opts, providers=providers),
        ort.InferenceSession(str(post), opts, providers=providers),
    )


def _u8_feeds(image: tuple[int, int], padded: tuple[int, int], scale: int) -> dict[str, np.ndarray]:
    """The shape-constant inputs of the conversion graphs: edge pads (bottom, right) and the HR crop."""
    (h, w), (ph, pw) = image, padded
    return {
        "pads": np.array([0, 0, 0, 0, 0, 0, ph - h, pw - w], np.int64),
        "starts": np.zeros(2, np.int64),
        "ends": np.array([h * scale, w * scale], np.int64),
    }


class OrtCpuFrameBackend:
    """ONNX Runtime on the CPU for a fully convolutional model: any frame size per call.

    `deterministic` loads the graph without noise inputs (temperature 0);
    otherwise `run` takes the noise maps by input name.
    """

    name = "onnxruntime-cpu"
    device = "cpu"

    def __init__(
        self, spec: ModelSpec, precision: str, deterministic: bool, threads: int | None = None, uint8_io: bool = False
    ) -> None:
        self.precision = resolve_precision(spec, precision, gpu=False)
        self.deterministic = deterministic
        path = spec.verify(self.precision, deterministic)
        self._session = ort.InferenceSession(
            str(path), frame_session_options(threads), providers=["CPUExecutionProvider"]
        )
        _check_frame_io(self._session, spec, deterministic)
        self._io = _io_sessions(spec, ["CPUExecutionProvider"]) if uint8_io else None
        self._scale = spec.scale
        m = spec.lr_multiple  # the smallest frame: one stride
        self._smallest = {"lr": np.zeros((1, 3, m, m), np.float32)}
        if not deterministic:
            self._smallest.update(
                {lv.name: np.zeros((1, lv.channels, *lv.size(m, m)), np.float32) for lv in spec.noise_levels}
            )
        self._shrink = ort.RunOptions()
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    @property
    def uint8_io(self) -> bool:
        return self._io is not None

    def run(self, lr: np.ndarray, noise: dict[str, np.ndarray]) -> np.ndarray:
        out: np.ndarray = self._session.run(["hr"], {"lr": lr, **noise})[0]
        return out

    def run_u8(self, u8: np.ndarray, padded: tuple[int, int], noise: dict[str, np.ndarray]) -> tuple[np.ndarray, bool]:
        """uint8 [1, h, w, 3] -> (uint8 [1, 4h, 4w, 3], all finite) through the conversion graphs (the GPU path's)."""
        if self._io is None:
            raise RuntimeError("this backend was created without uint8 I/O graphs")
        pre, post = self._io
        feeds = _u8_feeds((u8.shape[1], u8.shape[2]), padded, self._scale)
        lr = pre.run(["lr"], {"u8": u8, "pads": feeds["pads"]})[0]
        hr = self.run(lr, noise)
        out, nonfinite = post.run(["u8", "nonfinite"], {"hr": hr, "starts": feeds["starts"], "ends": feeds["ends"]})
        return out, not int(nonfinite)

    def release_memory(self) -> None:
        """Hand the memory arena's free blocks back to the system (after a large frame it keeps them all).

        ONNX Runtime shrinks an arena only at the end of a run, so this is a
        run on the smallest frame (one stride) with arena shrinkage asked for.
        """
        self._session.run(["hr"], self._smallest, self._shrink)

    def close(self) -> None:
        """Nothing to free by hand: the session goes with the object."""


class _FrameSlot:
    """Device buffers, IO binding and CUDA graph id of one frame shape (a captured graph replays fixed addresses)."""

    u8_in: ort.OrtValue | None = None
    u8_out: ort.OrtValue | None = None
    pre: ort.IOBinding | None = None
    post: ort.IOBinding | None = None

    def __init__(
        self,
        session: ort.InferenceSession,
        lr_shape: tuple[int, ...],
        hr_shape: tuple[int, ...],
        noise: dict[str, np.ndarray],
        graph_id: int | None,
    ) -> None:
        self.lr = ort.OrtValue.ortvalue_from_shape_and_type(list(lr_shape), np.float32, "cuda", 0)
        self.hr = ort.OrtValue.ortvalue_from_shape_and_type(list(hr_shape), np.float32, "cuda", 0)
        # The noise of this shape is uploaded once and stays on the device: frames of one shape share it.
        self.noise = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), "cuda", 0) for k, v in noise.items()}
        self.noise_src = dict(noise)  # the host maps on the device now (kept alive, compared by identity)
        self.binding = session.io_binding()
        self.binding.bind_ortvalue_input("lr", self.lr)
        for name, value in self.noise.items():
            self.binding.bind_ortvalue_input(name, value)
        self.binding.bind_ortvalue_output("hr", self.hr)
        self.options = ort.RunOptions()
        if graph_id is not None:
            self.options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self.runs = 0

    def use_noise(self, noise: dict[str, np.ndarray]) -> None:
        """Copy `noise` into the bound device maps unless they already hold it (the same cached host arrays).

        A stream of whole frames passes the same cached maps every call: no
        copy. Tiles pass a window each: copied into the same addresses, so the
        shape's CUDA graph still replays.
        """
        if all(noise[k] is self.noise_src.get(k) for k in noise):
            return
        for name, value in noise.items():
            self.noise[name].update_inplace(np.ascontiguousarray(value))
        self.noise_src = dict(noise)

    def bind_uint8(
        self, io: tuple[ort.InferenceSession, ort.InferenceSession], image: tuple[int, int], scale: int
    ) -> None:
        """uint8 frame in and out on the device: pre (x/255, edge pad) -> model -> post (crop, rint, uint8).

        The pads and crop bounds are host tensors constant for the shape (ONNX
        Runtime reads them on the host); only the uint8 frame and result move.
        """
        pre, post = io
        h, w = image
        _, _, ph, pw = self.lr.shape()
        feeds = _u8_feeds(image, (ph, pw), scale)
        self._host = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}  # kept alive with the slot
        self.u8_in = ort.OrtValue.ortvalue_from_shape_and_type([1, h, w, 3], np.uint8, "cuda", 0)
        self.u8_out = ort.OrtValue.ortvalue_from_shape_and_type([1, h * scale, w * scale, 3], np.uint8, "cuda", 0)
        self.nonfinite = ort.OrtValue.ortvalue_from_shape_and_type([], np.uint8, "cuda", 0)
        self.pre = pre.io_binding()
        self.pre.bind_ortvalue_input("u8", self.u8_in)
        self.pre.bind_ortvalue_input("pads", self._host["pads"])
        self.pre.bind_ortvalue_output("lr", self.lr)
        self.post = post.io_binding()
        self.post.bind_ortvalue_input("hr", self.hr)
        self.post.bind_ortvalue_input("starts", self._host["starts"])
        self.post.bind_ortvalue_input("ends", self._host["ends"])
        self.post.bind_ortvalue_output("u8", self.u8_out)
        self.post.bind_ortvalue_output("nonfinite", self.nonfinite)


class OrtCudaFrameBackend:
    """ONNX Runtime CUDA for a fully convolutional model: one frame shape, one set of device buffers.

    Per frame shape (at most `max_shapes` kept): device buffers for `lr` and
    `hr` and the shape's noise maps, bound once; with `cuda_graphs` the shape
    is its own CUDA graph (`gpu_graph_id`), captured after ORT's warm-up runs.
    `prefer_nhwc` asks the CUDA provider for channels-last convolutions (faster
    in fp16 on tensor cores where measured). A call copies the frame in and
    the result out and nothing else (tiles also copy their noise window).
    Beyond `max_shapes` the oldest slot's buffers go; ONNX Runtime keeps its
    captured graph, never replayed again (a new shape gets a new graph id).
    """

    name = "onnxruntime-cuda"
    device = "cuda"

    def __init__(
        self,
        spec: ModelSpec,
        precision: str,
        deterministic: bool,
        prefer_nhwc: bool = False,
        cuda_graphs: bool = True,
        max_shapes: int = 4,
    ) -> None:
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
        self.precision = resolve_precision(spec, precision, gpu=True)
        self.deterministic = deterministic
        self.cuda_graphs = cuda_graphs and version_tuple(ort.__version__) >= MULTI_GRAPH_SINCE
        path = spec.verify(self.precision, deterministic)
        cuda = {
            "device_id": "0",
            "cudnn_conv_algo_search": "EXHAUSTIVE",
            "enable_cuda_graph": str(int(self.cuda_graphs)),
            "prefer_nhwc": str(int(prefer_nhwc)),
        }
        try:
            self._session = ort.InferenceSession(
                str(path), session_options(), providers=[("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
            )
        except ORT_ERRORS as exc:
            raise BackendUnavailable(f"CUDA session failed: {str(exc).splitlines()[0]}") from exc
        if self._session.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendUnavailable("CUDAExecutionProvider did not load (CUDA/cuDNN libraries missing?)")
        _check_frame_io(self._session, spec, deterministic)
        self._scale = spec.scale
        self._io = _io_sessions(spec, [("CUDAExecutionProvider", {"device_id": "0"}), "CPUExecutionProvider"])
        self._slots: dict[tuple[tuple[int, ...], tuple[int, int] | None], _FrameSlot] = {}
        self._max_shapes = max_shapes
        self._next_graph = 1  # ORT reserves graph id 0 and reads -1 as "no graph"

    @property
    def uint8_io(self) -> bool:
        return self._io is not None

    def _slot(
        self, lr_shape: tuple[int, ...], noise: dict[str, np.ndarray], image: tuple[int, int] | None
    ) -> _FrameSlot:
        """The slot of this frame shape (and uint8 image size), made on first use, holding `noise` on the device."""
        key = (lr_shape, image)
        slot = self._slots.get(key)
        if slot is None:
            if len(self._slots) >= self._max_shapes:
                self._slots.pop(next(iter(self._slots)))
            n, c, h, w = lr_shape
            graph_id = None
            if self.cuda_graphs:
                graph_id, self._next_graph = self._next_graph, self._next_graph + 1
            slot = self._slots[key] = _FrameSlot(
                self._session, lr_shape, (n, c, h * self._scale, w * self._scale), noise, graph_id
            )
            if image is not None and self._io is not None:
                slot.bind_uint8(self._io, image, self._scale)
        slot.use_noise(noise)
        return slot

    def run_u8(self, u8: np.ndarray, padded: tuple[int, int], noise: dict[str, np.ndarray]) -> tuple[np.ndarray, bool]:
        """uint8 [1, h, w, 3] -> (uint8 [1, 4h, 4w, 3], all finite); conversion, padding, model, crop on the device."""
        slot = self._slot((1, 3, *padded), noise, (u8.shape[1], u8.shape[2]))
        if slot.pre is None or slot.post is None or slot.u8_in is None or slot.u8_out is None:
            raise RuntimeError("this model has no uint8 I/O graphs")
        assert self._io is not None
        slot.u8_in.update_inplace(np.ascontiguousarray(u8))
        self._io[0].run_with_iobinding(slot.pre)
        self._session.run_with_iobinding(slot.binding, slot.options)
        self._io[1].run_with_iobinding(slot.post)
        slot.runs += 1
        out: np.ndarray = slot.u8_out.numpy()
        return out, not int(slot.nonfinite.numpy())

    def run(self, lr: np.ndarray, noise: dict[str, np.ndarray]) -> np.ndarray:
        """One call; `noise` is copied to the device only when it is not the maps the shape's slot holds."""
        slot = self._slot(lr.shape, noise, None)
        slot.lr.update_inplace(np.ascontiguousarray(lr, np.float32))
        self._session.run_with_iobinding(slot.binding, slot.options)
        slot.runs += 1
        out: np.ndarray = slot.hr.numpy()
        return out

    def release_memory(self) -> None:
        """Nothing: device memory stays bound to each frame shape's buffers and CUDA graph until `close`."""

    def close(self) -> None:
        """Drop the per-shape buffers; the session and its graphs go with the object."""
        self._slots.clear()
