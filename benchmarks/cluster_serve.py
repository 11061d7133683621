"""``python -m benchmarks.cluster_serve``: sr-serve's latency and throughput against concurrent clients.

Starts a local Ray cluster and Serve on a free loopback port with one replica
of the shipped model (or ``--model``), then for each client count sends
``--requests`` PNG crops (random sizes in ``--sizes``) of real photos from that
many threads and records p50/p99 latency, requests/s and output MP/s. With
``--batching on,off`` every level runs with cross-request batching of
temperature-0 requests and without it (``max_batch_images=1``). Results go to
``--out`` (JSON) and the same name with ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import io
import json
import logging
import socket
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.report import log, positive_ints, write_result
from benchmarks.system import host_info, load_average, versions
from benchmarks.timing import summarize

SCHEMA = "vdvae-sr-bench-cluster-serve/1"
REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
HOST = "127.0.0.1"
TIMEOUT_S = 300.0
WARMUP_REQUESTS = 2


def crops(sources: list[Path], count: int, low: int, high: int, seed: int) -> list[bytes]:
    """`count` PNG-encoded crops of the source photos, each side a random size in [low, high]."""
    rng = np.random.default_rng(seed)
    photos = []
    for path in sources:
        with Image.open(path) as img:
            photos.append(img.convert("RGB"))
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = (min(int(rng.integers(low, high + 1)), side) for side in photo.size)
        x, y = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        buf = io.BytesIO()
        photo.crop((x, y, x + w, y + h)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def post(port: int, body: bytes) -> tuple[float, int]:
    """Seconds for one POST /upscale (response read in full) and the output pixels."""
    conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT_S)
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/upscale?format=png", body=body, headers={"Content-Type": "image/png"})
        resp = conn.getresponse()
        data = resp.read()
        seconds = time.perf_counter() - t0
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
    with Image.open(io.BytesIO(data)) as img:
        return seconds, img.width * img.height


def health(port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("GET", "/healthz")
        return dict(json.loads(conn.getresponse().read()))
    finally:
        conn.close()


def level(port: int, clients: int, bodies: list[bytes]) -> dict[str, Any]:
    """All `bodies` from `clients` threads: latency percentiles, requests/s and output MP/s over the wall time."""
    before = health(port)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda body: post(port, body), bodies, timeout=TIMEOUT_S * len(bodies)))
    wall = time.perf_counter() - t0
    after = health(port)
    latency = summarize([s for s, _ in results])
    batches = after["batches"] - before["batches"]
    batched = after["batched_images"] - before["batched_images"]
    return {
        "clients": clients,
        "requests": len(bodies),
        "wall_s": wall,
        "latency": latency,
        "requests_per_s": len(bodies) / wall,
        "output_mpix_per_s": sum(p for _, p in results) / 1e6 / wall,
        "batches": batches,
        "batched_images": batched,
        "images_per_batch": batched / batches if batches else None,
    }


def direct(args: argparse.Namespace, bodies: list[bytes]) -> dict[str, Any]:
    """The same crops through a local `Upscaler.run` in this process, one at a time: the service's floor."""
    from sr_runtime import Upscaler

    seconds = []
    with Upscaler(args.model, backend=args.backend) as up:
        for body in bodies[:WARMUP_REQUESTS]:
            with Image.open(io.BytesIO(body)) as img:
                up.run(img)
        for body in bodies[: args.direct]:
            with Image.open(io.BytesIO(body)) as img:
                img.load()
                t0 = time.perf_counter()
                up.run(img)
                seconds.append(time.perf_counter() - t0)
        return {"backend": up.backend, "precision": up.precision, "latency": summarize(seconds)}


def run_mode(args: argparse.Namespace, batching: bool, bodies: list[bytes]) -> dict[str, Any]:
    """One Serve deployment (batching on or off) measured at every client count."""
    from ray import serve

    from sr_cluster.serve import Scaling, ServiceOptions, build_app

    port = free_port()
    serve.start(http_options={"host": HOST, "port": port})
    try:
        options = ServiceOptions(max_batch_images=args.max_batch_images if batching else 1)
        t0 = time.perf_counter()
        serve.run(
            build_app(
                args.model, args.backend, options=options, scaling=Scaling(max_ongoing_requests=max(args.clients))
            ),
            name="sr-bench",
            route_prefix="/",
        )
        start_s = time.perf_counter() - t0
        info = health(port)
        for body in bodies[:WARMUP_REQUESTS]:
            post(port, body)
        rows = []
        for clients in args.clients:
            log(f"batching {'on' if batching else 'off'}: {clients} clients x {len(bodies)} requests ...")
            row = level(port, clients, bodies)
            log(
                f"  p50 {row['latency']['p50_ms']:.0f} ms, p99 {row['latency']['p99_ms']:.0f} ms, "
                f"{row['requests_per_s']:.2f} req/s, {row['output_mpix_per_s']:.3f} MP/s"
            )
            rows.append(row)
    finally:
        serve.shutdown()
    return {
        "batching": batching,
        "max_batch_images": options.max_batch_images,
        "start_s": start_s,
        "service": {k: info[k] for k in ("model", "backend", "precision")},
        "levels": rows,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def markdown(result: dict[str, Any]) -> str:
    """The result as the page committed beside its JSON."""
    host, s = result["host"], result["settings"]
    service = result["modes"][0]["service"]
    lines = [
        f"# sr-serve: latency and throughput vs concurrent clients, {result['created_utc']}",
        "",
        (
            f"- service: model `{service['model']}`, backend {service['backend']} {service['precision']}, one "
            + (
                "replica holding one GPU"
                if host["gpus"]
                else "replica (num_cpus=1 in Ray's accounting; ONNX Runtime uses every core)"
            )
            + f", local Ray {result['versions']['ray']}"
        ),
        (
            f"- host: {host['cpu']}, {host['usable_cpus']} usable cores, GPUs: {', '.join(host['gpus']) or 'none'}; "
            f"load average {host['load_average_at_start']} at start, {host['load_average_at_end']} at end; "
            f"{result.get('note') or 'the clients run on the same machine'}: compare rows within this page"
        ),
        (
            f"- requests: {s['requests']} per level, PNG crops {s['sizes'][0]}..{s['sizes'][1]} px a side of "
            f"{', '.join(s['images'])}, temperature 0, PNG out; {WARMUP_REQUESTS} warm-up requests first"
        ),
        f"- `{' '.join(result['command'])}`",
        "",
        "| batching | clients | n | p50 ms | p99 ms | req/s | out MP/s | images/batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in result["modes"]:
        for row in mode["levels"]:
            per_batch = row["images_per_batch"]
            lines.append(
                f"| {'on' if mode['batching'] else 'off'} | {row['clients']} | {row['latency']['n']} "
                f"| {row['latency']['p50_ms']:.0f} | {row['latency']['p99_ms']:.0f} | {row['requests_per_s']:.2f} "
                f"| {row['output_mpix_per_s']:.3f} | {'-' if per_batch is None else f'{per_batch:.1f}'} |"
            )
    floor = result["direct"]
    if floor:
        lat = floor["latency"]
        lines += [
            "",
            (
                f"Floor: the first {lat['n']} crops through a local `Upscaler.run` in the benchmark's "
                f"process (no HTTP, no Ray, one at a time, no PNG encode): p50 {lat['p50_ms']:.0f} ms, "
                f"p99 {lat['p99_ms']:.0f} ms."
            ),
        ]
    lines += [
        "",
        (
            "Latency is per request, client side (send, queue, upscale, PNG encode, read). "
            "images/batch: temperature-0 requests that shared one `run_many` call (images whose own tiles "
            "fill a backend batch run alone and are not counted)."
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cluster_serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=positive_ints, default=[1, 4, 16], help="client thread counts (default 1,4,16)")
    p.add_argument("--requests", type=int, default=24, help="requests per level (default 24)")
    p.add_argument("--sizes", type=positive_ints, default=[64, 128], help="crop side range LOW,HIGH (default 64,128)")
    p.add_argument(
        "--images",
        type=Path,
        nargs="+",
        default=[REPO / "assets" / "sample.png"],
        help="photos to crop (default assets/sample.png)",
    )
    p.add_argument("--batching", default="on,off", help="on, off or on,off (default on,off)")
    p.add_argument("--max-batch-images", type=int, default=8, help="batch bound when batching is on (default 8)")
    p.add_argument("--model", default=None, help="model directory (default: the shipped one)")
    p.add_argument("--backend", default="auto")
    p.add_argument(
        "--direct",
        type=int,
        default=8,
        help="crops also timed through a local Upscaler without HTTP or Ray (default 8; 0: none)",
    )
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="what else was running, for the page")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="result JSON (.md beside it); default benchmarks/results/cluster-serve-cpu-DATE.json",
    )
    args = p.parse_args(argv)
    if len(args.sizes) != 2 or args.sizes[0] > args.sizes[1]:
        p.error("--sizes needs LOW,HIGH")
    modes = [m.strip() for m in args.batching.split(",")]
    if not modes or not set(modes) <= {"on", "off"}:
        p.error("--batching takes on, off or on,off")
    import ray

    started = dt.datetime.now(dt.timezone.utc)
    host = host_info()
    bodies = crops(args.images, args.requests, args.sizes[0], args.sizes[1], args.seed)
    floor = direct(args, bodies) if args.direct else None
    if floor:
        log(f"direct Upscaler.run: p50 {floor['latency']['p50_ms']:.0f} ms over {floor['latency']['n']} crops")
    ray.init(
        num_cpus=args.cpus,
        include_dashboard=False,
        _node_ip_address=HOST,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    try:
        results = [run_mode(args, mode == "on", bodies) for mode in modes]
    finally:
        ray.shutdown()
    result = {
        "schema": SCHEMA,
        "created_utc": started.isoformat(timespec="seconds"),
        "command": ["python", "-m", "benchmarks.cluster_serve", *(argv if argv is not None else sys.argv[1:])],
        "host": host | {"load_average_at_end": load_average()},
        "versions": versions() | {"ray": ray.__version__},
        "settings": {
            "requests": args.requests,
            "sizes": args.sizes,
            "clients": args.clients,
            "images": [str(path.relative_to(REPO) if path.is_relative_to(REPO) else path) for path in args.images],
            "seed": args.seed,
            "cpus": args.cpus,
            "temperature": 0.0,
        },
        "direct": floor,
        "modes": results,
        "note": args.note,
    }
    out = args.out or RESULTS_DIR / f"cluster-serve-cpu-{started.strftime('%Y%m%d')}.json"
    page = write_result(out, result, markdown(result))
    print(markdown(result))
    log(f"wrote {out} and {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
