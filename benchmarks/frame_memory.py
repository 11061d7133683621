"""``python -m benchmarks.frame_memory``: where a fully convolutional model's CPU memory goes.

Each (variant, LR frame size) runs in a fresh subprocess, so one variant's
memory arena or allocator state never counts for another. A child loads one
ONNX Runtime CPU session (or an ``Upscaler``), runs the frame ``--runs``
times and reports, per run, wall and CPU seconds, the process's peak RSS so
far (``VmHWM``) and its RSS after the run; then its RSS after glibc's
``malloc_trim(0)`` (what the allocator could hand back).

Variants (``--case SIZE=VARIANT,...``):

* ``ort-defaults``: ONNX Runtime's defaults, what the runtime used before
  (memory arena on, memory pattern on, all graph optimisations), the t = 0 graph;
* ``no-mem-pattern``, ``no-arena``, ``no-arena-no-pattern``: those switched off;
* ``no-mem-pattern-extended``: no memory pattern, graph optimisation level
  ``extended`` (no NCHWc layout transformation);
* ``no-mem-pattern-shrink``: no memory pattern, the arena shrunk after every
  run (run option ``memory.enable_memory_arena_shrinkage``);
* ``sampling-ort-defaults``, ``sampling-no-mem-pattern``: the sampling graph
  with its noise maps at temperature 0.5 instead of the t = 0 graph;
* ``upscaler``, ``upscaler-t0.5``: ``sr_runtime.Upscaler.run`` on a uint8
  frame end to end, with whatever session settings the runtime uses.

Results go to ``--out`` as ``frame-memory-<device>-<model>-<date>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.report import log, save_result, slug

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "engines" / "vdvae-sr-fc-256"
#: Variant -> (what runs, ONNX Runtime settings). "graph": t0 or sampling; "upscaler": the runtime end to end.
VARIANTS: dict[str, dict[str, Any]] = {
    "ort-defaults": {"graph": "t0", "arena": True, "pattern": True, "opt": "all", "shrink": False},
    "no-mem-pattern": {"graph": "t0", "arena": True, "pattern": False, "opt": "all", "shrink": False},
    "no-arena": {"graph": "t0", "arena": False, "pattern": True, "opt": "all", "shrink": False},
    "no-arena-no-pattern": {"graph": "t0", "arena": False, "pattern": False, "opt": "all", "shrink": False},
    "no-mem-pattern-extended": {"graph": "t0", "arena": True, "pattern": False, "opt": "extended", "shrink": False},
    "no-mem-pattern-shrink": {"graph": "t0", "arena": True, "pattern": False, "opt": "all", "shrink": True},
    "sampling-ort-defaults": {"graph": "sampling", "arena": True, "pattern": True, "opt": "all", "shrink": False},
    "sampling-no-mem-pattern": {"graph": "sampling", "arena": True, "pattern": False, "opt": "all", "shrink": False},
    "upscaler": {"graph": "upscaler", "temperature": 0.0},
    "upscaler-t0.5": {"graph": "upscaler", "temperature": 0.5},
}
SAMPLING_TEMPERATURE = 0.5


def parse_case(text: str) -> tuple[tuple[int, int], list[str]]:
    """'640x480=no-mem-pattern,upscaler' -> ((480, 640), [...]) (LR height, width); 'all' names every variant."""
    size, _, names = text.partition("=")
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH=VARIANT,..., got {text!r}") from None
    variants = list(VARIANTS) if names in ("", "all") else names.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"unknown variants {unknown} (known: {', '.join(VARIANTS)})")
    return (h, w), variants


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def child(model: Path, variant: str, lr_hw: tuple[int, int], runs: int) -> dict[str, Any]:
    """One variant at one LR size in this (fresh) process: per-run seconds and RSS, then RSS after a trim."""
    import ctypes

    import numpy as np

    settings = VARIANTS[variant]
    h, w = lr_hw
    out: dict[str, Any] = {"rss_start_mb": _status_mb("VmRSS")}
    rng = np.random.default_rng(0)
    if settings["graph"] == "upscaler":
        from sr_runtime import Upscaler

        up = Upscaler(model, backend="cpu", temperature=settings["temperature"])
        frame = (rng.random((h, w, 3)) * 255).astype(np.uint8)

        def call() -> None:
            up.run(frame)

        release = up.release_memory
    else:
        import onnxruntime as ort

        from sr_runtime.backends.onnxrt import cpu_cores
        from sr_runtime.model import load_model_spec
        from sr_runtime.noise import FrameNoise

        spec = load_model_spec(model)
        sampling = settings["graph"] == "sampling"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = cpu_cores()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        }[settings["opt"]]
        opts.enable_cpu_mem_arena = settings["arena"]
        opts.enable_mem_pattern = settings["pattern"]
        path = spec.verify("fp32", deterministic=not sampling)
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feeds = {"lr": rng.random((1, 3, h, w), dtype=np.float32)}
        if sampling:
            feeds.update(FrameNoise(spec.noise_levels).window((h, w), 0, SAMPLING_TEMPERATURE, 0, 0, 0, h, w))
        run_options = ort.RunOptions()
        if settings["shrink"]:
            run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

        def call() -> None:
            session.run(["hr"], feeds, run_options)

        m = spec.lr_multiple
        smallest = {"lr": np.zeros((1, 3, m, m), np.float32)}
        if sampling:
            smallest.update(
                {lv.name: np.zeros((1, lv.channels, *lv.size(m, m)), np.float32) for lv in spec.noise_levels}
            )
        shrink = ort.RunOptions()
        shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

        def release() -> None:  # what Upscaler.release_memory does: a one-stride frame that shrinks the arena
            if settings["arena"]:  # without an arena there is nothing to shrink (ORT refuses the option)
                session.run(["hr"], smallest, shrink)

    out["rss_ready_mb"] = _status_mb("VmRSS")
    out["runs"] = []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        call()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        out["runs"].append(
            {"wall_s": wall, "cpu_s": cpu, "peak_mb": _status_mb("VmHWM"), "rss_mb": _status_mb("VmRSS")}
        )
    release()
    out["rss_after_release_mb"] = _status_mb("VmRSS")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    out["rss_after_trim_mb"] = _status_mb("VmRSS")
    return out


def run_child(model: Path, variant: str, lr_hw: tuple[int, int], runs: int, timeout_s: float) -> dict[str, Any]:
    """`child` in a fresh interpreter; its JSON, or {"error": ...} when it failed or ran out of time."""
    spec = json.dumps({"model": str(model), "variant": variant, "lr_hw": list(lr_hw), "runs": runs})
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.frame_memory", "--child", spec],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=REPO,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:g} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def summary(sample: dict[str, Any], pixels: int, baseline: dict[str, Any] | None) -> dict[str, Any]:
    """The figures of one child: peak, what the runs added per LR pixel, memory kept after, last-run seconds."""
    if "error" in sample:
        return {"error": sample["error"]}
    runs = sample["runs"]
    peak = runs[-1]["peak_mb"]
    row = {
        "session_mb": sample["rss_ready_mb"],
        "peak_first_run_mb": runs[0]["peak_mb"],
        "peak_mb": peak,
        "bytes_per_lr_pixel": (peak - sample["rss_ready_mb"]) * 2**20 / pixels,
        "rss_after_mb": runs[-1]["rss_mb"],
        "rss_after_release_mb": sample["rss_after_release_mb"],
        "rss_after_trim_mb": sample["rss_after_trim_mb"],
        "steady_wall_s": _steady(runs, "wall_s"),
        "steady_cpu_s": _steady(runs, "cpu_s"),
    }
    if baseline is not None and "error" not in baseline:
        row["cpu_vs_ort_defaults"] = row["steady_cpu_s"] / _steady(baseline["runs"], "cpu_s")
    return row


def _steady(runs: list[dict[str, Any]], key: str) -> float:
    """The median of `key` over the runs after the first (the first allocates, and plans per shape)."""
    return statistics.median(run[key] for run in runs[1:] or runs)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.system import host_info, versions

    result: dict[str, Any] = {
        "schema": "vdvae-sr-frame-memory/1",
        "model": str(
            args.model.resolve().relative_to(REPO) if args.model.resolve().is_relative_to(REPO) else args.model
        ),
        "manifest_bytes_per_lr_pixel": json.loads((args.model / "manifest.json").read_text())["memory"][
            "bytes_per_lr_pixel"
        ],
        "runs_per_child": args.runs,
        "rounds": args.rounds,
        "command": "python -m benchmarks.frame_memory " + " ".join(sys.argv[1:]),
        "host": host_info(),
        "versions": versions(),
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "sizes": [],
    }
    for lr_hw, variants in args.case:
        h, w = lr_hw
        samples: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for r in range(args.rounds):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]  # who goes first rotates
            for variant in order:
                log(f"{w}x{h} LR, {variant}, round {r + 1}/{args.rounds} ...")
                t0 = time.perf_counter()
                samples[variant].append(run_child(args.model, variant, lr_hw, args.runs, args.child_timeout))
                log(f"  {time.perf_counter() - t0:.0f} s: {json.dumps(samples[variant][-1])[:300]}")
        rows = {}
        for variant in variants:
            per_round = [
                summary(s, h * w, samples.get("ort-defaults", [None] * args.rounds)[k])
                for k, s in enumerate(samples[variant])
            ]
            good = [row for row in per_round if "error" not in row]
            rows[variant] = (
                {key: statistics.median(row[key] for row in good) for key in good[0]}
                if good
                else {"error": per_round[0]["error"]}
            )
        result["sizes"].append({"lr": [w, h], "variants": rows, "samples": samples})
    return result


def markdown(r: dict[str, Any]) -> str:
    """One page: per LR size, a row per variant."""
    host = r["host"]
    lines = [
        "# Memory of a fully convolutional model on the CPU (ONNX Runtime settings)",
        "",
        f"Model `{r['model']}` (manifest: {r['manifest_bytes_per_lr_pixel']} bytes per LR pixel); "
        f"{host['cpu']}, {host['usable_cpus']} usable CPUs, load average at start "
        f"{host['load_average_at_start']}; onnxruntime {r['versions']['onnxruntime']}; {r['when']}. "
        f"Each cell: a fresh process, {r['runs_per_child']} runs of the frame, median over {r['rounds']} "
        f"round(s). Command: `{r['command']}`.",
        "",
        "Peak: the process's peak RSS after the last run (`VmHWM`); per LR pixel: that peak minus the RSS "
        "with the session loaded, over the LR pixels; after: RSS once the runs returned, after "
        "a release (a one-stride frame with arena shrinkage, `Upscaler.release_memory`) and then "
        "`malloc_trim(0)`. Seconds: median of the runs after the first (steady state), wall and process CPU; "
        "CPU vs defaults: against the same round's `ort-defaults` child. The machine is shared: compare "
        "ratios, not absolute times.",
    ]
    for size in r["sizes"]:
        w, h = size["lr"]
        lines += [
            "",
            f"## {w}x{h} LR -> {4 * w}x{4 * h}",
            "",
            "| variant | peak MB (1st run) | peak MB | KB per LR pixel | after MB | after release MB "
            "| after trim MB | wall s | CPU s | CPU vs defaults |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for variant, row in size["variants"].items():
            if "error" in row:
                lines.append(f"| {variant} | {row['error']} ||||||||")
                continue
            ratio = row.get("cpu_vs_ort_defaults")
            lines.append(
                f"| {variant} | {row['peak_first_run_mb']:.0f} | {row['peak_mb']:.0f} "
                f"| {row['bytes_per_lr_pixel'] / 1024:.1f} | {row['rss_after_mb']:.0f} "
                f"| {row['rss_after_release_mb']:.0f} | {row['rss_after_trim_mb']:.0f} "
                f"| {row['steady_wall_s']:.1f} | {row['steady_cpu_s']:.2f} "
                f"| {'-' if ratio is None else f'{ratio:.3f}x'} |"
            )
    lines += ["", "Raw samples in the JSON beside this page.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.frame_memory", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL, help=f"fully convolutional model (default {DEFAULT_MODEL})"
    )
    p.add_argument(
        "--case",
        type=parse_case,
        action="append",
        help="LR size and variants, e.g. 320x240=all or 640x480=ort-defaults,no-mem-pattern (repeatable; "
        "default 320x240=all)",
    )
    p.add_argument("--runs", type=int, default=2, help="runs of the frame per child (default 2: the first allocates)")
    p.add_argument("--rounds", type=int, default=1, help="children per (size, variant), interleaved (default 1)")
    p.add_argument("--child-timeout", type=float, default=3600.0, help="seconds a child may take (default 3600)")
    p.add_argument("--device-name", default="cpu", help="device name for the result file (default cpu)")
    p.add_argument("--tag", default="", help="appended to the result file's name (e.g. which runtime version)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        spec = json.loads(args.child)
        print(json.dumps(child(Path(spec["model"]), spec["variant"], tuple(spec["lr_hw"]), spec["runs"])))
        return 0
    if not (args.model / "manifest.json").is_file():
        p.error(f"no model at {args.model}")
    if args.runs < 1 or args.rounds < 1:
        p.error("--runs and --rounds must be >= 1")
    args.case = args.case or [parse_case("320x240=all")]
    result = run(args)
    tag = slug(args.tag)
    stem = f"frame-memory-{slug(args.device_name)}-{args.model.name}-{dt.date.today():%Y%m%d}" + (
        f"-{tag}" if tag else ""
    )
    save_result(args.out, stem, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
