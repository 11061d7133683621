"""`Upscaler`: any image, any size, through a VDVAE-SR backend, 4x larger."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, TypeVar, overload

import numpy as np
from PIL import Image

from sr_runtime.backends import Backend, FrameBackend, batch_buckets, bucket_for, create_backend, create_frame_backend
from sr_runtime.errors import SRInputError, SRModelError
from sr_runtime.imaging import (
    DEFAULT_MAX_PIXELS,
    STRIP_ROWS,
    Decoded,
    ImageBuilder,
    decode_array,
    decode_pil,
    encode,
    open_image,
)
from sr_runtime.memory import LARGE_OUTPUT_PIXELS
from sr_runtime.model import ModelSpec, load_model_spec
from sr_runtime.noise import DEFAULT_ROWS, MAX_BANK_BYTES, MIN_ROWS, FrameNoise, NoiseBank
from sr_runtime.tiling import (
    Blender,
    FramePlan,
    extract,
    min_frame_tile,
    pad_frame,
    pad_image,
    plan_frame,
    plan_tiles,
)

if TYPE_CHECKING:  # typing.Self is 3.11+; annotations are never evaluated at runtime here
    from typing_extensions import Self

#: LR pixels shared by neighbouring tiles (an eighth of a 64-pixel tile).
DEFAULT_TILE_OVERLAP = 8
#: Tiles per backend call on the CPU when `batch_size` is not given. Measured on 2 cores, loaded and
#: quiet (benchmarks/results/cpu-batch-*.md): 2 was the fastest in both runs; 1 took 1.03-1.09x its
#: time, 4 1.09x, 8 and 16 1.23-1.26x; peak memory 0.3 GiB at 2, 0.5 at 4, 1.7 at 16.
#: GPU backends default to the model's batch max.
CPU_DEFAULT_BATCH = 2

#: Peak memory of one run per output pixel, beyond the session (measured, docs/benchmarks.md, Memory):
#: the output image itself (4 bytes as a PIL RGB image) and its encoder (PNG, JPEG 6.5, WebP 9.8 in all).
#: Several samples keep the running mean and sum of squares (24 bytes) and the std map as well.
BYTES_PER_OUTPUT_PIXEL = 10
BYTES_PER_OUTPUT_PIXEL_SAMPLES = 32
#: Share of the machine's RAM one image may take by default.
MEMORY_SHARE = 0.5
#: Device memory a whole-frame call may take on a GPU by default (`Upscaler(frame_pixels=...)` overrides).
GPU_FRAME_BUDGET = 16 * 2**30
#: Bytes per LR pixel assumed for a frame model whose manifest does not state its own.
FALLBACK_BYTES_PER_LR_PIXEL = 32 * 2**10
#: Most `samples` one run may average with a fully convolutional model (each its own noise streams).
MAX_FRAME_SAMPLES = 256

ImageLike = TypeVar("ImageLike", Image.Image, np.ndarray)
Progress = Callable[[int, int], None]


@dataclass
class RunStats:
    """Filled by `Upscaler.run` when passed: how long the backend itself ran, and on how many tiles.

    `backend_seconds` is wall time with at least one backend call in flight: frames
    that overlap in `run_frames` (one copied out while the next runs) count once.
    """

    backend_seconds: float = 0.0
    tiles: int = 0
    batches: int = 0
    busy_until: float = field(default=0.0, repr=False)  # perf_counter at which the last counted call ended

    def add_call(self, started: float, ended: float) -> None:
        """Count one backend call; the part that overlaps the previous counted call is not counted twice."""
        self.backend_seconds += max(0.0, ended - max(started, self.busy_until))
        self.busy_until = max(self.busy_until, ended)


def default_max_pixels(scale: int = 4, samples: int = 1) -> int:
    """Input pixels whose run fits in half this machine's RAM, at most DEFAULT_MAX_PIXELS.

    Memory grows with the output (scale^2 times the input), so the pixel guard is
    also the memory guard; where the RAM size is unknown only the bomb limit applies.
    The other half is left to everything else, the model's session among them
    (for the fixed-size small-256 on the CPU 0.3 GB at the default batch of 2, 1.7 GB at 16).
    """
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return DEFAULT_MAX_PIXELS
    per_pixel = (BYTES_PER_OUTPUT_PIXEL if samples == 1 else BYTES_PER_OUTPUT_PIXEL_SAMPLES) * scale * scale
    return max(1, min(DEFAULT_MAX_PIXELS, int(ram * MEMORY_SHARE) // per_pixel))


def checked_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """`value` if it is an integer in [low, high]; TypeError/ValueError naming `name` otherwise (never truncates)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return int(value)


def checked_temperature(value: object) -> float:
    """`value` as a float if it is a finite number >= 0; TypeError/ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"temperature must be a number, got {value!r}")
    temperature = float(value)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {value!r}")
    return temperature


@dataclass(frozen=True)
class _Sampling:
    """The noise of one call: temperature (0 = deterministic) and seed."""

    temperature: float
    seed: int


def max_batch_size(spec: ModelSpec) -> int:
    """The most tiles one backend call of fixed-size model `spec` may take: the manifest's batch max, lowered
    so the noise bank (MIN_ROWS + batch - 1 rows) fits its budget. `Upscaler(batch_size=...)` accepts up to this.
    """
    row_bytes = spec.noise_dim * np.dtype(np.float32).itemsize
    fits = MAX_BANK_BYTES // row_bytes - MIN_ROWS + 1
    if fits < 1:
        raise SRModelError(
            f"model {spec.name!r}: noise_dim {spec.noise_dim} would need a noise bank over {MAX_BANK_BYTES >> 20} MiB"
        )
    return min(spec.batch_max, fits)


def checked_max_pixels(max_pixels: int | float | None, scale: int) -> int:
    """The output pixel limit: the memory-derived default when None, else a finite number >= 1."""
    if max_pixels is None:
        return default_max_pixels(scale)
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, float, np.number)):
        raise TypeError(f"max_pixels must be a number, got {max_pixels!r}")
    if not math.isfinite(max_pixels) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a finite number >= 1, got {max_pixels!r}")
    return int(max_pixels)


class Upscaler:
    """x4 super-resolution of any image with an exported VDVAE-SR model.

    Thread safety: one `Upscaler` may be shared by several threads. Decoding,
    tiling and blending run concurrently; the backend call itself is
    serialised by a per-instance lock (its session, device buffers and noise
    bank are shared). For parallel inference create one `Upscaler` per thread.

    A fully convolutional model serves any temperature and seed per call
    (`run(..., temperature=, seed=)`), so one instance is enough for all of them.
    """

    #: The graphs whose sessions are loaded: ("sampling",) for a fixed-size model; a fully convolutional
    #: one loads "deterministic" (temperature 0) and "sampling" each on first use.
    loaded_graphs: tuple[str, ...]

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        backend: str = "auto",
        temperature: float = 0.0,
        seed: int = 0,
        tile_overlap: int = DEFAULT_TILE_OVERLAP,
        batch_size: int | None = None,
        precision: str = "auto",
        max_pixels: int | None = None,
        noise_rows: int = DEFAULT_ROWS,
        cpu_threads: int | None = None,
        frame_pixels: int | None = None,
        prefer_nhwc: bool = False,
        uint8_io: bool | None = None,
    ) -> None:
        """Load the model (`None`: the shipped default, or `$SR_MODEL_DIR`) and pick a backend.

        `temperature` scales the prior's sampling noise (0 = deterministic);
        `seed` fixes the noise bank; `tile_overlap` is in LR pixels;
        `batch_size` caps tiles per backend call (default: CPU_DEFAULT_BATCH on the
        CPU, measured as fast as larger batches and leaner; the model's batch max on GPUs);
        GPU backends are prepared at load for that size and the profile's
        smaller min/opt, and every call is padded to one of them;
        `precision` is "auto", "fp32" or "fp16"; `max_pixels` bounds input size
        (default: what half the RAM holds, see `default_max_pixels`);
        `noise_rows` is the noise bank size (also the most distinct `samples`);
        `cpu_threads` are the CPU backend's intra-op threads (default: one per
        core; give each of several Upscalers on one machine its share).

        Fully convolutional models (manifest kind "fully_convolutional") run
        whole frames: `frame_pixels` caps the LR pixels of one backend call
        (default: the memory budget over the manifest's measured bytes per
        pixel); larger images run as large tiles that keep their valid centres.
        `temperature` and `seed` are then only defaults that each call may
        override, and the graph of the other kind (deterministic at
        temperature 0, sampling above) loads on its first call;
        `tile_overlap`, `batch_size` and `noise_rows` do not apply to them;
        `prefer_nhwc` asks ONNX Runtime CUDA for channels-last convolutions;
        `uint8_io` sends uint8 RGB frames (arrays, RGB PIL images) through the
        model's conversion graphs, on the device on a GPU (default: on GPUs).
        """
        self.spec = load_model_spec(model)
        if self.spec.fully_convolutional:
            self._init_frames(
                backend, precision, temperature, seed, max_pixels, cpu_threads, frame_pixels, prefer_nhwc, uint8_io
            )
            return
        self._uint8_io = False
        tile = self.spec.lr_size
        tile_overlap = checked_int("tile_overlap", tile_overlap, 0)
        plan_tiles(tile[0], tile[1], tile, tile_overlap)  # validates the overlap early
        limit = max_batch_size(self.spec)
        batch = limit if batch_size is None else checked_int("batch_size", batch_size, 1, limit)
        max_pixels = checked_max_pixels(max_pixels, self.spec.scale)
        if cpu_threads is not None:
            cpu_threads = checked_int("cpu_threads", cpu_threads, 1)
        self.temperature = float(temperature)
        self.seed = seed
        self._default_sampling = _Sampling(self.temperature, seed)
        self.tile_overlap = tile_overlap
        self.batch_size = batch
        self.max_pixels = max_pixels
        self._bank = NoiseBank.create(
            self.spec.noise_dim, temperature=self.temperature, seed=seed, max_batch=batch, rows=noise_rows
        )
        self._backend: Backend = create_backend(
            self.spec, backend, precision, self._bank, batch_buckets(self.spec, batch), cpu_threads
        )
        if batch_size is None and self._backend.name == "onnxruntime-cpu":
            self.batch_size = min(batch, CPU_DEFAULT_BATCH)
        self.backend: str = self._backend.name
        self.precision: str = self._backend.precision
        self.loaded_graphs: tuple[str, ...] = ("sampling",)
        self._lock = threading.Lock()

    def _init_frames(
        self,
        backend: str,
        precision: str,
        temperature: float,
        seed: int,
        max_pixels: int | float | None,
        cpu_threads: int | None,
        frame_pixels: int | None,
        prefer_nhwc: bool,
        uint8_io: bool | None,
    ) -> None:
        """Whole-frame set-up: the graph of `temperature` (the deterministic one at 0) and the frame noise.

        The other graph is loaded on the first call that needs it (`run(..., temperature=...)`).
        """
        max_pixels = checked_max_pixels(max_pixels, self.spec.scale)
        if cpu_threads is not None:
            cpu_threads = checked_int("cpu_threads", cpu_threads, 1)
        if frame_pixels is not None:
            frame_pixels = checked_int("frame_pixels", frame_pixels, 1)
        self.temperature = checked_temperature(temperature)
        self.seed = checked_int("seed", seed, 0)
        self._default_sampling = _Sampling(self.temperature, self.seed)
        self.max_pixels = max_pixels
        self.tile_overlap = 2 * self.spec.receptive_radius
        self.batch_size = 1
        self._noise_maps = FrameNoise(self.spec.noise_levels)
        self._frame_options = (cpu_threads, prefer_nhwc, bool(uint8_io))
        self._frame_backends: dict[bool, FrameBackend] = {}  # by deterministic
        self.loaded_graphs = ()
        self._load_lock = threading.Lock()
        first = self._frame_backend(self.temperature == 0, backend, precision)
        self._uint8_io = first.uint8_io and uint8_io is not False
        self.backend = first.name
        self.precision = first.precision
        self.frame_pixels = frame_pixels or default_frame_pixels(self.spec, first.device)
        self._frame_bounds = first.frame_bounds
        self._lock = threading.Lock()

    def _frame_backend(
        self, deterministic: bool, backend: str | None = None, precision: str | None = None
    ) -> FrameBackend:
        """The frame backend of the deterministic or the sampling graph, loaded once, on first use.

        Later loads take the backend and precision the first one resolved, so both graphs run alike.
        """
        loaded = self._frame_backends.get(deterministic)
        if loaded is not None:
            return loaded
        cpu_threads, prefer_nhwc, uint8_io = self._frame_options
        with self._load_lock:
            loaded = self._frame_backends.get(deterministic)
            if loaded is None:
                loaded = create_frame_backend(
                    self.spec,
                    backend or self.backend,
                    precision or self.precision,
                    deterministic,
                    cpu_threads,
                    prefer_nhwc,
                    cpu_uint8_io=uint8_io,
                )
                self._frame_backends[deterministic] = loaded
                self.loaded_graphs = (*self.loaded_graphs, "deterministic" if deterministic else "sampling")
        return loaded

    def _sampling(self, temperature: float | None, seed: int | None) -> _Sampling:
        """The noise of one call: the Upscaler's own, or the per-call overrides of a fully convolutional model."""
        if temperature is None and seed is None:
            return self._default_sampling
        if not self.spec.fully_convolutional:
            raise ValueError(
                f"model {self.spec.name!r} is fixed-size: its noise bank is drawn once per Upscaler, so "
                "temperature and seed cannot change per call; create Upscaler(temperature=..., seed=...) instead"
            )
        return _Sampling(
            self.temperature if temperature is None else checked_temperature(temperature),
            self.seed if seed is None else checked_int("seed", seed, 0),
        )

    @property
    def max_samples(self) -> int:
        """The most `samples` one run may average: each needs its own rows of the noise bank (or noise streams)."""
        return MAX_FRAME_SAMPLES if self.spec.fully_convolutional else self._bank.rows

    def release_memory(self) -> None:
        """Hand back the memory the backend keeps for reuse after a call: on the CPU, a fully convolutional
        model's arena keeps what its largest frame needed (gigabytes for a large photo) until this.

        The next call allocates it again (measured in benchmarks/frame_memory.py), so a stream of frames
        should not call it between frames; an idle service should. Nothing to do for fixed-size models.
        """
        if not self.spec.fully_convolutional:
            return
        with self._lock:
            for backend in list(self._frame_backends.values()):
                backend.release_memory()

    def close(self) -> None:
        """Release the backend's session and device memory."""
        if self.spec.fully_convolutional:
            for backend in self._frame_backends.values():
                backend.close()
        else:
            self._backend.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @overload
    def run(
        self,
        img: str | os.PathLike[str],
        samples: None = None,
        *,
        progress: Progress | None = None,
        stats: RunStats | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> Image.Image: ...

    @overload
    def run(
        self,
        img: ImageLike,
        samples: None = None,
        *,
        progress: Progress | None = None,
        stats: RunStats | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> ImageLike: ...

    @overload
    def run(
        self,
        img: str | os.PathLike[str],
        samples: int,
        *,
        progress: Progress | None = None,
        stats: RunStats | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> tuple[Image.Image, np.ndarray]: ...

    @overload
    def run(
        self,
        img: ImageLike,
        samples: int,
        *,
        progress: Progress | None = None,
        stats: RunStats | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> tuple[ImageLike, np.ndarray]: ...

    def run(
        self,
        img: str | os.PathLike[str] | Image.Image | np.ndarray,
        samples: int | None = None,
        *,
        progress: Progress | None = None,
        stats: RunStats | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> Image.Image | np.ndarray | tuple[Image.Image | np.ndarray, np.ndarray]:
        """Upscale `img` 4x; returns the same kind (a path gives a PIL image).

        With `samples=K` the model runs K times with different noise and the
        result is `(mean image, std_map)`: `std_map` is float32 [4H, 4W], the
        per-pixel standard deviation across the samples (mean over RGB, in
        [0, 1] units) -- where the model is unsure. K > 1 needs temperature > 0.
        `progress(done, total)` is called after each batch of tiles; `stats`,
        if given, is filled with the time spent in the backend.

        `temperature` and `seed` override the Upscaler's for this call, on a
        fully convolutional model only (its noise is a function of seed and
        position, drawn per call; a fixed-size model's noise bank is drawn once
        per Upscaler, so there they are a ValueError). The result equals a
        fresh `Upscaler(temperature=..., seed=...)`'s bit for bit; the first
        call at temperature > 0 (or 0, if the Upscaler was made at > 0) loads
        that graph's session.
        """
        sampling = self._sampling(temperature, seed)
        n = 1 if samples is None else checked_int("samples", samples, 1)
        if n > 1 and sampling.temperature == 0:
            raise ValueError("samples > 1 needs temperature > 0: at temperature 0 every sample is the same")
        if not 1 <= n <= self.max_samples:
            raise ValueError(f"samples must be in [1, {self.max_samples}] (the noise bank rows), got {samples}")
        if samples is None:
            u8 = self._uint8_frame(img)
            if u8 is not None:
                out = self._run_uint8(u8, sampling, stats)
                if progress is not None:
                    progress(1, 1)
                return out
        decoded = self._decode(img)
        out, std = self._upscale(decoded, n, progress, stats, sampling)
        if samples is None:
            return out
        if std is None:  # one sample has no spread: a read-only zero view instead of a full-size allocation
            h, w = decoded.size
            std = np.broadcast_to(np.float32(0.0), (h * self.spec.scale, w * self.spec.scale))
        return out, std

    def run_many(
        self,
        images: Sequence[str | os.PathLike[str] | Image.Image | np.ndarray],
        *,
        stats: RunStats | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> list[Image.Image | np.ndarray]:
        """Upscale several images 4x, each returned as `run` returns it.

        At temperature 0 the tiles of all images share backend batches: many
        small images (a service's concurrent requests) then fill the batch the
        backend is fastest at instead of one small call each. At temperature > 0
        each image runs alone, because its noise rows are keyed by its own tile
        grid and one backend call reads one contiguous slice of the noise bank.
        Pixels equal `run`'s up to float rounding where a backend's arithmetic
        depends on the batch a tile shares. `temperature` and `seed` as in `run`.
        """
        sampling = self._sampling(temperature, seed)
        if sampling.temperature > 0 or self.spec.fully_convolutional:  # frames: one call per image already
            return [self.run(img, stats=stats, temperature=temperature, seed=seed) for img in images]
        decoded = [self._decode(img) for img in images]
        plans = [plan_tiles(*d.size, self.spec.lr_size, self.tile_overlap) for d in decoded]
        padded = [pad_image(d.rgb, plan) for d, plan in zip(decoded, plans, strict=True)]
        builders = [self._builder(d) for d in decoded]
        blenders = [Blender(plan, 3, self.spec.scale, b.write) for plan, b in zip(plans, builders, strict=True)]
        queue = [(image, tile) for image, plan in enumerate(plans) for tile in range(plan.count)]
        fixed = self._backend.batch_sizes
        for begin in range(0, len(queue), self.batch_size):
            runs = _runs_by_image(queue[begin : begin + self.batch_size])
            count = sum(n for _, _, n in runs)
            size = count if fixed is None else bucket_for(count, fixed)
            lr = np.zeros((size, 3, *self.spec.lr_size), np.float32)
            offset = 0
            for image, first, n in runs:
                lr[offset : offset + n] = extract(padded[image], plans[image], first, n, n)
                offset += n
            hr = self._run_backend(lr, 0, count, stats)  # bank start 0: at temperature 0 every row is zero
            offset = 0
            for image, first, n in runs:
                blenders[image].add(hr[offset : offset + n], first)
                offset += n
        for blender in blenders:
            blender.finish()
        return [b.image() for b in builders]

    def run_frames(
        self,
        frames: Iterable[str | os.PathLike[str] | Image.Image | np.ndarray],
        *,
        stats: RunStats | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> Generator[Image.Image | np.ndarray, None, None]:
        """Upscale a sequence of frames, yielding each result as `run` returns it, in order.

        The next frame is decoded on a helper thread while the backend runs the
        current one. Frames of one shape share everything prepared per shape:
        the noise maps (so a static region stays identical from frame to frame
        at any temperature), and on a GPU the device buffers and CUDA graph.
        On the uint8 path a frame's result is copied to the host while the
        next frame runs on the device. An error is raised at the frame that
        caused it; bad `temperature` or `seed` overrides (as in `run`) at once.
        """
        return self._frame_stream(frames, stats, self._sampling(temperature, seed))

    def _frame_stream(
        self,
        frames: Iterable[str | os.PathLike[str] | Image.Image | np.ndarray],
        stats: RunStats | None,
        sampling: _Sampling,
    ) -> Generator[Image.Image | np.ndarray, None, None]:
        """`run_frames`' generator: the next frame decoded on a helper thread while the backend runs this one."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sr-decode") as pool:
            it = iter(frames)
            pending: Future[Decoded | _Uint8Frame] | None = None
            in_flight: _InFlight | None = None  # a uint8 frame whose result is still on its way to the host
            first = next(it, _END)
            if first is not _END:
                pending = pool.submit(self._prepare, first)
            while pending is not None:
                try:
                    prepared = pending.result()
                    nxt = next(it, _END)
                    pending = None if nxt is _END else pool.submit(self._prepare, nxt)
                    started = self._submit_uint8(prepared, sampling) if isinstance(prepared, _Uint8Frame) else None
                except Exception:
                    if in_flight is not None:  # the frame before the bad one comes out first
                        yield self._finish_uint8(in_flight, stats)
                    raise
                if isinstance(prepared, _Uint8Frame):
                    assert started is not None
                    if in_flight is not None:
                        yield self._finish_uint8(in_flight, stats)
                    in_flight = started
                    continue
                if in_flight is not None:
                    yield self._finish_uint8(in_flight, stats)
                    in_flight = None
                out, _ = self._upscale(prepared, 1, None, stats, sampling)
                yield out
            if in_flight is not None:
                yield self._finish_uint8(in_flight, stats)

    def _prepare(self, img: object) -> Decoded | _Uint8Frame:
        """A frame ready for the backend: a file opened, then the uint8 path where it applies, else decoded."""
        if isinstance(img, (str, os.PathLike)):
            opened = open_image(img, self.max_pixels)
            u8 = self._uint8_frame(opened)
            if u8 is not None:
                return u8
            try:
                return decode_pil(opened, self.max_pixels)
            except ValueError as exc:
                raise SRInputError(f"{os.fspath(img)}: {exc}") from None
        return self._uint8_frame(img) or self._decode(img)

    def _uint8_frame(self, img: object) -> _Uint8Frame | None:
        """The frame as uint8 RGB when the uint8 path applies: a whole frame, 8-bit RGB, no alpha or EXIF turn."""
        if not self._uint8_io:
            return None
        if isinstance(img, Image.Image):
            if img.mode != "RGB" or img.getexif().get(0x0112, 1) != 1:
                return None
            arr, pil = np.asarray(img), True
        elif isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3:
            arr, pil = img, False
        else:
            return None
        h, w = arr.shape[:2]
        if not 0 < h * w <= self.max_pixels:
            return None  # the decoder names the problem
        plan = self._plan_frame(h, w)
        return _Uint8Frame(np.ascontiguousarray(arr)[None], plan, pil) if plan.whole else None

    def _run_uint8(self, frame: _Uint8Frame, sampling: _Sampling, stats: RunStats | None) -> Image.Image | np.ndarray:
        """One call from uint8 in to uint8 out: conversion, padding, model and cropping in the backend's graphs."""
        return self._finish_uint8(self._submit_uint8(frame, sampling), stats)

    def _submit_uint8(self, frame: _Uint8Frame, sampling: _Sampling) -> _InFlight:
        """Start a uint8 frame on the backend of `sampling`'s graph; its result may still be on its way to the host."""
        backend = self._frame_backend(sampling.temperature == 0)
        noise = self._frame_noise(frame.plan, sampling, 0, 0, 0)
        with self._lock:
            t0 = time.perf_counter()
            result = backend.submit_u8(frame.u8, frame.plan.padded_size, noise)
        return _InFlight(result, frame.pil, t0, sampling.temperature)

    def _finish_uint8(self, frame: _InFlight, stats: RunStats | None) -> Image.Image | np.ndarray:
        """The uint8 result once on the host; refuses a non-finite one."""
        out, finite = frame.result.result()
        if not finite:
            raise _not_finite(frame.temperature)
        if stats is not None:
            stats.add_call(frame.started, time.perf_counter())
            stats.tiles += 1
            stats.batches += 1
        return Image.fromarray(out[0]) if frame.pil else out[0]

    def _builder(self, decoded: Decoded) -> ImageBuilder:
        """Where the blended rows of `decoded` go: its output, in its layout, with its alpha upscaled beside."""
        h, w = decoded.size
        s = self.spec.scale
        return ImageBuilder(decoded.layout, (h * s, w * s), decoded.alpha, s)

    def _run_backend(
        self, lr: np.ndarray, start: int, count: int, stats: RunStats | None, release_memory: bool = False
    ) -> np.ndarray:
        """The first `count` HR tiles of one backend call; refuses a non-finite result."""
        with self._lock:
            t0 = time.perf_counter()
            hr = self._backend.run(lr, start, release_memory)[:count]
            t1 = time.perf_counter()
        if not np.isfinite(hr).all():
            raise _not_finite(self.temperature)
        if stats is not None:
            stats.add_call(t0, t1)
            stats.tiles += count
            stats.batches += 1
        return hr

    def _decode(self, img: object) -> Decoded:
        if isinstance(img, (str, os.PathLike)):
            opened = open_image(img, self.max_pixels)
            try:
                return decode_pil(opened, self.max_pixels)
            except ValueError as exc:  # SRInputError included: the message should name the file
                raise SRInputError(f"{os.fspath(img)}: {exc}") from None
        if isinstance(img, Image.Image):
            return decode_pil(img, self.max_pixels)
        if isinstance(img, np.ndarray):
            return decode_array(img, self.max_pixels)
        raise SRInputError(f"expected a path, PIL image or numpy array, got {type(img).__name__}")

    def _upscale(
        self,
        decoded: Decoded,
        samples: int,
        progress: Progress | None,
        stats: RunStats | None,
        sampling: _Sampling,
    ) -> tuple[Image.Image | np.ndarray, np.ndarray | None]:
        """The output in the input's layout (the mean over samples) and the per-pixel std map; one sample: no std.

        `sampling` applies to fully convolutional models; a fixed-size model's is its Upscaler's own.
        """
        if self.spec.fully_convolutional:
            mean, std = self._upscale_frame(decoded, samples, progress, stats, sampling)
            return encode(mean, decoded.layout, decoded.alpha, self.spec.scale), std
        h, w = decoded.size
        s = self.spec.scale
        plan = plan_tiles(h, w, self.spec.lr_size, self.tile_overlap)
        padded = pad_image(decoded.rgb, plan)
        builder = self._builder(decoded)
        moments = None if samples == 1 else SampleMoments((3, h * s, w * s))
        large = h * w * s * s >= LARGE_OUTPUT_PIXELS
        total = plan.count * samples
        done = 0
        fixed = self._backend.batch_sizes
        for sample in range(samples):
            sink = builder.write if moments is None else partial(moments.add, sample)
            blender = Blender(plan, 3, s, sink)
            rows = self._bank.tile_rows(plan.grid, sample)
            for first, count, start in self._bank.batches(rows, self.batch_size):
                lr = extract(padded, plan, first, count, count if fixed is None else bucket_for(count, fixed))
                release = large and done + count == total  # the image's last batch: the backend may give memory back
                blender.add(self._run_backend(lr, start, count, stats, release), first)
                done += count
                if progress is not None:
                    progress(done, total)
            blender.finish()
        if moments is None:
            return builder.image(), None
        mean, std = moments.finish()
        builder.write(0, mean)
        return builder.image(), std

    def _upscale_frame(
        self,
        decoded: Decoded,
        samples: int,
        progress: Progress | None,
        stats: RunStats | None,
        sampling: _Sampling,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """A fully convolutional model: the whole padded frame in one call, or tiles keeping their valid centres.

        Each output pixel is computed from the same inputs and the same noise
        (keyed by its absolute position) either way, so the two agree to float
        rounding; the result is cropped back to exactly 4x the image.
        """
        h, w = decoded.size
        s = self.spec.scale
        plan = self._plan_frame(h, w)
        padded = pad_frame(decoded.rgb, plan)
        th, tw = plan.tile
        total = plan.count * samples
        done = 0
        moments = None if samples == 1 else SampleMoments((3, h * s, w * s))
        for sample in range(samples):
            if plan.whole:
                noise = self._frame_noise(plan, sampling, sample, 0, 0)
                hr = self._run_frame_backend(padded[None], noise, sampling, stats)
                result = hr[0, :, : h * s, : w * s]
                done += 1
                if progress is not None:
                    progress(done, total)
            else:
                result = np.empty((3, plan.padded_size[0] * s, plan.padded_size[1] * s), np.float32)
                for y0, x0, (ky0, ky1), (kx0, kx1) in plan.tiles():
                    tile = np.ascontiguousarray(padded[None, :, y0 : y0 + th, x0 : x0 + tw])
                    noise = self._frame_noise(plan, sampling, sample, y0, x0)
                    hr = self._run_frame_backend(tile, noise, sampling, stats)
                    result[:, ky0 * s : ky1 * s, kx0 * s : kx1 * s] = hr[
                        0, :, (ky0 - y0) * s : (ky1 - y0) * s, (kx0 - x0) * s : (kx1 - x0) * s
                    ]
                    done += 1
                    if progress is not None:
                        progress(done, total)
                result = result[:, : h * s, : w * s]
            result = np.clip(result, 0.0, 1.0)
            if moments is None:
                return result, None
            moments.add(sample, 0, result)
        assert moments is not None
        return moments.finish()

    def _plan_frame(self, h: int, w: int) -> FramePlan:
        """How an h x w image runs: within the memory budget and the shapes the backend takes."""
        try:
            return plan_frame(
                h, w, self.spec.lr_multiple, self.spec.receptive_radius, self.frame_pixels, self._frame_bounds
            )
        except ValueError as exc:
            hint = "build an engine for larger frames (sr-export --frame) or use onnxruntime"
            raise SRInputError(f"{exc}: {hint}") from exc

    def _frame_noise(
        self, plan: FramePlan, sampling: _Sampling, sample: int, y0: int, x0: int
    ) -> dict[str, np.ndarray]:
        """The noise inputs of the tile at LR (y0, x0): a window of the frame's cached maps; none at temperature 0."""
        if sampling.temperature == 0:
            return {}
        return self._noise_maps.window(
            plan.padded_size, sampling.seed, sampling.temperature, sample, y0, x0, *plan.tile
        )

    def _run_frame_backend(
        self, lr: np.ndarray, noise: dict[str, np.ndarray], sampling: _Sampling, stats: RunStats | None
    ) -> np.ndarray:
        """One frame backend call (the deterministic graph at temperature 0); refuses a non-finite result."""
        backend = self._frame_backend(sampling.temperature == 0)
        with self._lock:
            t0 = time.perf_counter()
            hr = backend.run(lr, noise)
            t1 = time.perf_counter()
        if not np.isfinite(hr).all():
            raise _not_finite(sampling.temperature)
        if stats is not None:
            stats.add_call(t0, t1)
            stats.tiles += 1
            stats.batches += 1
        return hr


class SampleMoments:
    """Welford's running mean and sum of squared deviations over samples, updated band by band in place.

    One pass over the samples, with no stack of K full-size images and no
    image-sized temporaries: each band's arithmetic is the size of the band.
    """

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self._mean = np.zeros(shape, np.float32)
        self._m2 = np.zeros(shape, np.float32)
        self._samples = 0

    def add(self, sample: int, y0: int, rows: np.ndarray) -> None:
        """Rows `y0 ..` of sample number `sample` (0-based; every row of one sample before the next)."""
        mean = self._mean[:, y0 : y0 + rows.shape[1]]
        delta = rows - mean
        mean += delta / (sample + 1)
        self._m2[:, y0 : y0 + rows.shape[1]] += delta * (rows - mean)
        self._samples = max(self._samples, sample + 1)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """The mean image [C, H, W] and the per-pixel std across samples, averaged over channels, [H, W].

        The sums of squares are dropped here, before the caller builds its image from the mean.
        """
        std = np.empty(self._mean.shape[1:], np.float32)
        for y in range(0, std.shape[0], STRIP_ROWS):
            std[y : y + STRIP_ROWS] = np.sqrt(self._m2[:, y : y + STRIP_ROWS] / self._samples).mean(axis=0)
        self._m2 = np.empty((0, 0, 0), np.float32)
        return self._mean, std


def default_frame_pixels(spec: ModelSpec, device: str) -> int:
    """LR pixels one whole-frame call may take: the memory budget over the model's measured bytes per pixel.

    The budget is MEMORY_SHARE of the RAM on the CPU and GPU_FRAME_BUDGET on a
    GPU (ONNX Runtime does not report free device memory); at least one
    minimal tile, so a model always runs.
    """
    per_pixel = spec.bytes_per_lr_pixel or FALLBACK_BYTES_PER_LR_PIXEL
    budget = GPU_FRAME_BUDGET
    if device == "cpu":
        try:
            budget = int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * MEMORY_SHARE)
        except (AttributeError, ValueError, OSError):
            budget = GPU_FRAME_BUDGET
    least = min_frame_tile(spec.lr_multiple, spec.receptive_radius) ** 2
    return max(least, budget // per_pixel)


_END = object()


def _not_finite(temperature: float) -> SRInputError:
    """The error of a non-finite model output (noise scaled too far)."""
    return SRInputError(
        f"the model's output is not finite (NaN/Inf) at temperature {temperature:g}; a lower temperature may help"
    )


@dataclass(frozen=True)
class _Uint8Frame:
    """An 8-bit RGB frame bound for the backend's uint8 graphs: [1, h, w, 3], its plan, whether it came as PIL."""

    u8: np.ndarray
    plan: FramePlan
    pil: bool


@dataclass(frozen=True)
class _InFlight:
    """A uint8 frame submitted to the backend: its result's future, whether it came as PIL, when it started,
    and its temperature (for the error of a non-finite result)."""

    result: Future[tuple[np.ndarray, bool]]
    pil: bool
    started: float
    temperature: float


def _runs_by_image(batch: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """`(image, tile)` pairs in order, as `(image, first_tile, count)` runs of consecutive tiles."""
    runs: list[tuple[int, int, int]] = []
    for image, tile in batch:
        if runs and runs[-1][0] == image and runs[-1][1] + runs[-1][2] == tile:
            runs[-1] = (image, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((image, tile, 1))
    return runs
