"""sr-serve on a real local Ray cluster: real HTTP on loopback, real images, the test-double model.

Every response is checked against a local `Upscaler` run on the same decoded
image; bad requests are sent while good ones are in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import io
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sr_runtime import RunStats, Upscaler
from sr_runtime.upscaler import CPU_DEFAULT_BATCH

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (the `cluster` extra)")

from sr_cluster.serve import (  # after the skip: needs ray
    AppArgs,
    HTTPError,
    QueueBatcher,
    Scaling,
    ServiceOptions,
    UpscaleService,
    app_builder,
    build_app,
    build_parser,
    encode_image,
    main,
    parse_params,
    settings_from_args,
)

HOST = "127.0.0.1"
TIMEOUT_S = 60.0
MAX_PIXELS = 1_000_000
MAX_BODY_BYTES = 2 * 2**20
PREFIX = "/sr"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes
    seconds: float

    def error(self) -> str:
        return str(json.loads(self.body)["error"])


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = TIMEOUT_S,
) -> Reply:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    t0 = time.perf_counter()
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return Reply(resp.status, resp.getheader("Content-Type", ""), data, time.perf_counter() - t0)
    finally:
        conn.close()


def post_image(port: int, data: bytes, query: str = "", content_type: str = "image/png", prefix: str = PREFIX) -> Reply:
    return request(port, "POST", f"{prefix}/upscale{query}", data, {"Content-Type": content_type})


def start_upload(conn: http.client.HTTPConnection, port: int, prefix: str, data: bytes, in_flight: int = 1) -> None:
    """POST `data` to `prefix`/upscale but send only its first 100 bytes, and wait (bounded) until the
    replica holds `in_flight` requests, this one reading its body: a request in flight for as long as
    the test wants (or the replica's upload deadline)."""
    conn.putrequest("POST", f"{prefix}/upscale")
    conn.putheader("Content-Type", "image/png")
    conn.putheader("Content-Length", str(len(data)))
    conn.endheaders()
    conn.send(data[:100])
    wait_for_health(port, prefix, lambda h: h["in_flight"] == in_flight, "the request never reached the replica")


def health(port: int, prefix: str) -> dict[str, Any]:
    return dict(json.loads(request(port, "GET", f"{prefix}/healthz", timeout=10).body))


def wait_for_health(
    port: int, prefix: str, condition: Callable[[dict[str, Any]], bool], failure: str, timeout: float = 30.0
) -> dict[str, Any]:
    """Poll `/healthz` (at least once, then until `timeout`) until `condition` holds; its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        state = health(port, prefix)
        if condition(state):
            return state
        if time.monotonic() >= deadline:
            pytest.fail(f"{failure}: {state}")
        time.sleep(0.05)


def wait_for_health_status(port: int, status: int, timeout: float = 30.0) -> dict[str, Any]:
    """Poll `/healthz` (bounded) until it answers `status`; its JSON."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = request(port, "GET", "/healthz", timeout=10)
        if reply.status == status:
            return dict(json.loads(reply.body))
        time.sleep(0.05)
    pytest.fail(f"/healthz never answered {status}: {reply.status} {reply.body[:200]!r}")


def photo(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A smooth gradient with noise: content where tiles and blending show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    return img.convert(mode) if mode != "RGB" else img


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def service(ray_local: Any, double_model: Path) -> Iterator[int]:
    """Serve on a free loopback port: one CPU replica of the test double; its port. Shut down at the end."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": HOST, "port": port})
    try:
        options = ServiceOptions(max_body_bytes=MAX_BODY_BYTES, max_pixels=MAX_PIXELS, sampler_cache=2)
        serve.run(
            build_app(double_model, "cpu", options=options, scaling=Scaling(gpus_per_replica=0)),
            name="sr-test",
            route_prefix=PREFIX,
        )
        yield port
    finally:
        serve.shutdown()


def slow_double(double: Path, directory: Path, rounds: int) -> Path:
    """The test double plus `rounds` 384x384 matrix products per tile whose sum, times 0, is added to the
    output: the same pixels, but each tile costs about as much as the shipped model's (~0.1 s) on a CPU."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(double / "model.fp32.onnx")
    for node in model.graph.node:
        node.output[:] = ["hr_fast" if name == "hr" else name for name in node.output]
    nodes = [
        helper.make_node("Reshape", ["lr", "rows_shape"], ["rows"]),
        helper.make_node("Transpose", ["rows"], ["cols"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["rows", "cols"], ["m0"]),
        helper.make_node("Tanh", ["m0"], ["t0"]),
    ]  # tanh keeps every value finite: 0 * it is 0
    for i in range(rounds):
        nodes += [
            helper.make_node("MatMul", [f"t{i}", f"t{i}"], [f"m{i + 1}"]),
            helper.make_node("Tanh", [f"m{i + 1}"], [f"t{i + 1}"]),
        ]
    nodes += [
        helper.make_node("ReduceSum", [f"t{rounds}", "all_axes"], ["busy"], keepdims=1),
        helper.make_node("Unsqueeze", ["busy", "last_axis"], ["busy4"]),
        helper.make_node("Mul", ["busy4", "zero"], ["nothing"]),
        helper.make_node("Add", ["hr_fast", "nothing"], ["hr"]),
    ]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0, 384, -1], np.int64), "rows_shape"),
            numpy_helper.from_array(np.array([1, 2], np.int64), "all_axes"),
            numpy_helper.from_array(np.array([3], np.int64), "last_axis"),
        ]
    )
    onnx.checker.check_model(model)
    directory.mkdir(parents=True)
    onnx.save(model, directory / "model.fp32.onnx")
    manifest = json.loads((double / "manifest.json").read_text())
    sha = hashlib.sha256((directory / "model.fp32.onnx").read_bytes()).hexdigest()
    manifest.update(name="slow-double", onnx={"fp32": {"file": "model.fp32.onnx", "sha256": sha}})
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


HARD = "/hard"
HARD_MAX_ONGOING = 2
HARD_MAX_QUEUED = 3
# Wide enough that a stalled upload is still held while, on a loaded 2-core machine, a run and a few
# requests go by; a server that held it longer, or queued other requests behind it, still shows.
HARD_GRACE_S = 20.0
HARD_BODY_TIMEOUT_S = 30.0
HARD_MIN_RATE = 1000.0
#: Answered "at once": far below the stalled uploads' life, which a queued request would wait out.
PROMPT_S = 5.0


@pytest.fixture(scope="module")
def hard_service(service: int, double_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A second app on the same Serve, at /hard: the slow double (~0.1 s a tile), one run at a time,
    2 request slots and 3 queued requests, upload limits of its own. Its port."""
    from ray import serve

    model = slow_double(double_model, tmp_path_factory.mktemp("slow") / "slow-double", rounds=150)
    options = ServiceOptions(
        max_pixels=MAX_PIXELS,
        concurrent_runs=1,
        max_queued_requests=HARD_MAX_QUEUED,
        body_timeout_s=HARD_BODY_TIMEOUT_S,
        min_upload_bytes_per_s=HARD_MIN_RATE,
        upload_grace_s=HARD_GRACE_S,
    )
    # No CPU reserved: the test cluster's 2 CPUs stay for the other apps and for sr-serve processes.
    serve.run(
        build_app(
            model,
            "cpu",
            options=options,
            scaling=Scaling(max_ongoing_requests=HARD_MAX_ONGOING, gpus_per_replica=0, cpus_per_replica=0),
        ),
        name="sr-hard",
        route_prefix=HARD,
    )
    try:
        yield service
    finally:
        serve.delete("sr-hard")


def open_upload(port: int, size: int) -> http.client.HTTPConnection:
    """A POST to /hard/upscale announcing `size` bytes, with only its headers sent."""
    conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT_S)
    conn.putrequest("POST", f"{HARD}/upscale")
    conn.putheader("Content-Type", "image/png")
    conn.putheader("Content-Length", str(size))
    conn.endheaders()
    return conn


def reply_of(conn: http.client.HTTPConnection) -> Reply:
    resp = conn.getresponse()
    return Reply(resp.status, resp.getheader("Content-Type", ""), resp.read(), 0.0)


def expected(double_model: Path, data: bytes, temperature: float = 0.0, seed: int = 0) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        with Upscaler(double_model, backend="cpu", temperature=temperature, seed=seed) as up:
            return up.run(img)


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


def test_items_queued_while_a_call_runs_share_the_next_call() -> None:
    calls: list[list[int]] = []

    async def slow_double(items: list[int]) -> list[int]:
        calls.append(items)
        await asyncio.sleep(0.5)  # a backend call: everything submitted meanwhile queues
        return [2 * i for i in items]

    async def scenario() -> list[int]:
        batcher = QueueBatcher(slow_double, max_items=4, wait_s=0.0)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.05)  # the first call is running
        rest = []
        for i in range(1, 7):  # arriving one by one while the call runs, not within a batch wait
            rest.append(asyncio.create_task(batcher.submit(i)))
            await asyncio.sleep(0.015)
        results = await asyncio.gather(first, *rest)
        assert (batcher.batches, batcher.items) == (3, 7)
        return results

    assert asyncio.run(scenario()) == [0, 2, 4, 6, 8, 10, 12]
    assert calls == [[0], [1, 2, 3, 4], [5, 6]]  # what queued meanwhile fills the next calls, up to 4 each


def test_a_failed_batch_call_reaches_every_request_in_it() -> None:
    async def broken(items: list[int]) -> list[int]:
        raise RuntimeError("backend lost")

    async def scenario() -> list[BaseException | int]:
        batcher = QueueBatcher(broken, max_items=8, wait_s=0.01)
        return await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)

    results = asyncio.run(asyncio.wait_for(scenario(), 5))
    assert all(isinstance(r, RuntimeError) and str(r) == "backend lost" for r in results)


def test_a_replica_packs_small_requests_into_calls_of_the_models_batch_max_on_the_cpu(double_model: Path) -> None:
    """Not the CPU's per-image default batch (4): with it any request of 4 tiles or more (a 20x24 image is
    4 tiles of the double's 32, padded by the overlap) would count as filling a call and run alone."""
    assert CPU_DEFAULT_BATCH < 8, "the double's batch max (8) must differ from the CPU default to tell them apart"
    replica = UpscaleService(str(double_model), "cpu", "auto", ServiceOptions(max_pixels=MAX_PIXELS, sampler_cache=1))
    health = replica.health()
    assert (health["backend"], health["batch_size"]) == ("onnxruntime-cpu", 8)
    four_tiles = [photo(40, 40, 1), photo(40, 40, 2)]
    assert not any(replica._fills_a_batch(img) for img in four_tiles)
    assert replica._fills_a_batch(photo(90, 70, 3))  # 20 tiles
    stats = RunStats()
    replica._upscaler.run_many(four_tiles, stats=stats)
    assert (stats.tiles, stats.batches) == (8, 1)  # two requests, one backend call
    assert replica._samplers is not None
    assert asyncio.run(replica._samplers.get(0.5, 1)).batch_size == 8  # samplers alike


def test_query_parameters_are_checked() -> None:
    assert parse_params([("temperature", "0.5"), ("seed", "7"), ("format", "webp")]).seed == 7
    assert parse_params([("seed", "7")]).seed == 0  # temperature 0: the seed changes nothing
    for bad in (
        [("temperature", "nan")],
        [("temperature", "2.5")],
        [("temperature", "-0.1")],
        [("seed", "-1")],
        [("seed", str(2**63))],
        [("seed", "1e3")],
        [("format", "gif")],
        [("temp", "1")],
        [("seed", "1"), ("seed", "2")],
        [("temperature", "1"), ("seed", "1" * 5000)],
        [("temperature", "\u0661")],
        [("seed", "\u0661")],
    ):
        with pytest.raises(HTTPError) as err:
            parse_params(bad)
        assert err.value.status == 400, bad


def test_scaling_maps_to_serve_options() -> None:
    fixed = Scaling(replicas=3).deployment_options(cluster_gpus=0)
    assert fixed["num_replicas"] == 3 and fixed["ray_actor_options"] == {"num_cpus": 1}
    auto = Scaling(min_replicas=1, max_replicas=4, target_ongoing_requests=2).deployment_options(cluster_gpus=8)
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2}
    assert "num_replicas" not in auto and auto["ray_actor_options"] == {"num_gpus": 1.0}
    with pytest.raises(ValueError):
        Scaling(min_replicas=3, max_replicas=2).deployment_options(cluster_gpus=0)


def test_cli_flags_map_to_settings() -> None:
    args = build_parser().parse_args(
        [
            "--min-replicas",
            "0",
            "--max-replicas",
            "3",
            "--max-body-mb",
            "1",
            "--batch-wait-ms",
            "5",
            "--graceful-shutdown-s",
            "9",
        ]
    )
    options, scaling = settings_from_args(args)
    assert options.max_body_bytes == 2**20 and options.batch_wait_s == 0.005
    serve_options = scaling.deployment_options(cluster_gpus=0)
    assert serve_options["autoscaling_config"]["max_replicas"] == 3
    assert serve_options["graceful_shutdown_timeout_s"] == 9
    assert build_parser().parse_args([]).host == "127.0.0.1"
    assert main(["--concurrent-runs", "0"]) == 2  # refused before any Ray is started
    assert main(["--min-replicas", "3", "--max-replicas", "2"]) == 2


@pytest.mark.parametrize(
    "flags",
    [
        ["--port", "-1"],
        ["--port", "70000"],
        ["--port", "0"],
        ["--replicas", "0"],
        ["--max-ongoing-requests", "0"],
        ["--max-queued-requests", "0"],
        ["--max-body-mb", "inf"],
        ["--graceful-shutdown-s", "inf"],
        ["--target-ongoing-requests", "nan"],
        ["--gpus-per-replica", "-1"],
        ["--batch-wait-ms", "inf"],
        ["--body-timeout-s", "0"],
        ["--min-upload-kbps", "inf"],
        ["--backend", "gpu"],
        ["--precision", "fp8"],
        ["--concurrent-runs", "1.5"],
    ],
)
def test_bad_flags_are_one_usage_line(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(flags) == 2  # refused before Ray is started
    err = capsys.readouterr().err
    assert "Traceback" not in err and "pydantic" not in err and flags[0] in err.splitlines()[-1], err


def test_scaling_refuses_what_serve_would() -> None:
    for bad in (
        {"replicas": 0},
        {"max_ongoing_requests": 0},
        {"target_ongoing_requests": math.inf},
        {"gpus_per_replica": -1.0},
        {"graceful_shutdown_timeout_s": math.nan},
    ):
        with pytest.raises(ValueError):
            Scaling(**bad)  # type: ignore[arg-type]


def test_help_and_a_clear_error_without_ray(tmp_path: Path) -> None:
    """Without the cluster extra: --help works, anything else is one line naming the extra."""
    code = "import sys; sys.modules['ray'] = None; from sr_cluster.serve import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = partial(subprocess.run, check=False, capture_output=True, text=True, env=env, timeout=60)
    helped = run([sys.executable, "-c", code, "--help"])
    assert helped.returncode == 0 and "POST /upscale" in helped.stdout, helped.stderr
    refused = run([sys.executable, "-c", code])
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "sr-serve: error: needs the cluster extra (ray is missing): pip install '.[cluster]'"
    ], refused.stderr


def test_an_address_where_nothing_listens_fails_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        t0 = time.monotonic()
        assert main(["--ray-address", f"{HOST}:{port}"]) == 2
        assert time.monotonic() - t0 < 10
    assert capsys.readouterr().err.strip().splitlines() == [
        (
            f"sr-serve: error: cannot reach the Ray cluster at {HOST}:{port}: nothing answers at {HOST}:{port} "
            "(Connection refused)"
        )
    ]


def test_app_arguments_are_typed_and_checked() -> None:
    """What `serve run sr_cluster.serve:app_builder k=v ...` passes (strings) or a config file's `args` holds."""
    args = AppArgs.from_mapping(
        {
            "model": "/m",
            "backend": "cpu",
            "max_ongoing_requests": "4",
            "body_timeout_s": "7.5",
            "min_replicas": "none",
            "gpus_per_replica": 0,
        }
    )
    assert (args.model, args.backend, args.scaling.max_ongoing_requests) == ("/m", "cpu", 4)
    assert args.options.body_timeout_s == 7.5 and args.scaling.min_replicas is None
    assert args.scaling.gpus_per_replica == 0.0
    for bad in (
        {"max_ongoing_request": "4"},
        {"max_ongoing_requests": "four"},
        {"replicas": "0"},
        {"backend": "gpu"},
        {"body_timeout_s": "inf"},
        {"concurrent_runs": 1.5},
        {"port": "80"},
    ):
        with pytest.raises(ValueError):
            AppArgs.from_mapping(bad)


@pytest.mark.slow
def test_the_app_builder_serves(service: int, double_model: Path) -> None:
    """The builder as `serve run` calls it (Serve's own builder call, with string arguments)."""
    from ray import serve
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    app = call_user_app_builder_with_args_if_necessary(
        app_builder,
        {  # type: ignore[arg-type]
            "model": str(double_model),
            "backend": "cpu",
            "gpus_per_replica": "0",
            "cpus_per_replica": "0",
            "max_ongoing_requests": "3",
        },
    )
    serve.run(app, name="sr-built", route_prefix="/built")
    try:
        assert json.loads(request(service, "GET", "/built/healthz").body)["model"] == "test-double"
        data = encoded(photo(20, 16, 51), "PNG")
        reply = post_image(service, data, prefix="/built")
        assert reply.status == 200 and np.array_equal(pixels(reply.body), np.asarray(expected(double_model, data)))
    finally:
        serve.delete("sr-built")


@pytest.mark.slow
def test_one_upscaler_serves_every_temperature_and_seed_of_a_frame_model(
    service: int, exported_fc: dict[str, Any]
) -> None:
    """A fully convolutional model: requests at t = 0 and at two (temperature, seed) pairs, concurrently, each
    equal to a fresh local Upscaler at its own temperature and seed, all served by the replica's one Upscaler."""
    from ray import serve

    fc_dir = exported_fc["out"]
    options = ServiceOptions(max_pixels=MAX_PIXELS, sampler_cache=2)
    scaling = Scaling(gpus_per_replica=0, cpus_per_replica=0)
    serve.run(build_app(fc_dir, "cpu", options=options, scaling=scaling), name="sr-fc", route_prefix="/fc")
    try:
        before = health(service, "/fc")
        assert (before["upscalers"], before["samplers"], before["graphs_loaded"]) == (1, 0, ["deterministic"])
        keys = [(0.0, 0), (0.6, 1), (0.3, 2), (0.6, 1), (0.3, 2), (0.0, 0)]
        cases = [(encoded(photo(20 + 4 * (i % 2), 16, i), "PNG"), t, seed) for i, (t, seed) in enumerate(keys)]

        def send(case: tuple[bytes, float, int]) -> Reply:
            data, t, seed = case
            return post_image(service, data, f"?temperature={t}&seed={seed}", prefix="/fc")

        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(send, cases, timeout=TIMEOUT_S * 4))
        for (data, t, seed), reply in zip(cases, replies, strict=True):
            assert reply.status == 200, reply.body[:200]
            assert np.array_equal(pixels(reply.body), np.asarray(expected(fc_dir, data, t, seed))), (t, seed)
        after = health(service, "/fc")
        assert (after["upscalers"], after["samplers"]) == (1, 0)
        assert after["graphs_loaded"] == ["deterministic", "sampling"]  # the sampling graph, loaded once
        data = encoded(photo(16, 12, 99), "PNG")  # alone: the replica is idle after it, and hands its memory back
        reply = post_image(service, data, "?temperature=0.6&seed=1", prefix="/fc")
        assert reply.status == 200 and np.array_equal(pixels(reply.body), np.asarray(expected(fc_dir, data, 0.6, 1)))
        assert health(service, "/fc")["memory_releases"] > after["memory_releases"]
    finally:
        serve.delete("sr-fc")


def test_encode_keeps_what_the_format_can_hold() -> None:
    rgba = photo(8, 8, 0, "RGBA")
    with Image.open(io.BytesIO(encode_image(rgba, "jpeg"))) as img:
        assert img.format == "JPEG" and img.mode == "RGB"
    with Image.open(io.BytesIO(encode_image(rgba, "png"))) as img:
        assert img.mode == "RGBA" and np.array_equal(np.asarray(img), np.asarray(rgba))
    grey16 = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    with Image.open(io.BytesIO(encode_image(grey16, "webp"))) as img:
        assert np.asarray(img.convert("L")).min() == 255


@pytest.mark.slow
def test_health_route(service: int, double_model: Path) -> None:
    reply = request(service, "GET", f"{PREFIX}/healthz")
    assert reply.status == 200 and reply.content_type == "application/json"
    health = json.loads(reply.body)
    assert health["model"] == "test-double" and health["backend"] == "onnxruntime-cpu"
    assert health["precision"] == "fp32" and health["max_pixels"] == MAX_PIXELS
    assert health["batch_size"] == 8  # the double's batch max, not the CPU default
    assert request(service, "POST", f"{PREFIX}/healthz", b"x").status == 405


@pytest.mark.slow
def test_concurrent_requests_match_a_local_upscaler(service: int, double_model: Path) -> None:
    """24 requests from 8 threads: mixed sizes, formats, temperatures; each equals a local run exactly."""
    formats = [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
    sizes = [(20, 24), (31, 17), (40, 40), (90, 70)]  # 4, 4, 4 and 20 tiles of 32 (padded by the overlap; batch max 8)
    cases = []
    for i in range(24):
        width, height = sizes[i % len(sizes)]
        source, media = formats[i % 3]
        temperature, seed = (0.0, 0) if i % 4 else (0.7, i % 2)  # two (temperature, seed) keys
        cases.append((encoded(photo(width, height, i), source), media, temperature, seed))

    def send(case: tuple[bytes, str, float, int]) -> Reply:
        data, media, temperature, seed = case
        query = f"?format=png&temperature={temperature}&seed={seed}"
        return post_image(service, data, query, content_type=media)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(send, cases, timeout=TIMEOUT_S * 2))
    wall = time.perf_counter() - t0
    for (data, _, temperature, seed), reply in zip(cases, replies, strict=True):
        assert reply.status == 200, reply.body[:200]
        assert reply.content_type == "image/png"
        # Exact: the double's ops compute each tile alone, so a shared batch changes no rounding.
        assert np.array_equal(pixels(reply.body), np.asarray(expected(double_model, data, temperature, seed)))
    latencies = np.array([r.seconds for r in replies]) * 1e3
    print(
        f"\nserve: {len(replies)} requests from 8 threads in {wall:.2f} s = {len(replies) / wall:.1f} req/s; "
        f"p50 {np.percentile(latencies, 50):.0f} ms, p99 {np.percentile(latencies, 99):.0f} ms"
    )
    health = json.loads(request(service, "GET", f"{PREFIX}/healthz").body)
    assert health["batched_images"] > health["batches"], "no two concurrent requests shared a batch"
    assert health["samplers"] <= 2  # the LRU's bound (sampler_cache=2)
    assert health["upscalers"] == 1 + health["samplers"]  # a fixed-size model: one Upscaler per (t > 0, seed)


@pytest.mark.slow
def test_format_parameter_sets_the_content_type(service: int, double_model: Path) -> None:
    source = encoded(photo(24, 20, 5, "RGBA"), "PNG")
    want = expected(double_model, source)
    for fmt, media in [("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")]:
        reply = post_image(service, source, f"?format={fmt}")
        assert reply.status == 200 and reply.content_type == media
        with Image.open(io.BytesIO(reply.body)) as img:
            assert img.format == fmt.upper() and img.size == (96, 80)
        assert np.array_equal(pixels(reply.body), pixels(encode_image(want, fmt)))
    jpeg_in = post_image(service, encoded(photo(24, 20, 6), "JPEG"), content_type="image/jpeg")
    assert jpeg_in.content_type == "image/jpeg"  # no format: the body's own


@pytest.mark.slow
def test_a_large_image_takes_the_memory_release_path_and_is_exact(service: int, double_model: Path) -> None:
    """4 MP out: the arena is emptied after its last batch and the replica trims its heap after the reply."""
    source = encoded(photo(500, 500, 9), "JPEG")
    reply = post_image(service, source, "?format=png", content_type="image/jpeg")
    assert reply.status == 200, reply.body[:200]
    assert np.array_equal(pixels(reply.body), np.asarray(expected(double_model, source)))


@pytest.mark.slow
def test_a_multi_picture_jpeg_is_answered_as_a_jpeg(service: int, double_model: Path) -> None:
    """MPO (two JPEG pictures in one file, as phones write): its first picture, answered as a JPEG."""
    first, second = photo(32, 24, 41), photo(32, 24, 42)
    buf = io.BytesIO()
    first.save(buf, format="MPO", save_all=True, append_images=[second], quality=90)
    with Image.open(io.BytesIO(buf.getvalue())) as img:
        assert img.format == "MPO" and getattr(img, "n_frames", 1) == 2
    reply = post_image(service, buf.getvalue(), content_type="image/jpeg")
    assert reply.status == 200 and reply.content_type == "image/jpeg", reply.body[:200]
    want = encode_image(expected(double_model, buf.getvalue()), "jpeg")
    assert np.array_equal(pixels(reply.body), pixels(want))


@pytest.mark.slow
def test_bad_requests_get_4xx_while_good_ones_succeed(service: int, double_model: Path) -> None:
    good = encoded(photo(40, 40, 11), "PNG")
    over_limit = encoded(Image.new("RGB", (1100, 1000)), "PNG")  # 1.1 MP > 1 MP, a small file
    bad: list[tuple[str, Any, int, str]] = [
        ("not an image", lambda: post_image(service, b"hello, not an image"), 400, "not a PNG, JPEG or WebP"),
        ("truncated", lambda: post_image(service, good[: len(good) // 2]), 400, "corrupt"),
        ("bomb", lambda: post_image(service, png_declaring(30000, 30000)), 413, ""),
        ("declared size", lambda: post_image(service, over_limit), 413, "1100x1000"),
        ("body too big", lambda: post_image(service, b"\0" * (MAX_BODY_BYTES + 1)), 413, "limit"),
        ("empty", lambda: post_image(service, b""), 400, "empty body"),
        ("wrong method", lambda: request(service, "GET", f"{PREFIX}/upscale"), 405, "POST"),
        ("no route", lambda: request(service, "GET", f"{PREFIX}/nothing"), 404, "no such route"),
        ("temperature", lambda: post_image(service, good, "?temperature=3"), 400, "temperature"),
        ("seed", lambda: post_image(service, good, "?temperature=1&seed=-4"), 400, "seed"),
        ("format", lambda: post_image(service, good, "?format=gif"), 400, "format"),
        ("unknown", lambda: post_image(service, good, "?scale=8"), 400, "unknown"),
        ("long seed", lambda: post_image(service, good, f"?temperature=1&seed={'9' * 5000}"), 400, "seed"),
        ("content type", lambda: post_image(service, good, content_type="text/plain"), 415, "Content-Type"),
    ]
    with ThreadPoolExecutor(8) as pool:
        good_futures = [pool.submit(post_image, service, good, "?format=png") for _ in range(6)]
        bad_futures = [(name, pool.submit(call), status, text) for name, call, status, text in bad]
        for name, future, status, text in bad_futures:
            reply = future.result(timeout=TIMEOUT_S)
            assert reply.status == status, (name, reply.status, reply.body[:200])
            assert reply.content_type == "application/json" and text in reply.error(), (name, reply.body)
            assert len(reply.body) < 300 and b"\n" not in reply.body.strip(), name
        want = np.asarray(expected(double_model, good))
        for future in good_futures:
            reply = future.result(timeout=TIMEOUT_S)
            assert reply.status == 200 and np.array_equal(pixels(reply.body), want)


@pytest.mark.slow
def test_declared_body_size_refused_before_it_is_sent(service: int) -> None:
    conn = http.client.HTTPConnection(HOST, service, timeout=TIMEOUT_S)
    try:
        conn.putrequest("POST", f"{PREFIX}/upscale")
        conn.putheader("Content-Type", "image/png")
        conn.putheader("Content-Length", str(10 * 2**30))  # 10 GiB announced, nothing sent
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413 and b"limit" in resp.read()
    finally:
        conn.close()


@pytest.mark.slow
def test_delete_drains_a_request_in_flight(service: int, double_model: Path) -> None:
    """serve.delete (what sr-serve runs on SIGTERM) waits for a request whose body is still arriving."""
    from ray import serve

    serve.run(
        build_app(
            double_model,
            "cpu",
            scaling=Scaling(gpus_per_replica=0, graceful_shutdown_timeout_s=30, graceful_shutdown_wait_loop_s=0.5),
        ),
        name="sr-drain",
        route_prefix="/drain",
    )
    data = encoded(photo(40, 40, 21), "PNG")
    conn = http.client.HTTPConnection(HOST, service, timeout=TIMEOUT_S)
    deleted_at: list[float] = []
    try:
        start_upload(conn, service, "/drain", data)

        def delete() -> None:
            serve.delete("sr-drain")
            deleted_at.append(time.monotonic())

        deleter = threading.Thread(target=delete)
        deleter.start()
        time.sleep(1.5)  # the delete is under way: the replica is draining
        assert not deleted_at, "the application was deleted with a request in flight"
        conn.send(data[100:])
        resp = conn.getresponse()
        body = resp.read()
        answered_at = time.monotonic()
        deleter.join(TIMEOUT_S)
    finally:
        conn.close()
    assert resp.status == 200 and np.array_equal(pixels(body), np.asarray(expected(double_model, data)))
    assert deleted_at and deleted_at[0] >= answered_at


@pytest.mark.slow
def test_model_dir_from_the_environment_reaches_the_replicas(
    service: int, double_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$SR_MODEL_DIR set where the app is built, not on the cluster: the replica loads that model."""
    from ray import serve

    monkeypatch.setenv("SR_MODEL_DIR", str(double_model))
    serve.run(build_app(None, "cpu", scaling=Scaling(gpus_per_replica=0)), name="sr-env", route_prefix="/env")
    try:
        assert json.loads(request(service, "GET", "/env/healthz").body)["model"] == "test-double"
    finally:
        serve.delete("sr-env")


@pytest.mark.slow
def test_stalled_and_trickled_uploads_hold_no_request_slot(hard_service: int, double_model: Path) -> None:
    """More stalled uploads than request slots: /healthz and a good request still answer at once; the
    stalled ones get 408 once behind the minimum rate, a steady but too slow one at the deadline, and a
    request past what the replica may hold a 503 at once."""
    port = hard_service
    held = HARD_MAX_ONGOING + HARD_MAX_QUEUED
    stalled = [open_upload(port, 50_000) for _ in range(held - 1)]
    for conn in stalled:
        conn.send(b"\x89PNG" + b"\0" * 96)
    stalled_until = time.monotonic() + HARD_GRACE_S  # the earliest their 408 can come
    wait_for_health(port, HARD, lambda h: h["uploading"] == held - 1, "the uploads never arrived")
    assert request(port, "GET", f"{HARD}/healthz", timeout=PROMPT_S).seconds < PROMPT_S
    good = encoded(photo(24, 20, 31), "PNG")
    reply = request(port, "POST", f"{HARD}/upscale", good, {"Content-Type": "image/png"}, timeout=TIMEOUT_S)
    assert reply.status == 200 and np.array_equal(pixels(reply.body), np.asarray(expected(double_model, good)))
    assert health(port, HARD)["uploading"] == held - 1, "the stalled uploads were let go before the good request"

    rate = 1.5 * HARD_MIN_RATE  # above the minimum rate, but too slow for the body within the deadline
    size = int(rate * HARD_BODY_TIMEOUT_S * 2)
    trickled = open_upload(port, size)
    stop = threading.Event()

    def trickle() -> None:
        """Keep `rate` by the clock, catching up after a late wake-up, until told or answered."""
        start, sent = time.monotonic(), 0
        with contextlib.suppress(OSError):  # the replica answers 408 and closes while we still send
            while not stop.is_set() and sent < size - 150:
                due = min(int((time.monotonic() - start) * rate), size - 150)
                if due > sent:
                    trickled.send(b"\0" * (due - sent))
                    sent = due
                stop.wait(0.1)

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        wait_for_health(
            port,
            HARD,
            lambda h: h["uploading"] == held,
            "the trickle never arrived",
            timeout=max(stalled_until - time.monotonic(), 0.5),
        )
        busy = request(port, "POST", f"{HARD}/upscale", good, {"Content-Type": "image/png"}, timeout=PROMPT_S)
        assert busy.status == 503 and "busy" in busy.error() and busy.seconds < PROMPT_S, busy
        assert request(port, "GET", f"{HARD}/healthz", timeout=PROMPT_S).seconds < PROMPT_S
        for conn in stalled:
            reply = reply_of(conn)
            assert reply.status == 408 and "slower than 1000 bytes/s" in reply.error(), reply.body
        reply = reply_of(trickled)
        assert reply.status == 408 and f"not received within {HARD_BODY_TIMEOUT_S:g} s" in reply.error()
    finally:
        stop.set()
        for conn in [*stalled, trickled]:
            conn.close()
        sender.join(timeout=30)
    state = wait_for_health(port, HARD, lambda h: h["in_flight"] == 0, "the uploads were never let go")
    assert state["uploading"] == 0 and state["slow_uploads"] >= held and state["refused_busy"] >= 1


@pytest.mark.slow
def test_a_cancelled_request_stops_and_keeps_its_run_slot_until_it_has(hard_service: int, double_model: Path) -> None:
    """A client leaves mid-run: its run stops at the next backend call, and the request queued behind it
    starts only then (one run at a time here), so no two runs ever overlap; the counts end at 0."""
    port = hard_service
    before = wait_for_health(
        port, HARD, lambda h: h["in_flight"] == 0, "an earlier test's request is still held", timeout=TIMEOUT_S
    )
    # 64 tiles, eight backend calls of 8 (~6 s idle): time for the steps below while it runs, under load too
    long_run = encoded(photo(200, 200, 34), "PNG")
    data = encoded(photo(100, 100, 32), "PNG")  # 16 tiles: two backend calls of 8, run alone
    leaving = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT_S)
    leaving.request("POST", f"{HARD}/upscale", body=long_run, headers={"Content-Type": "image/png"})
    wait_for_health(port, HARD, lambda h: h["upscaling"] == 1, "the first request never started")
    with ThreadPoolExecutor(1) as pool:
        staying = pool.submit(post_image, port, data, prefix=HARD)
        wait_for_health(port, HARD, lambda h: h["in_flight"] == 2, "the second request never arrived")
        assert leaving.sock is not None
        leaving.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-run
        leaving.close()
        reply = staying.result(timeout=TIMEOUT_S)
    assert reply.status == 200 and np.array_equal(pixels(reply.body), np.asarray(expected(double_model, data)))
    state = wait_for_health(port, HARD, lambda h: h["in_flight"] == 0, "a request was never let go")
    assert state["upscaling"] == 0 and state["upscaling_peak"] == 1, state  # never past --concurrent-runs 1
    assert state["stopped_runs"] == before["stopped_runs"] + 1, state


@pytest.mark.slow
def test_health_answers_at_once_under_a_burst(hard_service: int, double_model: Path) -> None:
    """As many requests as a replica holds, each real work (~1 s, one at a time): /healthz is not queued
    behind them."""
    port = hard_service
    data = encoded(photo(60, 60, 33), "PNG")  # 9 tiles
    burst = HARD_MAX_ONGOING + HARD_MAX_QUEUED
    wait_for_health(
        port, HARD, lambda h: h["in_flight"] == 0, "an earlier test's request is still held", timeout=TIMEOUT_S
    )  # a request still held would push the burst's last one to a 503
    latencies: list[float] = []
    started = time.monotonic()
    with ThreadPoolExecutor(burst) as pool:
        replies = [pool.submit(post_image, port, data, prefix=HARD) for _ in range(burst)]
        wait_for_health(port, HARD, lambda h: h["in_flight"] == burst, "the burst never arrived")
        while not all(r.done() for r in replies):
            latencies.append(request(port, "GET", f"{HARD}/healthz", timeout=10).seconds)
            time.sleep(0.1)
        statuses = [r.result().status for r in replies]
        run_s = (time.monotonic() - started) / burst  # one run, as slow as this machine makes it now
    assert statuses == [200] * burst
    assert np.array_equal(pixels(replies[0].result().body), np.asarray(expected(double_model, data)))
    p50, worst = float(np.percentile(latencies, 50)), max(latencies)
    print(
        f"\nhealthz under a burst of {burst} ({run_s:.1f} s a run): {len(latencies)} probes, "
        f"p50 {p50 * 1e3:.0f} ms, max {worst * 1e3:.0f} ms"
    )
    # A probe queued behind the runs would wait for one to end: half a run on average, up to a whole one.
    assert len(latencies) >= 5 and p50 < run_s / 4 and worst < max(2.0, run_s), (p50, worst, run_s)


def sr_serve(ray_local: Any, *flags: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """`sr-serve FLAGS` in a process of its own, joining the test session's cluster, to its end."""
    address = ray_local.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "sr_cluster.serve", "--ray-address", address, *flags],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.mark.slow
def test_sr_serve_next_to_a_running_serve(service: int, double_model: Path, ray_local: Any, tmp_path: Path) -> None:
    """On a cluster whose Serve already listens on another port, for replicas it has no room for, or for a
    backend it has no GPU for: one line, exit 2, nothing changed. A replica that cannot load: exit 1, and
    its failed application is gone while the other application still answers."""
    from ray import serve

    other = sr_serve(ray_local, "--model", str(double_model), "--port", str(free_port()))
    assert other.returncode == 2, other.stderr
    assert f"Serve already runs on this Ray cluster with its HTTP proxy on {HOST}:{service}" in other.stderr
    free = int(ray_local.available_resources().get("CPU", 0))
    crowded = sr_serve(
        ray_local,
        "--model",
        str(double_model),
        "--port",
        str(service),
        "--gpus-per-replica",
        "0",
        "--replicas",
        str(free + 1),
    )
    assert crowded.returncode == 2 and crowded.stderr.strip().splitlines() == [
        (
            f"sr-serve: error: {free + 1} replicas need {free + 1} CPUs and the Ray cluster has {free} free (of 2): "
            "lower --replicas/--min-replicas or --cpus-per-replica, or free some"
        )
    ], crowded.stderr
    if not ray_local.cluster_resources().get("GPU"):
        cuda = sr_serve(ray_local, "--model", str(double_model), "--port", str(service), "--backend", "cuda")
        assert cuda.returncode == 2 and cuda.stderr.strip().splitlines() == [
            "sr-serve: error: --backend cuda needs a GPU per replica, and the Ray cluster has none"
        ], cuda.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.fp32.onnx").write_bytes(b"not an onnx model")
    manifest = json.loads((double_model / "manifest.json").read_text())
    sha = hashlib.sha256(b"not an onnx model").hexdigest()
    manifest["onnx"] = {"fp32": {"file": "model.fp32.onnx", "sha256": sha}}
    (broken / "manifest.json").write_text(json.dumps(manifest))
    t0 = time.monotonic()
    failed = sr_serve(
        ray_local, "--model", str(broken), "--port", str(service), "--backend", "cpu", "--gpus-per-replica", "0"
    )
    print(f"\nsr-serve with a model no replica can load gave up after {time.monotonic() - t0:.1f} s")
    assert failed.returncode == 1, failed.stderr
    lines = failed.stderr.strip().splitlines()  # the replica's reason, not Ray's retries and tracebacks
    assert len(lines) == 1 and lines[0].startswith("sr-serve: error: the service did not start: "), lines
    assert "INVALID_PROTOBUF" in lines[0]
    assert "sr" not in serve.status().applications
    assert request(service, "GET", f"{PREFIX}/healthz").status == 200


def test_cli_usage_errors_exit_2_before_ray_starts(tmp_path: Path) -> None:
    assert main(["--model", str(tmp_path / "no-model")]) == 2
    assert main(["--max-body-mb", "0"]) == 2


@pytest.mark.slow
def test_sr_serve_drains_a_request_in_flight_on_sigterm(double_model: Path, tmp_path: Path) -> None:
    """The real `sr-serve` process (its own local Ray cluster): SIGTERM mid-request, the request still
    gets its image, then the process exits 0."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_agent_register_timeout_ms"] = "180000"
    log = tmp_path / "sr-serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sr_cluster.serve",
                "--model",
                str(double_model),
                "--backend",
                "cpu",
                "--port",
                str(port),
                "--gpus-per-replica",
                "0",
                "--graceful-shutdown-s",
                "30",
                "--ray-address",
                "local",
            ],  # not the test session's cluster, which Ray would find and join
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT_S)
    try:
        deadline = time.monotonic() + 180
        while True:  # bounded: the cluster, Serve and the replica start
            assert proc.poll() is None, f"sr-serve exited early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"sr-serve never answered:\n{log.read_text()[-3000:]}"
            if "SIGTERM or Ctrl-C stops it" in log.read_text():  # sr-serve says it is up
                break
            time.sleep(0.5)
        assert request(port, "GET", "/healthz").status == 200
        data = encoded(photo(40, 40, 22), "PNG")
        start_upload(conn, port, "", data)
        proc.send_signal(signal.SIGTERM)
        # Draining: new requests and /healthz get a JSON 503 (not the proxy's text 404 of a deleted route).
        state = wait_for_health_status(port, 503)
        assert state["status"] == "draining" and state["in_flight"] == 1
        late = post_image(port, data, prefix="")
        assert late.status == 503 and late.content_type == "application/json" and "shutting down" in late.error()
        assert proc.poll() is None, "sr-serve exited with a request in flight"
        conn.send(data[100:])
        try:
            resp = conn.getresponse()
            body = resp.read()
        except OSError as exc:
            pytest.fail(f"no answer after SIGTERM ({exc}); sr-serve said:\n{log.read_text()[-3000:]}")
        assert resp.status == 200 and np.array_equal(pixels(body), np.asarray(expected(double_model, data)))
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        conn.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
