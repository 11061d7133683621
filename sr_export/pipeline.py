"""The whole export of one model into a model directory: ONNX files, checks, manifest.

Everything is built and checked in a staging directory beside the target
(``.<name>.export-<pid>-<hex>.tmp``); only a complete, passing export is moved in,
ONNX files first and ``manifest.json`` last, each by one rename. So a failed or
interrupted re-export leaves the working model as it was; a kill between those
renames leaves files whose sha256 the old manifest refuses, never old and new
files served together. A staging directory outlives its export only when the
process is killed outright (SIGKILL, the OOM killer); the next export to the
same target removes it once that process is gone.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

from sr_export.calibration import extreme_lr_batch, photo_lr_batch
from sr_export.common import (
    FP16_FILE,
    FP32_FILE,
    MANIFEST_FILE,
    ExportCheckFailed,
    ExportOptions,
    ExportReport,
    timed,
)
from sr_export.cost import HEAVY_GMAC, calibration_crops, check_crops, is_heavy
from sr_export.fp16 import Fp16Result, Fp16TargetMissed, choose_fp16
from sr_export.onnx_export import (
    LintResult,
    check_onnx,
    export_fp32,
    op_histogram,
    polygraphy_lint,
)
from sr_export.parity import ParityCase, parity_suite, parity_summary
from sr_runtime.files import atomic_write_bytes, atomic_write_json, sha256_file
from sr_runtime.model import KIND_FIXED, MANIFEST_FORMAT
from sr_train.info import model_info
from sr_train.model import VDVAESR

CALIBRATION_TEMPERATURES = (0.0, 1.0)
CHECK_TEMPERATURES = (0.0, 0.8)
PARITY_BATCHES = (1, 3)
#: Images the parity check runs through PyTorch (and as many through ONNX Runtime).
PARITY_IMAGES = len(CHECK_TEMPERATURES) * sum(PARITY_BATCHES)


def _noise_feed(n: int, dim: int, temperature: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, dim)) * temperature).astype(np.float32)


def calibration_feeds(lr_size: int, noise_dim: int, seed: int, crops: int = 2) -> list[dict[str, np.ndarray]]:
    """Range-measurement inputs: `crops` per photo one by one at each temperature, plus extreme images."""
    photos = photo_lr_batch(lr_size, per_photo=crops)
    extremes = list(extreme_lr_batch(lr_size, seed).values())
    return [
        {"lr": img[None], "noise": _noise_feed(1, noise_dim, t, seed + k)}
        for k, img in enumerate([*photos, *(e[0] for e in extremes)])
        for t in CALIBRATION_TEMPERATURES
    ]


def check_cases(lr_size: int, noise_dim: int, seed: int, crops: int = 3) -> dict[str, dict[str, np.ndarray]]:
    """Held-out FP16 checks: `crops` other crops per photo (batches of 3), and the extreme images."""
    photos = photo_lr_batch(lr_size, per_photo=crops)
    cases: dict[str, dict[str, np.ndarray]] = {}
    for t in CHECK_TEMPERATURES:
        for start in range(0, len(photos), 3):
            chunk = photos[start : start + 3]
            cases[f"photos{start}-{start + len(chunk) - 1}_t{t:g}"] = {
                "lr": chunk,
                "noise": _noise_feed(len(chunk), noise_dim, t, seed + 100 + start),
            }
    for label, img in extreme_lr_batch(lr_size, seed + 1).items():
        for t in (0.0, 1.0):
            cases[f"{label}_t{t:g}"] = {"lr": img, "noise": _noise_feed(1, noise_dim, t, seed + 200)}
    return cases


def export_model_dir(
    model: VDVAESR, checkpoint: dict[str, Any], opts: ExportOptions, log: Callable[[str], None] = print
) -> ExportReport:
    """Export, check and describe ``model`` in ``opts.out_dir``; raises ExportCheckFailed on a failed check.

    Built in a staging directory and moved in only when every check passed.
    """
    out = opts.out_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_stages(out):
        log(f"sr-export: removed {stale}, left by an export that was killed")
    stage = out.parent / f".{out.name}.export-{os.getpid()}-{secrets.token_hex(6)}.tmp"
    stage.mkdir()
    try:
        report = _export_into(stage, model, checkpoint, opts, log)
        out.mkdir(exist_ok=True)
        for key in sorted(report.files, key=lambda k: k == "manifest"):  # the manifest last
            os.replace(report.files[key], out / report.files[key].name)
            report.files[key] = out / report.files[key].name
        if "fp16" not in report.files:
            (out / FP16_FILE).unlink(missing_ok=True)  # an earlier export's, not described by this manifest
        return report
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def remove_stale_stages(out: Path) -> list[Path]:
    """Staging directories of earlier exports to ``out`` whose process no longer runs: removed, and listed."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.export-(\d+)-[0-9a-f]+\.tmp")
    removed = []
    for path in out.parent.glob(f".{glob.escape(out.name)}.export-*.tmp"):
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink() and not process_alive(int(match[1])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (True where that cannot be asked without side effects: not POSIX)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _export_into(
    out: Path, model: VDVAESR, checkpoint: dict[str, Any], opts: ExportOptions, log: Callable[[str], None]
) -> ExportReport:
    if model.config.fully_convolutional:  # symbolic frame size, noise maps per level: its own pipeline
        from sr_export.frame_pipeline import export_frame_model_dir

        return export_frame_model_dir(model, checkpoint, dataclasses.replace(opts, out_dir=out), log)
    model = model.eval()
    cfg = model.config
    seconds: dict[str, float] = {}
    files = {"fp32": out / FP32_FILE}
    steps = 4 if opts.fp16 else 3

    with timed(seconds, "export_fp32"):
        log(f"[1/{steps}] exporting FP32 ONNX (torch {torch.__version__} dynamo exporter, opset {opts.opset}) ...")
        fp32 = export_fp32(model, files["fp32"], opset=opts.opset)

    with timed(seconds, "checks"):
        log(f"[2/{steps}] onnx.checker + polygraphy lint ...")
        try:
            check_onnx(files["fp32"])
        except onnx.checker.ValidationError as exc:
            raise ExportCheckFailed(f"onnx.checker rejects {files['fp32']}: {exc}") from exc
        lr_shape = (2, 3, cfg.lr_size, cfg.lr_size)
        lint = polygraphy_lint(files["fp32"], {"lr": lr_shape, "noise": (2, model.noise_dim)})
        if lint.ran and not lint.passed:
            raise ExportCheckFailed(f"polygraphy lint failed on {files['fp32']}: {lint.detail}")

    with timed(seconds, "parity"):
        log(
            f"[3/{steps}] parity: ONNX Runtime CPU vs PyTorch on real photo crops, t in {CHECK_TEMPERATURES}, "
            f"batch {' and '.join(map(str, PARITY_BATCHES))} ..."
        )
        lr = photo_lr_batch(cfg.lr_size, per_photo=1)
        parity = parity_suite(model, files["fp32"], lr, CHECK_TEMPERATURES, PARITY_BATCHES, opts.seed, log)
    failed = [
        c
        for c in parity
        if not (
            c.max_abs_err_non_tie <= opts.parity_tolerance  # NaN fails too
            and math.isfinite(c.max_abs_err)
        )
    ]
    if failed:
        worst = failed[0].max_abs_err_non_tie if math.isfinite(failed[0].max_abs_err) else failed[0].max_abs_err
        raise ExportCheckFailed(
            f"ONNX Runtime differs from PyTorch by {worst:.3g} > {opts.parity_tolerance:g} "
            f"(t={failed[0].temperature:g}, batch {failed[0].batch})"
        )

    fp16_result: Fp16Result | None = None
    if opts.fp16:
        with timed(seconds, "fp16"):
            log(f"[4/{steps}] FP16: measuring activation ranges on photos + extreme inputs, choosing FP32 islands ...")
            info = model_info(cfg)
            heavy = is_heavy(info.gmac_per_tile)
            if heavy:
                log(
                    f"      {info.gmac_per_tile:.0f} GMAC per tile (> {HEAVY_GMAC:g}): ranges from "
                    f"{calibration_crops(heavy)} crop per photo instead of {calibration_crops(False)}, "
                    f"checked on {check_crops(heavy)} instead of {check_crops(False)}"
                )
            try:
                fp16_result = choose_fp16(
                    fp32,
                    calibration_feeds(cfg.lr_size, model.noise_dim, opts.seed, calibration_crops(heavy)),
                    check_cases(cfg.lr_size, model.noise_dim, opts.seed, check_crops(heavy)),
                    target_psnr_db=opts.fp16_target_psnr_db,
                    log=log,
                )
            except Fp16TargetMissed as exc:
                raise ExportCheckFailed(str(exc)) from exc
            files["fp16"] = out / FP16_FILE
            atomic_write_bytes(files["fp16"], fp16_result.model.SerializeToString())

    manifest = build_manifest(
        model, checkpoint, opts, files=files, parity=parity, lint=lint, fp32=fp32, fp16=fp16_result, seconds=seconds
    )
    files["manifest"] = atomic_write_json(out / MANIFEST_FILE, finite_json(manifest))
    return ExportReport(manifest, files, parity, lint, fp16_result, seconds)


def finite_json(value: Any) -> Any:
    """`value` with every non-finite float as the string "nan"/"inf"/"-inf": strict JSON parsers reject bare NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def build_manifest(
    model: VDVAESR,
    checkpoint: dict[str, Any],
    opts: ExportOptions,
    *,
    files: dict[str, Path],
    parity: list[ParityCase],
    lint: LintResult,
    fp32: onnx.ModelProto,
    fp16: Fp16Result | None,
    seconds: dict[str, float],
) -> dict[str, Any]:
    """The model directory's contract with sr_runtime (keys fixed by the issue; extra keys are free)."""
    cfg = model.config
    lo, opt, hi = opts.batch
    hr = cfg.lr_size * cfg.scale_factor
    onnx_entries: dict[str, Any] = {
        "fp32": {
            "file": files["fp32"].name,
            "sha256": sha256_file(files["fp32"]),
            "bytes": files["fp32"].stat().st_size,
            "nodes": len(fp32.graph.node),
            "ops": op_histogram(fp32),
        },
    }
    checks: dict[str, Any] = {
        "parity_max_abs_err": parity_summary(parity),
        "parity_tolerance": opts.parity_tolerance,
        "parity_cases": [c.as_dict() for c in parity],
        "polygraphy_lint": {"ran": lint.ran, "passed": lint.passed, "detail": lint.detail},
        "exported_with": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "opset": opts.opset,
        },
    }
    if fp16 is not None:
        onnx_entries["fp16"] = {
            "file": files["fp16"].name,
            "sha256": sha256_file(files["fp16"]),
            "bytes": files["fp16"].stat().st_size,
            "nodes": len(fp16.model.graph.node),
            "ops": op_histogram(fp16.model),
            "fp32_island": fp16.island_summary(fp32),
        }
        checks["fp16_psnr_db"] = round(fp16.ort.min_psnr_db, 2)  # the FP16 file in ORT CPU, all pixels
        checks["fp16_target_psnr_db"] = opts.fp16_target_psnr_db
        checks["fp16_ort_cpu"] = fp16.ort.as_dict()
        checks["fp16_rounding_sim"] = fp16.simulated.as_dict()
        checks["fp16_tried"] = fp16.tried
    return {
        "format": MANIFEST_FORMAT,
        "kind": KIND_FIXED,
        "name": opts.name,
        "scale": cfg.scale_factor,
        "lr_size": [cfg.lr_size, cfg.lr_size],
        "hr_size": [hr, hr],
        "noise_dim": model.noise_dim,
        "noise_layout": {
            "blocks": [list(s) for s in model.latent_shapes],
            "order": "decoder blocks in order, each [zdim, r, r] flattened C-order, concatenated",
            "values": "standard normal x temperature (temperature 0 = all zeros)",
        },
        "batch": {"min": lo, "opt": opt, "max": hi},
        "inputs": {"lr": ["N", 3, cfg.lr_size, cfg.lr_size], "noise": ["N", model.noise_dim]},
        "outputs": {"hr": ["N", 3, hr, hr]},
        "value_range": [0.0, 1.0],
        "onnx": onnx_entries,
        "model_config": cfg.to_dict(),
        "checkpoint": checkpoint,
        "checks": checks,
        "export_seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
