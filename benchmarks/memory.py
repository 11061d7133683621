"""``python -m benchmarks.memory``: peak memory of one image through the tiled runtime, per output pixel.

Each measurement is a fresh process (peak RSS is a per-process high-water
mark), one per batch size and image size:

1. import ``sr_runtime``, build ``Upscaler(model, backend="cpu", batch_size=B)``
   and run an image of exactly B tiles three times: the **session** figure is
   the peak so far (interpreter, libraries, the ONNX Runtime session and its
   memory arena grown to its steady size for one full batch);
2. reset the peak (``/proc/self/clear_refs``) and upscale a synthetic photo of
   WxH the way ``sr-upscale`` does (open the file, ``Upscaler.run``, save it
   atomically), on a worker thread as ``sr-serve`` runs it: the **run** peak;
3. RSS with the result still held, after dropping it, and after
   ``sr_runtime.memory.release_free_memory()`` (glibc's ``malloc_trim``): what
   a long-lived process (an ``sr-serve`` replica, a Ray worker) keeps.

Per output pixel = slope of the run peak between the two largest sizes at one
batch size; fixed = the rest. ``--code DIR`` runs another checkout's
``sr_runtime`` with the same script (a before/after comparison).

``--serve WxH`` measures an ``sr-serve`` replica instead: a local Ray
cluster, one replica of the model with the service's defaults, one small
request to warm it up, then the replica process's RSS before, its peak during
one POST of a WxH PNG and its RSS after the answer. The service code is this
checkout's (copy the script into another checkout to measure that one).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.report import log, positive_ints, write_result
from benchmarks.system import host_info, load_average, reset_peak_rss, rss_mb, versions

SCHEMA = "vdvae-sr-bench-memory/1"
REPO = Path(__file__).resolve().parent.parent
MIB = 2**20
HOST = "127.0.0.1"
APP_NAME = "sr-memory"
#: ONNX Runtime's arena was still growing on the second call of one batch shape, not on the third.
WARM_UP_RUNS = 3


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'500x500,1000x750' -> [(500, 500), (1000, 750)] (width, height)."""
    try:
        sizes = [tuple(int(v) for v in part.lower().split("x")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes are WxH,WxH...; got {text!r}") from None
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes are WxH,WxH... with positive sides; got {text!r}")
    return [(s[0], s[1]) for s in sizes]


def synthetic_photo(path: Path, width: int, height: int, seed: int = 0) -> None:
    """The bundled sample photo resized to WxH plus mild noise, so the PNG encoder has real work."""
    import numpy as np
    from PIL import Image

    with Image.open(REPO / "assets" / "sample.png") as sample:
        base = np.asarray(sample.convert("RGB").resize((width, height), Image.Resampling.BICUBIC), np.int16)
    noise = np.random.default_rng(seed).integers(-4, 5, base.shape, dtype=np.int16)
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path)


def warm_up_shape(batch: int) -> tuple[int, int]:
    """(height, width) of an LR image that the default 8-pixel overlap splits into exactly `batch` 64x64 tiles."""
    return 48, 40 if batch == 1 else 56 * batch - 16


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this (fresh) process; see the module docstring."""
    import numpy as np

    if args.code:  # before anything imports sr_runtime
        sys.path.insert(0, str(Path(args.code).resolve()))
    import sr_runtime
    from sr_runtime import Upscaler
    from sr_runtime.imaging import open_image
    from sr_runtime.jobs import save_atomic

    try:
        from sr_runtime.memory import release_free_memory
    except ImportError:  # a checkout from before it existed (--code)
        release_free_memory = None

    out: dict[str, Any] = {"sr_runtime": str(Path(sr_runtime.__file__).parent), "rss_start_mib": rss_mb()[0]}
    up = Upscaler(args.model, backend="cpu", batch_size=args.batch)
    for _ in range(WARM_UP_RUNS):
        up.run(np.zeros((*warm_up_shape(args.batch), 3), np.uint8))
    out["session_peak_mib"] = rss_mb()[1]
    out["rss_idle_mib"] = rss_mb()[0]
    if args.size is None:
        return out
    width, height = args.size
    with tempfile.TemporaryDirectory(prefix="sr-bench-memory-") as tmp:
        src, dest = Path(tmp) / "in.png", Path(tmp) / f"out.{args.format}"
        synthetic_photo(src, width, height)
        out["peak_reset"] = reset_peak_rss()
        out["rss_before_mib"] = rss_mb()[0]

        def job() -> Any:
            img = open_image(src, up.max_pixels)
            result = up.run(img)
            save_atomic(result, dest)
            return result

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=1) as pool:
            result = pool.submit(job).result()
            out["seconds"] = time.perf_counter() - t0
            out["run_peak_mib"] = rss_mb()[1]
            out["rss_holding_result_mib"] = rss_mb()[0]
            out["output_pixels"] = result.width * result.height
            del result
            out["rss_after_free_mib"] = rss_mb()[0]
            if release_free_memory is not None:
                release_free_memory()  # malloc_trim trims every thread's heap
                out["rss_after_trim_mib"] = rss_mb()[0]
        out["output_bytes"] = dest.stat().st_size
    out["threads_at_end"] = threading.active_count()
    return out


def proc_status(pid: int, key: str) -> float:
    """A /proc/<pid>/status value in MiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def post_png(port: int, body: bytes) -> tuple[float, int]:
    """Seconds for one POST /upscale of a PNG (reply read in full) and the reply's bytes."""
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=7200)
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/upscale", body=body, headers={"Content-Type": "image/png"})
        reply = conn.getresponse()
        data = reply.read()
    finally:
        conn.close()
    if reply.status != 200:
        raise RuntimeError(f"HTTP {reply.status}: {data[:300]!r}")
    return time.perf_counter() - t0, len(data)


def replica_pid(app: str) -> int:
    """The process of the one Serve replica of `app` on this machine (Ray titles it ray::ServeReplica:<app>:...)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            title = (entry / "cmdline").read_bytes()
        except OSError:  # not a process, or gone
            continue
        if f"ServeReplica:{app}:".encode() in title:
            found.append(int(entry.name))
    if len(found) != 1:
        raise RuntimeError(f"expected one replica process of {app}, found {found}")
    return found[0]


def serve_replica(args: argparse.Namespace) -> dict[str, Any]:
    """One sr-serve replica's RSS around one large request (see the module docstring)."""
    import socket

    import ray
    from ray import serve

    from sr_cluster.serve import Scaling, build_app

    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")  # a loaded machine starts slowly
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address=HOST, logging_level="ERROR", log_to_driver=False)
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = int(sock.getsockname()[1])
    out: dict[str, Any] = {"size": f"{args.serve[0]}x{args.serve[1]}"}
    try:
        serve.start(http_options={"host": HOST, "port": port})
        serve.run(build_app(args.model, "cpu", scaling=Scaling()), name=APP_NAME, route_prefix="/")
        pid = replica_pid(APP_NAME)
        environ = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
        out["replica_pythonpath"] = environ.get("PYTHONPATH")  # whose sr_cluster and sr_runtime it runs
        with tempfile.TemporaryDirectory(prefix="sr-bench-memory-") as tmp:
            small, large = Path(tmp) / "small.png", Path(tmp) / "large.png"
            synthetic_photo(small, 200, 150)
            synthetic_photo(large, *args.serve)
            post_png(port, small.read_bytes())  # warm-up: 12 tiles, less than one batch
            out["rss_idle_mib"] = proc_status(pid, "VmRSS")
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            out["seconds"], out["reply_bytes"] = post_png(port, large.read_bytes())
        out["peak_mib"] = proc_status(pid, "VmHWM")
        out["rss_after_mib"] = proc_status(pid, "VmRSS")
        time.sleep(10)
        out["rss_after_10s_mib"] = proc_status(pid, "VmRSS")
        out["output_pixels"] = 16 * args.serve[0] * args.serve[1]
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def measure(args: argparse.Namespace, batch: int, size: tuple[int, int] | None) -> dict[str, Any]:
    """One child process; its JSON line."""
    cmd = [sys.executable, "-m", "benchmarks.memory", "--child", "--batch", str(batch), "--format", args.format]
    if args.model:
        cmd += ["--model", str(args.model)]
    if size is not None:
        cmd += ["--size", f"{size[0]}x{size[1]}"]
    if args.code:
        cmd += ["--code", args.code]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    row: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    row.update({"batch": batch, "size": None if size is None else f"{size[0]}x{size[1]}"})
    return row


def fit(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Run peak = fixed + per_pixel x output pixels, through the two largest images of one batch size."""
    sized = sorted((r for r in rows if "run_peak_mib" in r), key=lambda r: r["output_pixels"])
    if len(sized) < 2:
        return None
    small, large = sized[-2], sized[-1]
    grew = (large["run_peak_mib"] - small["run_peak_mib"]) * MIB
    per_pixel = grew / (large["output_pixels"] - small["output_pixels"])
    fixed = large["run_peak_mib"] - per_pixel * large["output_pixels"] / MIB
    return {"bytes_per_output_pixel": per_pixel, "fixed_mib": fixed, "between": [small["size"], large["size"]]}


def markdown(result: dict[str, Any]) -> str:
    """The result as the markdown page committed beside its JSON."""
    host = result["host"]

    def cell(row: dict[str, Any], key: str, fmt: str = ".0f") -> str:
        return "-" if row.get(key) is None else format(row[key], fmt)

    keys = ("session_peak_mib", "rss_idle_mib", "run_peak_mib", "rss_holding_result_mib", "rss_after_free_mib")
    rows = "".join(
        f"| {r['batch']} | {r['size'] or '-'} | {r.get('output_pixels', 0) / 1e6:.1f} | "
        + " | ".join(cell(r, k) for k in (*keys, "rss_after_trim_mib"))
        + f" | {cell(r, 'seconds', '.1f')} |\n"
        for r in result["rows"]
    )
    fits = "".join(
        f"- batch {batch}: {f['fixed_mib']:.0f} MiB + {f['bytes_per_output_pixel']:.1f} bytes per output pixel "
        f"(through {f['between'][0]} and {f['between'][1]})\n"
        for batch, f in result["fits"].items()
        if f is not None
    )
    return (
        f"# Peak memory of one image, tiled runtime, {result['date']}\n\n"
        f"- model: {result['model']}; ONNX Runtime CPU fp32; output {result['format'].upper()}\n"
        f"- runtime code: {result['code']}\n"
        f"- host: {host['cpu']} ({host['usable_cpus']} usable cores); load average "
        f"{host['load_average_at_start']} at start, {result['load_average_at_end']} at end\n"
        f"- onnxruntime {result['versions']['onnxruntime']}, numpy {result['versions']['numpy']}\n"
        f"- command: `{result['command']}`\n\n"
        "| batch | LR size | out MP | session peak MiB | idle MiB | run peak MiB | holding result MiB | "
        "after free MiB | after trim MiB | s |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n" + rows + "\n" + fits + "\n" + result["method"] + "\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: the shipped one)")
    parser.add_argument("--batches", type=positive_ints, default=[16], help="tile batch sizes (default 16)")
    parser.add_argument(
        "--sizes", type=parse_sizes, default=parse_sizes("500x500,1000x1000"), help="LR image sizes WxH,..."
    )
    parser.add_argument("--format", choices=("png", "jpg", "webp"), default="png", help="output format (png)")
    parser.add_argument("--code", help="measure the sr_runtime of this checkout instead of this one's")
    parser.add_argument("--serve", type=lambda t: parse_sizes(t)[0], help="measure an sr-serve replica on one WxH PNG")
    parser.add_argument("--out", help="write the result JSON here (and markdown beside it, .md)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=lambda t: parse_sizes(t)[0], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    host = host_info()
    if args.serve:
        replica = serve_replica(args)
        print(json.dumps({"schema": SCHEMA, "host": host, "versions": versions(), "replica": replica}, indent=1))
        return 0
    rows = []
    for batch in args.batches:
        for size in [None, *args.sizes]:
            log(f"batch {batch}, {'session only' if size is None else f'{size[0]}x{size[1]}'} ...")
            rows.append(measure(args, batch, size))
            log(f"  {json.dumps(rows[-1])}")
    result = {
        "schema": SCHEMA,
        "date": dt.date.today().isoformat(),
        "command": " ".join(["python -m benchmarks.memory", *(argv if argv is not None else sys.argv[1:])]),
        "model": args.model or "shipped default (sr_runtime/models/vdvae-sr-256)",
        "format": args.format,
        "code": args.code or "this checkout",
        "host": host,
        "versions": versions(),
        "load_average_at_end": load_average(),
        "rows": rows,
        "fits": {str(b): fit([r for r in rows if r["batch"] == b]) for b in args.batches},
        "method": (
            "Each row is a fresh process. session peak: VmHWM after building the Upscaler and running an image "
            f"of exactly `batch` tiles {WARM_UP_RUNS} times; run peak: VmHWM (reset first) while one synthetic "
            "photo of that LR size is opened, upscaled and saved as sr-upscale does, on a worker thread; then RSS "
            "holding the result, after dropping it, and after malloc_trim. MiB = 2^20 bytes."
        ),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        log(f"wrote {write_result(Path(args.out), result, markdown(result))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
