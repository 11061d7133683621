"""`sr-upscale`: x4 super-resolution of image files and folders.

Exit status: 0 every input done, 1 some inputs failed (each named on stderr
with its reason), 2 usage error (bad flags, no model...). User errors never
print a traceback. Outputs are written atomically and never over an input.

`--ray` is the one optional hand-off: the same checks, then `sr_cluster.batch`
(the `cluster` extra, imported only then) spreads the files over Ray workers.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import logging
import math
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from sr_runtime.backends import ALIASES, PRECISIONS
from sr_runtime.errors import BackendUnavailable, SRInputError, SRModelError
from sr_runtime.files import atomic_write
from sr_runtime.imaging import open_image
from sr_runtime.noise import DEFAULT_ROWS
from sr_runtime.upscaler import DEFAULT_TILE_OVERLAP, RunStats, Upscaler, default_max_pixels

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".tga"}
FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
#: zlib level 3: as fast as level 1 and ~12% larger than the default 6, which alone took
#: longer than all tiling and blending of a 2048x2048 result.
SAVE_OPTIONS: dict[str, dict[str, int]] = {"PNG": {"compress_level": 3}, "JPEG": {"quality": 95},
                                           "WEBP": {"quality": 95}}


#: What one input may fail with: reported as `failed: <input>: <reason>`, the batch goes on.
FILE_ERRORS = (SRInputError, OSError, MemoryError)
#: `--ray` ADDRESS: auto, host:port (the GCS) or ray://host:port (Ray Client).
RAY_ADDRESS = re.compile(r"auto|(ray://)?[^\s:/]+:\d{1,5}")
RAY_EXTRA_MISSING = "--ray needs the cluster extra: pip install 'vdvae-sr[cluster]'"


class UsageError(Exception):
    """Bad command line: exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sr-upscale",
        description="Upscale images x4 with VDVAE-SR (no PyTorch needed).",
        epilog="Exit status: 0 all done, 1 some inputs failed, 2 usage error.",
    )
    p.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("-o", "--output", help="output file (one input) or folder (default: next to each input)")
    p.add_argument("-s", "--scale", type=int, default=4, help="upscale factor; the model does 4 only")
    p.add_argument("-t", "--tile-overlap", type=int, default=DEFAULT_TILE_OVERLAP,
                   help=f"LR pixels shared by neighbouring tiles (default {DEFAULT_TILE_OVERLAP})")
    p.add_argument("--suffix", default="_x4", help="added to the file name in folder outputs (default _x4); "
                   "a folder input skips files that are such outputs of its other images")
    p.add_argument("-n", "--no-clobber", action="store_true", help="skip inputs whose output file already exists")
    p.add_argument("-f", "--ext", "--format", dest="ext", choices=sorted(FORMATS),
                   help="output format (default: the input's if png/jpg/webp, else png)")
    p.add_argument("--backend", default="auto", choices=sorted(ALIASES), help="inference backend (default auto)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="model precision (default auto)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="prior sampling temperature; 0 = deterministic (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise bank (default 0)")
    p.add_argument("--model", help="model directory (default: the shipped one, or $SR_MODEL_DIR)")
    p.add_argument("--batch-size", type=int, help="tiles per backend call (default: the model's maximum)")
    p.add_argument("--samples", type=int,
                   help=f"average this many samples, at most {DEFAULT_ROWS} (the noise bank; fewer for very "
                        "large models) (default 1; 8 with --std-map)")
    p.add_argument("--std-map", action="store_true",
                   help="also write <output>_std.png: per-pixel std across samples, 16-bit, 65535 = std 0.5")
    p.add_argument("--max-pixels", type=float,
                   help="refuse inputs with more pixels than this; memory grows with it, ~31 bytes per output "
                        f"pixel (44 with --samples) (default here {default_max_pixels():.0f}: what half the "
                        "RAM holds, at most 64 MP)")
    p.add_argument("--timings", action="store_true", help="print wall time and backend share per file")
    p.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="spread the files over a Ray cluster (needs the cluster extra): ADDRESS is host:6379, "
                        "ray://host:10001 or auto (the default: RAY_ADDRESS, a cluster started on this machine, "
                        "else a new local one); paths must be on a filesystem every worker shares; outputs "
                        "already there are kept (resume), as with --no-clobber")
    p.add_argument("--workers", type=int,
                   help="Ray workers, one Upscaler each (default: one per GPU of the cluster, else one per CPU)")
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
        if path.is_dir():
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
        unique.setdefault(p.resolve(), p)
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


def output_path(src: Path, args: argparse.Namespace) -> Path:
    """Where `src`'s result goes: `-o` file, or `<folder>/<stem><suffix>.<ext>`."""
    if args.output and _output_is_file(args.output):
        out = Path(args.output)
        if args.ext:
            out = out.with_suffix("." + args.ext)
        return out
    folder = Path(args.output) if args.output else src.parent
    ext = args.ext or (src.suffix.lower().lstrip(".") if src.suffix.lower().lstrip(".") in FORMATS else "png")
    return folder / f"{src.stem}{args.suffix}.{ext}"


def _output_is_file(out: str) -> bool:
    """`-o` names a file when it has an extension and is not an existing folder; else a folder."""
    return not out.endswith(("/", os.sep)) and not Path(out).is_dir() and Path(out).suffix != ""


def save_atomic(img: Image.Image, dest: Path) -> None:
    """Write via a temporary file in the same folder and os.replace: no half-written outputs."""
    fmt = FORMATS.get(dest.suffix.lower().lstrip("."))
    if fmt is None:
        raise SRInputError(f"{dest}: unknown output format {dest.suffix!r} (use .png, .jpg or .webp)")
    img = fit_format(img, fmt)
    atomic_write(dest, lambda fh: img.save(fh, format=fmt, **SAVE_OPTIONS[fmt]))


def fit_format(img: Image.Image, fmt: str) -> Image.Image:
    """Convert modes a format cannot store to the nearest one it can (only what is needed); `sr-serve` too."""
    if img.mode == "F":  # float results: keep 16 bits where the format allows
        img = Image.fromarray(np.rint(np.asarray(img) * 65535).astype(np.uint16))
    if img.mode == "I;16" and fmt != "PNG":
        img = Image.fromarray((np.asarray(img).astype(np.uint32) * 255 // 65535).astype(np.uint8))
    if img.mode == "CMYK" and fmt != "JPEG":
        img = img.convert("RGB")
    if fmt == "JPEG" and img.mode in ("RGBA", "LA"):
        img = img.convert(img.mode[:-1] if img.mode == "LA" else "RGB")
    return img


def std_map_image(std: np.ndarray) -> Image.Image:
    """16-bit grey image of a std map; std 0.5 (the most a [0, 1] signal can have) is white."""
    return Image.fromarray(np.rint(np.clip(std * 2.0, 0.0, 1.0) * 65535).astype(np.uint16))


def _validate(args: argparse.Namespace) -> int:
    """Number of samples to draw; UsageError naming the flag for values that cannot work."""
    if args.scale != 4:
        raise UsageError(f"scale {args.scale} is not supported: the VDVAE-SR model upscales x4 only")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UsageError("--temperature must be a finite number >= 0")
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
    if any(sep and sep in args.suffix for sep in (os.sep, os.altsep, "/")) or args.suffix in (".", ".."):
        raise UsageError("--suffix must not contain a path separator (outputs stay in the output folder)")
    if args.ray is not None and not RAY_ADDRESS.fullmatch(args.ray):
        raise UsageError(f"--ray {args.ray}: expected host:port, ray://host:port or auto")
    if args.workers is not None and (args.ray is None or args.workers < 1):
        raise UsageError("--workers must be >= 1 and needs --ray")
    return samples


def _check_output_file(args: argparse.Namespace, sources: list[Path]) -> None:
    """An `-o` file takes one input, in a format we can write."""
    if args.output and _output_is_file(args.output):
        if len(sources) > 1:
            raise UsageError(f"-o {args.output} is a file but there are {len(sources)} inputs; give a folder")
        if Path(args.output).suffix.lower().lstrip(".") not in FORMATS and not args.ext:
            raise UsageError(f"-o {args.output}: unknown output format (use .png, .jpg or .webp)")


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """While active, SIGTERM raises SystemExit(143): `finally` blocks remove temp files as on Ctrl-C."""
    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: signals cannot be caught here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad flags, 0 on --help
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="sr-upscale: %(message)s")
    try:
        samples = _validate(args)
        sources, unmatched = expand_inputs(args.inputs, args.suffix)
        _check_output_file(args, sources)
    except UsageError as exc:
        print(f"sr-upscale: error: {exc}", file=sys.stderr)
        return 2
    if args.ray is not None:
        return _run_on_ray(args, samples, sources, unmatched)
    try:
        upscaler = upscaler_from_args(args)
    except (SRModelError, BackendUnavailable, ValueError) as exc:
        print(f"sr-upscale: error: {exc}", file=sys.stderr)
        return 2
    if samples > upscaler.max_samples:
        upscaler.close()
        print(f"sr-upscale: error: --samples must be at most {upscaler.max_samples} for this model "
              "(its noise bank)", file=sys.stderr)
        return 2
    print(f"sr-upscale: model {upscaler.spec.name}, backend {upscaler.backend} ({upscaler.precision})",
          file=sys.stderr)
    failures = [f"{name}: {why}" for name, why in unmatched]
    inputs = {p.resolve() for p in sources}
    written: set[Path] = set()
    status = 0
    try:
        with sigterm_as_exit(), upscaler, tqdm(sources, desc="files", unit="file",
                                               disable=args.quiet or None) as files:
            if upscaler.spec.fully_convolutional and samples == 1 and not (args.std_map or args.timings):
                failures += _process_frames(upscaler, sources, inputs, written, args, files.update)
            else:
                for src in files:
                    try:
                        _process(upscaler, src, output_path(src, args), inputs, written, samples, args)
                    except FILE_ERRORS as exc:
                        failures.append(failure_line(src, exc))
    except KeyboardInterrupt:
        status = 130
    except SystemExit as exc:  # SIGTERM
        status = exc.code if isinstance(exc.code, int) else 143
    return final_status(failures, status)


def upscaler_from_args(args: argparse.Namespace, cpu_threads: int | None = None) -> Upscaler:
    """The Upscaler the flags describe: every Ray worker builds this same one, so pixels do not depend on which."""
    return Upscaler(
        args.model, backend=args.backend, temperature=args.temperature, seed=args.seed,
        tile_overlap=args.tile_overlap, batch_size=args.batch_size, precision=args.precision,
        max_pixels=None if args.max_pixels is None else int(args.max_pixels), cpu_threads=cpu_threads,
    )


def _run_on_ray(args: argparse.Namespace, samples: int, sources: list[Path],
                unmatched: list[tuple[str, str]]) -> int:
    """The single optional hand-off: `--ray` runs `sr_cluster.batch`, imported only now (Ray is an extra)."""
    try:
        batch = importlib.import_module("sr_cluster.batch")
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("ray", "sr_cluster"):
            raise
        print(f"sr-upscale: error: {RAY_EXTRA_MISSING}", file=sys.stderr)
        return 2
    status: int = batch.run(args, samples, sources, unmatched)
    return status


def final_status(failures: list[str], interrupted: int) -> int:
    """Print each failure line; the exit status: `interrupted` (130/143) if set, 1 with failures, else 0."""
    for failure in failures:
        print(f"sr-upscale: failed: {failure}", file=sys.stderr)
    if interrupted:
        print("sr-upscale: interrupted", file=sys.stderr)
        return interrupted
    return 1 if failures else 0


def failure_line(src: Path, exc: BaseException) -> str:
    """`<input>: <reason>`, naming the input once whatever raised."""
    if isinstance(exc, MemoryError):
        return f"{src}: not enough memory (lower --max-pixels or --samples)"
    reason = str(exc)
    return reason if reason.startswith(str(src)) else f"{src}: {reason}"


def _process(upscaler: Upscaler, src: Path, dest: Path, inputs: set[Path], written: set[Path], samples: int,
             args: argparse.Namespace) -> None:
    """Upscale one file; `written` collects outputs so two inputs (a.png, a.jpg) never share one."""
    targets = output_targets(dest, args)
    if args.no_clobber and any(t.exists() for t in targets):
        logging.getLogger("sr_runtime").warning("%s: skipped, %s exists (--no-clobber)", src, dest)
        return
    check_targets(src, targets, inputs, written)
    upscale_file(upscaler, src, targets, samples, args).report()
    written.update(t.resolve() for t in targets)


def _process_frames(upscaler: Upscaler, sources: list[Path], inputs: set[Path], written: set[Path],
                    args: argparse.Namespace, advance: Callable[[int], object]) -> list[str]:
    """Files as a frame sequence (`Upscaler.run_frames`): the next one decodes while the model runs this one.

    Same checks as `_process`; after a failed file the sequence resumes at the next one.
    """
    failures: list[str] = []
    jobs: list[tuple[Path, Path]] = []
    claimed = set(written)
    for src in sources:
        dest = output_path(src, args)
        if args.no_clobber and dest.exists():
            logging.getLogger("sr_runtime").warning("%s: skipped, %s exists (--no-clobber)", src, dest)
            advance(1)
            continue
        try:
            check_targets(src, (dest,), inputs, claimed)
        except SRInputError as exc:
            failures.append(failure_line(src, exc))
            advance(1)
            continue
        claimed.add(dest.resolve())
        jobs.append((src, dest))
    start = 0
    while start < len(jobs):
        frames = upscaler.run_frames([src for src, _ in jobs[start:]])
        try:
            for _src, dest in jobs[start:]:
                out = next(frames)
                assert isinstance(out, Image.Image)  # a path in gives a PIL image out
                save_atomic(out, dest)
                written.add(dest.resolve())
                start += 1
                advance(1)
        except FILE_ERRORS as exc:
            failures.append(failure_line(jobs[start][0], exc))
            start += 1
            advance(1)
        finally:
            frames.close()
    return failures


def output_targets(dest: Path, args: argparse.Namespace) -> tuple[Path, ...]:
    """Every file one input writes: its output, and with --std-map the std map beside it."""
    return (dest, dest.with_name(f"{dest.stem}_std.png")) if args.std_map else (dest,)


def check_targets(src: Path, targets: tuple[Path, ...], inputs: set[Path], claimed: set[Path]) -> None:
    """SRInputError if a target is an input or in `claimed`, another input's output (a.png, a.jpg -> a_x4.png)."""
    for target in targets:
        if target.resolve() in inputs:
            raise SRInputError(f"{src}: output {target} is an input; refusing to overwrite it")
        if target.resolve() in claimed:
            raise SRInputError(f"{src}: output {target} was already written for another input")


@dataclass
class FileNotes:
    """What upscaling one file has to tell: returned, not printed, so a Ray worker's reach the driver."""

    warnings: list[str]
    timing: str | None = None

    def report(self) -> None:
        """Decoder warnings to the `sr_runtime` log, the --timings line to stderr."""
        for warning in self.warnings:
            logging.getLogger("sr_runtime").warning("%s", warning)
        if self.timing:
            print(f"sr-upscale: {self.timing}", file=sys.stderr)


def upscale_file(upscaler: Upscaler, src: Path, targets: tuple[Path, ...], samples: int,
                 args: argparse.Namespace) -> FileNotes:
    """Read `src`, upscale it, write its `output_targets` atomically: the whole of one input's work."""
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # one decode per process at a time: safe here
        warnings.simplefilter("always")
        img = open_image(src, upscaler.max_pixels)
    notes = FileNotes([f"{src}: {message}" for message in dict.fromkeys(str(w.message).strip() for w in caught)])
    stats = RunStats()
    with tqdm(desc=src.name, unit="tile", leave=False, disable=args.quiet or None) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        out, std = upscaler.run(img, samples, progress=progress, stats=stats)
    save_atomic(out, targets[0])
    if args.std_map:
        save_atomic(std_map_image(std), targets[1])
    if args.timings:
        wall = time.perf_counter() - t0
        share = 1.0 - stats.backend_seconds / wall if wall > 0 else 0.0
        notes.timing = (f"{src} -> {targets[0]}: {wall:.2f} s wall, backend {stats.backend_seconds:.2f} s "
                        f"({stats.tiles} tiles), {share:.1%} outside the backend")
    return notes


if __name__ == "__main__":
    sys.exit(main())
