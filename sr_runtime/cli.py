"""`sr-upscale`: x4 super-resolution of image files and folders.

Exit status: 0 every input done, 1 some inputs failed (each named on stderr
with its reason), 2 usage error (bad flags, no model...). User errors never
print a traceback. Outputs are written atomically and never over an input.

`--ray` is the one optional hand-off: the same checks, then the runner
registered as "ray" (`sr_runtime.runners`; the `cluster` extra provides it)
spreads the files over Ray workers.
"""

from __future__ import annotations

import argparse
import glob
import logging
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from sr_runtime.backends import ALIASES, PRECISIONS
from sr_runtime.errors import BackendUnavailable, SRModelError, UsageError
from sr_runtime.files import atomic_write_json, printable, resolved
from sr_runtime.jobs import (
    FORMATS,
    STDIO,
    FileNotes,
    FileOutcome,
    UpscaleOptions,
    final_status,
    output_is_file,
    run_files,
)
from sr_runtime.model import load_model_spec
from sr_runtime.noise import DEFAULT_ROWS
from sr_runtime.runners import BatchJob, load_runner
from sr_runtime.signals import sigterm_as_exit
from sr_runtime.tiling import min_frame_tile
from sr_runtime.upscaler import CPU_DEFAULT_BATCH, DEFAULT_TILE_OVERLAP, default_max_pixels

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".tga"}
#: `--ray` ADDRESS: auto, host:port (the GCS) or ray://host:port (Ray Client).
RAY_ADDRESS = re.compile(r"auto|(ray://)?[^\s:/]+:\d{1,5}")
#: Above this the prior's noise swamps the image (sr-serve accepts the same range).
MAX_TEMPERATURE = 2.0
RAY_EXTRA_MISSING = "--ray needs the cluster extra: pip install 'vdvae-sr[cluster]'"
#: Largest --outscale: the x4 result is resized, never upscaled by more than this overall.
MAX_OUTSCALE = 16.0


def version_line() -> str:
    """`sr-upscale <version>` with the versions that decide its pixels."""
    import importlib.metadata

    import onnxruntime

    try:
        ours = importlib.metadata.version("vdvae-sr")
    except importlib.metadata.PackageNotFoundError:
        ours = "(not installed)"
    return (
        f"sr-upscale {ours} (onnxruntime {onnxruntime.__version__}, Pillow {Image.__version__}, numpy {np.__version__})"
    )


class TqdmHandler(logging.StreamHandler):
    """Log lines through tqdm, so they land on their own line above a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


class PrintableFormatter(logging.Formatter):
    """Log lines name files: their control characters are escaped before they reach the terminal."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sr-upscale",
        description="Upscale images x4 with VDVAE-SR (no PyTorch needed).",
        epilog="Exit status: 0 all done, 1 some inputs failed, 2 usage error.",
    )
    p.add_argument(
        "inputs", nargs="+", help="image files, folders or glob patterns; - reads one image from standard input"
    )
    p.add_argument(
        "-o",
        "--output",
        help="output file (one input) or folder (default: next to each input); "
        "- writes the one image to standard output (format: -f, else the input's, else png)",
    )
    p.add_argument("--version", action="version", version=version_line())
    p.add_argument("-s", "--scale", type=int, default=4, help="upscale factor; the model does 4 only")
    p.add_argument(
        "-t",
        "--tile-overlap",
        type=int,
        default=DEFAULT_TILE_OVERLAP,
        help=f"LR pixels shared by neighbouring tiles (default {DEFAULT_TILE_OVERLAP})",
    )
    p.add_argument(
        "--suffix",
        default="_x4",
        help="added to the file name in folder outputs (default _x4); "
        "a folder input skips files that are such outputs of its other images",
    )
    p.add_argument("-n", "--no-clobber", action="store_true", help="skip inputs whose output file already exists")
    p.add_argument(
        "-f",
        "--ext",
        "--format",
        dest="ext",
        choices=sorted(FORMATS),
        help="output format (default: the input's if png/jpg/webp, else png)",
    )
    p.add_argument("--backend", default="auto", choices=sorted(ALIASES), help="inference backend (default auto)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="model precision (default auto)")
    p.add_argument(
        "--temperature", type=float, default=0.0, help="prior sampling temperature; 0 = deterministic (default 0)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise bank (default 0)")
    p.add_argument("--model", help="model directory (default: the shipped one, or $SR_MODEL_DIR)")
    p.add_argument(
        "--batch-size",
        type=int,
        help=f"fixed-size models: tiles per backend call, their memory control (default: {CPU_DEFAULT_BATCH} on "
        "the CPU, measured as fast as larger batches and leaner; the model's maximum on GPUs)",
    )
    p.add_argument(
        "--tile",
        type=int,
        default=0,
        metavar="N",
        help="fully convolutional models: at most N x N LR pixels per backend call, larger images run as "
        "tiles about N wide overlapped by the receptive field (less memory, some time); 0 = the whole image "
        "in one call when memory allows (default 0). Fixed-size models have fixed tiles: --batch-size is "
        "their memory control",
    )
    p.add_argument(
        "--samples",
        type=int,
        help=f"average this many samples, at most {DEFAULT_ROWS} (the noise bank; fewer for very "
        "large models) (default 1; 8 with --std-map)",
    )
    p.add_argument(
        "--std-map",
        action="store_true",
        help="also write <output>_std.png: per-pixel std across samples, 16-bit, 65535 = std 0.5",
    )
    p.add_argument(
        "--max-pixels",
        type=float,
        help="refuse inputs with more pixels than this; memory grows with it, ~10 bytes per output "
        "pixel (32 with --samples) beside the model's session (a fixed-size model like small-256 on the CPU: "
        f"0.3 GB at the default batch 2, 1.7 GB at 16) (default here {default_max_pixels():.0f}: what half the "
        "RAM holds, at most 64 MP)",
    )
    p.add_argument(
        "--outscale",
        type=float,
        help="final scale: the model's x4, then a Lanczos resize to this factor of the input "
        "(as Real-ESRGAN's --outscale), in (0, 16] (default 4: no resize)",
    )
    p.add_argument("--timings", action="store_true", help="print wall time and backend share per file")
    p.add_argument(
        "--report",
        metavar="FILE",
        help="write a JSON report: per file its output, status, reason and timings, and totals",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        metavar="ADDRESS",
        help="spread the files over a Ray cluster (needs the cluster extra): ADDRESS is host:6379, "
        "ray://host:10001 or auto (the default: RAY_ADDRESS, a cluster started on this machine, "
        "else a new local one); paths must be on a filesystem every worker shares; outputs "
        "already there are kept (resume), as with --no-clobber",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="Ray workers, one Upscaler each (default: one per GPU of the cluster, else one per CPU)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log backend selection details")
    return p


def expand_inputs(patterns: Sequence[str], suffix: str) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files named by files, folders (their images, sorted) and globs; plus inputs that matched nothing.

    A folder's earlier outputs (`a<suffix>.png` beside `a.jpg`) are left out, so a re-run
    next to the inputs does not upscale its own results.
    """
    found: list[Path] = []
    missing: list[tuple[str, str]] = []
    for pattern in patterns:
        path = Path(pattern)
        if pattern == "-":
            found.append(STDIO)
        elif path.is_dir():
            images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            images = [p for p in images if not _is_output_of_another(p, images, suffix)]
            if not images:
                missing.append((pattern, "folder has no image files"))
            found.extend(images)
        elif path.exists() or not glob.has_magic(pattern):
            found.append(path)  # a missing plain path fails later with its own reason
        else:
            matches = sorted(Path(m) for m in glob.glob(pattern) if Path(m).is_file())
            if not matches:
                missing.append((pattern, "pattern matched no files"))
            found.extend(matches)
    unique: dict[Path, Path] = {}
    for p in found:
        unique.setdefault(p if p == STDIO else resolved(p), p)
    return list(unique.values()), missing


def _is_output_of_another(path: Path, images: list[Path], suffix: str) -> bool:
    """Whether `path` is named like this tool's output (or std map) of another image in `images`."""
    if not suffix:
        return False
    stem = path.stem.removesuffix("_std")
    if not stem.endswith(suffix):
        return False
    source_stem = stem[: -len(suffix)]
    return any(other.stem == source_stem for other in images if other != path)


def _validate(args: argparse.Namespace) -> int:
    """Number of samples to draw; UsageError naming the flag for values that cannot work."""
    if args.scale != 4:
        raise UsageError(f"scale {args.scale} is not supported: the VDVAE-SR model upscales x4 only")
    if not 0 <= args.temperature <= MAX_TEMPERATURE:  # also refuses NaN
        raise UsageError(f"--temperature must be a number in [0, {MAX_TEMPERATURE:g}]")
    samples = args.samples if args.samples is not None else (8 if args.std_map else 1)
    if not 1 <= samples <= DEFAULT_ROWS:
        raise UsageError(f"--samples must be in [1, {DEFAULT_ROWS}] (the noise bank's rows)")
    if samples > 1 and args.temperature == 0:
        raise UsageError("--samples/--std-map need --temperature > 0 (at 0 every sample is the same)")
    if args.std_map and samples < 2:
        raise UsageError("--std-map needs --samples >= 2")
    if args.max_pixels is not None and (not math.isfinite(args.max_pixels) or args.max_pixels < 1):
        raise UsageError("--max-pixels must be a finite number >= 1")
    if not 0 <= args.seed < 2**63:
        raise UsageError("--seed must be in [0, 2**63)")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    if args.tile_overlap < 0:
        raise UsageError("--tile-overlap must be >= 0")
    if args.tile < 0:
        raise UsageError("--tile must be >= 0 (0: the whole image in one call when memory allows)")
    if any(sep and sep in args.suffix for sep in (os.sep, os.altsep, "/")) or args.suffix in (".", ".."):
        raise UsageError("--suffix must not contain a path separator (outputs stay in the output folder)")
    if args.ray is not None and not RAY_ADDRESS.fullmatch(args.ray):
        raise UsageError(f"--ray {args.ray}: expected host:port, ray://host:port or auto")
    if args.workers is not None and (args.ray is None or args.workers < 1):
        raise UsageError("--workers must be >= 1 and needs --ray")
    if args.outscale is not None and not 0 < args.outscale <= MAX_OUTSCALE:  # also refuses NaN
        raise UsageError(f"--outscale must be a number in (0, {MAX_OUTSCALE:g}]")
    if args.report is not None and Path(args.report).is_dir():
        raise UsageError(f"--report {printable(args.report)} is a folder; give a file name")
    piped = "-" in args.inputs or args.output == "-"
    if piped and len(args.inputs) != 1:
        raise UsageError("- (standard input) and -o - (standard output) take exactly one input")
    if piped and args.ray is not None:
        raise UsageError("--ray reads and writes files on the workers: - and -o - are for local runs")
    if args.output == "-" and args.std_map:
        raise UsageError("--std-map writes a second file: it needs an output file or folder, not -o -")
    if args.inputs == ["-"] and (not args.output or not (args.output == "-" or output_is_file(args.output))):
        raise UsageError("- (standard input) needs -o FILE or -o - (standard output)")
    return samples


def _check_output_file(args: argparse.Namespace, sources: list[Path]) -> None:
    """An `-o` file takes one input, in a format we can write; a name without extension must be a folder."""
    out = Path(args.output) if args.output and args.output != "-" else None
    if out is not None and not output_is_file(args.output) and (out.exists() or out.is_symlink()) and not out.is_dir():
        raise UsageError(
            f"-o {printable(args.output)} is an existing file, not a folder: give a folder, or an "
            "output file name ending .png, .jpg or .webp"
        )
    if args.output and output_is_file(args.output):
        if len(sources) > 1:
            raise UsageError(f"-o {args.output} is a file but there are {len(sources)} inputs; give a folder")
        if args.output != "-" and Path(args.output).suffix.lower().lstrip(".") not in FORMATS and not args.ext:
            raise UsageError(f"-o {args.output}: unknown output format (use .png, .jpg or .webp)")


def _check_tile(tile: int, model: str | None) -> None:
    """--tile needs a fully convolutional model, and a tile wide enough to keep a valid centre."""
    if not tile:
        return
    spec = load_model_spec(model)
    if not spec.fully_convolutional:
        h, w = spec.lr_size
        raise UsageError(
            f"--tile: model {spec.name} runs fixed {w}x{h} LR tiles; --batch-size (tiles per backend call) "
            "is its memory control"
        )
    least = min_frame_tile(spec.lr_multiple, spec.receptive_radius)
    if tile < least:
        raise UsageError(
            f"--tile {tile} is below model {spec.name}'s smallest tile, {least} LR pixels (twice its receptive "
            f"radius {spec.receptive_radius} plus one stride): give 0 or at least {least}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad flags, 0 on --help
        return exc.code if isinstance(exc.code, int) else 2
    handler = TqdmHandler()
    handler.setFormatter(PrintableFormatter("sr-upscale: %(message)s"))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[handler])
    try:
        samples = _validate(args)
        sources, unmatched = expand_inputs(args.inputs, args.suffix)
        _check_output_file(args, sources)
        _check_tile(args.tile, args.model)
    except (UsageError, SRModelError) as exc:
        print(f"sr-upscale: error: {exc}", file=sys.stderr)
        return 2
    options = options_from(args, samples)
    if args.ray is not None:
        return _run_on_ray(BatchJob(options, tuple(sources), tuple(unmatched), args.ray, args.workers))
    try:
        upscaler = options.build_upscaler()
    except (SRModelError, BackendUnavailable, ValueError) as exc:
        print(f"sr-upscale: error: {exc}", file=sys.stderr)
        return 2
    if samples > upscaler.max_samples:
        upscaler.close()
        print(
            f"sr-upscale: error: --samples must be at most {upscaler.max_samples} for this model (its noise bank)",
            file=sys.stderr,
        )
        return 2
    print(f"sr-upscale: model {upscaler.spec.name}, backend {upscaler.backend} ({upscaler.precision})", file=sys.stderr)
    failures = [f"{name}: {why}" for name, why in unmatched]
    report = RunReport(version_line(), upscaler.spec.name, upscaler.backend, upscaler.precision)
    report.files += [{"input": name, "status": "failed", "reason": why} for name, why in unmatched]
    status = 0
    try:
        with (
            sigterm_as_exit(),
            upscaler,
            tqdm(total=len(sources), desc="files", unit="file", disable=args.quiet or None) as files,
        ):

            def record(outcome: FileOutcome) -> None:
                files.update(1)
                if outcome.failure is not None:
                    failures.append(outcome.failure)
                elif outcome.status == "skipped":
                    logging.getLogger("sr_runtime").warning(
                        "%s: skipped, %s exists (--no-clobber)",
                        printable(str(outcome.src)),
                        printable(str(outcome.dest)),
                    )
                elif outcome.notes is not None:
                    outcome.notes.report()
                report.add(outcome.src, outcome.dest, outcome.status, outcome.notes, outcome.failure or "")

            run_files(upscaler, sources, options, record)
    except KeyboardInterrupt:
        status = 130
    except SystemExit as exc:  # SIGTERM
        status = exc.code if isinstance(exc.code, int) else 143
    status = final_status(failures, status)
    print(f"sr-upscale: {report.summary()}", file=sys.stderr)
    if args.report is not None:
        try:
            atomic_write_json(args.report, report.as_dict(status))
        except OSError as exc:
            print(f"sr-upscale: error: --report {printable(args.report)}: {exc.strerror or exc}", file=sys.stderr)
            return status or 1
    return status


@dataclass
class RunReport:
    """What a local run did, file by file: the summary line and the `--report` JSON."""

    version: str
    model: str
    backend: str
    precision: str
    files: list[dict[str, object]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def add(self, src: Path, dest: Path, status: str, notes: FileNotes | None = None, reason: str = "") -> None:
        entry: dict[str, object] = {"input": str(src), "output": str(dest), "status": status}
        if reason:
            entry["reason"] = reason
        if notes is not None:
            entry |= {
                "seconds": round(notes.seconds, 3),
                "backend_seconds": round(notes.backend_seconds, 3),
                "tiles": notes.tiles,
            }
            if notes.stages is not None:
                entry["stage_seconds"] = {name: round(s, 3) for name, s in notes.stages.seconds().items()}
        self.files.append(entry)

    def count(self, status: str) -> int:
        return sum(1 for f in self.files if f["status"] == status)

    def summary(self) -> str:
        skipped = f", {self.count('skipped')} skipped" if self.count("skipped") else ""
        return (
            f"{self.count('done')} done, {self.count('failed')} failed{skipped} in "
            f"{time.perf_counter() - self.started:.1f} s"
        )

    def as_dict(self, status: int) -> dict[str, object]:
        return {
            "version": self.version,
            "model": self.model,
            "backend": self.backend,
            "precision": self.precision,
            "exit_status": status,
            "seconds": round(time.perf_counter() - self.started, 3),
            "done": self.count("done"),
            "failed": self.count("failed"),
            "skipped": self.count("skipped"),
            "files": self.files,
        }


def options_from(args: argparse.Namespace, samples: int) -> UpscaleOptions:
    """The checked flags as the typed options every file is done with, here or on a runner's workers."""
    return UpscaleOptions(
        model=args.model,
        backend=args.backend,
        precision=args.precision,
        temperature=args.temperature,
        seed=args.seed,
        tile_overlap=args.tile_overlap,
        batch_size=args.batch_size,
        max_pixels=None if args.max_pixels is None else int(args.max_pixels),
        tile=args.tile,
        samples=samples,
        output=args.output,
        suffix=args.suffix,
        ext=args.ext,
        std_map=args.std_map,
        outscale=args.outscale,
        no_clobber=args.no_clobber,
        timings=args.timings,
        quiet=args.quiet,
    )


def _run_on_ray(job: BatchJob) -> int:
    """The single optional hand-off: `--ray` runs the runner registered as "ray", imported only now."""
    try:
        runner = load_runner("ray")
    except ModuleNotFoundError as exc:  # registered, but Ray (the extra) is not installed
        logging.getLogger("sr_runtime").info("the ray runner cannot load: %s", exc)
        runner = None
    if runner is None:
        print(f"sr-upscale: error: {RAY_EXTRA_MISSING}", file=sys.stderr)
        return 2
    return runner(job)


if __name__ == "__main__":
    sys.exit(main())
