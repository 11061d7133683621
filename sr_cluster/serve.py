"""`sr-serve`: x4 upscaling over HTTP on Ray Serve.

`POST /upscale?temperature=T&seed=S&format=png|jpeg|webp` with a PNG, JPEG or
WebP body answers the 4x image; `GET /healthz` answers the model, backend and
precision as JSON; `GET /` is a page to try it in a browser (`page.py`). Every
error is one JSON line `{"error": "..."}` with a 4xx status for the client's
mistakes and 500 only for faults of the server.

For a fully convolutional model each replica holds one `Upscaler`, which
serves every (temperature, seed): its noise is a function of seed and position
drawn per call, and its sampling graph loads with the first temperature > 0
request. Each image is one whole-frame call, so nothing is batched across
requests.

For a fixed-size model each replica holds one deterministic (temperature 0)
`Upscaler`, used by every temperature-0 request, and a small LRU of
`Upscaler`s at temperature > 0, one per (temperature, seed): an Upscaler's
noise bank is drawn once at construction. Small temperature-0 images of
concurrent requests are batched (`QueueBatcher`) into shared backend calls of
up to the model's batch max (on every backend) with `Upscaler.run_many`;
requests at temperature > 0 are never batched across requests, because every
backend call reads one contiguous slice of the noise bank keyed by one image's
tile grid.

Layout: `protocol` (HTTP parsing and limits), `batching` (QueueBatcher, the
sampler LRU), this module (the replica, admission, the app builders, the CLI).
`app_builder` serves `serve run sr_cluster.serve:app_builder model=... ` and a
Serve config file's `import_path`; `build_app` is the same from Python.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from typing import Any, cast

from PIL import Image

from sr_cluster.address import check_reachable
from sr_cluster.batching import (
    QueueBatcher,
    SamplerCache,
    run_each_or_together,
    wait_through_cancellation,
)
from sr_runtime import SRInputError, SRModelError, Upscaler
from sr_runtime.backends import ALIASES, PRECISIONS
from sr_runtime.memory import LARGE_OUTPUT_PIXELS, release_free_memory
from sr_runtime.model import load_model_spec
from sr_runtime.tiling import plan_tiles
from sr_runtime.upscaler import max_batch_size

try:  # the `cluster` extra; without it `sr-serve --help` still works and the rest says what is missing
    from ray import serve
    from ray.serve.handle import DeploymentHandle
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    from sr_cluster.page import page
    from sr_cluster.protocol import (
        ACCEPTED_CONTENT_TYPES,
        INPUT_FORMATS,
        MAX_TEMPERATURE,
        OUTPUT_FORMATS,
        SEED_LIMIT,
        HTTPError,
        UploadLimits,
        UpscaleParams,
        decode_body,
        encode_image,
        error_response,
        parse_params,
        quoted,
        read_body,
    )
except ModuleNotFoundError as missing:
    if (missing.name or "").split(".")[0] not in ("ray", "starlette"):
        raise
    CLUSTER_MISSING: str | None = f"needs the cluster extra ({missing.name} is missing): pip install '.[cluster]'"
else:
    CLUSTER_MISSING = None

log = logging.getLogger("sr_cluster.serve")
#: The deployment and its CLI, with the HTTP (`protocol`) and batching (`batching`) pieces it is built from.
__all__ = [
    "ACCEPTED_CONTENT_TYPES",
    "INPUT_FORMATS",
    "MAX_TEMPERATURE",
    "OUTPUT_FORMATS",
    "SEED_LIMIT",
    "AppArgs",
    "DrainControl",
    "HTTPError",
    "QueueBatcher",
    "SamplerCache",
    "Scaling",
    "ServiceOptions",
    "UpscaleParams",
    "UpscaleService",
    "app_builder",
    "build_app",
    "build_parser",
    "decode_body",
    "encode_image",
    "main",
    "parse_params",
    "quoted",
    "read_body",
    "run_each_or_together",
    "settings_from_args",
]

DEFAULT_MAX_BODY_MB = 25.0
#: 4 MP input = 64 MP output; one run of it needs ~0.6 GB (10 bytes per output pixel) beside the session.
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
    memory_releases: int = 0  # times an idle replica handed a frame's memory back (fully convolutional models)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()  # `upscaling` changes in worker threads

    def released_memory(self) -> None:
        with self._lock:  # counted in worker threads
            self.memory_releases += 1

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
            if not math.isfinite(value) or (not value > 0 and not (name == "batch_wait_s" and value == 0)):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")

    @property
    def upload_limits(self) -> UploadLimits:
        return UploadLimits(self.max_body_bytes, self.body_timeout_s, self.min_upload_bytes_per_s, self.upload_grace_s)


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
        for name, value in (
            ("target_ongoing_requests", self.target_ongoing_requests),
            ("gpus_per_replica", self.gpus_per_replica or 0.0),
            ("cpus_per_replica", self.cpus_per_replica),
            ("graceful_shutdown_timeout_s", self.graceful_shutdown_timeout_s),
            ("graceful_shutdown_wait_loop_s", self.graceful_shutdown_wait_loop_s),
        ):
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
                raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got {low}..{high}")
            options["autoscaling_config"] = {
                "min_replicas": low,
                "max_replicas": high,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
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
    """One replica: one Upscaler for a fully convolutional model; for a fixed-size one a deterministic
    Upscaler for batched temperature-0 work plus an LRU of samplers.

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

    def __init__(
        self,
        model: str,
        backend: str,
        precision: str,
        options: ServiceOptions,
        max_ongoing: int = DEFAULT_MAX_ONGOING_REQUESTS,
        drain_control: str | None = None,
    ) -> None:
        self._max_held = max_ongoing + options.max_queued_requests
        self._draining = False
        spec = load_model_spec(model)
        # The model's whole batch, explicitly: with Upscaler's CPU default (CPU_DEFAULT_BATCH, chosen for one
        # image at a time) any request of that many tiles would count as a full call and never share one.
        batch = None if spec.fully_convolutional else max_batch_size(spec)
        make = partial(Upscaler, model, backend, precision=precision, max_pixels=options.max_pixels, batch_size=batch)
        self._options = options
        # Temperature 0, and for a fully convolutional model every (temperature, seed) through per-call overrides.
        self._upscaler = make()
        self._samplers = (
            None
            if self._upscaler.spec.fully_convolutional
            else SamplerCache(lambda temperature, seed: make(temperature=temperature, seed=seed), options.sampler_cache)
        )
        self._requests = asyncio.Semaphore(max_ongoing)  # requests with their body in: queued or running
        # Runs at once per replica: bounds peak memory (about 10 bytes per output pixel each).
        self._runs = asyncio.Semaphore(options.concurrent_runs)
        self._counters = Counters()
        self._batcher: QueueBatcher[Image.Image, Image.Image | SRInputError] = QueueBatcher(
            self._run_batch, options.max_batch_images, options.batch_wait_s
        )
        if drain_control is not None:
            threading.Thread(target=self._follow_drain, args=(drain_control,), daemon=True, name="sr-drain").start()

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
                    raise HTTPError(
                        503, "shutting down: retry on another instance", {"Retry-After": "5", "Connection": "close"}
                    )
                self._counters.in_flight += 1
                try:
                    return await self.upscale(request)
                finally:
                    self._counters.in_flight -= 1
            if path == "/healthz":
                if request.method not in ("GET", "HEAD"):
                    raise HTTPError(405, "use GET", {"Allow": "GET, HEAD"})
                return JSONResponse(self.health(), status_code=503 if self._draining else 200)
            if path == "":
                if request.method not in ("GET", "HEAD"):
                    raise HTTPError(405, "use GET", {"Allow": "GET, HEAD"})
                body, headers = page()
                return Response(body, media_type="text/html", headers=headers)
            raise HTTPError(404, "no such route: GET / (a page to try it), POST /upscale, GET /healthz")
        except HTTPError as exc:
            return error_response(exc.status, exc.message, exc.headers)
        except Exception:
            log.exception("upscale request failed")
            return error_response(500, "internal error (logged by the replica)")

    def health(self) -> dict[str, Any]:
        up, c = self._upscaler, self._counters
        samplers = 0 if self._samplers is None else len(self._samplers)
        return {
            "status": "draining" if self._draining else "ok",
            "model": up.spec.name,
            "backend": up.backend,
            "precision": up.precision,
            "max_pixels": up.max_pixels,
            "batch_size": up.batch_size,  # tiles per backend call, shared by small temperature-0 requests
            "in_flight": c.in_flight,
            "uploading": c.uploading,
            "upscaling": c.upscaling,
            "upscaling_peak": c.upscaling_peak,
            "stopped_runs": c.stopped_runs,
            "refused_busy": c.refused_busy,
            "slow_uploads": c.slow_uploads,
            "memory_releases": c.memory_releases,
            "upscalers": 1 + samplers,  # Upscalers this replica holds, each with its own sessions
            "graphs_loaded": list(up.loaded_graphs),  # of the first one: "sampling" once t > 0 was asked
            "samplers": samplers,
            "batches": self._batcher.batches,
            "batched_images": self._batcher.items,
        }

    async def upscale(self, request: Request) -> Response:
        params = parse_params(request.query_params.multi_items())
        content_type = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip()
        if content_type.lower() not in ACCEPTED_CONTENT_TYPES:
            raise HTTPError(
                415,
                f"Content-Type {quoted(content_type)} is not accepted: send "
                f"{', '.join(sorted(ACCEPTED_CONTENT_TYPES))}",
            )
        image, source_format = await self._receive(request)
        try:
            result = await self._upscale(image, params)
        finally:
            self._requests.release()
        fmt = params.format or source_format
        data = await asyncio.to_thread(encode_image, result, fmt)
        large = result.width * result.height >= LARGE_OUTPUT_PIXELS
        del image, result  # from here on only the encoded reply is held
        if large:  # a replica lives on: hand the image's freed pages back instead of keeping its peak
            await asyncio.to_thread(release_free_memory)
        return Response(data, media_type=OUTPUT_FORMATS[fmt][1])

    async def _receive(self, request: Request) -> tuple[Image.Image, str]:
        """The decoded body, once it also holds a request slot (the caller releases that)."""
        counters = self._counters
        if counters.in_flight > self._max_held:  # this request is counted already
            counters.refused_busy += 1
            raise HTTPError(
                503, f"busy: this replica holds {self._max_held} requests already; retry", {"Retry-After": "1"}
            )
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
            if self._samplers is None:  # fully convolutional: one whole-frame call, any temperature and seed
                return await self._run_alone(self._upscaler, image, params, release_when_idle=True)
            if params.temperature > 0:
                sampler = await self._samplers.get(params.temperature, params.seed)
                return await self._run_alone(sampler, image)
            if self._fills_a_batch(image):
                return await self._run_alone(self._upscaler, image)
            batched = await self._batcher.submit(image)
            if isinstance(batched, SRInputError):
                raise batched
            return batched
        except SRInputError as exc:
            raise HTTPError(422, str(exc)) from None

    async def _run_alone(
        self,
        upscaler: Upscaler,
        image: Image.Image,
        overrides: UpscaleParams | None = None,
        release_when_idle: bool = False,
    ) -> Image.Image:
        """`upscaler.run(image)` in a worker thread under a run slot, held until the thread has returned.

        `overrides` gives the run its temperature and seed (a fully convolutional
        model's Upscaler serves them all). With `release_when_idle`, a run after
        which the replica holds no other request hands the memory its frame
        needed back (`Upscaler.release_memory`: gigabytes for a large photo on
        the CPU); a busy replica keeps it for the next request. If the request
        is cancelled (its client left), the run stops at its next backend call;
        the cancellation is re-raised once the thread is out.
        """
        stop = threading.Event()
        temperature, seed = (None, None) if overrides is None else (overrides.temperature, overrides.seed)

        def progress(done: int, total: int) -> None:
            if stop.is_set():
                raise ClientGone

        def run() -> Image.Image:
            try:
                with self._counters.running():
                    return cast(Image.Image, upscaler.run(image, progress=progress, temperature=temperature, seed=seed))
            finally:
                if release_when_idle and self._counters.in_flight <= 1:  # counts this request too
                    upscaler.release_memory()
                    self._counters.released_memory()

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
        up = self._upscaler
        width, height = image.size
        return plan_tiles(height, width, up.spec.lr_size, up.tile_overlap).count >= up.batch_size

    async def _run_batch(self, images: list[Image.Image]) -> list[Image.Image | SRInputError]:
        """Small temperature-0 images of concurrent requests, their tiles packed into shared backend calls."""

        def run() -> list[Image.Image | SRInputError]:
            with self._counters.running():
                return run_each_or_together(self._upscaler, images)

        async with self._runs:
            return await asyncio.to_thread(run)


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
    return deployment.options(**serve_options).bind(
        model_path, backend, precision, options, scaling.max_ongoing_requests, drain_control
    )


#: Application arguments that may be None (the rest take the type of their default).
_OPTIONAL_NUMBERS: dict[str, Callable[[str], float]] = {
    "min_replicas": int,
    "max_replicas": int,
    "gpus_per_replica": float,
}


@dataclass(frozen=True)
class AppArgs:
    """The arguments of `app_builder`: model, backend and precision, plus every ServiceOptions and
    Scaling field by name, flat (`max_ongoing_requests`, `body_timeout_s`, ...)."""

    model: str | None = None
    backend: str = "auto"
    precision: str = "auto"
    options: ServiceOptions = field(default_factory=ServiceOptions)
    scaling: Scaling = field(default_factory=Scaling)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> AppArgs:
        """Checked and typed: `serve run` passes every value as a string. ValueError names a bad key or value."""
        top: dict[str, Any] = {}
        parts: dict[type, dict[str, Any]] = {ServiceOptions: {}, Scaling: {}}
        defaults = {kind: {f.name: getattr(kind(), f.name) for f in fields(kind)} for kind in parts}
        for key, value in raw.items():
            if key in ("model", "backend", "precision"):
                top[key] = None if value is None else str(value)
                continue
            kind = next((k for k in parts if key in defaults[k]), None)
            if kind is None:
                known = ["model", "backend", "precision", *defaults[ServiceOptions], *defaults[Scaling]]
                raise ValueError(f"unknown application argument {key!r} (use {', '.join(known)})")
            parts[kind][key] = _typed(key, value, defaults[kind][key])
        if top.get("backend", "auto") not in ALIASES:
            raise ValueError(f"backend must be one of {', '.join(sorted(ALIASES))}, got {top['backend']!r}")
        if top.get("precision", "auto") not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {top['precision']!r}")
        return cls(**top, options=ServiceOptions(**parts[ServiceOptions]), scaling=Scaling(**parts[Scaling]))


def _typed(key: str, value: Any, default: Any) -> Any:
    """`value` as the type of the argument's default (strings from `serve run` parsed)."""
    if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
        if key in _OPTIONAL_NUMBERS:
            return None
        raise ValueError(f"{key} needs a value")
    kind = _OPTIONAL_NUMBERS.get(key) or type(default)
    try:
        typed = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    if kind is int and isinstance(value, float) and value != typed:
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return typed


def app_builder(args: Mapping[str, Any]) -> serve.Application:
    """The application for `serve run sr_cluster.serve:app_builder model=... backend=cpu ...` and for a
    Serve config file's `import_path: sr_cluster.serve:app_builder` with its `args`: see AppArgs."""
    parsed = args if isinstance(args, AppArgs) else AppArgs.from_mapping(args)
    return build_app(parsed.model, parsed.backend, parsed.precision, options=parsed.options, scaling=parsed.scaling)


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
    p = argparse.ArgumentParser(
        prog="sr-serve", description="x4 upscaling over HTTP on Ray Serve: POST /upscale, GET /healthz"
    )
    p.add_argument(
        "--model",
        default=None,
        help="model directory readable on every node (default: $SR_MODEL_DIR here, else the shipped one)",
    )
    p.add_argument("--backend", default="auto", choices=sorted(ALIASES), help="inference backend (default auto)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="model precision (default auto)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=_number(int, 1, 65535), default=8000, help="HTTP port (default 8000)")
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join (host:6379, ray://head:10001, auto); `local` starts a new one; "
        "default: $RAY_ADDRESS, else the cluster `ray start` made here, else a new local one",
    )
    scale = p.add_argument_group("scaling")
    scale.add_argument("--replicas", type=_number(int, 1), default=1, help="fixed replica count (default 1)")
    scale.add_argument(
        "--min-replicas", type=_number(int, 0), default=None, help="autoscaling lower bound (enables autoscaling)"
    )
    scale.add_argument(
        "--max-replicas", type=_number(int, 1), default=None, help="autoscaling upper bound (enables autoscaling)"
    )
    scale.add_argument(
        "--target-ongoing-requests",
        type=_number(float, 1e-3),
        default=4.0,
        help="autoscaling target of requests in flight per replica (default 4)",
    )
    scale.add_argument(
        "--max-ongoing-requests",
        type=_number(int, 1),
        default=DEFAULT_MAX_ONGOING_REQUESTS,
        help=f"requests with their body in that a replica queues or runs at once "
        f"(default {DEFAULT_MAX_ONGOING_REQUESTS})",
    )
    scale.add_argument(
        "--max-queued-requests",
        type=_number(int, 1),
        default=DEFAULT_MAX_QUEUED_REQUESTS,
        help="requests a replica holds beyond those (bodies arriving, or in and waiting for a "
        f"slot); more are answered 503 at once (default {DEFAULT_MAX_QUEUED_REQUESTS})",
    )
    scale.add_argument(
        "--gpus-per-replica",
        type=_number(float, 0),
        default=None,
        help="default: 1 where the cluster has GPUs, else each replica takes 1 CPU",
    )
    scale.add_argument(
        "--cpus-per-replica",
        type=_number(float, 0),
        default=1.0,
        help="CPUs a replica reserves where it takes no GPU (default 1)",
    )
    scale.add_argument(
        "--graceful-shutdown-s",
        type=_number(float, 0),
        default=60.0,
        help="on SIGTERM/SIGINT, wait this long for requests in flight (default 60)",
    )
    lim = p.add_argument_group("limits and batching (per replica)")
    lim.add_argument(
        "--max-body-mb",
        type=_number(float, 1e-6, 2**20),
        default=DEFAULT_MAX_BODY_MB,
        help=f"largest request body; more is refused with 413 (default {DEFAULT_MAX_BODY_MB:g})",
    )
    lim.add_argument(
        "--body-timeout-s",
        type=_number(float, 1e-3),
        default=DEFAULT_BODY_TIMEOUT_S,
        help=f"a body must be in within this long, else 408 (default {DEFAULT_BODY_TIMEOUT_S:g})",
    )
    lim.add_argument(
        "--min-upload-kbps",
        type=_number(float, 1e-3),
        default=DEFAULT_MIN_UPLOAD_BYTES_PER_S * 8 / 1000,
        help=f"an upload more than {DEFAULT_UPLOAD_GRACE_S:g} s behind this rate (kilobit/s) is "
        f"answered 408 (default {DEFAULT_MIN_UPLOAD_BYTES_PER_S * 8 / 1000:g})",
    )
    lim.add_argument(
        "--max-pixels",
        type=_number(int, 1),
        default=DEFAULT_MAX_PIXELS,
        help=f"largest input width x height; more is refused with 413 (default {DEFAULT_MAX_PIXELS})",
    )
    lim.add_argument(
        "--sampler-cache",
        type=_number(int, 1),
        default=DEFAULT_SAMPLER_CACHE,
        help="fixed-size models: Upscalers kept for (temperature > 0, seed) pairs; each holds a session "
        "and a noise bank (~125 MB for the shipped model); a fully convolutional model needs none "
        f"(default {DEFAULT_SAMPLER_CACHE})",
    )
    lim.add_argument(
        "--concurrent-runs",
        type=_number(int, 1),
        default=DEFAULT_CONCURRENT_RUNS,
        help=f"images upscaled at once (peak memory ~10 bytes per output pixel each) "
        f"(default {DEFAULT_CONCURRENT_RUNS})",
    )
    lim.add_argument(
        "--max-batch-images",
        type=_number(int, 1),
        default=DEFAULT_MAX_BATCH_IMAGES,
        help=f"temperature-0 requests batched together (default {DEFAULT_MAX_BATCH_IMAGES})",
    )
    lim.add_argument(
        "--batch-wait-ms",
        type=_number(float, 0, 60_000),
        default=DEFAULT_BATCH_WAIT_S * 1e3,
        help=f"how long a batch waits to fill (default {DEFAULT_BATCH_WAIT_S * 1e3:g})",
    )
    return p


def settings_from_args(args: argparse.Namespace) -> tuple[ServiceOptions, Scaling]:
    options = ServiceOptions(
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_pixels=args.max_pixels,
        sampler_cache=args.sampler_cache,
        max_batch_images=args.max_batch_images,
        batch_wait_s=args.batch_wait_ms / 1e3,
        concurrent_runs=args.concurrent_runs,
        max_queued_requests=args.max_queued_requests,
        body_timeout_s=args.body_timeout_s,
        min_upload_bytes_per_s=args.min_upload_kbps * 1000 / 8,
    )
    scaling = Scaling(
        replicas=args.replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        max_ongoing_requests=args.max_ongoing_requests,
        gpus_per_replica=args.gpus_per_replica,
        cpus_per_replica=args.cpus_per_replica,
        graceful_shutdown_timeout_s=args.graceful_shutdown_s,
    )
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
        replicas = sum(
            count
            for d in deployments
            for state, count in d.replica_states.items()
            if getattr(state, "value", state) == "RUNNING"
        )
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
        raise ValueError(
            f"--backend {args.backend} needs a GPU per replica, and "
            + ("the Ray cluster has none" if gpus == 0 else "--gpus-per-replica is 0")
        )
    if (scaling.gpus_per_replica or 0) > gpus:
        raise ValueError(f"--gpus-per-replica {scaling.gpus_per_replica:g}: the Ray cluster has {gpus:g} GPUs")
    # Replicas that cannot be placed would leave serve.run waiting for ever: refuse what is not free now.
    options = scaling.deployment_options(gpus)
    count = options.get("num_replicas", options.get("autoscaling_config", {}).get("min_replicas", 1))
    free = ray.available_resources()
    for resource, each in (
        ("GPU", options["ray_actor_options"].get("num_gpus", 0)),
        ("CPU", options["ray_actor_options"].get("num_cpus", 0)),
    ):
        if count * each > free.get(resource, 0.0):
            raise ValueError(
                f"{count} replicas need {count * each:g} {resource}s and the Ray cluster has "
                f"{free.get(resource, 0.0):g} free (of {ray.cluster_resources().get(resource, 0.0):g}): "
                "lower --replicas/--min-replicas or --cpus-per-replica, or free some"
            )
    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return False
    running = client.http_config
    if (running.host, running.port) != (args.host, args.port):
        raise ValueError(
            f"Serve already runs on this Ray cluster with its HTTP proxy on {running.host}:"
            f"{running.port}, which it keeps: pass --host {running.host} --port {running.port} to "
            "add sr-serve there, or --ray-address local for a cluster of its own"
        )
    if APP_NAME in serve.status().applications:
        raise ValueError(
            f"an application named {APP_NAME!r} already runs on this Ray cluster (another "
            "sr-serve?); stop it first, or use --ray-address local"
        )
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
            app = build_app(
                args.model, args.backend, args.precision, options=options, scaling=scaling, drain_control=control_name
            )
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
        print(
            f"sr-serve: http://{args.host}:{args.port}/ (a page to try it; POST /upscale, GET /healthz) "
            f"({handle.deployment_name}, {asdict(scaling)}); replica logs in <ray temp dir>/{session}/logs/serve; "
            "SIGTERM or Ctrl-C stops it",
            file=sys.stderr,
            flush=True,
        )
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
