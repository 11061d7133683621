"""sr-export: write a model directory (FP32 + FP16 ONNX, manifest) and optionally TensorRT engines.

Examples::

    sr-export --res 256                      # the shipped default (checkpoint in engines/vdvae-sr-256/,
                                             # ONNX + manifest to sr_runtime/models/vdvae-sr-256/)
    sr-export --checkpoint runs/x/ckpt --out out/x
    sr-export --preset paper-256 --random-weights --out out/paper-256   # cost/benchmark model
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sr_runtime.backends.engine_build import EngineBuildFailed, build_engine
from sr_runtime.backends.engine_identity import (
    EngineUnavailable,
    check_batch,
    engine_cache_dir,
    engine_unavailable_reason,
)
from sr_runtime.model import MAX_BATCH, packaged_model_dir
from sr_runtime.signals import sigterm_as_exit

REPO_ROOT = Path(__file__).resolve().parent.parent
ENGINES_DIR = REPO_ROOT / "engines"
# --res -> the preset of the shipped model at that HR size (its random-weights stand-in).
DEFAULT_PRESETS = {256: "fc-256-deep"}


def model_dir_for(res: int) -> Path:
    """engines/vdvae-sr-<res>/: where the shipped model's checkpoint for that HR tile size lives."""
    return ENGINES_DIR / f"vdvae-sr-{res}"


def shipped_model_dir(res: int) -> Path:
    """sr_runtime/models/vdvae-sr-<res>/: where its ONNX files and manifest ship (package data)."""
    return packaged_model_dir(f"vdvae-sr-{res}")


def parse_batch(text: str) -> tuple[int, int, int]:
    """'1,4,16' -> (1, 4, 16), validated, max at most what the runtime accepts from a manifest."""
    try:
        parts = tuple(int(p) for p in text.split(","))
        batch = check_batch(parts)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--batch MIN,OPT,MAX: {exc}") from None
    if batch[2] > MAX_BATCH:
        raise argparse.ArgumentTypeError(
            f"--batch MIN,OPT,MAX: max {batch[2]} is over {MAX_BATCH}, the largest batch the runtime loads"
        )
    return batch


#: Seeds are offset a little per check input and handed to torch and numpy; this keeps them all in range.
MAX_SEED = 2**32 - 1


def parse_seed(text: str) -> int:
    """argparse type: a seed in [0, MAX_SEED]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, {MAX_SEED}], got {value}")
    return value


def parse_frame(text: str) -> tuple[int, int]:
    """'960x540' -> (960, 540): an LR frame's width and height."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--frame WxH, e.g. 960x540; got {text!r}") from None
    if not (0 < w <= 1 << 14 and 0 < h <= 1 << 14):
        raise argparse.ArgumentTypeError(f"--frame {text}: width and height must be in [1, 16384]")
    return w, h


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sr-export", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--checkpoint", type=Path, help="export this checkpoint directory (config.json + model.safetensors)"
    )
    src.add_argument("--preset", help="a model preset (e.g. paper-256); needs --random-weights")
    p.add_argument("--res", type=int, help="HR tile size of the shipped model to export (default 256)")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="use freshly initialised weights (cost/benchmark models, or a stand-in until a checkpoint exists)",
    )
    p.add_argument(
        "--out", type=Path, help="output directory (default sr_runtime/models/vdvae-sr-<res>/ for the shipped model)"
    )
    p.add_argument(
        "--batch", type=parse_batch, default=(1, 4, 16), help="engine batch profile MIN,OPT,MAX (default 1,4,16)"
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16", "both"),
        default="both",
        help="which graphs/engines: fp32 skips the FP16 graph; fp16 and both write both ONNX "
        "files (the FP16 one is derived from and checked against FP32), engines for the named ones",
    )
    p.add_argument(
        "--engine",
        choices=("auto", "on", "off"),
        default="auto",
        help="TensorRT engine: auto builds where TensorRT and a GPU exist; on fails without them",
    )
    p.add_argument("--engine-cache", type=Path, help=f"engine cache directory (default {engine_cache_dir()})")
    p.add_argument("--seed", type=parse_seed, default=0, help="seed for random weights and check noise")
    p.add_argument(
        "--force",
        action="store_true",
        help="start even when the up-front estimate says the export needs more memory than is available",
    )
    p.add_argument(
        "--frame",
        type=parse_frame,
        help="fully convolutional models: build engines for this one input frame size WxH (LR pixels, "
        "e.g. 960x540 for 4K output), a fixed-size video engine; default: a profile from one "
        "stride to 960x540 with opt at --res / 4",
    )
    return p


def load_source(args: argparse.Namespace) -> tuple[Any, dict[str, Any], Path, str]:
    """(model, checkpoint info, out dir, model name) from the CLI's source options; SystemExit(2) with a reason."""
    import torch

    from sr_train.checkpoint import CheckpointError, load_checkpoint
    from sr_train.model import VDVAESR, preset

    def random_model(preset_name: str) -> tuple[Any, dict[str, Any]]:
        torch.manual_seed(args.seed)
        model = VDVAESR(preset(preset_name))
        info = {"step": None, "weights_sha256": None, "random_weights": True, "preset": preset_name, "seed": args.seed}
        return model, info

    if args.checkpoint is not None or args.preset is not None:
        if args.out is None:
            raise SystemExit(
                "sr-export: --out is required with --checkpoint/--preset "
                "(so a one-off export never overwrites the shipped model)"
            )
        if args.preset is not None:
            if not args.random_weights:
                raise SystemExit(
                    f"sr-export: preset {args.preset!r} has no trained weights; add --random-weights "
                    "for a cost/benchmark model, or export a checkpoint with --checkpoint"
                )
            try:
                model, info = random_model(args.preset)
            except KeyError as exc:
                raise SystemExit(f"sr-export: {exc.args[0]}") from None
        else:
            try:
                model, meta = load_checkpoint(args.checkpoint)
            except CheckpointError as exc:
                raise SystemExit(f"sr-export: {exc}") from None
            info = checkpoint_info(meta, args.checkpoint)
        if args.res is not None and args.res != model.config.hr_size and not model.config.fully_convolutional:
            raise SystemExit(f"sr-export: --res {args.res} but the model's HR size is {model.config.hr_size}")
        return model, info, args.out, args.out.name

    res = args.res if args.res is not None else 256
    home = model_dir_for(res)
    ckpt = home / "checkpoint"
    if (ckpt / "config.json").is_file():
        try:
            model, meta = load_checkpoint(ckpt)
        except CheckpointError as exc:
            raise SystemExit(f"sr-export: {exc}") from None
        if model.config.hr_size != res:
            raise SystemExit(f"sr-export: {ckpt} has HR size {model.config.hr_size}, not {res}")
        return model, checkpoint_info(meta, ckpt), args.out or shipped_model_dir(res), home.name
    if not args.random_weights:
        raise SystemExit(
            f"sr-export: no trained checkpoint at {ckpt} (config.json missing). Export one with "
            "--checkpoint DIR, or pass --random-weights for a clearly-labelled untrained stand-in."
        )
    if res not in DEFAULT_PRESETS:
        raise SystemExit(
            f"sr-export: no default model for --res {res} (known: {sorted(DEFAULT_PRESETS)}); "
            "use --preset NAME --random-weights --out DIR"
        )
    model, info = random_model(DEFAULT_PRESETS[res])
    return model, info, args.out or shipped_model_dir(res), home.name


def checkpoint_info(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """The manifest's ``checkpoint`` block: where the weights came from."""
    try:
        shown = str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        shown = str(path)
    return {
        "step": meta.get("step"),
        "weights_sha256": meta.get("weights_sha256"),
        "weights": meta.get("weights"),
        "random_weights": False,
        "path": shown,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        print(f"sr-export: error: --out {args.out} is a file; give a directory", file=sys.stderr)
        return 2
    with sigterm_as_exit():  # temp files and directories are removed on SIGTERM as on Ctrl-C
        return _export(args)


def _export(args: argparse.Namespace) -> int:
    wanted = ["fp32", "fp16"] if args.precision == "both" else [args.precision]
    no_engine = None if args.engine == "off" else engine_unavailable_reason()
    if args.engine == "on" and no_engine is not None:
        print(f"sr-export: --engine on, but no TensorRT engine can be built here: {no_engine}", file=sys.stderr)
        return 1

    model, info, out, name = load_source(args)
    if args.frame is not None and not model.config.fully_convolutional:
        print(
            f"sr-export: --frame needs a fully convolutional model; {model.config.name} is fixed-size", file=sys.stderr
        )
        return 2
    if info["random_weights"]:
        print(
            f"WARNING: RANDOM WEIGHTS - exporting an untrained {info['preset']} (seed {args.seed}); "
            "its output is not super-resolution, use it only for testing and cost measurements"
        )

    from sr_export.pipeline import ExportCheckFailed, ExportOptions, export_model_dir

    opts = ExportOptions(out_dir=out, name=name, batch=args.batch, fp16=args.precision != "fp32", seed=args.seed)
    print(f"sr-export: {name} ({model.config.name}, noise_dim {model.noise_dim}) -> {out}")
    if not model.config.fully_convolutional and not check_cost(model, opts.fp16, args.force):
        return 1
    try:
        report = export_model_dir(model, info, opts)
    except ExportCheckFailed as exc:
        print(f"sr-export: FAILED: {exc}", file=sys.stderr)
        return 1
    print_summary(report)

    if args.engine == "off":
        print("engine: not built (--engine off)")
        return 0
    if no_engine is not None:
        print(f"engine: not built: {no_engine}")
        return 0
    cache = args.engine_cache or engine_cache_dir()
    frame_kw = frame_engine_options(report.manifest, args.res, args.frame)
    try:
        for precision in wanted:
            for key in (precision, f"t0.{precision}") if frame_kw else (precision,):
                path = build_engine(
                    report.files[key],
                    cache,
                    precision=precision,
                    batch=args.batch,
                    model_config=report.manifest["model_config"],
                    **frame_kw,
                )
                print(f"engine: {key}: {path}")
    except (EngineUnavailable, EngineBuildFailed) as exc:
        print(f"engine: build failed: {exc}", file=sys.stderr)
        return 1 if args.engine == "on" else 0
    return 0


def check_cost(model: Any, fp16: bool, force: bool) -> bool:
    """Print the export's estimated time and peak memory; False (with the reason) if it cannot fit here."""
    from sr_export.cost import LONG_EXPORT_S, estimate_cost
    from sr_export.pipeline import CALIBRATION_TEMPERATURES, CHECK_TEMPERATURES, PARITY_IMAGES

    print("sr-export: timing one forward pass to estimate the export's time and memory ...", flush=True)
    cost = estimate_cost(model, fp16, PARITY_IMAGES, len(CALIBRATION_TEMPERATURES), len(CHECK_TEMPERATURES))
    for line in cost.lines():
        print(f"sr-export: {line}")
    if not cost.fits:
        assert cost.available_bytes is not None
        message = (
            f"the export needs about {cost.peak_bytes / 1e9:.1f} GB, more than the "
            f"{cost.available_bytes / 1e9:.1f} GB available"
        )
        if not force:
            print(
                f"sr-export: refusing to start: {message}. Free memory, skip the FP16 graph (--precision fp32), "
                "or pass --force to try anyway",
                file=sys.stderr,
            )
            return False
        print(f"WARNING: {message}; going on (--force)", file=sys.stderr)
    if cost.seconds > LONG_EXPORT_S:
        print(
            "WARNING: this export will take long on this machine (see the estimate); Ctrl-C stops it and "
            "leaves any earlier model in place",
            file=sys.stderr,
        )
    return True


def frame_engine_options(manifest: dict[str, Any], res: int | None, frame: tuple[int, int] | None) -> dict[str, Any]:
    """build_engine's frame profile for a fully convolutional model (empty for a fixed-size one)."""
    if manifest.get("kind") != "fully_convolutional":
        return {}
    from sr_runtime.backends.engine_build import frame_profile

    shapes = frame_profile(res or manifest["model_config"]["hr_size"], manifest["lr_multiple"], frame)
    return {"frame": shapes, "frame_scales": {lv["name"]: lv["scale"] for lv in manifest["noise_levels"]}}


def print_summary(report: Any) -> None:
    """Files, sizes, node counts, parity errors, FP16 PSNR and FP32 islands, one fact per line."""
    m = report.manifest
    print("summary:")
    for key, path in report.files.items():
        entry = m["onnx"].get(key, {})
        nodes = f", {entry['nodes']} nodes" if "nodes" in entry else ""
        print(f"  {key:8s} {path}  {path.stat().st_size / 1e6:.2f} MB{nodes}")
    print(
        f"  lint     {'passed' if report.lint.passed else 'not run' if not report.lint.ran else 'FAILED'}: "
        f"{report.lint.detail}"
    )
    for c in report.parity:
        if c.near_tie_pixels == c.pixels:
            ties = " (every pixel is a near-tie of its top two mixture logits)"
        elif c.near_tie_pixels:
            ties = f" ({c.near_tie_pixels} near-tie px; max on the others {c.max_abs_err_non_tie:.2e})"
        else:
            ties = ""
        at = f" lr={c.shape[0]}x{c.shape[1]}" if c.shape else ""
        print(f"  parity   t={c.temperature:g} batch={c.batch}{at}: max |ORT - torch| = {c.max_abs_err:.2e}{ties}")
    if report.fp16 is not None:
        isl = m["onnx"]["fp16"]["fp32_island"]
        for label, chk in (("ORT CPU, FP16 file", report.fp16.ort), ("FP16 rounding sim", report.fp16.simulated)):
            print(
                f"  fp16     {label}: PSNR vs FP32 >= {chk.min_psnr_db:.2f} dB (worst held-out image; "
                f"{chk.min_psnr_db_same_component:.2f} dB without the {chk.flip_fraction:.4%} of pixels whose "
                f"argmax component flipped), all finite incl. black/white/noise: {chk.all_finite}"
            )
        print(
            f"  fp16     FP32 island: {isl['nodes']}/{isl['of_nodes']} nodes (|x| > {isl['limit_abs']:g}) "
            f"{isl['by_scope'] or ''}"
        )
        top = isl["largest_measured"][0] if isl["largest_measured"] else None
        if top:
            where = top["scope"] or "top level"
            print(f"  fp16     largest measured |x|: {top['max_abs']:.4g} ({top['op']} in {where})")
    print(f"  seconds  {m['export_seconds']}")
