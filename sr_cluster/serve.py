"""`sr-serve`: x4 upscaling over HTTP on Ray Serve.

`POST /upscale?temperature=T&seed=S&format=png|jpeg|webp` with a PNG, JPEG or
WebP body answers the 4x image; `GET /healthz` answers the model, backend and
precision as JSON. Every error is one JSON line `{"error": "..."}` with a 4xx
status for the client's mistakes and 500 only for faults of the server.

Each replica holds one deterministic (temperature 0) `Upscaler`, used by every
temperature-0 request, and a small LRU of `Upscaler`s at temperature > 0, one
per (temperature, seed): an Upscaler's noise bank is drawn once at
construction. Small temperature-0 images of concurrent requests are batched
(`QueueBatcher`) into shared backend calls with `Upscaler.run_many`; requests
at temperature > 0 are never batched across requests, because every backend
call reads one contiguous slice of the noise bank keyed by one image's tile
grid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Generic, TypeVar, cast

from PIL import Image, UnidentifiedImageError

from sr_cluster.address import check_reachable
from sr_runtime import SRInputError, SRModelError, Upscaler
from sr_runtime.backends import ALIASES, PRECISIONS
from sr_runtime.cli import SAVE_OPTIONS, fit_format
from sr_runtime.model import load_model_spec
from sr_runtime.tiling import plan_tiles

try:  # the `cluster` extra; without it `sr-serve --help` still works and the rest says what is missing
    from ray import serve
    from ray.serve.handle import DeploymentHandle
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response
except ModuleNotFoundError as missing:
    if (missing.name or "").split(".")[0] not in ("ray", "starlette"):
        raise
    CLUSTER_MISSING: str | None = f"needs the cluster extra ({missing.name} is missing): pip install '.[cluster]'"
else:
    CLUSTER_MISSING = None

log = logging.getLogger("sr_cluster.serve")
T = TypeVar("T")
R = TypeVar("R")

#: Body formats the service decodes (Pillow format name -> media type).
INPUT_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
#: Content-Types a request may declare; anything else is a 415 (the bytes decide the format).
ACCEPTED_CONTENT_TYPES = frozenset([*INPUT_FORMATS.values(), "application/octet-stream"])
#: `format` query values -> (Pillow format, media type); saved as `sr-upscale` saves them (SAVE_OPTIONS).
OUTPUT_FORMATS: dict[str, tuple[str, str]] = {
    "png": ("PNG", "image/png"),
    "jpeg": ("JPEG", "image/jpeg"),
    "webp": ("WEBP", "image/webp"),
}
#: Above this the model's samples drift off the image manifold; the range keeps requests sane.
MAX_TEMPERATURE = 2.0
#: Seeds are numpy Generator seeds; the bound keeps them one signed 64-bit word.
SEED_LIMIT = 2**63
QUERY_PARAMETERS = ("temperature", "seed", "format")

DEFAULT_MAX_BODY_MB = 25.0
#: 4 MP input = 64 MP output; one run of it peaks near 2 GB (31 bytes per output pixel).
DEFAULT_MAX_PIXELS = 4_000_000
DEFAULT_SAMPLER_CACHE = 4
DEFAULT_MAX_BATCH_IMAGES = 8
DEFAULT_BATCH_WAIT_S = 0.01
DEFAULT_CONCURRENT_RUNS = 2
DEFAULT_MAX_ONGOING_REQUESTS = 16
#: Requests a replica holds beyond its request slots (bodies arriving, or in and waiting); more: 503.
DEFAULT_MAX_QUEUED_REQUESTS = 16
#: A body must be in within this long ...
DEFAULT_BODY_TIMEOUT_S = 60.0
#: ... and never fall more than the grace behind this rate (128 kbit/s): stalled uploads end in seconds.
DEFAULT_MIN_UPLOAD_BYTES_PER_S = 16 * 1024
DEFAULT_UPLOAD_GRACE_S = 5.0
#: How often a replica reports its load to sr-serve's DrainControl and reads the drain flag.
DRAIN_POLL_S = 0.25
#: The Ray namespace of DrainControl actors: replicas run in Serve's, the driver in one of its own.
DRAIN_NAMESPACE = "sr-serve"
#: Serve-level request slots beyond ongoing and queued requests: `/healthz` and instant refusals get one.
HEALTH_HEADROOM = 8
APP_NAME = "sr"


class HTTPError(Exception):
    """A request answered with `status` and a one-line `message` (extra `headers` e.g. Allow)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class UpscaleParams:
    """The query of one request: temperature, seed (ignored at temperature 0) and output format."""

    temperature: float = 0.0
    seed: int = 0
    format: str | None = None  # None: the format of the body


def quoted(text: str, limit: int = 40) -> str:
    """`text` quoted for an error message, cut at `limit` characters: errors stay one short line."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def parse_params(items: Sequence[tuple[str, str]]) -> UpscaleParams:
    """The request's query parameters, each checked; HTTPError 400 names the first bad one."""
    seen: dict[str, str] = {}
    for key, value in items:
        if key not in QUERY_PARAMETERS:
            raise HTTPError(400, f"unknown query parameter {quoted(key)} (use {', '.join(QUERY_PARAMETERS)})")
        if key in seen:
            raise HTTPError(400, f"query parameter {quoted(key)} given twice")
        seen[key] = value
    temperature = 0.0
    if "temperature" in seen:
        try:  # ASCII only: float() also reads other scripts' digits and surrounding spaces
            temperature = float(seen["temperature"]) if seen["temperature"].isascii() else math.nan
        except ValueError:
            temperature = math.nan
        if not 0.0 <= temperature <= MAX_TEMPERATURE:  # also refuses NaN
            raise HTTPError(400, f"temperature must be a number in [0, {MAX_TEMPERATURE:g}], "
                                 f"got {quoted(seen['temperature'])}")
    seed = 0
    if "seed" in seen:
        text = seen["seed"]
        # Length first: int() refuses strings over 4300 digits with a ValueError of its own.
        if not text.isascii() or not text.isdigit() or len(text) > 19 or int(text) >= SEED_LIMIT:
            raise HTTPError(400, f"seed must be an integer in [0, 2**63), got {quoted(text)}")
        seed = int(text)
    fmt = seen.get("format")
    if fmt is not None and fmt not in OUTPUT_FORMATS:
        raise HTTPError(400, f"format must be one of {', '.join(OUTPUT_FORMATS)}, got {quoted(fmt)}")
    return UpscaleParams(temperature, seed if temperature > 0 else 0, fmt)


def decode_body(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    """The decoded image and its format name (lower case); the size is checked before decoding.

    Pillow reads the size from the header, so a small file declaring a huge
    raster (a decompression bomb) is refused before any pixel is allocated.
    """
    try:
        with Image.open(io.BytesIO(data), formats=tuple(INPUT_FORMATS)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise HTTPError(413, f"image is {width}x{height} = {width * height / 1e6:.1f} MP, over this "
                                     f"service's limit of {max_pixels / 1e6:.1f} MP")
            img.load()
            # A multi-picture JPEG (MPO, as phones write) is its first picture, a JPEG: answered as one.
            return img, "jpeg" if img.format == "MPO" else str(img.format).lower()
    except HTTPError:
        raise
    except UnidentifiedImageError:
        raise HTTPError(400, "body is not a PNG, JPEG or WebP image") from None
    except Image.DecompressionBombError:
        raise HTTPError(413, "image refused as a decompression bomb (too many pixels)") from None
    except MemoryError:
        raise HTTPError(413, "image too large to decode") from None
    except Exception as exc:  # noqa: BLE001 -- a decoder's error on hostile bytes is this request's fault
        raise HTTPError(400, f"truncated or corrupt image ({type(exc).__name__}: {exc})") from None


def encode_image(img: Image.Image, fmt: str) -> bytes:
    """`img` saved as `fmt` the way `sr-upscale` saves files (modes the format lacks converted)."""
    pil_format = OUTPUT_FORMATS[fmt][0]
    buf = io.BytesIO()
    fit_format(img, pil_format).save(buf, format=pil_format, **SAVE_OPTIONS[pil_format])
    return buf.getvalue()


@dataclass(frozen=True)
class UploadLimits:
    """How big and how slow a body may be: over `max_bytes` is a 413, too slow a 408.

    The whole body must arrive within `timeout_s`, and never fall more than
    `grace_s` behind `min_bytes_per_s`: a client that stalls or trickles is
    answered within seconds instead of holding its connection for the deadline.
    """

    max_bytes: int
    timeout_s: float
    min_bytes_per_s: float
    grace_s: float


async def read_body(request: Request, limits: UploadLimits) -> bytes:
    """The request body, refused with 413 as soon as its declared or received size passes the limit,
    and with 408 when it does not arrive within the deadline or at the minimum rate."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isascii() or not declared.isdigit():
            raise HTTPError(400, f"bad Content-Length {quoted(declared)}")
        if len(declared) > 18 or int(declared) > limits.max_bytes:
            raise HTTPError(413, f"body of {declared[:40]} bytes is over this service's limit of "
                                 f"{limits.max_bytes} bytes")
    loop = asyncio.get_running_loop()
    start = loop.time()
    body = bytearray()
    chunks = request.stream().__aiter__()
    while True:
        deadline = start + limits.timeout_s
        behind = start + limits.grace_s + len(body) / limits.min_bytes_per_s  # when the rate is missed
        wait = min(deadline, behind) - loop.time()
        try:
            if wait <= 0:
                raise TimeoutError
            chunk = await asyncio.wait_for(chunks.__anext__(), wait)
        except StopAsyncIteration:
            break
        except TimeoutError:
            if deadline <= behind:
                reason = f"body not received within {limits.timeout_s:g} s"
            else:
                reason = f"body arriving slower than {limits.min_bytes_per_s:g} bytes/s"
            raise HTTPError(408, f"{reason} ({len(body)} bytes in {loop.time() - start:.1f} s)",
                            {"Connection": "close"}) from None
        except ClientDisconnect:
            raise HTTPError(400, "the client closed the connection before the body was in") from None
        body += chunk
        if len(body) > limits.max_bytes:
            raise HTTPError(413, f"body is over this service's limit of {limits.max_bytes} bytes")
    if not body:
        raise HTTPError(400, "empty body: send the image's bytes")
    return bytes(body)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class SamplerCache:
    """A bounded LRU of `Upscaler`s at temperature > 0, one per (temperature, seed).

    Each entry costs one backend session plus its noise bank: (16 + batch - 1)
    rows of noise_dim floats, 125 MB for the shipped model (noise_dim 1.01 M,
    batch 16), so 4 entries are about 0.5-1 GB per replica. An evicted entry is
    dropped, not closed: a request still running on it finishes, and its memory
    goes when that request lets go of it.

    A hit never waits for a miss: entries are built one at a time in a worker
    thread, and a build finishes (and is kept) even if the request that asked
    for it has gone; requests for a key being built share that build.
    """

    def __init__(self, create: Callable[[float, int], Upscaler], capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"the sampler cache needs at least one entry, got {capacity}")
        self._create = create
        self._capacity = capacity
        self._entries: OrderedDict[tuple[float, int], Upscaler] = OrderedDict()
        self._building: dict[tuple[float, int], asyncio.Task[Upscaler]] = {}
        self._build_lock = asyncio.Lock()  # one construction at a time: each allocates a session and a bank

    async def get(self, temperature: float, seed: int) -> Upscaler:
        key = (temperature, seed)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        task = self._building.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._build(key))
            task.add_done_callback(_retrieve)
            self._building[key] = task
        return await asyncio.shield(task)

    async def _build(self, key: tuple[float, int]) -> Upscaler:
        try:
            async with self._build_lock:
                upscaler = await asyncio.to_thread(self._create, *key)
        finally:
            del self._building[key]
        self._entries[key] = upscaler
        if len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return upscaler

    def __len__(self) -> int:
        return len(self._entries)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Marks a background future's exception as seen: the requests that wanted it report it, if any remain."""
    if not future.cancelled():
        future.exception()


async def wait_through_cancellation(future: asyncio.Future[T]) -> None:
    """Wait until `future` is done, whatever cancellations arrive meanwhile (the caller re-raises them)."""
    while not future.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({future})
    _retrieve(future)


class ClientGone(Exception):
    """Raised inside a run whose request was cancelled: it stops at its next backend call."""


@dataclass
class Counters:
    """What `/healthz` reports beside the model: kept as plain numbers, so answering costs nothing.

    `in_flight` counts every upscale request the replica holds (uploading,
    queued, running, or still stopping after its client left); `uploading`
    those without a request slot yet; `upscaling` the runs
    inside an Upscaler right now, counted in the worker threads themselves.
    """

    in_flight: int = 0
    uploading: int = 0
    upscaling: int = 0
    upscaling_peak: int = 0
    stopped_runs: int = 0  # runs cut short because their client left
    refused_busy: int = 0  # 503s: the replica held all the requests it may
    slow_uploads: int = 0  # 408s

    def __post_init__(self) -> None:
        self._lock = threading.Lock()  # `upscaling` changes in worker threads

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with self._lock:
            self.upscaling += 1
            self.upscaling_peak = max(self.upscaling_peak, self.upscaling)
        try:
            yield
        finally:
            with self._lock:
                self.upscaling -= 1


@dataclass(frozen=True)
class ServiceOptions:
    """Per-replica limits and batching; see `sr-serve --help` for what each one bounds."""

    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20)
    max_pixels: int = DEFAULT_MAX_PIXELS
    sampler_cache: int = DEFAULT_SAMPLER_CACHE
    max_batch_images: int = DEFAULT_MAX_BATCH_IMAGES
    batch_wait_s: float = DEFAULT_BATCH_WAIT_S
    concurrent_runs: int = DEFAULT_CONCURRENT_RUNS
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    min_upload_bytes_per_s: float = DEFAULT_MIN_UPLOAD_BYTES_PER_S
    upload_grace_s: float = DEFAULT_UPLOAD_GRACE_S

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not math.isfinite(value) or not value > 0 and not (name == "batch_wait_s" and value == 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")

    @property
    def upload_limits(self) -> UploadLimits:
        return UploadLimits(self.max_body_bytes, self.body_timeout_s, self.min_upload_bytes_per_s,
                            self.upload_grace_s)


@dataclass(frozen=True)
class Scaling:
    """Replica count or autoscaling, per-replica concurrency and drain time, mapped to Serve's options.

    `min_replicas`/`max_replicas` switch on Serve's autoscaler (it keeps about
    `target_ongoing_requests` requests per replica); otherwise `replicas` is fixed.
    `gpus_per_replica` None: 1 where the cluster has GPUs, else the replica takes
    `cpus_per_replica` CPUs.
    """

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 4.0
    max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS
    gpus_per_replica: float | None = None
    cpus_per_replica: float = 1.0
    graceful_shutdown_timeout_s: float = 60.0
    graceful_shutdown_wait_loop_s: float = 1.0

    def __post_init__(self) -> None:
        """Refuse what Serve would refuse later with a validation error of its own (or never start)."""
        counts = {"replicas": self.replicas, "max_ongoing_requests": self.max_ongoing_requests}
        for name, count in counts.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {count!r}")
        for name, value in (("target_ongoing_requests", self.target_ongoing_requests),
                            ("gpus_per_replica", self.gpus_per_replica or 0.0),
                            ("cpus_per_replica", self.cpus_per_replica),
                            ("graceful_shutdown_timeout_s", self.graceful_shutdown_timeout_s),
                            ("graceful_shutdown_wait_loop_s", self.graceful_shutdown_wait_loop_s)):
            if not math.isfinite(value) or value < 0 or (name == "target_ongoing_requests" and value == 0):
                raise ValueError(f"{name} must be a finite number >= 0 (> 0 for the target), got {value!r}")

    def deployment_options(self, cluster_gpus: float, extra_slots: int = 0) -> dict[str, Any]:
        """Serve's options; `extra_slots` are Serve request slots beyond `max_ongoing_requests` (the
        replica bounds requests with a body itself, so uploads and `/healthz` never wait behind them)."""
        gpus = (1.0 if cluster_gpus > 0 else 0.0) if self.gpus_per_replica is None else self.gpus_per_replica
        options: dict[str, Any] = {
            "ray_actor_options": {"num_gpus": gpus} if gpus > 0 else {"num_cpus": self.cpus_per_replica},
            "max_ongoing_requests": self.max_ongoing_requests + extra_slots,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
        }
        if self.min_replicas is None and self.max_replicas is None:
            options["num_replicas"] = self.replicas
        else:
            low = 1 if self.min_replicas is None else self.min_replicas
            high = max(low, 1) if self.max_replicas is None else self.max_replicas
            if not 0 <= low <= high or high < 1:
                raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                                 f"got {low}..{high}")
            options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                             "target_ongoing_requests": self.target_ongoing_requests}
        return options


class DrainControl:
    """A Ray actor sr-serve creates: the drain flag replicas poll, and what each replica reports back.

    Serve's own drain (`serve.delete`) removes the route first, so requests that
    arrive meanwhile get the proxy's text/plain 404. Through this flag the
    replicas answer them a JSON 503 while they finish what they hold, and
    sr-serve deletes the application once every replica reports it is idle.
    """

    def __init__(self) -> None:
        self._draining = False
        self._reports: dict[str, tuple[bool, int]] = {}  # replica -> (saw the drain, requests it holds)

    def drain(self) -> None:
        self._draining = True

    def report(self, replica: str, in_flight: int) -> bool:
        """Record `replica`'s load; whether it must drain."""
        self._reports[replica] = (self._draining, in_flight)
        return self._draining

    def drained(self, replicas: int) -> bool:
        """True once `replicas` replicas have seen the drain and each holds no request."""
        seen = [held for saw, held in self._reports.values() if saw]
        return len(seen) >= replicas and not any(seen)


class UpscaleService:
    """One replica: a deterministic Upscaler for batched temperature-0 work plus an LRU of samplers.

    Admission is the replica's own, not Serve's: Serve gives it `max_ongoing`
    + `max_queued_requests` + HEALTH_HEADROOM slots. The replica holds at most
    `max_ongoing` + `max_queued_requests` upload requests (more: 503 at once);
    a body must arrive within a deadline and at a minimum rate (else 408), and
    only with the whole body in does a request wait for one of `max_ongoing`
    request slots. So stalled uploads cannot hold the slots good requests
    need, and `/healthz`, answered from counters, always finds a Serve slot. A
    request whose client leaves stops its run at the next backend call, but
    holds its slots until the worker thread has returned, so `concurrent_runs`
    and the counts stay true.
    """

    def __init__(self, model: str, backend: str, precision: str, options: ServiceOptions,
                 max_ongoing: int = DEFAULT_MAX_ONGOING_REQUESTS, drain_control: str | None = None) -> None:
        self._max_held = max_ongoing + options.max_queued_requests
        self._draining = False
        make = partial(Upscaler, model, backend, precision=precision, max_pixels=options.max_pixels)
        self._options = options
        self._deterministic = make()
        self._samplers = SamplerCache(lambda temperature, seed: make(temperature=temperature, seed=seed),
                                      options.sampler_cache)
        self._requests = asyncio.Semaphore(max_ongoing)  # requests with their body in: queued or running
        # Runs at once per replica: bounds peak memory (about 31 bytes per output pixel each).
        self._runs = asyncio.Semaphore(options.concurrent_runs)
        self._counters = Counters()
        self._batcher: QueueBatcher[Image.Image, Image.Image | SRInputError] = QueueBatcher(
            self._run_batch, options.max_batch_images, options.batch_wait_s)
        if drain_control is not None:
            threading.Thread(target=self._follow_drain, args=(drain_control,), daemon=True,
                             name="sr-drain").start()

    def _follow_drain(self, name: str) -> None:
        """Report this replica's load to sr-serve's DrainControl and take up its drain flag (a thread: a
        blocking poll, off the request loop)."""
        import ray

        replica = serve.get_replica_context().replica_id.unique_id
        control = None
        while True:
            with contextlib.suppress(Exception):  # not registered yet, or sr-serve gone: keep serving, retry
                control = control or ray.get_actor(name, namespace=DRAIN_NAMESPACE)
                self._draining = ray.get(control.report.remote(replica, self._counters.in_flight), timeout=10)
            time.sleep(DRAIN_POLL_S)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.removeprefix(request.scope.get("root_path", "")).rstrip("/")
        try:
            if path == "/upscale":
                if request.method != "POST":
                    raise HTTPError(405, "use POST with the image as the body", {"Allow": "POST"})
                if self._draining:
                    raise HTTPError(503, "shutting down: retry on another instance",
                                    {"Retry-After": "5", "Connection": "close"})
                self._counters.in_flight += 1
                try:
                    return await self.upscale(request)
                finally:
                    self._counters.in_flight -= 1
            if path == "/healthz":
                if request.method not in ("GET", "HEAD"):
                    raise HTTPError(405, "use GET", {"Allow": "GET, HEAD"})
                return JSONResponse(self.health(), status_code=503 if self._draining else 200)
            raise HTTPError(404, "no such route: POST /upscale, GET /healthz")
        except HTTPError as exc:
            return error_response(exc.status, exc.message, exc.headers)
        except Exception:
            log.exception("upscale request failed")
            return error_response(500, "internal error (logged by the replica)")

    def health(self) -> dict[str, Any]:
        up, c = self._deterministic, self._counters
        return {"status": "draining" if self._draining else "ok", "model": up.spec.name, "backend": up.backend, "precision": up.precision,
                "max_pixels": up.max_pixels, "in_flight": c.in_flight, "uploading": c.uploading,
                "upscaling": c.upscaling, "upscaling_peak": c.upscaling_peak, "stopped_runs": c.stopped_runs,
                "refused_busy": c.refused_busy, "slow_uploads": c.slow_uploads,
                "samplers": len(self._samplers), "batches": self._batcher.batches,
                "batched_images": self._batcher.items}

    async def upscale(self, request: Request) -> Response:
        params = parse_params(request.query_params.multi_items())
        content_type = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip()
        if content_type.lower() not in ACCEPTED_CONTENT_TYPES:
            raise HTTPError(415, f"Content-Type {quoted(content_type)} is not accepted: send "
                                 f"{', '.join(sorted(ACCEPTED_CONTENT_TYPES))}")
        image, source_format = await self._receive(request)
        try:
            result = await self._upscale(image, params)
        finally:
            self._requests.release()
        fmt = params.format or source_format
        data = await asyncio.to_thread(encode_image, result, fmt)
        return Response(data, media_type=OUTPUT_FORMATS[fmt][1])

    async def _receive(self, request: Request) -> tuple[Image.Image, str]:
        """The decoded body, once it also holds a request slot (the caller releases that)."""
        counters = self._counters
        if counters.in_flight > self._max_held:  # this request is counted already
            counters.refused_busy += 1
            raise HTTPError(503, f"busy: this replica holds {self._max_held} requests already; retry",
                            {"Retry-After": "1"})
        counters.uploading += 1
        try:
            try:
                body = await read_body(request, self._options.upload_limits)
            except HTTPError as exc:
                counters.slow_uploads += exc.status == 408
                raise
            decoded = await asyncio.to_thread(decode_body, body, self._options.max_pixels)
            await self._requests.acquire()
            return decoded
        finally:
            counters.uploading -= 1

    async def _upscale(self, image: Image.Image, params: UpscaleParams) -> Image.Image:
        try:
            if params.temperature > 0:
                sampler = await self._samplers.get(params.temperature, params.seed)
                return await self._run_alone(sampler, image)
            if self._fills_a_batch(image):
                return await self._run_alone(self._deterministic, image)
            batched = await self._batcher.submit(image)
            if isinstance(batched, SRInputError):
                raise batched
            return batched
        except SRInputError as exc:
            raise HTTPError(422, str(exc)) from None

    async def _run_alone(self, upscaler: Upscaler, image: Image.Image) -> Image.Image:
        """`upscaler.run(image)` in a worker thread under a run slot, held until the thread has returned.

        If the request is cancelled (its client left), the run stops at its
        next backend call; the cancellation is re-raised once the thread is out.
        """
        stop = threading.Event()

        def progress(done: int, total: int) -> None:
            if stop.is_set():
                raise ClientGone

        def run() -> Image.Image:
            with self._counters.running():
                return cast(Image.Image, upscaler.run(image, progress=progress))

        async with self._runs:
            future = asyncio.get_running_loop().run_in_executor(None, run)
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                stop.set()
                await wait_through_cancellation(future)
                if not future.cancelled() and isinstance(future.exception(), ClientGone):
                    self._counters.stopped_runs += 1
                raise

    def _fills_a_batch(self, image: Image.Image) -> bool:
        """True if the image's own tiles fill a backend batch: sharing one with other requests gains nothing."""
        up = self._deterministic
        width, height = image.size
        return plan_tiles(height, width, up.spec.lr_size, up.tile_overlap).count >= up.batch_size

    async def _run_batch(self, images: list[Image.Image]) -> list[Image.Image | SRInputError]:
        """Small temperature-0 images of concurrent requests, their tiles packed into shared backend calls."""
        def run() -> list[Image.Image | SRInputError]:
            with self._counters.running():
                return run_each_or_together(self._deterministic, images)

        async with self._runs:
            return await asyncio.to_thread(run)


class QueueBatcher(Generic[T, R]):
    """Packs the items queued while the previous call ran into the next call.

    Why not `@serve.batch`: Ray Serve (2.60) forms the next batch as soon as the
    previous one is launched and queues it behind that one, so behind a
    multi-second CPU call each batch holds only what arrived within the batch
    wait (measured: 1 to 2.2 images per batch at 16 clients). Here one consumer
    takes a batch only when the previous call has returned, so everything that
    queued meanwhile, up to `max_items`, shares the next call. A lone item waits
    `wait_s` once for company.
    """

    def __init__(self, run: Callable[[list[T]], Awaitable[list[R]]], max_items: int, wait_s: float) -> None:
        if max_items < 1 or wait_s < 0:
            raise ValueError(f"need max_items >= 1 and wait_s >= 0, got {max_items} and {wait_s}")
        self._run = run
        self._max_items = max_items
        self._wait_s = wait_s
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] = asyncio.Queue()
        self._consumer: asyncio.Task[None] | None = None
        self._running: set[asyncio.Future[R]] = set()  # the futures of the call in progress
        self.batches = 0
        self.items = 0

    async def submit(self, item: T) -> R:
        """`item`'s result, computed in a call shared with whatever else is queued.

        Cancelled while queued, the item is dropped; cancelled while its call
        runs, this waits for the call to return before re-raising, so the
        caller's slots are not given up while its item still computes.
        """
        loop = asyncio.get_running_loop()
        if self._consumer is None or self._consumer.done():
            self._consumer = loop.create_task(self._consume())
        future: asyncio.Future[R] = loop.create_future()
        self._queue.put_nowait((item, future))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if future in self._running:
                await wait_through_cancellation(future)
            else:
                future.cancel()
            raise

    async def _consume(self) -> None:
        while True:
            batch = [await self._queue.get()]
            if self._queue.qsize() < self._max_items - 1 and self._wait_s > 0:
                await asyncio.sleep(self._wait_s)
            while len(batch) < self._max_items and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [(item, future) for item, future in batch if not future.cancelled()]  # clients gone
            if not batch:
                continue
            self._running = {future for _, future in batch}
            try:
                results = await self._run([item for item, _ in batch])
            except Exception as exc:  # noqa: BLE001 - any failure must reach every waiting request, or it hangs
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for (_, future), result in zip(batch, results):
                    if not future.done():
                        future.set_result(result)
            finally:
                self._running = set()
            self.batches += 1
            self.items += len(batch)


def run_each_or_together(upscaler: Upscaler, images: list[Image.Image]) -> list[Image.Image | SRInputError]:
    """`run_many` over all images; if one image fails, each runs alone so that only its request fails."""
    try:
        return list(cast(list[Image.Image], upscaler.run_many(images)))  # PIL images in, PIL images out
    except SRInputError:
        if len(images) == 1:
            raise
    results: list[Image.Image | SRInputError] = []
    for image in images:
        try:
            results.append(upscaler.run(image))
        except SRInputError as exc:
            results.append(exc)
    return results


def build_app(
    model: str | os.PathLike[str] | None = None,
    backend: str = "auto",
    precision: str = "auto",
    *,
    options: ServiceOptions | None = None,
    scaling: Scaling | None = None,
    drain_control: str | None = None,
) -> serve.Application:
    """The bound Serve application: `serve.run(build_app(...), route_prefix="/")`.

    With `scaling.gpus_per_replica` None this connects to Ray (as `serve.run`
    would) to see whether the cluster has GPUs. `model` must be a path every
    node can read (None: `$SR_MODEL_DIR` here, else the shipped model);
    SRModelError if it is not a model. `drain_control`: the name of a
    DrainControl actor whose flag the replicas follow (sr-serve's).
    """
    import ray

    scaling = scaling or Scaling()
    if scaling.gpus_per_replica is None and not ray.is_initialized():
        ray.init()
    cluster_gpus = ray.cluster_resources().get("GPU", 0.0) if scaling.gpus_per_replica is None else 0.0
    # Resolved here: a replica's environment (no $SR_MODEL_DIR) and working directory are not this process's.
    model_path = str(load_model_spec(model).directory.absolute())
    options = options or ServiceOptions()
    deployment = serve.deployment(name="Upscaler")(UpscaleService)
    serve_options = scaling.deployment_options(cluster_gpus, extra_slots=options.max_queued_requests + HEALTH_HEADROOM)
    return deployment.options(**serve_options).bind(model_path, backend, precision, options,
                                                    scaling.max_ongoing_requests, drain_control)


def _number(kind: Callable[[str], float], low: float, high: float = math.inf) -> Callable[[str], Any]:
    """An argparse type: `kind(text)` in [low, high] and finite, else a usage error naming the range."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low <= value <= high):
            bound = f"[{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"expected a finite {kind.__name__} {bound}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sr-serve", description="x4 upscaling over HTTP on Ray Serve: "
                                                           "POST /upscale, GET /healthz")
    p.add_argument("--model", default=None, help="model directory readable on every node (default: $SR_MODEL_DIR here, else the shipped one)")
    p.add_argument("--backend", default="auto", choices=sorted(ALIASES), help="inference backend (default auto)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="model precision (default auto)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=_number(int, 1, 65535), default=8000, help="HTTP port (default 8000)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (host:6379, ray://head:10001, auto); `local` starts a new one; "
                        "default: $RAY_ADDRESS, else the cluster `ray start` made here, else a new local one")
    scale = p.add_argument_group("scaling")
    scale.add_argument("--replicas", type=_number(int, 1), default=1, help="fixed replica count (default 1)")
    scale.add_argument("--min-replicas", type=_number(int, 0), default=None, help="autoscaling lower bound (enables autoscaling)")
    scale.add_argument("--max-replicas", type=_number(int, 1), default=None, help="autoscaling upper bound (enables autoscaling)")
    scale.add_argument("--target-ongoing-requests", type=_number(float, 1e-3), default=4.0,
                       help="autoscaling target of requests in flight per replica (default 4)")
    scale.add_argument("--max-ongoing-requests", type=_number(int, 1), default=DEFAULT_MAX_ONGOING_REQUESTS,
                       help=f"requests with their body in that a replica queues or runs at once "
                            f"(default {DEFAULT_MAX_ONGOING_REQUESTS})")
    scale.add_argument("--max-queued-requests", type=_number(int, 1), default=DEFAULT_MAX_QUEUED_REQUESTS,
                       help="requests a replica holds beyond those (bodies arriving, or in and waiting for a "
                            f"slot); more are answered 503 at once (default {DEFAULT_MAX_QUEUED_REQUESTS})")
    scale.add_argument("--gpus-per-replica", type=_number(float, 0), default=None,
                       help="default: 1 where the cluster has GPUs, else each replica takes 1 CPU")
    scale.add_argument("--cpus-per-replica", type=_number(float, 0), default=1.0,
                       help="CPUs a replica reserves where it takes no GPU (default 1)")
    scale.add_argument("--graceful-shutdown-s", type=_number(float, 0), default=60.0,
                       help="on SIGTERM/SIGINT, wait this long for requests in flight (default 60)")
    lim = p.add_argument_group("limits and batching (per replica)")
    lim.add_argument("--max-body-mb", type=_number(float, 1e-6, 2**20), default=DEFAULT_MAX_BODY_MB,
                     help=f"largest request body; more is refused with 413 (default {DEFAULT_MAX_BODY_MB:g})")
    lim.add_argument("--body-timeout-s", type=_number(float, 1e-3), default=DEFAULT_BODY_TIMEOUT_S,
                     help=f"a body must be in within this long, else 408 (default {DEFAULT_BODY_TIMEOUT_S:g})")
    lim.add_argument("--min-upload-kbps", type=_number(float, 1e-3), default=DEFAULT_MIN_UPLOAD_BYTES_PER_S * 8 / 1000,
                     help=f"an upload more than {DEFAULT_UPLOAD_GRACE_S:g} s behind this rate (kilobit/s) is "
                          f"answered 408 (default {DEFAULT_MIN_UPLOAD_BYTES_PER_S * 8 / 1000:g})")
    lim.add_argument("--max-pixels", type=_number(int, 1), default=DEFAULT_MAX_PIXELS,
                     help=f"largest input width x height; more is refused with 413 (default {DEFAULT_MAX_PIXELS})")
    lim.add_argument("--sampler-cache", type=_number(int, 1), default=DEFAULT_SAMPLER_CACHE,
                     help="Upscalers kept for (temperature > 0, seed) pairs; each holds a session and a noise bank "
                          f"(~125 MB for the shipped model) (default {DEFAULT_SAMPLER_CACHE})")
    lim.add_argument("--concurrent-runs", type=_number(int, 1), default=DEFAULT_CONCURRENT_RUNS,
                     help=f"images upscaled at once (peak memory ~31 bytes per output pixel each) "
                          f"(default {DEFAULT_CONCURRENT_RUNS})")
    lim.add_argument("--max-batch-images", type=_number(int, 1), default=DEFAULT_MAX_BATCH_IMAGES,
                     help=f"temperature-0 requests batched together (default {DEFAULT_MAX_BATCH_IMAGES})")
    lim.add_argument("--batch-wait-ms", type=_number(float, 0, 60_000), default=DEFAULT_BATCH_WAIT_S * 1e3,
                     help=f"how long a batch waits to fill (default {DEFAULT_BATCH_WAIT_S * 1e3:g})")
    return p


def settings_from_args(args: argparse.Namespace) -> tuple[ServiceOptions, Scaling]:
    options = ServiceOptions(
        max_body_bytes=int(args.max_body_mb * 2**20), max_pixels=args.max_pixels, sampler_cache=args.sampler_cache,
        max_batch_images=args.max_batch_images, batch_wait_s=args.batch_wait_ms / 1e3,
        concurrent_runs=args.concurrent_runs, max_queued_requests=args.max_queued_requests,
        body_timeout_s=args.body_timeout_s, min_upload_bytes_per_s=args.min_upload_kbps * 1000 / 8)
    scaling = Scaling(
        replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests, max_ongoing_requests=args.max_ongoing_requests,
        gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica,
        graceful_shutdown_timeout_s=args.graceful_shutdown_s)
    return options, scaling


def start_failure(exc: Exception) -> str:
    """Why the application did not start, in one line: the replica's own error where Serve recorded it
    (the last line of its traceback), else the last line of Serve's exception."""
    with contextlib.suppress(Exception):  # a status that cannot be read leaves Serve's own message
        app = serve.status().applications.get(APP_NAME)
        messages = [] if app is None else [d.message for d in app.deployments.values()] + [app.message]
        for message in messages:
            lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
            if lines:
                return lines[-1]
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def drain(control: Any, timeout_s: float) -> None:
    """Turn the replicas to answering new requests 503, and wait (at most `timeout_s`) until every
    replica reports that it holds no request."""
    import ray

    ray.get(control.drain.remote())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP_NAME)
        deployments = [] if app is None else list(app.deployments.values())
        replicas = sum(count for d in deployments for state, count in d.replica_states.items()
                       if getattr(state, "value", state) == "RUNNING")
        if ray.get(control.drained.remote(replicas)):
            return
        time.sleep(DRAIN_POLL_S)


#: Backends that need a GPU on the replica's node.
GPU_BACKENDS = frozenset(["tensorrt", "onnxruntime-cuda"])


def check_cluster(args: argparse.Namespace, scaling: Scaling) -> bool:
    """Whether Serve already runs on the cluster; ValueError for what could only fail (slowly) later.

    A running Serve keeps its own HTTP address whatever `serve.start` asks
    for, and a second application named APP_NAME would replace the first.
    """
    import ray
    from ray.serve.context import _get_global_client

    # _get_global_client: Serve's public API has no way to read a running instance's HTTP address.

    gpus = ray.cluster_resources().get("GPU", 0.0)
    backend = ALIASES[args.backend]
    if backend in GPU_BACKENDS and (gpus == 0 or scaling.gpus_per_replica == 0):
        raise ValueError(f"--backend {args.backend} needs a GPU per replica, and "
                         + ("the Ray cluster has none" if gpus == 0 else "--gpus-per-replica is 0"))
    if (scaling.gpus_per_replica or 0) > gpus:
        raise ValueError(f"--gpus-per-replica {scaling.gpus_per_replica:g}: the Ray cluster has {gpus:g} GPUs")
    # Replicas that cannot be placed would leave serve.run waiting for ever: refuse what is not free now.
    options = scaling.deployment_options(gpus)
    count = options.get("num_replicas", options.get("autoscaling_config", {}).get("min_replicas", 1))
    free = ray.available_resources()
    for resource, each in (("GPU", options["ray_actor_options"].get("num_gpus", 0)),
                           ("CPU", options["ray_actor_options"].get("num_cpus", 0))):
        if count * each > free.get(resource, 0.0):
            raise ValueError(f"{count} replicas need {count * each:g} {resource}s and the Ray cluster has "
                             f"{free.get(resource, 0.0):g} free (of {ray.cluster_resources().get(resource, 0.0):g}): "
                             "lower --replicas/--min-replicas or --cpus-per-replica, or free some")
    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return False
    running = client.http_config
    if (running.host, running.port) != (args.host, args.port):
        raise ValueError(f"Serve already runs on this Ray cluster with its HTTP proxy on {running.host}:"
                         f"{running.port}, which it keeps: pass --host {running.host} --port {running.port} to "
                         "add sr-serve there, or --ray-address local for a cluster of its own")
    if APP_NAME in serve.status().applications:
        raise ValueError(f"an application named {APP_NAME!r} already runs on this Ray cluster (another "
                         "sr-serve?); stop it first, or use --ray-address local")
    return True


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on bad flags (one line), 0 on --help
        return exc.code if isinstance(exc.code, int) else 2
    if CLUSTER_MISSING is not None:
        print(f"sr-serve: error: {CLUSTER_MISSING}", file=sys.stderr)
        return 2
    try:
        options, scaling = settings_from_args(args)
        scaling.deployment_options(0.0)
        load_model_spec(args.model)  # a wrong --model is a usage error before any cluster starts
    except (ValueError, SRModelError) as exc:
        print(f"sr-serve: error: {exc}", file=sys.stderr)
        return 2
    import ray

    try:
        check_reachable(args.ray_address)  # Ray itself would retry for minutes, deaf to SIGTERM
        # Ray's own warnings and the replicas' logs stay in Ray's log files; this console gets sr-serve's lines.
        ray.init(address=args.ray_address, logging_level=logging.ERROR, log_to_driver=False)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"sr-serve: error: cannot reach the Ray cluster at {args.ray_address}: {reason}", file=sys.stderr)
        return 2
    except SystemExit:  # SIGTERM while Ray connects: its handler exits with the bare signal number
        print("sr-serve: interrupted while connecting to Ray", file=sys.stderr)
        return 143
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())  # before serve.run: a signal while it starts still drains
    try:
        try:
            serve_was_running = check_cluster(args, scaling)
        except ValueError as exc:
            print(f"sr-serve: error: {exc}", file=sys.stderr)
            return 2
        control_name = f"sr-serve-drain-{os.getpid()}"
        control = ray.remote(num_cpus=0)(DrainControl).options(name=control_name, namespace=DRAIN_NAMESPACE).remote()
        try:
            serve.start(http_options={"host": args.host, "port": args.port})
            app = build_app(args.model, args.backend, args.precision, options=options, scaling=scaling,
                            drain_control=control_name)
            handle: DeploymentHandle = serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except Exception as exc:  # noqa: BLE001 - a replica that cannot start (port taken, backend...): one line
            print(f"sr-serve: error: the service did not start: {start_failure(exc)}", file=sys.stderr)
            # Leave the cluster as found: no failed application answering 503, no Serve holding the port.
            with contextlib.suppress(Exception):
                serve.delete(APP_NAME)
            if not serve_was_running:
                with contextlib.suppress(Exception):
                    serve.shutdown()
            return 1
        session = ray.get_runtime_context().get_session_name()
        print(f"sr-serve: http://{args.host}:{args.port}/upscale ({handle.deployment_name}, "
              f"{asdict(scaling)}); replica logs in <ray temp dir>/{session}/logs/serve; "
              "SIGTERM or Ctrl-C stops it", file=sys.stderr, flush=True)
        stop.wait()
        print("sr-serve: draining requests in flight, then shutting down", file=sys.stderr, flush=True)
        drain(control, scaling.graceful_shutdown_timeout_s)
        serve.delete(APP_NAME)  # drains whatever is still in flight, up to the graceful timeout
        if not serve.status().applications:  # a shared cluster may serve other applications: leave Serve to them
            serve.shutdown()
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
