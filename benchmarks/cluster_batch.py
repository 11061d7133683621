"""Throughput of `sr-upscale --ray` with 1, 2, ... workers on the same images: images/s and the scaling ratio.

Each worker count gets a fresh actor pool (sr_cluster.batch, the code `--ray` runs),
one warm-up image per worker, then the timed run over every image: start-up
and model loading are not in the figure, reading and writing the files are.
CPU workers split the cores (`cpu_threads` = cores // workers), so every row
uses the whole machine and the ratio says what per-image parallelism adds
over ONNX Runtime's intra-op threads.

Inputs (`--photos DIR`): the photos of DIR (default data/photos/val), each
centre-cropped and resized to --size x --size and repeated up to --images;
without such a folder, crops of assets/sample.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

import ray
from PIL import Image
from tqdm import tqdm

from benchmarks.report import write_result
from benchmarks.system import host_info, load_average
from sr_cluster.batch import Summary, WorkerPool, connect, plan_jobs, plan_placement
from sr_runtime.jobs import UpscaleOptions

SAMPLE = Path(__file__).resolve().parent.parent / "assets" / "sample.png"


def make_inputs(photos: Path, count: int, size: int, folder: Path) -> tuple[list[Path], str]:
    """`count` PNGs of size x size in `folder`, and a description of where they came from."""
    sources = sorted(p for p in photos.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if sources:
        described = f"{len(sources)} photos of {photos}, centre-cropped and resized to {size}x{size}"
        crops = [_square(Image.open(p).convert("RGB")).resize((size, size), Image.Resampling.LANCZOS) for p in sources]
    else:
        sample = Image.open(SAMPLE).convert("RGB")
        step = max(1, (min(sample.size) - size) // 3)
        crops = [
            sample.crop((x, y, x + size, y + size))
            for x in range(0, sample.width - size + 1, step)
            for y in range(0, sample.height - size + 1, step)
        ] or [sample.resize((size, size))]
        described = f"{len(crops)} crops of {size}x{size} of {SAMPLE.name} ({photos} has no photos)"
    paths = []
    for i in range(count):
        path = folder / f"img{i:03d}.png"
        crops[i % len(crops)].save(path)
        paths.append(path)
    return paths, described + (f", repeated to {count}" if count > len(crops) else "")


def _square(img: Image.Image) -> Image.Image:
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side))


def measure(model: str | None, inputs: list[Path], workers: int, work: Path) -> dict[str, Any]:
    """One pool of `workers`: warm each up on one image, then time the whole set; images/s."""
    options = UpscaleOptions(model=model, quiet=True)  # sr-upscale's defaults
    nodes = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]]
    placement = plan_placement(ray.cluster_resources(), nodes, workers)
    with WorkerPool(options, placement) as pool:
        infos = pool.start()
        for name, files in (("warm-up", inputs[:workers]), ("timed", inputs)):
            summary = Summary()
            jobs = plan_jobs(files, replace(options, output=str(work / f"{workers}-{name}")), summary)
            started = time.perf_counter()
            with tqdm(total=len(jobs), desc=f"{workers} worker(s), {name}", unit="img") as bar:
                pool.run(deque(jobs), summary, bar)
            seconds = time.perf_counter() - started
            if summary.failures or summary.done != len(files):
                raise RuntimeError(f"{workers} workers: {summary.failures or summary.done}")
    return {
        "workers": workers,
        "cpus_per_worker": placement.num_cpus,
        "gpus_per_worker": placement.num_gpus,
        "cpu_threads_per_worker": placement.cpu_threads,
        "backend": infos[0].backend,
        "precision": infos[0].precision,
        "model": infos[0].model,
        "images": len(inputs),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(inputs) / seconds, 4),
    }


def markdown(result: dict[str, Any]) -> str:
    """The result as the markdown page committed beside its JSON."""
    host = result["host"]
    rows = "".join(
        f"| {r['workers']} | {r['cpu_threads_per_worker'] or '-'} | {r['gpus_per_worker']} | {r['backend']} | "
        f"{r['images']} | {r['seconds']:.1f} | {r['images_per_s']:.3f} | {r['speedup']:.2f}x |\n"
        for r in result["runs"]
    )
    return (
        f"# Batch upscaling on Ray: images/s by worker count, {result['date']}\n\n"
        f"- inputs: {result['inputs']}; model {result['runs'][0]['model']}, temperature 0\n"
        f"- host: {host['cpu']} ({host['usable_cpus']} usable cores); GPUs: {', '.join(host['gpus']) or 'none'}; "
        f"load average {host['load_average_at_start']} at start, {result['load_average_at_end']} at end\n"
        f"- Ray {result['versions']['ray']}, onnxruntime {result['versions']['onnxruntime']}; "
        f"cluster {result['cluster']}\n"
        f"- command: `{result['command']}`\n\n"
        "| workers | ORT threads each | GPUs each | backend | images | s | images/s | vs 1 worker |\n"
        "|---|---|---|---|---|---|---|---|\n"
        + rows
        + "\nTimed: the whole set after one warm-up image per worker (start-up and model load excluded; "
        "file reading and writing included). " + result["note"] + "\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster_batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12, help="images per run (default 12)")
    parser.add_argument("--size", type=int, default=256, help="input side in pixels (default 256)")
    parser.add_argument("--photos", type=Path, default=Path("data/photos/val"), help="folder of photos to crop")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    parser.add_argument("--model", help="model directory (default: the shipped one)")
    parser.add_argument("--address", default="auto", help="Ray cluster (default auto: a running one or a new one)")
    parser.add_argument("--note", default="", help="what else was running, for the page")
    parser.add_argument("--out", help="write the result JSON here (and markdown beside it, .md)")
    args = parser.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    host = host_info()
    connected_here = connect(args.address)
    with tempfile.TemporaryDirectory(prefix="cluster-batch-") as tmp:
        work = Path(tmp)
        (work / "in").mkdir()
        inputs, described = make_inputs(args.photos, args.images, args.size, work / "in")
        runs = [measure(args.model, inputs, count, work) for count in counts]
    for run in runs:
        run["speedup"] = round(run["images_per_s"] / runs[0]["images_per_s"], 3)
    result = {
        "date": dt.date.today().isoformat(),
        "inputs": described,
        "host": host,
        "cluster": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")},
        "versions": {name: metadata.version(name) for name in ("ray", "onnxruntime")},
        "load_average_at_end": load_average(),
        "command": shlex.join(["python", "-m", "benchmarks.cluster_batch", *(sys.argv[1:] if argv is None else argv)]),
        "note": args.note,
        "runs": runs,
    }
    if connected_here:
        ray.shutdown()
    print(json.dumps(result, indent=1))
    if args.out:
        write_result(Path(args.out), result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
