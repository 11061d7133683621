"""``python -m benchmarks.latency``: per-tile and whole-image latency of every backend available here.

For each model and batch size: per-tile latency (p50/p90/p99 after warm-up),
output megapixels/s, peak memory, achieved GFLOP/s from the model's counted
GMAC against a matmul peak measured in the same run, and the speed-up over
PyTorch eager FP32 on the same device in the same run. Then whole-image
latency through ``sr_runtime.Upscaler`` with the share of time spent outside
the backend. Results go to ``benchmarks/results/<device>-<model>-<date>.json``
and ``.md``. ``--quick`` is the CI smoke run (tiny model, few iterations).
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks import report
from benchmarks.models import DEFAULT_CACHE, REPO, BenchModel, load_model, parity
from benchmarks.report import log, positive_ints
from benchmarks.runners import (
    Runner,
    Target,
    Unavailable,
    all_targets,
    gpu_memory_mb,
    make_runner,
    reference_target,
)
from benchmarks.system import (
    cpu_model,
    gpu_names,
    host_info,
    load_average,
    matmul_peak,
    reset_peak_rss,
    rss_mb,
    versions,
)
from benchmarks.timing import measure_interleaved, summarize

SCHEMA = "vdvae-sr-bench-latency/1"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SAMPLE_IMAGE = REPO / "assets" / "sample.png"
IMAGE_NOTE = (
    "whole image: input is a uint8 numpy array (no file decode/encode); outside-backend share = "
    "1 - RunStats.backend_seconds / wall time (tiling, blending, conversion, noise slicing)"
)


def _sizes(text: str) -> list[tuple[int, int]]:
    sizes = [re.fullmatch(r"(\d+)x(\d+)", part.strip()) for part in text.split(",")]
    if not all(sizes):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT[,WIDTHxHEIGHT...], got {text}")
    return [(int(m[1]), int(m[2])) for m in sizes if m]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="CI smoke run: the tiny model, batch 1 and 2, 3 iterations, a 64x48 image"
    )
    p.add_argument(
        "--models",
        default=None,
        help="comma list: default (shipped, or random small-256 stand-in), tiny, or a preset "
        "(random weights). Default: default,paper-256 (--quick: tiny)",
    )
    p.add_argument("--batches", type=positive_ints, default=None, help="tile batch sizes (default 1,4; --quick 1,2)")
    p.add_argument("--devices", default=None, help="only backends on these devices (comma list of cpu,cuda)")
    p.add_argument(
        "--backends",
        default=None,
        help="only these backends (comma list of e.g. pytorch-eager,onnxruntime-cpu,tensorrt)",
    )
    p.add_argument("--iters", type=int, default=None, help="timed calls per measurement (default 30; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3; --quick 1)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=60.0,
        help="stop a measurement after this many seconds once 2 samples exist (default 60)",
    )
    p.add_argument(
        "--heavy-gmac",
        type=float,
        default=50.0,
        help="models costing more GMAC per tile run --heavy-batches only, --heavy-iters, no whole image, "
        "no FP16 export (default 50)",
    )
    p.add_argument("--heavy-iters", type=int, default=3, help="timed calls for heavy models (default 3)")
    p.add_argument(
        "--heavy-batches", type=positive_ints, default=[1], help="tile batch sizes for heavy models (default 1)"
    )
    p.add_argument(
        "--image", type=_sizes, default=None, help="whole-image LR sizes WxH, comma-separated (default 640x480)"
    )
    p.add_argument("--image-iters", type=int, default=None, help="timed whole-image runs (default 3; --quick 2)")
    p.add_argument(
        "--image-batches",
        type=positive_ints,
        default=None,
        help="Upscaler batch sizes for the whole image (default: the largest of --batches)",
    )
    p.add_argument("--no-image", action="store_true", help="skip the whole-image measurement")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"results directory (default {RESULTS_DIR})")
    p.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help=f"where random-weights exports are kept (default {DEFAULT_CACHE})",
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on --quick."""
    q = args.quick
    args.models = (args.models or ("tiny" if q else "default,paper-256")).split(",")
    args.batches = args.batches or ([1, 2] if q else [1, 4])
    args.iters = args.iters or (3 if q else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 3)
    args.image = args.image or [(64, 48) if q else (640, 480)]
    args.image_iters = args.image_iters or (2 if q else 3)
    args.image_batches = args.image_batches or [max(args.batches)]
    args.backends = None if args.backends is None else set(args.backends.split(","))
    args.devices = None if args.devices is None else set(args.devices.split(","))
    return args


def device_name(device: str) -> str:
    return cpu_model() if device == "cpu" else (gpu_names() or ["cuda"])[0]


def measure_peaks(cuda: bool, quick: bool) -> dict[str, Any]:
    """The reference peaks for '% of peak': CPU fp32, and on a GPU fp32 and fp16 matmuls."""
    n, reps = (512, 3) if quick else (2048, 10)
    peaks = {"cpu fp32": matmul_peak("cpu", "float32", n, reps)}
    if cuda:
        peaks["cuda fp32"] = matmul_peak("cuda", "float32", 8192, reps)
        peaks["cuda fp16"] = matmul_peak("cuda", "float16", 8192, reps)
    return peaks


def peak_for(target: Target, peaks: dict[str, Any]) -> dict[str, Any] | None:
    """CPU rows use the fp32 peak (fp16 is not native there); GPU rows the peak of their precision."""
    key = "cpu fp32" if target.device == "cpu" else f"cuda {target.precision}"
    return peaks.get(key)


def prepare(target: Target, model: BenchModel, batch: int, warmup: int, seed: int) -> tuple[Runner, dict[str, Any]]:
    """Create the backend and warm it up; its memory is what creation and warm-up added to the process."""
    reset_ok = reset_peak_rss()
    rss_before, _ = rss_mb()
    torch_gpu = target.device == "cuda" and torch.cuda.is_available()
    if torch_gpu:
        torch.cuda.reset_peak_memory_stats()
        allocated_before = torch.cuda.memory_allocated()
    try:
        runner = make_runner(target, model, batch, seed)
    except Unavailable:
        raise
    except Exception as exc:  # a backend that breaks is a result to report, not a reason to stop the others
        raise Unavailable(f"failed to load: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
    try:
        for _ in range(warmup):
            runner.call()
    except Exception as exc:
        runner.close()
        raise Unavailable(f"failed to run: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
    _, rss_peak = rss_mb()
    memory: dict[str, Any] = {
        "peak_rss_mb": rss_peak,
        "rss_before_mb": rss_before,
        "added_rss_mb": None if rss_before is None or not reset_ok else rss_peak - rss_before,
        "rss_scope": "creation + warm-up of this backend (VmHWM reset before it)"
        if reset_ok
        else "process lifetime peak",
    }
    if torch_gpu:
        memory["gpu"] = gpu_memory_mb() | {
            "torch_added_peak_mb": (torch.cuda.max_memory_allocated() - allocated_before) / 2**20
        }
    return runner, memory


def tile_row(
    target: Target,
    model: BenchModel,
    batch: int,
    samples: list[float],
    cpu: list[float],
    memory: dict[str, Any],
    notes: list[str],
    peaks: dict[str, Any],
) -> dict[str, Any]:
    """One per-tile result row from its timings (wall or device time, and process CPU time)."""
    lat = summarize(samples)
    seconds = lat["p50_ms"] / 1e3
    hr = model.config.hr_size
    gflops = 2 * model.gmac_per_tile * batch / seconds
    peak = peak_for(target, peaks)
    return {
        "kind": "tile",
        "model": model.key,
        "config": model.config.name,
        "weights": model.weights,
        "device": device_name(target.device),
        "device_type": target.device,
        "backend": target.backend,
        "precision": target.precision,
        "batch": batch,
        "resolution": model.resolution,
        "latency": lat,
        "cpu_time": summarize(cpu),
        "per_tile_p50_ms": lat["p50_ms"] / batch,
        "throughput_mpix_s": batch * hr * hr / 1e6 / seconds,
        "gflops": gflops,
        "peak_gflops": None if peak is None else peak["gflops"],
        "peak_fraction": None if peak is None else gflops / peak["gflops"],
        "memory": memory,
        "notes": notes,
    }


def tile_rows(
    targets: list[Target],
    model: BenchModel,
    batch: int,
    warmup: int,
    iters: int,
    args: argparse.Namespace,
    peaks: dict[str, Any],
    skipped: list[dict[str, str]],
) -> list[dict[str, Any]]:
    """All targets at one batch size, timed round-robin so that load changes hit every backend alike."""
    prepared: list[tuple[Target, Runner, dict[str, Any]]] = []
    try:
        for target in targets:
            log(f"[{model.key}] batch {batch}: preparing {target.label} ...")
            try:
                runner, memory = prepare(target, model, batch, warmup, args.seed)
            except Unavailable as exc:
                skipped.append({"backend": target.label, "what": f"tile batch {batch}", "reason": str(exc)})
                log(f"  skipped: {exc}")
                continue
            prepared.append((target, runner, memory))
        log(f"[{model.key}] batch {batch}: timing {len(prepared)} backends round-robin, up to {iters} rounds ...")
        samples, cpu = measure_interleaved(
            [(r.call, r.timer) for _, r, _ in prepared], iters, args.budget_s * len(prepared)
        )
    finally:
        for _, runner, _ in prepared:
            runner.close()
    rows = [
        tile_row(t, model, batch, s, c, m, r.notes, peaks)
        for (t, r, m), s, c in zip(prepared, samples, cpu, strict=True)
    ]
    for row in rows:
        log(f"  {row['backend']} {row['precision']}: p50 {row['latency']['p50_ms']:.1f} ms (n={row['latency']['n']})")
    return rows


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """speedup_vs_pytorch_fp32 = reference p50 / row p50, same model, device and batch, same run."""
    ref = {
        (r["model"], r["device_type"], r["batch"]): r["latency"]["p50_ms"]
        for r in rows
        if (r["backend"], r["precision"]) == (reference_target("cpu").backend, "fp32")
    }
    for r in rows:
        base = ref.get((r["model"], r["device_type"], r["batch"]))
        r["speedup_vs_pytorch_fp32"] = None if base is None else base / r["latency"]["p50_ms"]


def test_image(size: tuple[int, int]) -> np.ndarray:
    """The bundled sample photo resized to ``size`` (latency does not depend on content)."""
    with Image.open(SAMPLE_IMAGE) as im:
        return np.asarray(im.convert("RGB").resize(size, Image.Resampling.BICUBIC))


def image_row(
    target: Target, model: BenchModel, batch: int, img: np.ndarray, args: argparse.Namespace
) -> dict[str, Any]:
    """Whole-image latency through Upscaler, and how much of it is outside the backend.

    Loading (which includes a GPU backend's per-shape warm-up) and the first
    image are timed apart from the steady state: the first image should not
    pay per-shape set-up again.
    """
    from sr_runtime import RunStats, Upscaler
    from sr_runtime.errors import BackendUnavailable, SRModelError
    from sr_runtime.upscaler import DEFAULT_TILE_OVERLAP

    reset_ok = reset_peak_rss()
    t_load = time.perf_counter()
    try:
        up = Upscaler(
            model.model_dir,
            backend=target.backend,
            precision=target.precision,
            batch_size=batch,
            seed=args.seed,
            tile_overlap=min(DEFAULT_TILE_OVERLAP, model.config.lr_size // 8),
        )
    except (BackendUnavailable, SRModelError, ImportError, ValueError) as exc:
        raise Unavailable(str(exc).splitlines()[0]) from exc
    load_s = time.perf_counter() - t_load
    walls: list[float] = []
    shares: list[float] = []
    tiles = 0
    try:
        t_first = time.perf_counter()
        up.run(img)  # the first image: untimed for the steady state, reported apart
        first_call_ms = (time.perf_counter() - t_first) * 1e3
        for _ in range(args.image_iters):
            stats = RunStats()
            t0 = time.perf_counter()
            up.run(img, stats=stats)
            walls.append(time.perf_counter() - t0)
            shares.append(stats.backend_seconds / walls[-1])
            tiles = stats.tiles
    finally:
        _, rss_peak = rss_mb()
        gpu_mem = gpu_memory_mb() if target.device == "cuda" and torch.cuda.is_available() else None
        up.close()
    lat = summarize(walls)
    h, w = img.shape[:2]
    s = model.config.scale_factor
    backend_share = statistics.median(shares)
    return {
        "kind": "image",
        "model": model.key,
        "config": model.config.name,
        "weights": model.weights,
        "device": device_name(target.device),
        "device_type": target.device,
        "backend": up.backend,
        "precision": up.precision,
        "batch": batch,
        "resolution": f"{w}x{h}->{w * s}x{h * s}",
        "tiles": tiles,
        "tile_overlap": up.tile_overlap,
        "load_s": load_s,
        "first_call_ms": first_call_ms,
        "latency": lat,
        "throughput_mpix_s": w * s * h * s / 1e6 / (lat["p50_ms"] / 1e3),
        "backend_share": backend_share,
        "outside_backend_share": 1.0 - backend_share,
        "memory": {
            "peak_rss_mb": rss_peak,
            "rss_scope": "this Upscaler (VmHWM reset before it)" if reset_ok else "process lifetime peak",
            **({"gpu": gpu_mem} if gpu_mem else {}),
        },
        "notes": [IMAGE_NOTE],
    }


def run_model(
    model: BenchModel, targets: list[Target], args: argparse.Namespace, peaks: dict[str, Any]
) -> dict[str, Any]:
    """Every target x batch for one model, then the whole image; unavailable targets are listed with why."""
    heavy = model.gmac_per_tile > args.heavy_gmac
    batches = args.heavy_batches if heavy else args.batches
    iters = min(args.iters, args.heavy_iters) if heavy else args.iters
    warmup = min(args.warmup, 1) if heavy else args.warmup
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    par = parity(model, args.seed)
    log(f"[{model.key}] {model.config.name}, {model.weights}; {model.gmac_per_tile:.3f} GMAC/tile; parity {par}")
    for batch in batches:
        rows += tile_rows(targets, model, batch, warmup, iters, args, peaks, skipped)
    add_speedups(rows)
    if heavy:
        skipped.append(
            {
                "backend": "all",
                "what": "image",
                "reason": f"{model.gmac_per_tile:.0f} GMAC/tile > --heavy-gmac {args.heavy_gmac:g}: "
                "a whole image is ~100 tiles, too long for this device",
            }
        )
    elif not args.no_image:
        ran = {(r["backend"], r["precision"], r["device_type"]) for r in rows}
        for size in args.image:
            img = test_image(size)
            for target in (t for t in targets if not t.is_torch and (t.backend, t.precision, t.device) in ran):
                for batch in args.image_batches:
                    log(f"[{model.key}] image {size[0]}x{size[1]} {target.label} batch {batch} ...")
                    try:
                        rows.append(image_row(target, model, batch, img, args))
                    except Unavailable as exc:
                        skipped.append({"backend": target.label, "what": "image", "reason": str(exc)})
                        log(f"  skipped: {exc}")
                        break
    if not heavy and not args.no_image:
        skipped.append(
            {
                "backend": "pytorch-*",
                "what": "image",
                "reason": "no whole-image path: Upscaler runs the exported model only; other backends "
                "not measured per tile are not tried on whole images either",
            }
        )
    return {"model": model.describe() | {"parity_vs_pytorch": par}, "rows": rows, "skipped": merge_skipped(skipped)}


def merge_skipped(skipped: list[dict[str, str]]) -> list[dict[str, str]]:
    """One entry per backend and reason, listing every measurement it was skipped for."""
    merged: dict[tuple[str, str], dict[str, str]] = {}
    for s in skipped:
        key = (s["backend"], s["reason"])
        if key in merged:
            merged[key]["what"] += f", {s['what']}"
        else:
            merged[key] = dict(s)
    return list(merged.values())


def result_stem(device: str, model: BenchModel, date: str, quick: bool) -> str:
    """cpu-small-256-random-20261125 / cuda-nvidia-h100-...: device, model, weights, date."""
    weights = "" if model.trained else "-random"
    return f"{report.slug(device)}-{model.config.name}{weights}{'-quick' if quick else ''}-{date}"


DEVICES = ("cpu", "cuda")


def gpu_present(torch_cuda: bool) -> bool:
    """A CUDA GPU on this machine, as torch sees it or by its device node (onnxruntime-gpu needs no torch CUDA)."""
    return torch_cuda or any(Path("/dev").glob("nvidia[0-9]*"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = resolve(parser.parse_args(argv))
    if args.devices is not None and not args.devices <= set(DEVICES):
        parser.error(f"--devices: {', '.join(sorted(args.devices - set(DEVICES)))} is not one of {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available()
    wanted = [
        t
        for t in all_targets(cuda)
        if (args.backends is None or t.backend in args.backends) and (args.devices is None or t.device in args.devices)
    ]
    targets = wanted if gpu_present(cuda) else [t for t in wanted if t.device != "cuda"]
    if not targets:
        why = "no CUDA GPU here (torch sees none, no /dev/nvidia*)" if wanted else "no backend matches"
        print(f"benchmarks.latency: error: nothing to measure for --backends/--devices: {why}", file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.timezone.utc)
    host, vers = host_info(), versions()
    log(
        f"host: {host['cpu']}, {host['usable_cpus']} usable cores, load {host['load_average_at_start']}, "
        f"GPUs {host['gpus'] or 'none'}"
    )
    peaks = measure_peaks(cuda, args.quick)
    log("peaks: " + ", ".join(f"{k} {v['gflops']:.1f} GFLOP/s" for k, v in peaks.items()))
    written: list[Path] = []
    for name in args.models:
        model = load_model(name, args.cache, args.seed, fp16_max_gmac=0.0 if args.quick else args.heavy_gmac, log=log)
        body = run_model(model, targets, args, peaks)
        if not body["rows"]:
            reasons = "; ".join(f"{s.get('backend')}: {s.get('reason')}" for s in body["skipped"]) or "none given"
            print(f"benchmarks.latency: error: {model.key}: every backend was skipped ({reasons})", file=sys.stderr)
            return 1
        result = {
            "schema": SCHEMA,
            "created_utc": started.isoformat(timespec="seconds"),
            "mode": "quick" if args.quick else "full",
            "command": ["python", "-m", "benchmarks.latency", *(argv if argv is not None else sys.argv[1:])],
            "host": host | {"load_average_at_end": load_average()},
            "versions": vers,
            "peaks": peaks,
            "settings": {
                "batches": args.batches,
                "iters": args.iters,
                "warmup": args.warmup,
                "budget_s": args.budget_s,
                "heavy_gmac": args.heavy_gmac,
                "heavy_iters": args.heavy_iters,
                "heavy_batches": args.heavy_batches,
                "image": [list(size) for size in args.image],
                "image_iters": args.image_iters,
                "image_batches": args.image_batches,
                "temperature": 0.0,
                "seed": args.seed,
            },
            **body,
        }
        primary = "cuda" if cuda else "cpu"
        stem = result_stem(device_name(primary) if cuda else "cpu", model, started.strftime("%Y%m%d"), args.quick)
        json_path = args.out / f"{stem}.json"
        written += [json_path, report.write_result(json_path, result, report.latency_markdown(result))]
        print(report.latency_markdown(result))
    for path in written:
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
