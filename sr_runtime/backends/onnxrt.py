"""ONNX Runtime backends: CUDA (fixed shapes, IO binding, CUDA graphs, device-resident noise) and CPU, for
fixed-size models (batches of tiles) and fully convolutional ones (whole frames)."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

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
from sr_runtime.tiling import FrameBounds

log = logging.getLogger("sr_runtime")
T = TypeVar("T")
#: What ONNX Runtime raises for a session it cannot create or run (its errors share no base class).
ORT_ERRORS = (EPFail, Fail, InvalidArgument, RuntimeException)
#: Regular runs ONNX Runtime makes before it captures a graph (for its allocations), plus the capture.
CUDA_GRAPH_WARMUP_RUNS = 3
#: Several CUDA graphs per session (`gpu_graph_id`) since 1.18; before, every run would replay the first one.
MULTI_GRAPH_SINCE = (1, 18)
#: Run option that hands the CPU arena's unused chunks back when the run ends.
ARENA_SHRINK = ("memory.enable_memory_arena_shrinkage", "cpu:0")


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
    """`session_options` for frames of any size on the CPU: no memory pattern, no NCHWc layout.

    The memory pattern is planned per input shape on the first run and then
    allocated beside what the arena already holds, so from the second frame
    of a shape on the peak was about twice the first run's; the arena alone
    reuses its blocks. The NCHWc layout (level `all` over `extended`) pads
    channels and adds reorders: fc-256 took 1.8x the memory at 640x480 LR and
    was not faster. Measured in benchmarks/frame_memory.py.
    """
    opts = session_options(threads)
    opts.enable_mem_pattern = False
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
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
    `buckets` is not used and `batch_sizes` is None. The session keeps ONNX
    Runtime's memory arena between batches (without it each batch pays for its
    memory afresh, ~20% more CPU time measured); `release_memory` empties it.
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
        self._shrink = ort.RunOptions()
        self._shrink.add_run_config_entry(*ARENA_SHRINK)

    def run(self, lr: np.ndarray, noise_start: int, release_memory: bool = False) -> np.ndarray:
        noise = self._bank.slice(noise_start, lr.shape[0])
        options = self._shrink if release_memory else None
        out: np.ndarray = self._session.run(["hr"], {"lr": lr, "noise": noise}, options)[0]
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
        """Run a batch whose size is one of the buckets; returns a fresh host array.

        Its device buffers are bound once per shape, so there is no memory to release between images.
        """
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

    def run(self, lr: np.ndarray, noise_start: int, release_memory: bool = False) -> np.ndarray:
        return self._bound.run(lr, noise_start)  # fixed shapes: its device memory is reused, not released

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


def _done(value: tuple[np.ndarray, bool]) -> Future[tuple[np.ndarray, bool]]:
    """An already finished future: what `submit_u8` returns where nothing runs in the background."""
    future: Future[tuple[np.ndarray, bool]] = Future()
    future.set_result(value)
    return future


class OrtCpuFrameBackend:
    """ONNX Runtime on the CPU for a fully convolutional model: any frame size per call.

    `deterministic` loads the graph without noise inputs (temperature 0);
    otherwise `run` takes the noise maps by input name.
    """

    name = "onnxruntime-cpu"
    device = "cpu"
    frame_bounds: FrameBounds | None = None

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
        self._shrink.add_run_config_entry(*ARENA_SHRINK)

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

    def submit_u8(
        self, u8: np.ndarray, padded: tuple[int, int], noise: dict[str, np.ndarray]
    ) -> Future[tuple[np.ndarray, bool]]:
        """`run_u8`, returned as a finished future (nothing to overlap on the CPU)."""
        return _done(self.run_u8(u8, padded, noise))

    def release_memory(self) -> None:
        """Hand the memory arena's free blocks back to the system (after a large frame it keeps them all).

        ONNX Runtime shrinks an arena only at the end of a run, so this is a
        run on the smallest frame (one stride) with arena shrinkage asked for.
        """
        self._session.run(["hr"], self._smallest, self._shrink)

    def close(self) -> None:
        """Nothing to free by hand: the session goes with the object."""


def frame_dimension_overrides(
    inputs: dict[str, list[Any]], spec: ModelSpec, lr_shape: tuple[int, int, int, int]
) -> dict[str, int]:
    """Values for the graph's symbolic input dimensions (ONNX Runtime's free dimensions) at one frame shape.

    `inputs` maps input names to their shapes as ONNX Runtime reports them
    (ints and dimension names such as '4*h'); `lr` is [N, 3, H, W] and each
    noise level [N, C, H * scale, W * scale], as the export contract says.
    A session with every free dimension fixed sees only static shapes, so its
    optimiser folds the shape arithmetic away and every node can run on the
    GPU, which ONNX Runtime requires before it captures a CUDA graph.
    """
    n, _, h, w = lr_shape
    sizes = {"lr": (h, w), **{lv.name: lv.size(h, w) for lv in spec.noise_levels}}
    values: dict[str, int] = {}
    for name, shape in inputs.items():
        if name not in sizes or len(shape) != 4:
            raise SRModelError(f"ONNX input {name} {shape} is not one of the frame contract's [N, C, H, W] inputs")
        for dim, value in zip((shape[0], shape[2], shape[3]), (n, *sizes[name]), strict=True):
            if isinstance(dim, int):
                if dim != value:
                    raise SRModelError(f"ONNX input {name} has a fixed size {dim} where the frame needs {value}")
                continue
            if not isinstance(dim, str) or values.setdefault(dim, value) != value:
                raise SRModelError(
                    f"ONNX input {name}: dimension {dim!r} would need both {values.get(dim)} and {value}"
                )
    return values


class _ShapeSession:
    """One frame shape: its own session with every dimension fixed, device buffers bound once, a CUDA graph.

    `lr`, `hr` and the noise maps live on the device at fixed addresses, which
    a captured graph replays. The uint8 path adds the uint8 frame's device
    buffer and two result buffers used in turn, so the result of one frame
    can be copied to the host while the next frame runs.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        device: str,
        lr_shape: tuple[int, int, int, int],
        scale: int,
        noise: dict[str, np.ndarray],
        cuda_graph: bool,
    ) -> None:
        n, c, h, w = lr_shape
        self.session = session
        self.device = device
        self.cuda_graph = cuda_graph
        self.lr = ort.OrtValue.ortvalue_from_shape_and_type(list(lr_shape), np.float32, device, 0)
        self.hr = ort.OrtValue.ortvalue_from_shape_and_type([n, c, h * scale, w * scale], np.float32, device, 0)
        # Own buffers, filled by copy: tiles overwrite them with their windows, never the cached host maps.
        self.noise = {
            k: ort.OrtValue.ortvalue_from_shape_and_type(list(v.shape), np.float32, device, 0) for k, v in noise.items()
        }
        self.noise_src: dict[str, np.ndarray] = {}
        self.use_noise(noise)
        self.binding = session.io_binding()
        self.binding.bind_ortvalue_input("lr", self.lr)
        for name, value in self.noise.items():
            self.binding.bind_ortvalue_input(name, value)
        self.binding.bind_ortvalue_output("hr", self.hr)
        self.uint8: dict[tuple[int, int], _Uint8Buffers] = {}

    def use_noise(self, noise: dict[str, np.ndarray]) -> None:
        """Copy `noise` into the bound device maps unless they already hold it (the same cached host arrays).

        A stream of whole frames passes the same read-only cached maps every
        call: no copy. Tiles pass a window each: copied into the same
        addresses, so the shape's CUDA graph still replays.
        """
        if noise.keys() == self.noise_src.keys() and all(noise[k] is self.noise_src[k] for k in noise):
            return
        for name, value in noise.items():
            self.noise[name].update_inplace(np.ascontiguousarray(value, np.float32))
        self.noise_src = dict(noise)

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)


class _Uint8Buffers:
    """The uint8 frame's device buffer and bindings of the conversion graphs for one image size in one shape."""

    #: Result buffers used in turn: one is copied to the host while the next frame fills the other.
    RING = 2

    def __init__(
        self, io: tuple[ort.InferenceSession, ort.InferenceSession], shape: _ShapeSession, image: tuple[int, int]
    ) -> None:
        pre, post = io
        h, w = image
        _, _, ph, pw = shape.lr.shape()
        scale = shape.hr.shape()[2] // ph
        self.host = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in _u8_feeds(image, (ph, pw), scale).items()}
        self.u8_in = ort.OrtValue.ortvalue_from_shape_and_type([1, h, w, 3], np.uint8, shape.device, 0)
        self.pre = pre.io_binding()
        self.pre.bind_ortvalue_input("u8", self.u8_in)
        self.pre.bind_ortvalue_input("pads", self.host["pads"])
        self.pre.bind_ortvalue_output("lr", shape.lr)
        self.out = [
            ort.OrtValue.ortvalue_from_shape_and_type([1, h * scale, w * scale, 3], np.uint8, shape.device, 0)
            for _ in range(self.RING)
        ]
        self.nonfinite = [ort.OrtValue.ortvalue_from_shape_and_type([], np.uint8, shape.device, 0) for _ in self.out]
        self.post = []
        for out, flag in zip(self.out, self.nonfinite, strict=True):
            binding = post.io_binding()
            binding.bind_ortvalue_input("hr", shape.hr)
            binding.bind_ortvalue_input("starts", self.host["starts"])
            binding.bind_ortvalue_input("ends", self.host["ends"])
            binding.bind_ortvalue_output("u8", out)
            binding.bind_ortvalue_output("nonfinite", flag)
            self.post.append(binding)
        self.pending: list[Future[tuple[np.ndarray, bool]] | None] = [None] * self.RING
        self.turn = 0


def _to_host(value: ort.OrtValue) -> np.ndarray:
    """A host array the caller owns: `OrtValue.numpy()` copies from a device but may view CPU memory."""
    out: np.ndarray = value.numpy()
    return out.copy() if out.size and out.ctypes.data == value.data_ptr() else out


class OrtBoundFrameBackend:
    """ONNX Runtime with IO binding for a fully convolutional model: one session and buffer set per frame shape.

    Per padded frame shape (at most `max_shapes` kept, the least recently
    used dropped first): a session whose free dimensions are fixed to that
    shape (`frame_dimension_overrides`), device buffers for `lr`, `hr` and the
    shape's noise maps bound once, and with `cuda_graphs` the model call
    captured as a CUDA graph on its first run (ONNX Runtime captures only
    sessions whose every node runs on the GPU, hence the fixed shapes; where
    it refuses, the shape runs without a graph and a WARNING says why).
    `prefer_nhwc` asks the CUDA provider for channels-last convolutions.

    A call copies the frame in and the result out; noise only when it is not
    the maps the shape already holds (whole frames of one shape: never again).
    With the uint8 graphs, `submit_u8` runs conversion, model and crop on the
    device and returns a future whose device-to-host copy runs on a helper
    thread, so a stream's next frame computes meanwhile.

    `device="cpu"` runs the very same bindings on ONNX Runtime's CPU provider,
    which is how the code is tested on machines without a GPU.
    """

    def __init__(
        self,
        spec: ModelSpec,
        precision: str,
        deterministic: bool,
        *,
        device: str,
        prefer_nhwc: bool = False,
        cuda_graphs: bool = True,
        max_shapes: int = 4,
        threads: int | None = None,
    ) -> None:
        if device not in ("cuda", "cpu"):
            raise ValueError(f"device must be cuda or cpu, got {device!r}")
        gpu = device == "cuda"
        if gpu and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
        self.device = device
        self.name = "onnxruntime-cuda" if gpu else "onnxruntime-cpu"
        self.frame_bounds: FrameBounds | None = None
        self.precision = resolve_precision(spec, precision, gpu=gpu)
        self.deterministic = deterministic
        self.cuda_graphs = cuda_graphs and gpu
        self._path = spec.verify(self.precision, deterministic)
        self._spec = spec
        self._threads = threads
        self._provider: list[Any] = ["CPUExecutionProvider"]
        if gpu:
            cuda = {"device_id": "0", "cudnn_conv_algo_search": "EXHAUSTIVE"}
            if prefer_nhwc:  # only when asked: a build without NHWC kernels may not know the option
                cuda["prefer_nhwc"] = "1"
            self._provider = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
        # Names and shapes of the inputs, read once without optimising (the per-shape sessions optimise).
        plain = ort.SessionOptions()
        plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            meta = ort.InferenceSession(str(self._path), plain, providers=["CPUExecutionProvider"])
        except ORT_ERRORS as exc:
            raise SRModelError(f"{self._path}: ONNX Runtime cannot load it: {str(exc).splitlines()[0]}") from None
        _check_frame_io(meta, spec, deterministic)
        self._inputs = {i.name: list(i.shape) for i in meta.get_inputs()}
        io_providers: list[Any] = [("CUDAExecutionProvider", {"device_id": "0"}), "CPUExecutionProvider"]
        self._io = _io_sessions(spec, io_providers if gpu else ["CPUExecutionProvider"])
        self._shapes: OrderedDict[tuple[int, int, int, int], _ShapeSession] = OrderedDict()
        self._graphless: set[tuple[int, int, int, int]] = set()  # shapes whose graph failed at its first run
        self._max_shapes = max_shapes
        self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sr-d2h")
        if gpu:  # fail now, not at the first frame, where the CUDA provider does not load
            if self._io is not None:
                if self._io[0].get_providers()[0] != "CUDAExecutionProvider":
                    raise BackendUnavailable("CUDAExecutionProvider did not load (CUDA/cuDNN libraries missing?)")
            else:
                probe = (1, 3, spec.lr_multiple, spec.lr_multiple)
                self._shape(probe, {})
                self._drop(probe)

    @property
    def uint8_io(self) -> bool:
        return self._io is not None

    @property
    def graphs_captured(self) -> dict[str, bool]:
        """Per frame shape ('HxW') whether it runs as a CUDA graph: for benchmarks and logs."""
        return {f"{k[2]}x{k[3]}": s.cuda_graph for k, s in self._shapes.items()}

    def _session(self, lr_shape: tuple[int, int, int, int], cuda_graph: bool) -> ort.InferenceSession:
        # On the CPU provider the same options as the CPU frame backend, so the two compute alike.
        opts = session_options(self._threads) if self.device == "cuda" else frame_session_options(self._threads)
        for dim, value in frame_dimension_overrides(self._inputs, self._spec, lr_shape).items():
            opts.add_free_dimension_override_by_name(dim, value)
        providers = self._provider
        if cuda_graph:
            name, cuda = self._provider[0]
            providers = [(name, {**cuda, "enable_cuda_graph": "1"}), *self._provider[1:]]
        session = ort.InferenceSession(str(self._path), opts, providers=providers)
        if session.get_providers()[0] != ("CUDAExecutionProvider" if self.device == "cuda" else "CPUExecutionProvider"):
            raise BackendUnavailable("CUDAExecutionProvider did not load (CUDA/cuDNN libraries missing?)")
        return session

    def _shape(self, lr_shape: tuple[int, int, int, int], noise: dict[str, np.ndarray]) -> _ShapeSession:
        """The session of this frame shape, made on first use, holding `noise` on the device."""
        found = self._shapes.get(lr_shape)
        if found is not None:
            self._shapes.move_to_end(lr_shape)
            found.use_noise(noise)
            return found
        if len(self._shapes) >= self._max_shapes:
            self._drop(next(iter(self._shapes)))
        if not noise and not self.deterministic:  # the start-up probe: zero maps of the right sizes
            n, _, h, w = lr_shape
            noise = {lv.name: np.zeros((n, lv.channels, *lv.size(h, w)), np.float32) for lv in self._spec.noise_levels}
        graph = self.cuda_graphs and lr_shape not in self._graphless
        try:
            session = self._session(lr_shape, graph)
        except ORT_ERRORS as exc:
            if not graph:
                raise BackendUnavailable(f"CUDA session failed: {str(exc).splitlines()[0]}") from exc
            log.warning(
                "sr_runtime: onnxruntime-cuda runs frames of %dx%d without a CUDA graph: %s",
                lr_shape[2],
                lr_shape[3],
                str(exc).splitlines()[0],
            )
            graph = False
            try:
                session = self._session(lr_shape, graph)
            except ORT_ERRORS as again:
                raise BackendUnavailable(f"CUDA session failed: {str(again).splitlines()[0]}") from again
        shape = self._shapes[lr_shape] = _ShapeSession(session, self.device, lr_shape, self._spec.scale, noise, graph)
        return shape

    def _drop(self, key: tuple[int, int, int, int]) -> None:
        """Forget a frame shape once its results in flight are on the host."""
        shape = self._shapes.pop(key)
        for buffers in shape.uint8.values():
            for pending in buffers.pending:
                if pending is not None:
                    pending.exception()  # waits; the caller of that frame sees its error, not us

    def _on_shape(
        self, lr_shape: tuple[int, int, int, int], noise: dict[str, np.ndarray], work: Callable[[_ShapeSession], T]
    ) -> T:
        """`work` on the shape's session; a CUDA graph that fails at its capture costs that shape its graph, once."""
        shape = self._shape(lr_shape, noise)
        try:
            return work(shape)
        except ORT_ERRORS as exc:
            if not shape.cuda_graph:
                raise
            log.warning(
                "sr_runtime: onnxruntime-cuda could not capture a CUDA graph for %dx%d frames, running without: %s",
                lr_shape[2],
                lr_shape[3],
                str(exc).splitlines()[0],
            )
            self._drop(lr_shape)
            self._graphless.add(lr_shape)
            return work(self._shape(lr_shape, noise))

    def run(self, lr: np.ndarray, noise: dict[str, np.ndarray]) -> np.ndarray:
        """One call on float32 [N, 3, H, W]; noise is copied to the device only when it is not the shape's maps."""
        n, c, h, w = lr.shape

        def work(shape: _ShapeSession) -> np.ndarray:
            shape.lr.update_inplace(np.ascontiguousarray(lr, np.float32))
            shape.run()
            return _to_host(shape.hr)

        return self._on_shape((n, c, h, w), noise, work)

    def submit_u8(
        self, u8: np.ndarray, padded: tuple[int, int], noise: dict[str, np.ndarray]
    ) -> Future[tuple[np.ndarray, bool]]:
        """uint8 [1, h, w, 3] in; conversion, padding, model and crop on the device; the copy out in the background.

        Returns a future of (uint8 [1, 4h, 4w, 3], all finite). The device work
        is done when this returns, so the next frame may start at once; only
        the result's device-to-host copy is still running.
        """
        io = self._io
        if io is None:
            raise RuntimeError("this model has no uint8 I/O graphs")
        image = (u8.shape[1], u8.shape[2])

        def work(shape: _ShapeSession) -> Future[tuple[np.ndarray, bool]]:
            buffers = shape.uint8.get(image)
            if buffers is None:
                buffers = shape.uint8[image] = _Uint8Buffers(io, shape, image)
            turn = buffers.turn
            previous = buffers.pending[turn]
            if previous is not None:
                previous.exception()  # its copy out of this result buffer has finished (or failed)
            buffers.u8_in.update_inplace(np.ascontiguousarray(u8, np.uint8))
            io[0].run_with_iobinding(buffers.pre)
            shape.run()
            io[1].run_with_iobinding(buffers.post[turn])
            out, flag = buffers.out[turn], buffers.nonfinite[turn]
            future = self._copier.submit(lambda: (_to_host(out), not int(flag.numpy())))
            buffers.pending[turn] = future
            buffers.turn = (turn + 1) % buffers.RING
            return future

        return self._on_shape((1, 3, *padded), noise, work)

    def run_u8(self, u8: np.ndarray, padded: tuple[int, int], noise: dict[str, np.ndarray]) -> tuple[np.ndarray, bool]:
        """uint8 [1, h, w, 3] -> (uint8 [1, 4h, 4w, 3], all finite): `submit_u8` and wait."""
        return self.submit_u8(u8, padded, noise).result()

    def release_memory(self) -> None:
        """Nothing: memory stays bound to each frame shape's session, buffers and CUDA graph until `close`."""

    def close(self) -> None:
        """Wait for copies in flight, then drop the sessions, their graphs and device buffers."""
        self._copier.shutdown(wait=True)
        self._shapes.clear()


class OrtCudaFrameBackend(OrtBoundFrameBackend):
    """`OrtBoundFrameBackend` on the GPU (ONNX Runtime's CUDA provider)."""

    def __init__(
        self,
        spec: ModelSpec,
        precision: str,
        deterministic: bool,
        prefer_nhwc: bool = False,
        cuda_graphs: bool = True,
        max_shapes: int = 4,
    ) -> None:
        super().__init__(
            spec,
            precision,
            deterministic,
            device="cuda",
            prefer_nhwc=prefer_nhwc,
            cuda_graphs=cuda_graphs,
            max_shapes=max_shapes,
        )
