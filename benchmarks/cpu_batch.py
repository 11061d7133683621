"""``python -m benchmarks.cpu_batch``: the CPU batch size of ``Upscaler`` against wall time and peak memory.

On one real photo (default: scikit-image's ``rocket``, 640x427; ``--crop WxH``
takes its centre), with the model (default: the shipped one) on ONNX Runtime
CPU, for each batch size (default 1, 2, 4, 8, 16):

* **time**: one process holds an ``Upscaler`` per batch size; after a warm-up
  run each, ``--runs`` rounds run the photo once per batch size, the order
  rotating every round, so load drift on a shared machine hits every batch
  size alike. Wall and process CPU seconds; the median per batch size, and
  its time relative to the fastest one's *in the same round*, the median over
  rounds (load spikes on a shared machine move a whole round, not one batch
  size, so this ratio is steadier than the ratio of medians); the fastest is
  judged by the same paired ratios.
* **memory**: a fresh process per batch size does what ``sr-upscale`` does
  for one file (``sr_runtime.jobs.upscale_file``: decode, upscale, write a
  PNG) on the photo twice, then reads its peak RSS: the kernel's high-water
  mark of that process image (``VmHWM``; the whole process: interpreter,
  libraries, the session and its arena, the images), beside
  ``resource.getrusage`` ``ru_maxrss`` (Linux carries that one over ``exec``
  from the spawning process, so the parent imports nothing heavy before its
  children run). With ``--memory-crop WxH`` the same process then does a
  larger centre crop of the photo (or all of it: ``--memory-crop full``): the
  slope between the two peaks is the memory per output
  pixel, and what is left at zero pixels is the session's own (with the
  interpreter). The leanest batch within 5% of the fastest is named; at it
  one more process measures the same with ``--samples`` 2 at temperature 0.5.

Results go to ``--out`` (default: ``sr_bench_results`` in the temporary
directory, outside the checkout) as ``cpu-batch-<device>-<model>-<date>.json``
and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.report import log, positive_ints, save_result, slug
from benchmarks.system import load_average, rss_mb

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(tempfile.gettempdir()) / "sr_bench_results"
#: Batch sizes within this share of the fastest median count as "as fast" when picking the leanest.
AS_FAST = 0.05


def default_photo() -> Path:
    """scikit-image's rocket (NASA, public domain; 640x427): a real photo that ships with a dev dependency."""
    from skimage import data

    return Path(data.__file__).parent / "rocket.jpg"


def parse_crop(text: str) -> tuple[int, int]:
    """'456x232' -> (width, height)."""
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def parse_memory_crop(text: str) -> tuple[int, int] | str:
    """'440x328' -> (440, 328); 'full' -> the whole photo."""
    return "full" if text == "full" else parse_crop(text)


def load_image(path: Path, crop: tuple[int, int] | None) -> Any:
    """The photo as RGB, centre-cropped to `crop` (WxH) when given."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    if crop is None:
        return img
    w, h = crop
    left, top = (img.width - w) // 2, (img.height - h) // 2
    return img.crop((left, top, left + w, top + h))


def time_batches(args: argparse.Namespace) -> dict[int, dict[str, Any]]:
    """Every batch size's Upscaler in this process, timed in interleaved rounds after a warm-up each."""
    from benchmarks.timing import host_timer, measure_interleaved
    from sr_runtime import RunStats, Upscaler

    img = load_image(args.image, args.crop)
    ups = {b: Upscaler(args.model, backend="cpu", batch_size=b) for b in args.batches}
    calls: dict[int, int] = {}
    tiles = 0
    for batch, up in ups.items():
        log(f"time: warm-up at batch {batch} ...")
        stats = RunStats()
        up.run(img, stats=stats)
        calls[batch], tiles = stats.batches, stats.tiles
    log(f"time: {args.runs} interleaved rounds of {len(ups)} batch sizes, {tiles} tiles each ...")
    wall, cpu = measure_interleaved(
        [(lambda up=up: up.run(img), host_timer) for up in ups.values()], args.runs, budget_s=1e9
    )
    return {
        b: {"calls": calls[b], "tiles": tiles, "wall_s": w, "cpu_s": c} for b, w, c in zip(ups, wall, cpu, strict=True)
    }


def memory_child(args: argparse.Namespace) -> dict[str, Any]:
    """One batch size in this fresh process: sr-upscale's job on the photo twice (and the larger photo)."""
    from sr_runtime import Upscaler
    from sr_runtime.jobs import UpscaleOptions, upscale_file

    src = Path(tempfile.mkdtemp(prefix="sr-bench-batch-"))
    photo = src / "photo.png"
    img = load_image(args.image, args.crop)
    img.save(photo)
    out: dict[str, Any] = {"rss_after_imports_mb": rss_mb()[0]}
    up = Upscaler(args.model, backend="cpu", batch_size=args.batch, temperature=args.temperature)
    out["rss_after_load_mb"] = rss_mb()[0]
    options = UpscaleOptions(samples=args.samples, quiet=True)
    for _ in range(2):
        notes = upscale_file(up, photo, (src / "photo_x4.png",), options)
    out["out_pixels"] = 16 * img.width * img.height
    out["tiles"] = notes.tiles
    out["peak_rss_mb"] = rss_mb()[1]
    out["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.memory_crop is not None:
        big = load_image(args.image, None if args.memory_crop == "full" else args.memory_crop)
        big.save(src / "big.png")
        upscale_file(up, src / "big.png", (src / "big_x4.png",), options)
        out["memory_image"] = {"out_pixels": 16 * big.width * big.height, "peak_rss_mb": rss_mb()[1]}
    return out


def run_memory_child(args: argparse.Namespace, batch: int, samples: int = 1) -> dict[str, Any]:
    """`memory_child` for one batch size in a fresh interpreter (niced as this one is)."""
    cmd = [sys.executable, "-m", "benchmarks.cpu_batch", "--child", "--batch", str(batch), "--image", str(args.image)]
    if samples > 1:
        cmd += ["--samples", str(samples), "--temperature", "0.5"]
    if args.model is not None:
        cmd += ["--model", str(args.model)]
    if args.crop is not None:
        cmd += ["--crop", f"{args.crop[0]}x{args.crop[1]}"]
    if args.memory_crop is not None:
        cmd += ["--memory-crop", "full" if args.memory_crop == "full" else "x".join(map(str, args.memory_crop))]
    log(f"memory: batch {batch}{f', {samples} samples' if samples > 1 else ''} in a fresh process ...")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"batch {batch}: the memory child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if "memory_image" in result:
        small, big = result, result["memory_image"]
        slope = (big["peak_rss_mb"] - small["peak_rss_mb"]) * 2**20 / (big["out_pixels"] - small["out_pixels"])
        result["bytes_per_output_pixel"] = slope
        result["rss_at_zero_pixels_mb"] = small["peak_rss_mb"] - slope * small["out_pixels"] / 2**20
    return result


def paired_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's `vs_fastest`: the median over rounds of its wall time over the fastest row's in that round.

    The fastest is judged round by round as well: the row whose time, paired
    with any other row's round by round, is at most a median ratio above it
    the least (a minimax, since medians of ratios need not be transitive).
    """

    def median_ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
        return statistics.median(x / y for x, y in zip(a["wall_s"], b["wall_s"], strict=True))

    fastest = min(rows, key=lambda r: max(median_ratio(r, other) for other in rows))
    for r in rows:
        r["vs_fastest"] = median_ratio(r, fastest)


def leanest_as_fast(rows: list[dict[str, Any]]) -> int:
    """The batch size with the lowest peak RSS among those within AS_FAST of the fastest (`vs_fastest`)."""
    candidates = [r for r in rows if r["vs_fastest"] <= 1 + AS_FAST]
    return int(min(candidates, key=lambda r: (r["memory"]["peak_rss_mb"], r["batch"]))["batch"])


def markdown(r: dict[str, Any]) -> str:
    """The table, the pick, and how it was measured."""
    w, h = r["lr"]
    lines = [
        f"# CPU batch size: {r['model']} on {r['device']}",
        "",
        f"{r['photo']} ({w}x{h} LR -> {4 * w}x{4 * h}, {r['tiles']} tiles), ONNX Runtime CPU fp32, temperature 0, "
        f"{r['when']}; load average {r['load_average_at_start']} at start, {r['load_average_at_end']} at end "
        "(other jobs share this machine: compare rows with each other, not with other files). Time: one "
        f"process, an Upscaler per batch size, {r['runs']} interleaved rounds after a warm-up each. Memory: "
        f"a fresh process per batch size, sr-upscale's job on the photo twice. Command: `{r['command']}`.",
        "",
        "| batch | calls | wall p50 s | vs fastest, per round | CPU s p50 | ms/tile (wall) | peak RSS MiB "
        "| ru_maxrss MiB | RSS after load MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        m = row["memory"]
        lines.append(
            f"| {row['batch']} | {row['calls']} | {row['wall_p50_s']:.2f} | {row['vs_fastest']:.3f}x "
            f"| {row['cpu_p50_s']:.2f} | {1e3 * row['wall_p50_s'] / row['tiles']:.0f} | {m['peak_rss_mb']:.0f} "
            f"| {m['ru_maxrss_mb']:.0f} | {m['rss_after_load_mb']:.0f} |"
        )
    lines += [
        "",
        f"Leanest batch within {AS_FAST:.0%} of the fastest: **{r['leanest_as_fast']}**.",
        "",
        "vs fastest, per round = the median over rounds of this batch size's wall time over that of the "
        "fastest batch size in the same round (a round runs every batch size back to back; the fastest is the "
        "one no other beats by a median ratio, or beats least);",
        "peak RSS = the memory process's high-water mark (`VmHWM`) after two runs of sr-upscale's job on the "
        "photo (interpreter, numpy/Pillow, the ONNX Runtime session and its arena, the images, the PNG); "
        "ru_maxrss = `resource.getrusage` at the same point; RSS after load = after `Upscaler()`, before any "
        "image; CPU s = process CPU time, both threads (it counts ONNX Runtime's spin-waiting as work).",
    ]
    with_slope = [(str(row["batch"]), row["memory"]) for row in r["rows"] if "bytes_per_output_pixel" in row["memory"]]
    if "samples" in r:
        with_slope.append((f"{r['leanest_as_fast']}, 2 samples at t = 0.5", r["samples"]))
    if with_slope:
        mw, mh = r["memory_image_lr"]
        lines += [
            "",
            f"Memory per output pixel: the slope of peak RSS from that crop to a {mw}x{mh} one "
            f"(-> {4 * mw}x{4 * mh}) in the same process:",
            "",
            "| batch | peak RSS MiB there | bytes per output pixel | MiB at zero pixels (session, interpreter) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {m['memory_image']['peak_rss_mb']:.0f} | {m['bytes_per_output_pixel']:.1f} "
            f"| {m['rss_at_zero_pixels_mb']:.0f} |"
            for name, m in with_slope
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.cpu_batch", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped one)")
    p.add_argument("--image", type=Path, default=None, help="the photo (default: scikit-image's rocket.jpg)")
    p.add_argument("--crop", type=parse_crop, default=None, help="centre crop WxH of the photo (default: all of it)")
    p.add_argument(
        "--memory-crop",
        type=parse_memory_crop,
        default=None,
        help="a larger centre crop WxH of the photo (or full) for the per-pixel memory slope",
    )
    p.add_argument("--batches", type=positive_ints, default=[1, 2, 4, 8, 16], help="default 1,2,4,8,16")
    p.add_argument("--runs", type=int, default=4, help="interleaved timed rounds after the warm-up (default 4)")
    p.add_argument("--device-name", default="cpu", help="device name for the result file (default cpu)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results directory (default {DEFAULT_OUT})")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--samples", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--temperature", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.image = args.image or default_photo()
    if args.child:
        print(json.dumps(memory_child(args)))
        return 0
    if args.runs < 1:
        p.error("--runs must be >= 1")
    load_at_start = load_average()
    # Memory first, in fresh processes spawned while this one is still small (ru_maxrss carries over exec).
    memory = {b: run_memory_child(args, b) for b in args.batches}
    timed = time_batches(args)
    rows = []
    for b in args.batches:
        t = timed[b]
        rows.append(
            {
                "batch": b,
                "calls": t["calls"],
                "tiles": t["tiles"],
                "wall_s": t["wall_s"],
                "cpu_s": t["cpu_s"],
                "wall_p50_s": statistics.median(t["wall_s"]),
                "cpu_p50_s": statistics.median(t["cpu_s"]),
                "memory": memory[b],
            }
        )
    paired_ratios(rows)
    pick = leanest_as_fast(rows)
    from benchmarks.system import host_info, versions
    from sr_runtime.model import load_model_spec

    img = load_image(args.image, args.crop)
    result: dict[str, Any] = {
        "schema": "vdvae-sr-cpu-batch/2",
        "model": load_model_spec(args.model).name,
        "device": args.device_name,
        "photo": args.image.name,
        "lr": list(img.size),
        "tiles": rows[0]["tiles"],
        "runs": args.runs,
        "rows": rows,
        "leanest_as_fast": pick,
        "command": "python -m benchmarks.cpu_batch " + " ".join(sys.argv[1:] if argv is None else argv),
        "host": host_info(),
        "versions": versions(),
        "load_average_at_start": load_at_start,
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if args.memory_crop is not None:
        result["samples"] = run_memory_child(args, pick, samples=2)
        big = load_image(args.image, None if args.memory_crop == "full" else args.memory_crop)
        result["memory_image_lr"] = list(big.size)
    result["load_average_at_end"] = load_average()
    stem = f"cpu-batch-{slug(args.device_name)}-{result['model']}-{dt.date.today():%Y%m%d}"
    save_result(args.out, stem, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
