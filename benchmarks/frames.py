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
* **fixed-size model, tiled** (``--fixed-model``, e.g. ``default``): the same
  image through a fixed-size model's tiles (overlapped, blended on the host),
  for the side-by-side the whole-frame path replaces;
* with ``--torch``: the same model in PyTorch from its checkpoint (the model
  directory's ``checkpoint/``, else random weights of its config), replayed as
  a CUDA graph on a GPU (fp16 channels-last or fp32, as ``--precision``),
  eager on the CPU.

Every row also gets its GFLOP/s (multiply-accumulates of the padded frame,
counted by torch's FLOP counter) and the share of a matmul peak measured in the
same run, and on a GPU the device memory the run took (nvidia-smi's
memory.used, sampled, peak minus before). Results go to ``--out`` as
``frames-<device>-<model>-<date>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import log, save_result, slug
from benchmarks.system import host_info, matmul_peak, rss_mb, versions
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


def model_call(up: Any, lr_hw: tuple[int, int]) -> tuple[Callable[[], object], str]:
    """The model's own call on the padded frame, through the backend object the Upscaler uses, and what it is.

    On a backend with bound device buffers that is the bound session's run
    alone (inputs already on the device, no copies); elsewhere `run` with a
    float32 frame in host memory.
    """
    m = up.spec.lr_multiple
    h, w = (-(-lr_hw[0] // m) * m, -(-lr_hw[1] // m) * m)
    lr = np.random.default_rng(0).random((1, 3, h, w), dtype=np.float32)
    t = up.temperature
    noise = {} if t == 0 else up._noise_maps.window((h, w), up.seed, t, 0, 0, 0, h, w)
    backend = up._frame_backend(t == 0)
    backend.run(lr, noise)  # the shape's session and buffers
    bound = getattr(backend, "_shapes", {}).get((1, 3, h, w))
    if bound is not None:
        return bound.run, "the bound session's run alone, inputs on the device"
    return (lambda: backend.run(lr, noise)), "one backend call, float32 frame from and to host memory"


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
        result["uint8_io"] = up._uint8_io
        log(f"model call alone and Upscaler.run whole frame, {w}x{h} LR, interleaved ({args.iters} rounds) ...")
        stats = RunStats()
        model, result["model_call"] = model_call(up, (h, w))

        def whole() -> None:
            up.run(img, stats=stats)

        model(), whole()  # warm-up: arena growth, noise maps, CUDA graph capture
        result["whole_calls_per_image"] = stats.batches

        def stream() -> None:
            for _ in up.run_frames(img for _ in range(args.stream)):
                pass

        # Round-robin so the load drift of a shared machine hits all alike; CPU seconds drift less still.
        rounds = measure_interleaved(
            [(model, host_timer), (whole, host_timer), (stream, host_timer)], args.iters, budget_s=1e9
        )
        result["cuda_graphs"] = getattr(up._frame_backend(up.temperature == 0), "graphs_captured", None)
        return rounds


def padded(lr_hw: tuple[int, int], multiple: int) -> tuple[int, int]:
    """The LR frame rounded up to the model's stride, as the runtime pads it."""
    return -(-lr_hw[0] // multiple) * multiple, -(-lr_hw[1] // multiple) * multiple


def torch_model(manifest: dict[str, Any], checkpoint: Path | None) -> tuple[Any, str]:
    """The model in PyTorch: from `checkpoint` when given, else random weights of the manifest's config."""
    from sr_train.model import VDVAESR, VDVAESRConfig

    if checkpoint is not None:
        from sr_train.checkpoint import load_checkpoint

        model, _ = load_checkpoint(checkpoint)
        return model.eval(), f"checkpoint {checkpoint}"
    return VDVAESR(VDVAESRConfig.from_dict(manifest["model_config"])).eval(), "random weights"


def frame_gmac(manifest: dict[str, Any], lr_hw: tuple[int, int]) -> float:
    """Multiply-accumulates of one deterministic call on the padded frame, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sr_train.model import VDVAESR, VDVAESRConfig

    with torch.device("meta"):
        model = VDVAESR(VDVAESRConfig.from_dict(manifest["model_config"])).eval()
        lr = torch.zeros(1, 3, *padded(lr_hw, manifest["lr_multiple"]))
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model.sample(lr, None)
    return float(counter.get_total_flops()) / 2 / 1e9


def torch_seconds(
    manifest: dict[str, Any], checkpoint: Path | None, lr_hw: tuple[int, int], iters: int, device: str, precision: str
) -> dict[str, Any]:
    """PyTorch, deterministic path: on a GPU one captured CUDA graph (fp16 channels-last, or fp32), eager on the CPU."""
    import torch

    model, weights = torch_model(manifest, checkpoint)
    half = device == "cuda" and precision == "fp16"
    dtype = torch.half if half else torch.float32
    model = model.to(device=device, dtype=dtype)
    fmt = torch.channels_last if half else torch.contiguous_format
    model = model.to(memory_format=fmt)
    lr = torch.rand(1, 3, *padded(lr_hw, manifest["lr_multiple"]), device=device, dtype=dtype)
    lr = lr.contiguous(memory_format=fmt)
    with torch.no_grad():
        if device == "cuda":
            for _ in range(3):
                model.sample(lr, None)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model.sample(lr, None)

            def call() -> None:
                graph.replay()
                torch.cuda.synchronize()

            torch.cuda.reset_peak_memory_stats()
        else:

            def call() -> None:
                model.sample(lr, None)

        samples = timed(call, iters)
    out = {
        "path": (
            f"PyTorch {'fp16 channels-last' if half else 'fp32'} + CUDA graph"
            if device == "cuda"
            else "PyTorch fp32 eager (CPU)"
        ),
        "weights": weights,
        "p50_ms": 1e3 * statistics.median(samples),
        "min_ms": 1e3 * min(samples),
    }
    if device == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


class GpuMemory:
    """Device memory in use, sampled from nvidia-smi on a thread: the peak a run reached above where it began.

    ONNX Runtime reports no peak of its own; its arena keeps what it took, so
    sampling every 50 ms catches the high-water mark.
    """

    def __init__(self) -> None:
        self.available = shutil.which("nvidia-smi") is not None
        self.before = self.peak = self._used() if self.available else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True) if self.available else None

    @staticmethod
    def _used() -> int | None:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "--id=0"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
            return int(out.split()[0])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            used = self._used()
            if used is not None and self.peak is not None:
                self.peak = max(self.peak, used)

    def __enter__(self) -> GpuMemory:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def report(self) -> dict[str, Any]:
        if self.before is None or self.peak is None:
            return {"peak_mb": None, "why": "no nvidia-smi here (CPU run)"}
        return {
            "peak_mb": self.peak - self.before,
            "method": "nvidia-smi memory.used every 50 ms, peak minus before the run (whole GPU, MiB)",
        }


def fixed_model_seconds(args: argparse.Namespace, backend: str, img: np.ndarray) -> dict[str, Any]:
    """A fixed-size model (tiles, host blending) on the same image: its `Upscaler.run` p50."""
    from sr_runtime import RunStats, Upscaler

    with Upscaler(args.fixed_model, backend=backend, precision=args.precision) as up:
        if up.spec.fully_convolutional:
            raise SystemExit(f"--fixed-model {args.fixed_model}: {up.spec.name} is fully convolutional, not fixed-size")
        log(f"fixed-size model {up.spec.name} ({up.backend} {up.precision}), tiled, {args.tiled_iters} iters ...")
        stats = RunStats()
        up.run(img, stats=stats)  # warm-up
        samples = timed(lambda: up.run(img), args.tiled_iters, warmup=0)
        return {
            "model": up.spec.name,
            "backend": up.backend,
            "precision": up.precision,
            "tiles_per_image": stats.tiles,
            "calls_per_image": stats.batches,
            "p50_s": statistics.median(samples),
            "samples_s": samples,
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
    with GpuMemory() as memory:
        (model_s, whole_s, stream_s), (model_cpu, whole_cpu, stream_cpu) = whole_frame_rounds(
            model_dir, backend, args, img, result
        )
    result["whole_frame_gpu_memory"] = memory.report()
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
    if args.fixed_model:
        result["fixed_model"] = fixed_model_seconds(args, backend, img)
    precision = result["precision_used"]
    if args.torch:
        checkpoint = args.checkpoint or (model_dir / "checkpoint")
        checkpoint = checkpoint if (checkpoint / "config.json").is_file() else None
        log(f"PyTorch ({'checkpoint' if checkpoint else 'random weights'}) on {args.device} ...")
        result["torch"] = torch_seconds(manifest, checkpoint, (h, w), args.iters, args.device, precision)
    result["gmac_per_frame"] = frame_gmac(manifest, (h, w))
    result["peak"] = matmul_peak(
        args.device, "float16" if precision == "fp16" and args.device == "cuda" else "float32", *args.peak_size
    )
    return result


def markdown(r: dict[str, Any]) -> str:
    """One page: the setup and a table of the paths, side by side, each with its share of the measured peak."""
    w, h = r["lr"]
    gflop = 2 * r["gmac_per_frame"]
    peak = r["peak"]["gflops"]

    def rate(seconds: float) -> str:
        return f"{gflop / seconds:,.4g} GFLOP/s, {100 * gflop / seconds / peak:.3g}%"

    mode = "uint8 in/out on the device" if r.get("uint8_io") else "host conversions"
    lines = [
        f"# Whole frames vs tiles: {r['model']} ({'random weights' if r['random_weights'] else 'trained'})",
        "",
        f"{w}x{h} -> {4 * w}x{4 * h}, device {r['device']} ({r['host']['cpu']}; GPUs: {r['host']['gpus'] or 'none'}), "
        f"backend {r['backend']} {r['precision_used']}, temperature {r['temperature']:g}, "
        f"load average at start {r['host']['load_average_at_start']}, {r['when']}; {r['rounds']} interleaved "
        f"rounds after a warm-up. Command: `{r['command']}`.",
        "",
        f"{r['gmac_per_frame']:.4g} GMAC per padded frame (torch FLOP counter); peak: {peak:,.4g} GFLOP/s "
        f"({r['peak']['method']}). CUDA graphs per shape: {r.get('cuda_graphs') or 'none'}.",
        "",
        "| path | p50 | calls per image | vs model | GFLOP/s, % of peak |",
        "|---|---|---|---|---|",
        f"| model alone on the padded frame ({r.get('model_call', 'one backend call')}) "
        f"| {r['model_p50_s']:.4f} s | 1 | 1.00x "
        f"| {rate(r['model_p50_s'])} |",
        f"| `Upscaler.run`, whole frame ({mode}) | {r['whole_p50_s']:.4f} s | {r['whole_calls_per_image']} "
        f"| {r['whole_over_model']:.3f}x (per round {r['whole_over_model_paired']:.3f}x, "
        f"CPU seconds {r['whole_over_model_cpu']:.3f}x) | {rate(r['whole_p50_s'])} |",
        f"| `Upscaler.run`, tiled | {r['tiled_p50_s']:.4f} s | {r['tiled_calls_per_image']} "
        f"| {r['tiled_p50_s'] / r['model_p50_s']:.2f}x (CPU seconds {r['tiled_over_model_cpu']:.2f}x) | |",
        f"| `Upscaler.run_frames`, {r['stream_frames']} frames | {1 / r['stream_fps']:.4f} s/frame "
        f"({r['stream_fps']:.1f} frames/s) | 1 | "
        f"{1 / r['stream_fps'] / r['model_p50_s']:.3f}x (CPU seconds {r['stream_over_model_cpu']:.3f}x) "
        f"| {rate(1 / r['stream_fps'])} |",
    ]
    if "fixed_model" in r:
        f = r["fixed_model"]
        lines.append(
            f"| fixed-size {f['model']} ({f['backend']} {f['precision']}), {f['tiles_per_image']} tiles blended "
            f"on the host | {f['p50_s']:.4f} s | {f['calls_per_image']} | {f['p50_s'] / r['model_p50_s']:.2f}x | |"
        )
    if "torch" in r:
        t = r["torch"]
        lines.append(
            f"| {t['path']}, {t['weights']} | {t['p50_ms'] / 1e3:.4f} s | 1 | "
            f"{t['p50_ms'] / 1e3 / r['model_p50_s']:.2f}x | {rate(t['p50_ms'] / 1e3)} |"
        )
    memory = r["whole_frame_gpu_memory"]
    gpu = (
        f"GPU memory of the whole-frame Upscaler: {memory['peak_mb']} MiB above the start ({memory['method']})"
        if memory["peak_mb"] is not None
        else f"GPU memory: not measured ({memory['why']})"
    )
    if "torch" in r and "peak_gpu_mb" in r["torch"]:
        gpu += f"; PyTorch's graph: {r['torch']['peak_gpu_mb']:.0f} MiB allocated at peak"
    lines += ["", f"Peak RSS {r['peak_rss_mb']} MB. {gpu}. Raw samples in the JSON beside this page.", ""]
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
    p.add_argument(
        "--torch", action="store_true", help="also the model in PyTorch (CUDA graph on a GPU, eager on the CPU)"
    )
    p.add_argument("--checkpoint", type=Path, help="PyTorch weights (default: the model directory's checkpoint/)")
    p.add_argument("--fixed-model", help="also this fixed-size model directory's tiled path on the same image")
    p.add_argument(
        "--peak-size", type=lambda t: [int(v) for v in t.split(",")], default=[8192, 10], help="matmul N,REPEATS"
    )
    p.add_argument("--device-name", default=None, help="device name for the result file (default: from the host)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    result = run(args)
    name = args.device_name or (
        result["host"]["gpus"][0] if args.device == "cuda" and result["host"]["gpus"] else "cpu"
    )
    stem = f"frames-{slug(name)}-{result['model_config']}-{dt.date.today():%Y%m%d}"
    save_result(args.out, stem, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
