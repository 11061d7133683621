"""``python -m benchmarks.frames``: whole frames vs tiles through ``Upscaler`` on a fully convolutional model.

For one LR frame size (default 640x480 -> 2560x1920) on one device:

* **model**: the model's own ONNX Runtime time for exactly those pixels (one
  session call on the stride-padded frame, float32 input already in place);
* **whole**: ``Upscaler.run`` on a uint8 HxWx3 array, end to end (decode,
  padding, the call, crop, quantisation), and its ratio to *model*: the cost
  of everything around the model (goal <= 1.15x);
* **tiled**: the same with ``frame_pixels`` forcing large tiles overlapped by
  the receptive radius (what a frame too large for memory costs);
* **stream**: frames/s of ``Upscaler.run_frames`` over a sequence of frames of
  one shape (steady state: noise, buffers and, on a GPU, the CUDA graph are
  per shape);
* on a GPU with ``--torch``: PyTorch FP16 channels-last with a captured CUDA
  graph, the same architecture (random weights: cost only).

Results go to ``--out`` as ``frames-<device>-<model>-<date>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import log
from benchmarks.system import host_info, rss_mb, versions
from benchmarks.timing import host_timer, measure_interleaved

REPO = Path(__file__).resolve().parent.parent


def parse_size(text: str) -> tuple[int, int]:
    """'640x480' -> (width, height)."""
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def timed(call: Callable[[], object], iters: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `iters` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        out.append(time.perf_counter() - t0)
    return out


def ensure_model(model_dir: Path) -> Path:
    """The fc-256 benchmark model: exported with random weights into `model_dir` when missing (needs torch)."""
    if (model_dir / "manifest.json").is_file():
        return model_dir
    from sr_export.cli import main as export_main

    log(f"exporting an untrained fc-256 into {model_dir} (cost model, random weights) ...")
    rc = export_main(["--preset", "fc-256", "--random-weights", "--out", str(model_dir), "--engine", "off"])
    if rc != 0:
        raise SystemExit(f"sr-export failed with {rc}")
    return model_dir


def model_call(up: Any, lr_hw: tuple[int, int]) -> Callable[[], object]:
    """The backend call alone on the padded frame, through the same backend object the Upscaler uses."""
    m = up.spec.lr_multiple
    h, w = (-(-lr_hw[0] // m) * m, -(-lr_hw[1] // m) * m)
    lr = np.random.default_rng(0).random((1, 3, h, w), dtype=np.float32)
    t = up.temperature
    noise = {} if t == 0 else up._noise_maps.window((h, w), up.seed, t, 0, 0, 0, h, w)
    backend = up._frame_backend(t == 0)
    return lambda: backend.run(lr, noise)


def whole_frame_rounds(
    model_dir: Path, backend: str, args: argparse.Namespace, img: np.ndarray, result: dict[str, Any]
) -> tuple[list[list[float]], list[list[float]]]:
    """Model alone, `Upscaler.run` and a `run_frames` stream, interleaved: (wall, CPU) seconds of each."""
    from sr_runtime import RunStats, Upscaler

    h, w = img.shape[:2]
    with Upscaler(
        model_dir, backend=backend, precision=args.precision, temperature=args.temperature, prefer_nhwc=args.nhwc
    ) as up:
        result["backend"], result["precision_used"] = up.backend, up.precision
        log(f"model call alone and Upscaler.run whole frame, {w}x{h} LR, interleaved ({args.iters} rounds) ...")
        stats = RunStats()
        model, whole = model_call(up, (h, w)), (lambda: up.run(img, stats=stats))
        model(), whole()  # warm-up: arena growth, noise maps, CUDA graph capture
        result["whole_calls_per_image"] = stats.batches

        def stream() -> None:
            for _ in up.run_frames(img for _ in range(args.stream)):
                pass

        # Round-robin so the load drift of a shared machine hits all alike; CPU seconds drift less still.
        return measure_interleaved(
            [(model, host_timer), (whole, host_timer), (stream, host_timer)], args.iters, budget_s=1e9
        )


def torch_cuda_graph_seconds(manifest: dict[str, Any], lr_hw: tuple[int, int], iters: int) -> dict[str, Any]:
    """PyTorch FP16 channels-last, deterministic path, replayed as one CUDA graph (random weights: cost only)."""
    import torch

    from sr_train.model import VDVAESR, VDVAESRConfig

    model = VDVAESR(VDVAESRConfig.from_dict(manifest["model_config"])).eval().cuda().half()
    model = model.to(memory_format=torch.channels_last)
    m = manifest["lr_multiple"]
    h, w = (-(-lr_hw[0] // m) * m, -(-lr_hw[1] // m) * m)
    lr = torch.rand(1, 3, h, w, device="cuda", dtype=torch.half).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(3):
            model.sample(lr, None)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model.sample(lr, None)

    def replay() -> None:
        graph.replay()
        torch.cuda.synchronize()

    torch.cuda.reset_peak_memory_stats()
    samples = timed(replay, iters)
    return {
        "p50_ms": 1e3 * statistics.median(samples),
        "min_ms": 1e3 * min(samples),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from sr_runtime import RunStats, Upscaler

    model_dir = ensure_model(args.model)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    w, h = args.image
    img = (np.random.default_rng(1).random((h, w, 3)) * 255).astype(np.uint8)
    backend = "cpu" if args.device == "cpu" else "cuda"
    result: dict[str, Any] = {
        "schema": "vdvae-sr-frames/1",
        "model": manifest["name"],
        "model_config": manifest["model_config"]["name"],
        "random_weights": bool(manifest["checkpoint"].get("random_weights")),
        "device": args.device,
        "lr": [w, h],
        "hr": [4 * w, 4 * h],
        "temperature": args.temperature,
        "precision": args.precision,
        "command": "python -m benchmarks.frames " + " ".join(sys.argv[1:]),
        "host": host_info(),
        "versions": versions(),
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    # In a function of its own: its Upscaler (session, memory arena) is gone before the tiled run's.
    (model_s, whole_s, stream_s), (model_cpu, whole_cpu, stream_cpu) = whole_frame_rounds(
        model_dir, backend, args, img, result
    )
    with Upscaler(
        model_dir,
        backend=backend,
        precision=args.precision,
        temperature=args.temperature,
        frame_pixels=args.tiled_pixels,
        prefer_nhwc=args.nhwc,
    ) as tiled:
        log(f"Upscaler.run tiled, frame_pixels {args.tiled_pixels} ({args.tiled_iters} iters) ...")
        stats = RunStats()
        tiled.run(img, stats=stats)  # warm-up
        result["tiled_calls_per_image"] = stats.batches
        (tiled_s,), (tiled_cpu,) = measure_interleaved(
            [(lambda: tiled.run(img), host_timer)], args.tiled_iters, budget_s=1e9
        )
    model_p50, whole_p50 = statistics.median(model_s), statistics.median(whole_s)
    result.update(
        {
            "model_s": model_s,
            "whole_s": whole_s,
            "tiled_s": tiled_s,
            "model_cpu_s": model_cpu,
            "whole_cpu_s": whole_cpu,
            "whole_over_model_cpu": statistics.median(whole_cpu) / statistics.median(model_cpu),
            "whole_over_model_paired": statistics.median(a / b for a, b in zip(whole_s, model_s, strict=True)),
            "model_p50_s": model_p50,
            "rounds": len(model_s),
            "whole_p50_s": whole_p50,
            "tiled_p50_s": statistics.median(tiled_s),
            "whole_over_model": whole_p50 / model_p50,
            "tiled_over_whole": statistics.median(tiled_s) / whole_p50,
            "stream_frames": args.stream,
            "stream_s": stream_s,
            "stream_cpu_s": stream_cpu,
            "tiled_cpu_s": tiled_cpu,
            "stream_fps": args.stream / statistics.median(stream_s),
            "stream_over_model_cpu": statistics.median(stream_cpu) / args.stream / statistics.median(model_cpu),
            "tiled_over_model_cpu": statistics.median(tiled_cpu) / statistics.median(model_cpu),
            "peak_rss_mb": round(rss_mb()[1]),
        }
    )
    if args.torch and args.device == "cuda":
        log("PyTorch FP16 channels-last + CUDA graph ...")
        result["torch_cuda_graph"] = torch_cuda_graph_seconds(manifest, (h, w), args.iters)
    return result


def markdown(r: dict[str, Any]) -> str:
    """One page: the setup and a table of the paths, side by side."""
    w, h = r["lr"]
    lines = [
        f"# Whole frames vs tiles: {r['model_config']} ({'random weights' if r['random_weights'] else 'trained'})",
        "",
        f"{w}x{h} -> {4 * w}x{4 * h}, device {r['device']} ({r['host']['cpu']}; GPUs: {r['host']['gpus'] or 'none'}), "
        f"backend {r['backend']} {r['precision_used']}, temperature {r['temperature']:g}, "
        f"load average at start {r['host']['load_average_at_start']}, {r['when']}; {r['rounds']} interleaved "
        f"rounds after a warm-up. Command: `{r['command']}`.",
        "",
        "| path | p50 | calls per image | vs model |",
        "|---|---|---|---|",
        f"| model alone (one ORT call, padded frame) | {r['model_p50_s']:.3f} s | 1 | 1.00x |",
        f"| `Upscaler.run`, whole frame (uint8 in/out) | {r['whole_p50_s']:.3f} s | {r['whole_calls_per_image']} "
        f"| {r['whole_over_model']:.3f}x (per round {r['whole_over_model_paired']:.3f}x, "
        f"CPU seconds {r['whole_over_model_cpu']:.3f}x) |",
        f"| `Upscaler.run`, tiled | {r['tiled_p50_s']:.3f} s | {r['tiled_calls_per_image']} "
        f"| {r['tiled_p50_s'] / r['model_p50_s']:.2f}x (CPU seconds {r['tiled_over_model_cpu']:.2f}x) |",
        f"| `Upscaler.run_frames`, {r['stream_frames']} frames | {1 / r['stream_fps']:.3f} s/frame | 1 | "
        f"{1 / r['stream_fps'] / r['model_p50_s']:.3f}x (CPU seconds {r['stream_over_model_cpu']:.3f}x) |",
    ]
    if "torch_cuda_graph" in r:
        t = r["torch_cuda_graph"]
        lines.append(
            f"| PyTorch fp16 channels-last + CUDA graph | {t['p50_ms'] / 1e3:.4f} s | 1 | "
            f"{t['p50_ms'] / 1e3 / r['model_p50_s']:.2f}x |"
        )
    lines += ["", f"Peak RSS {r['peak_rss_mb']} MB. Raw samples in the JSON beside this page.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.frames", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        type=Path,
        default=Path("/tmp/sr_bench_cache/fc-256-random"),
        help="a fully convolutional model directory (exported there with random weights if missing)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--image", type=parse_size, default=(640, 480), help="LR frame WxH (default 640x480)")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16"), default="auto")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--tiled-iters", type=int, default=1)
    p.add_argument("--tiled-pixels", type=int, default=512 * 512, help="frame_pixels of the tiled run")
    p.add_argument("--stream", type=int, default=3, help="frames in the run_frames stream")
    p.add_argument("--nhwc", action="store_true", help="ONNX Runtime CUDA prefer_nhwc")
    p.add_argument("--torch", action="store_true", help="also PyTorch fp16 + CUDA graph (GPU only)")
    p.add_argument("--device-name", default=None, help="device name for the result file (default: from the host)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    result = run(args)
    name = args.device_name or (
        result["host"]["gpus"][0] if args.device == "cuda" and result["host"]["gpus"] else "cpu"
    )
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    stem = f"frames-{slug}-{result['model_config']}-{dt.date.today():%Y%m%d}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    log(f"wrote {args.out / stem}.json/.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
