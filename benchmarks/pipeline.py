"""``python -m benchmarks.pipeline``: a folder of photos through sr-upscale's job path, pipelined vs one at a time.

``sr_runtime.jobs.run_files`` reads and decodes the next file and encodes and
writes the previous one on helper threads while the backend runs the current
one; ``overlap=False`` does the same stages one after another. Both run here
in one process on one ``Upscaler`` per model, in interleaved rounds (the
order rotating) after an untimed warm-up, on a folder of real photos
(default: eight of scikit-image's, resized so their long side is ``--size``,
half PNG, half JPEG). Each round checks that both write the same bytes.

Reported per model: the median wall and process CPU seconds of each mode,
their ratio, and each stage's share of one file's work (read, upscale,
write) from the job's own stage times. With ``--memory-size N`` also the peak
RSS (``VmHWM``) of a fresh process per mode running one photo of long side N
twice (two files of one size: the most the pipeline can hold at once), and of
one running it once: what holding a file decoded ahead and one being written
costs.

Results go to ``--out`` (default: ``sr_bench_results`` in the temporary
directory, outside the checkout) as ``pipeline-<device>-<date>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import log, save_result, slug
from benchmarks.system import host_info, load_average, rss_mb, versions

REPO = Path(__file__).resolve().parent.parent

DEFAULT_OUT = Path(tempfile.gettempdir()) / "sr_bench_results"
#: scikit-image's colour photos (public domain or CC0, shipped with the package).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry")


def make_photos(folder: Path, size: int) -> list[Path]:
    """Eight real photos, long side `size`, alternately PNG and JPEG (quality 95)."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    arrays = [getattr(data, name)() for name in PHOTOS] + [data.stereo_motorcycle()[0]]
    paths = []
    for k, (name, array) in enumerate(zip([*PHOTOS, "motorcycle"], arrays, strict=True)):
        img = Image.fromarray(array).convert("RGB")
        scale = size / max(img.size)
        size_wh = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size_wh, Image.Resampling.LANCZOS)
        path = folder / f"{k:02d}-{name}.{'png' if k % 2 == 0 else 'jpg'}"
        img.save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))
        paths.append(path)
    return paths


def one_run(up: Any, sources: list[Path], out: Path, overlap: bool) -> tuple[float, float, list[Any]]:
    """Wall and process CPU seconds of one folder run into a fresh `out`; the outcomes."""
    from sr_runtime.jobs import FileOutcome, UpscaleOptions, run_files

    shutil.rmtree(out, ignore_errors=True)
    options = UpscaleOptions(output=str(out), quiet=True)
    outcomes: list[FileOutcome] = []
    w0, c0 = time.perf_counter(), time.process_time()
    run_files(up, sources, options, outcomes.append, overlap=overlap)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    failed = [o.failure for o in outcomes if o.status != "done"]
    if failed:
        raise SystemExit(f"files failed: {failed}")
    return wall, cpu, outcomes


def measure_model(model: str, sources: list[Path], work: Path, rounds: int) -> dict[str, Any]:
    """Both modes on one Upscaler, interleaved; outputs compared byte for byte every round."""
    from sr_runtime import Upscaler

    model_dir = None if model == "default" else model
    with Upscaler(model_dir, backend="cpu") as up:
        log(f"{up.spec.name}: warm-up ...")
        one_run(up, sources, work / "warm", overlap=False)
        times: dict[str, list[float]] = {"pipelined": [], "sequential": []}
        cpu: dict[str, list[float]] = {"pipelined": [], "sequential": []}
        stages: dict[str, list[float]] = {"read": [], "upscale": [], "write": []}
        identical = True
        for k in range(rounds):
            modes = ["pipelined", "sequential"] if k % 2 == 0 else ["sequential", "pipelined"]
            written: dict[str, dict[str, bytes]] = {}
            for mode in modes:
                log(f"{up.spec.name}: round {k + 1}/{rounds}, {mode} ...")
                out = work / mode
                wall, cpu_s, outcomes = one_run(up, sources, out, overlap=mode == "pipelined")
                times[mode].append(wall)
                cpu[mode].append(cpu_s)
                written[mode] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
                if mode == "sequential":
                    for o in outcomes:
                        for name, seconds in o.notes.stages.seconds().items():
                            stages[name].append(seconds)
            identical = identical and written["pipelined"] == written["sequential"]
        result: dict[str, Any] = {
            "model": up.spec.name,
            "kind": "fully convolutional" if up.spec.fully_convolutional else "fixed tiles",
            "backend": up.backend,
            "precision": up.precision,
            "batch_size": up.batch_size,
        }
    p50 = {mode: statistics.median(v) for mode, v in times.items()}
    cpu50 = {mode: statistics.median(v) for mode, v in cpu.items()}
    total = sum(sum(v) for v in stages.values())
    result |= {
        "wall_s": times,
        "cpu_s": cpu,
        "wall_p50_s": p50,
        "cpu_p50_s": cpu50,
        "pipelined_over_sequential": p50["pipelined"] / p50["sequential"],
        "paired_ratios": [a / b for a, b in zip(times["pipelined"], times["sequential"], strict=True)],
        "cpu_pipelined_over_sequential": cpu50["pipelined"] / cpu50["sequential"],
        "stage_share_sequential": {name: sum(v) / total for name, v in stages.items()},
        "outputs_identical": identical,
    }
    return result


def memory_child(model: str, mode: str, sources: list[Path]) -> dict[str, Any]:
    """In this fresh process: `sources` through `run_files` in `mode`; the peak RSS (MiB) and output pixels."""
    from PIL import Image

    from sr_runtime import Upscaler

    with Upscaler(None if model == "default" else model, backend="cpu") as up:
        loaded = rss_mb()[0]
        _, _, outcomes = one_run(up, sources, Path(tempfile.mkdtemp(prefix="sr-bench-mem-")), mode == "pipelined")
    pixels = 0
    for o in outcomes:
        with Image.open(o.dest) as img:
            pixels = max(pixels, img.width * img.height)
    return {
        "mode": mode,
        "files": len(sources),
        "rss_after_load_mb": loaded,
        "peak_rss_mb": rss_mb()[1],
        "out_pixels": pixels,
    }


def measure_memory(model: str, sources: list[Path]) -> dict[str, Any]:
    """Peak RSS of a fresh process per mode on `sources`, and of one doing only the first file."""
    runs: dict[str, Any] = {}
    for name, mode, files in (
        ("one file", "sequential", sources[:1]),
        ("sequential", "sequential", sources),
        ("pipelined", "pipelined", sources),
    ):
        log(f"{model}: memory, {name}, in a fresh process ...")
        cmd = [sys.executable, "-m", "benchmarks.pipeline", "--memory-child", model, mode, *map(str, files)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"memory child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    extra = runs["pipelined"]["peak_rss_mb"] - runs["one file"]["peak_rss_mb"]
    runs["pipelined_extra_bytes_per_output_pixel"] = extra * 2**20 / runs["one file"]["out_pixels"]
    return runs


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# A folder through sr-upscale's job path: pipelined vs one at a time ({r['device']})",
        "",
        f"{r['files']} real photos ({r['photos']}), "
        f"{r['when']}; load average {r['load_average_at_start']} at start, {r['load_average_at_end']} at end "
        f"(other jobs share this machine). {r['rounds']} interleaved rounds per model after a warm-up, "
        f"one `Upscaler` per model. Command: `{r['command']}`.",
        "",
        "| model | backend | wall p50 pipelined s | wall p50 one at a time s | ratio (p50; per round) | CPU s ratio "
        "| read / upscale / write share | same bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in r["models"]:
        share = m["stage_share_sequential"]
        paired = ", ".join(f"{x:.3f}" for x in m["paired_ratios"])
        lines.append(
            f"| {m['model']} ({m['kind']}) | {m['backend']} {m['precision']}, batch {m['batch_size']} "
            f"| {m['wall_p50_s']['pipelined']:.2f} | {m['wall_p50_s']['sequential']:.2f} "
            f"| {m['pipelined_over_sequential']:.3f} ({paired}) | {m['cpu_pipelined_over_sequential']:.3f} "
            f"| {share['read']:.1%} / {share['upscale']:.1%} / {share['write']:.1%} "
            f"| {'yes' if m['outputs_identical'] else 'NO'} |"
        )
    lines += [
        "",
        "ratio = pipelined / one at a time (below 1: the pipeline is faster); CPU s = process CPU time, all "
        "threads; shares = each stage's part of the files' own work in the one-at-a-time runs.",
    ]
    with_memory = [m for m in r["models"] if "memory" in m]
    if with_memory:
        lines += [
            "",
            f"Memory (`--memory-size {r['memory_size']}`: {r['memory_files']}), peak RSS (`VmHWM`) of a fresh "
            "process per row:",
            "",
            "| model | one file MiB | both, one at a time MiB | both, pipelined MiB | pipelining adds, bytes per "
            "output pixel |",
            "|---|---|---|---|---|",
        ]
        for m in with_memory:
            mem = m["memory"]
            lines.append(
                f"| {m['model']} | {mem['one file']['peak_rss_mb']:.0f} | {mem['sequential']['peak_rss_mb']:.0f} "
                f"| {mem['pipelined']['peak_rss_mb']:.0f} | {mem['pipelined_extra_bytes_per_output_pixel']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models",
        default="default",
        help="comma-separated: default (the shipped model) or model directories (default: default)",
    )
    p.add_argument("--photos", type=Path, default=None, help="a folder of images (default: eight made here)")
    p.add_argument("--size", type=int, default=160, help="long side of the made photos, px (default 160)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per model (default 3)")
    p.add_argument(
        "--memory-size", type=int, default=0, help="also peak RSS on two photos of this long side (default 0: no)"
    )
    p.add_argument("--device-name", default="cpu", help="device name for the result file (default cpu)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results directory (default {DEFAULT_OUT})")
    p.add_argument("--memory-child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        model, mode, *files = args.memory_child
        print(json.dumps(memory_child(model, mode, [Path(f) for f in files])))
        return 0
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    host = host_info()
    with tempfile.TemporaryDirectory(prefix="sr-bench-pipeline-") as tmp:
        work = Path(tmp)
        if args.photos is None:
            sources = make_photos(work / "photos", args.size)
        else:
            sources = sorted(q for q in args.photos.iterdir() if q.is_file())
        models = [measure_model(m, sources, work, args.rounds) for m in args.models.split(",")]
        if args.memory_size:
            first = make_photos(work / "big", args.memory_size)[0]
            big = [first, Path(shutil.copy(first, first.with_name("copy-" + first.name)))]  # same size: the worst case
            for name, m in zip(args.models.split(","), models, strict=True):
                m["memory"] = measure_memory(name, big)
    result: dict[str, Any] = {
        "schema": "vdvae-sr-pipeline/1",
        "device": args.device_name,
        "files": len(sources),
        "photos": (
            f"scikit-image, long side {args.size} px, half PNG, half JPEG" if args.photos is None else str(args.photos)
        ),
        "rounds": args.rounds,
        "memory_size": args.memory_size,
        "memory_files": "one scikit-image photo (PNG) twice",
        "models": models,
        "command": "python -m benchmarks.pipeline " + " ".join(sys.argv[1:] if argv is None else argv),
        "host": host,
        "versions": versions(),
        "load_average_at_start": host["load_average_at_start"],
        "load_average_at_end": load_average(),
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    save_result(args.out, f"pipeline-{slug(args.device_name)}-{dt.date.today():%Y%m%d}", result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
