"""Export of a fully convolutional model: any frame size in one graph call.

Writes four graphs beside ``manifest.json``: the sampling graph (``lr`` plus
one ``noise_<res>`` map per latent level) and the deterministic graph (``lr``
only, temperature 0, what most users run), each in FP32 and FP16. Every
graph has symbolic batch, height and width; the checks run at several frame
sizes, non-square and odd multiples of the stride among them, because a
graph that is right at the traced size can still be wrong at another.
Same order as the fixed-size pipeline: the old manifest goes first, the
manifest is written last.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

from sr_export.calibration import extreme_lr_batch, photo_lr_batch
from sr_export.common import MANIFEST_FILE, ExportCheckFailed, ExportOptions, ExportReport, timed
from sr_export.fp16 import Fp16Result, Fp16TargetMissed, choose_fp16
from sr_export.onnx_export import (
    FC_EXAMPLE_LR,
    LintResult,
    check_onnx,
    export_fc,
    fc_noise_levels,
    op_histogram,
    polygraphy_lint,
    uint8_post_graph,
    uint8_pre_graph,
)
from sr_export.parity import ParityCase, compare_frame, level_feeds, parity_summary
from sr_export.parity import cpu_session as parity_session
from sr_runtime.files import atomic_write_bytes, atomic_write_json, sha256_file
from sr_runtime.model import FRAME_MANIFEST_FORMAT, KIND_FULLY_CONVOLUTIONAL
from sr_train.model import VDVAESR

#: Graph files by (graph, precision); "sampling" takes noise maps, "deterministic" does not.
FRAME_FILES = {
    ("sampling", "fp32"): "model.fp32.onnx",
    ("sampling", "fp16"): "model.fp16.onnx",
    ("deterministic", "fp32"): "model.t0.fp32.onnx",
    ("deterministic", "fp16"): "model.t0.fp16.onnx",
}
#: uint8 conversion, padding and cropping as graphs, so a GPU backend keeps a frame on the device.
IO_FILES = {"pre": "io.pre.onnx", "post": "io.post.onnx"}
#: LR (h, w, batch) of the parity checks: square, non-square, odd multiples of the stride (5, 9, 11, 7 x 4).
PARITY_SHAPES = ((16, 16, 1), (20, 36, 2), (44, 28, 1))
#: FP16 calibration and held-out frame sizes (held-out sizes differ from the calibration ones).
CALIBRATION_SHAPE, EXTREME_SHAPE = (32, 48), (16, 24)
HELD_OUT_SHAPES = ((20, 36), (44, 28))
#: Frame sizes whose peak memory gives the per-pixel cost the runtime sizes whole frames by.
MEMORY_PROBE_SHAPES = ((128, 128), (256, 384))


def _photos(h: int, w: int, per_photo: int) -> np.ndarray:
    """Real-photo LR frames [3 * per_photo, 3, h, w] (square crops of the larger side, cut to h x w)."""
    side = max(h, w)
    return np.ascontiguousarray(photo_lr_batch(side, per_photo=per_photo)[:, :, :h, :w])


def _feeds(model: VDVAESR, lr: np.ndarray, temperature: float, seed: int, sampling: bool) -> dict[str, np.ndarray]:
    feed = {"lr": np.ascontiguousarray(lr, np.float32)}
    if sampling:
        feed.update(level_feeds(model, lr.shape[0], (lr.shape[2], lr.shape[3]), temperature, seed))
    return feed


def frame_calibration(model: VDVAESR, seed: int, sampling: bool) -> list[dict[str, np.ndarray]]:
    """FP16 range measurement: photo frames one by one (t 0 and 1 for the sampling graph), extremes."""
    temps = (0.0, 1.0) if sampling else (0.0,)
    photos = list(_photos(*CALIBRATION_SHAPE, per_photo=2))
    extremes = [img[0, :, : EXTREME_SHAPE[0], : EXTREME_SHAPE[1]] for img in extreme_lr_batch(32, seed).values()]
    return [
        _feeds(model, img[None], t, seed + k, sampling) for k, img in enumerate([*photos, *extremes]) for t in temps
    ]


def frame_check_cases(model: VDVAESR, seed: int, sampling: bool) -> dict[str, dict[str, np.ndarray]]:
    """FP16 held-out checks: photo frames at sizes the calibration did not see, batches of 3, and extremes."""
    temps = (0.0, 0.8) if sampling else (0.0,)
    cases: dict[str, dict[str, np.ndarray]] = {}
    for h, w in HELD_OUT_SHAPES:
        photos = _photos(h, w, per_photo=1)
        for t in temps:
            cases[f"photos_{h}x{w}_t{t:g}"] = _feeds(model, photos, t, seed + 100, sampling)
    for label, img in extreme_lr_batch(max(HELD_OUT_SHAPES[0]), seed + 1).items():
        h, w = HELD_OUT_SHAPES[0]
        for t in temps:
            cases[f"{label}_t{t:g}"] = _feeds(model, img[:, :, :h, :w], t, seed + 200, sampling)
    return cases


def check_symbolic(proto: onnx.ModelProto, sampling: bool, levels: list[dict[str, Any]]) -> None:
    """The graph must take any batch, height and width: every input's axes 0, 2, 3 symbolic."""
    names = {"lr", *(lv["name"] for lv in levels)} if sampling else {"lr"}
    inputs = {vi.name: vi.type.tensor_type.shape.dim for vi in proto.graph.input}
    if set(inputs) != names:
        raise RuntimeError(f"graph inputs {sorted(inputs)}, expected {sorted(names)}")
    for name, dims in inputs.items():
        fixed = [i for i in (0, 2, 3) if dims[i].HasField("dim_value")]
        if fixed:
            raise RuntimeError(f"input {name} has fixed axes {fixed}: the export specialised a size")


def measure_bytes_per_lr_pixel(path: Path) -> int:
    """Peak memory per LR pixel of ORT CPU calls on this graph (slope of peak RSS over two frame sizes).

    Measured in a child process so the exporter's own memory does not count,
    with the runtime's own CPU frame session settings and each size run twice
    (a stream's later frames are what stays: benchmarks/frame_memory.py); the
    runtime divides its memory budget by it to decide whole frame or tiles.
    """
    (h0, w0), (h1, w1) = MEMORY_PROBE_SHAPES
    code = (
        "import resource, sys, numpy as np, onnxruntime as ort\n"
        "from sr_runtime.backends.onnxrt import frame_session_options\n"
        "s = ort.InferenceSession(sys.argv[1], frame_session_options(1), providers=['CPUExecutionProvider'])\n"
        "peaks = []\n"
        f"for h, w in (({h0}, {w0}), ({h1}, {w1})):\n"
        "    for _ in range(2):\n"
        "        s.run(None, {'lr': np.full((1, 3, h, w), 0.5, np.float32)})\n"
        "    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
        "print(peaks[0], peaks[1])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    small, large = (int(v) for v in proc.stdout.split())
    return max(1, (large - small) // (h1 * w1 - h0 * w0))


def export_frame_model_dir(
    model: VDVAESR, checkpoint: dict[str, Any], opts: ExportOptions, log: Callable[[str], None] = print
) -> ExportReport:
    """Export, check and describe a fully convolutional ``model`` in ``opts.out_dir``."""
    model = model.eval()
    out: Path = opts.out_dir
    seconds: dict[str, float] = {}
    levels = fc_noise_levels(model)
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    for name in (*FRAME_FILES.values(), *IO_FILES.values()):
        (out / name).unlink(missing_ok=True)
    precisions = ("fp32", "fp16") if opts.fp16 else ("fp32",)
    steps = 3 + len(precisions) - 1
    files: dict[str, Path] = {}
    protos: dict[str, onnx.ModelProto] = {}
    with timed(seconds, "export_fp32"):
        for graph in ("deterministic", "sampling"):
            key = f"{graph}.fp32"
            files[key] = out / FRAME_FILES[(graph, "fp32")]
            log(
                f"[1/{steps}] exporting the {graph} FP32 ONNX (symbolic batch, height, width; torch "
                f"{torch.__version__} dynamo exporter, opset {opts.opset}) ..."
            )
            protos[key] = export_fc(model, files[key], deterministic=graph == "deterministic", opset=opts.opset)

    with timed(seconds, "checks"):
        log(f"[2/{steps}] onnx.checker, symbolic axes, polygraphy lint ...")
        lints: dict[str, LintResult] = {}
        for graph in ("deterministic", "sampling"):
            key = f"{graph}.fp32"
            try:
                check_onnx(files[key])
                check_symbolic(protos[key], graph == "sampling", levels)
            except (onnx.checker.ValidationError, RuntimeError) as exc:
                raise ExportCheckFailed(f"{files[key]}: {exc}") from exc
            h, w = FC_EXAMPLE_LR
            shapes: dict[str, tuple[int, ...]] = {"lr": (2, 3, h, w)}
            if graph == "sampling":
                shapes.update(
                    {lv["name"]: (2, lv["channels"], round(h * lv["scale"]), round(w * lv["scale"])) for lv in levels}
                )
            lints[graph] = polygraphy_lint(files[key], shapes)
            if lints[graph].ran and not lints[graph].passed:
                raise ExportCheckFailed(f"polygraphy lint failed on {files[key]}: {lints[graph].detail}")

    with timed(seconds, "parity"):
        log(
            f"[3/{steps}] parity: ONNX Runtime CPU vs PyTorch on real photo frames {PARITY_SHAPES} (h, w, batch), "
            "t 0 and 0.8 ..."
        )
        parity: list[ParityCase] = []
        for graph, temps in (("deterministic", (0.0,)), ("sampling", (0.0, 0.8))):
            session = parity_session(files[f"{graph}.fp32"])
            for h, w, b in PARITY_SHAPES:
                lr = _photos(h, w, per_photo=1)[:b]
                parity.extend(compare_frame(model, session, lr, t, opts.seed) for t in temps)
    worst = max(c.max_abs_err_non_tie for c in parity)
    if not worst <= opts.parity_tolerance:  # NaN fails too
        raise ExportCheckFailed(f"ONNX Runtime differs from PyTorch by {worst:.3g} > {opts.parity_tolerance:g}")

    fp16: dict[str, Fp16Result] = {}
    if opts.fp16:
        with timed(seconds, "fp16"):
            log(
                f"[4/{steps}] FP16 per graph: activation ranges on photo + extreme frames, FP32 islands, "
                f"held-out checks at {HELD_OUT_SHAPES} ..."
            )
            for graph in ("deterministic", "sampling"):
                sampling = graph == "sampling"
                try:
                    fp16[graph] = choose_fp16(
                        protos[f"{graph}.fp32"],
                        frame_calibration(model, opts.seed, sampling),
                        frame_check_cases(model, opts.seed, sampling),
                        target_psnr_db=opts.fp16_target_psnr_db,
                    )
                except Fp16TargetMissed as exc:
                    raise ExportCheckFailed(f"{graph} graph: {exc}") from exc
                files[f"{graph}.fp16"] = out / FRAME_FILES[(graph, "fp16")]
                atomic_write_bytes(files[f"{graph}.fp16"], fp16[graph].model.SerializeToString())

    with timed(seconds, "memory"):
        bytes_per_px = measure_bytes_per_lr_pixel(files["deterministic.fp32"])
    for key, build in (("pre", uint8_pre_graph), ("post", uint8_post_graph)):
        protos[f"io.{key}"] = proto = build()
        onnx.checker.check_model(proto, full_check=True)
        files[f"io.{key}"] = out / IO_FILES[key]
        atomic_write_bytes(files[f"io.{key}"], proto.SerializeToString())

    manifest = frame_manifest(
        model,
        checkpoint,
        opts,
        files=files,
        protos=protos,
        parity=parity,
        lints=lints,
        fp16=fp16,
        bytes_per_lr_pixel=bytes_per_px,
        seconds=seconds,
    )
    files["manifest"] = atomic_write_json(out / MANIFEST_FILE, manifest)
    # Keyed like the fixed-size report (fp32 / fp16 = the sampling graphs) plus t0.* for the deterministic ones.
    names = {
        "sampling.fp32": "fp32",
        "sampling.fp16": "fp16",
        "deterministic.fp32": "t0.fp32",
        "deterministic.fp16": "t0.fp16",
        "io.pre": "io.pre",
        "io.post": "io.post",
        "manifest": "manifest",
    }
    report_files = {names[k]: v for k, v in files.items()}
    return ExportReport(manifest, report_files, parity, lints["sampling"], fp16.get("sampling"), seconds)


def _entry(path: Path, proto: onnx.ModelProto) -> dict[str, Any]:
    return {
        "file": path.name,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "nodes": len(proto.graph.node),
        "ops": op_histogram(proto),
    }


def frame_manifest(
    model: VDVAESR,
    checkpoint: dict[str, Any],
    opts: Any,
    *,
    files: dict[str, Path],
    protos: dict[str, onnx.ModelProto],
    parity: list[ParityCase],
    lints: dict[str, LintResult],
    fp16: dict[str, Fp16Result],
    bytes_per_lr_pixel: int,
    seconds: dict[str, float],
) -> dict[str, Any]:
    """The fully convolutional model's contract with sr_runtime (docs/export.md, Whole frames)."""
    cfg = model.config
    lo, opt, hi = opts.batch
    levels = fc_noise_levels(model)
    graphs: dict[str, dict[str, Any]] = {"sampling": {}, "deterministic": {}}
    checks: dict[str, Any] = {
        "parity_max_abs_err": parity_summary(parity),
        "parity_tolerance": opts.parity_tolerance,
        "parity_cases": [c.as_dict() for c in parity],
        "polygraphy_lint": {g: {"ran": r.ran, "passed": r.passed, "detail": r.detail} for g, r in lints.items()},
        "exported_with": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "opset": opts.opset,
        },
    }
    for graph in graphs:
        graphs[graph]["fp32"] = _entry(files[f"{graph}.fp32"], protos[f"{graph}.fp32"])
        if graph in fp16:
            result = fp16[graph]
            graphs[graph]["fp16"] = {
                **_entry(files[f"{graph}.fp16"], result.model),
                "fp32_island": result.island_summary(protos[f"{graph}.fp32"]),
            }
            checks.setdefault("fp16_psnr_db", {})[graph] = round(result.ort.min_psnr_db, 2)
            checks.setdefault("fp16_ort_cpu", {})[graph] = result.ort.as_dict()
            checks.setdefault("fp16_rounding_sim", {})[graph] = result.simulated.as_dict()
    if fp16:
        checks["fp16_target_psnr_db"] = opts.fp16_target_psnr_db
    noise_inputs = {lv["name"]: ["N", lv["channels"], f"H*{lv['scale']:g}", f"W*{lv['scale']:g}"] for lv in levels}
    return {
        "format": FRAME_MANIFEST_FORMAT,
        "kind": KIND_FULLY_CONVOLUTIONAL,
        "name": opts.name,
        "scale": cfg.scale_factor,
        "lr_multiple": cfg.lr_multiple,
        "receptive_radius": model.receptive_radius(),
        "lr_size": [cfg.lr_size, cfg.lr_size],  # the training crop; frames take any multiple of lr_multiple
        "noise_levels": levels,
        "noise_contract": {
            "values": "sr_runtime.noise.position_noise(seed, stream, channels, y, x, h, w) x temperature",
            "window": "a frame cut at LR (y0, x0) reads each level from (y0 * scale, x0 * scale)",
        },
        "batch": {"min": lo, "opt": opt, "max": hi},
        "inputs": {"lr": ["N", 3, "H", "W"], **noise_inputs},
        "outputs": {"hr": ["N", 3, f"{cfg.scale_factor}H", f"{cfg.scale_factor}W"]},
        "graphs": {g: {p: e["file"] for p, e in entries.items()} for g, entries in graphs.items()},
        "value_range": [0.0, 1.0],
        "onnx": graphs["sampling"],
        "onnx_deterministic": graphs["deterministic"],
        "io_graphs": {
            key: {**_entry(files[f"io.{key}"], protos[f"io.{key}"]), "purpose": purpose}
            for key, purpose in (
                ("pre", "uint8 [N,h,w,3] + pads -> lr (x/255, edge pad)"),
                ("post", "hr + starts/ends -> uint8 [N,h,w,3] (crop, clip, rint)"),
            )
        },
        "memory": {
            "bytes_per_lr_pixel": bytes_per_lr_pixel,
            "measured": "ONNX Runtime CPU FP32, deterministic graph, the runtime's frame session settings "
            "(no memory pattern), peak RSS slope over LR frames "
            + json.dumps([list(s) for s in MEMORY_PROBE_SHAPES])
            + ", two runs each",
        },
        "model_config": cfg.to_dict(),
        "checkpoint": checkpoint,
        "checks": checks,
        "export_seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
