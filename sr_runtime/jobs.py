"""One input file's job: decode, upscale, write atomically, or one failure line; and the options it runs with.

The library core every driver shares: `sr-upscale` runs it file by file in its
own process, a runner (`sr-upscale --ray`, see `runners`) on workers elsewhere,
and `sr-serve` encodes its answers with the same format helpers.
`UpscaleOptions` is plain, frozen data, so a driver ships it to another process
as it is; the command line it came from stays with the CLI.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image
from tqdm import tqdm

from sr_runtime.errors import SRInputError
from sr_runtime.files import atomic_write, is_symlink_loop, name_too_long, printable, resolved
from sr_runtime.imaging import open_image, open_image_bytes
from sr_runtime.upscaler import DEFAULT_TILE_OVERLAP, RunStats, Upscaler

FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
#: zlib level 3: as fast as level 1 and ~12% larger than the default 6, which alone took
#: longer than all tiling and blending of a 2048x2048 result.
SAVE_OPTIONS: dict[str, dict[str, int]] = {
    "PNG": {"compress_level": 3},
    "JPEG": {"quality": 95},
    "WEBP": {"quality": 95},
}
#: What one input may fail with: reported as `failed: <input>: <reason>`, the batch goes on.
FILE_ERRORS = (SRInputError, OSError, MemoryError)
#: The `-` of `sr-upscale - -o -`: standard input as the input, standard output as the output.
STDIO = Path("-")


@dataclass(frozen=True)
class UpscaleOptions:
    """How a job's Upscaler is built and each of its files written: the checked flags, without the parser."""

    # The Upscaler: every worker builds the same one, so pixels do not depend on which.
    model: str | None = None
    backend: str = "auto"
    precision: str = "auto"
    temperature: float = 0.0
    seed: int = 0
    tile_overlap: int = DEFAULT_TILE_OVERLAP
    batch_size: int | None = None
    max_pixels: int | None = None
    # Each file.
    samples: int = 1
    output: str | None = None  # `-o`: a file, a folder, `-`, or None (next to each input)
    suffix: str = "_x4"
    ext: str | None = None
    std_map: bool = False
    outscale: float | None = None
    no_clobber: bool = False
    timings: bool = False
    quiet: bool = False

    def build_upscaler(self, cpu_threads: int | None = None) -> Upscaler:
        """The Upscaler these options describe (`cpu_threads`: a worker's share of its node)."""
        return Upscaler(
            self.model,
            backend=self.backend,
            temperature=self.temperature,
            seed=self.seed,
            tile_overlap=self.tile_overlap,
            batch_size=self.batch_size,
            precision=self.precision,
            max_pixels=self.max_pixels,
            cpu_threads=cpu_threads,
        )


def output_path(src: Path, options: UpscaleOptions) -> Path:
    """Where `src`'s result goes: `-o` file (or `-`), or `<folder>/<stem><suffix>.<ext>`."""
    if options.output == "-":
        return STDIO
    if options.output and output_is_file(options.output):
        out = Path(options.output)
        if options.ext:
            out = out.with_suffix("." + options.ext)
        return out
    folder = Path(options.output) if options.output else src.parent
    ext = options.ext or (src.suffix.lower().lstrip(".") if src.suffix.lower().lstrip(".") in FORMATS else "png")
    return folder / f"{src.stem}{options.suffix}.{ext}"


def output_is_file(out: str) -> bool:
    """`-o` names a file when it has an extension and is not an existing folder, or is `-`; else a folder."""
    return out == "-" or (not out.endswith(("/", os.sep)) and not Path(out).is_dir() and Path(out).suffix != "")


def output_targets(dest: Path, options: UpscaleOptions) -> tuple[Path, ...]:
    """Every file one input writes: its output, and with --std-map the std map beside it."""
    return (dest, dest.with_name(f"{dest.stem}_std.png")) if options.std_map else (dest,)


def check_targets(src: Path, targets: tuple[Path, ...], inputs: set[Path], claimed: set[Path]) -> None:
    """SRInputError if a target is an input or in `claimed`, another input's output (a.png, a.jpg -> a_x4.png)."""
    for target in targets:
        if is_symlink_loop(target):
            raise SRInputError(f"{src}: output {target} is a symlink loop; remove it or choose another -o")
        if resolved(target) in inputs:
            raise SRInputError(f"{src}: output {target} is an input; refusing to overwrite it")
        if resolved(target) in claimed:
            raise SRInputError(f"{src}: output {target} was already written for another input")
        too_long = name_too_long(target)
        if too_long:
            raise SRInputError(f"{src}: {too_long}")


@dataclass
class FileNotes:
    """What upscaling one file has to tell: returned, not printed, so a worker's reach the driver."""

    warnings: list[str]
    timing: str | None = None
    seconds: float = 0.0
    backend_seconds: float = 0.0
    tiles: int = 0

    def report(self) -> None:
        """Decoder warnings to the `sr_runtime` log, the --timings line to stderr on its own line."""
        for warning in self.warnings:
            logging.getLogger("sr_runtime").warning("%s", printable(warning))
        if self.timing:
            tqdm.write(f"sr-upscale: {printable(self.timing)}", file=sys.stderr)


@dataclass(frozen=True)
class FileResult:
    """One file's end as `run_file` returns it: its notes, or its failure line."""

    notes: FileNotes | None = None
    failure: str | None = None


def upscale_file(upscaler: Upscaler, src: Path, targets: tuple[Path, ...], options: UpscaleOptions) -> FileNotes:
    """Read `src`, upscale it, write its `output_targets` atomically: the whole of one input's work.

    Raises what FILE_ERRORS names for this file alone; `run_file` turns that into its line.
    """
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # one decode per process at a time: safe here
        warnings.simplefilter("always")
        if src == STDIO:
            data = sys.stdin.buffer.read()
            img = open_image_bytes(data, "-", upscaler.max_pixels)
            in_format = sniff_format(data)
        else:
            img = open_image(src, upscaler.max_pixels)
            in_format = FORMATS.get(src.suffix.lower().lstrip("."))
    notes = FileNotes([f"{src}: {message}" for message in dict.fromkeys(str(w.message).strip() for w in caught)])
    stats = RunStats()
    with tqdm(desc=src.name, unit="tile", leave=False, disable=options.quiet or None) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        out, std = upscaler.run(img, options.samples, progress=progress, stats=stats)
    std_img = std_map_image(std) if options.std_map else None
    if options.outscale not in (None, 4.0):
        size = (max(1, round(img.width * options.outscale)), max(1, round(img.height * options.outscale)))
        out = lanczos_resize(out, size)
        std_img = None if std_img is None else lanczos_resize(std_img, size)
    icc = img.info.get("icc_profile")
    if targets[0] == STDIO:
        write_stdout(out, FORMATS[options.ext] if options.ext else in_format or "PNG", icc)
    else:
        save_atomic(out, targets[0], icc)
    if std_img is not None:
        save_atomic(std_img, targets[1])
    wall = time.perf_counter() - t0
    notes.seconds, notes.backend_seconds, notes.tiles = wall, stats.backend_seconds, stats.tiles
    if options.timings:
        share = 1.0 - stats.backend_seconds / wall if wall > 0 else 0.0
        notes.timing = (
            f"{src} -> {targets[0]}: {wall:.2f} s wall, backend {stats.backend_seconds:.2f} s "
            f"({stats.tiles} tiles), {share:.1%} outside the backend"
        )
    return notes


def run_file(upscaler: Upscaler, src: Path, targets: tuple[Path, ...], options: UpscaleOptions) -> FileResult:
    """`upscale_file`, its failure as a result: for a driver (a worker) that must answer for every file."""
    try:
        return FileResult(notes=upscale_file(upscaler, src, targets, options))
    except FILE_ERRORS as exc:
        return FileResult(failure=failure_line(src, exc))


def failure_line(src: Path, exc: BaseException) -> str:
    """`<input>: <reason>`, naming the input once whatever raised."""
    if isinstance(exc, MemoryError):
        return f"{src}: not enough memory (lower --max-pixels or --samples)"
    reason = str(exc)
    return reason if reason.startswith(str(src)) else f"{src}: {reason}"


def final_status(failures: list[str], interrupted: int) -> int:
    """Print each failure line; the exit status: `interrupted` (130/143) if set, 1 with failures, else 0."""
    for failure in failures:
        print(f"sr-upscale: failed: {printable(failure)}", file=sys.stderr)
    if interrupted:
        print("sr-upscale: interrupted", file=sys.stderr)
        return interrupted
    return 1 if failures else 0


def save_atomic(img: Image.Image, dest: Path, icc_profile: bytes | None = None) -> None:
    """Write via a temporary file in the same folder and os.replace: no half-written outputs.

    `icc_profile` (the input's) is embedded when it describes the written mode's
    colour space, so Display P3 or Adobe RGB pixels are not read back as sRGB.
    """
    fmt = FORMATS.get(dest.suffix.lower().lstrip("."))
    if fmt is None:
        raise SRInputError(f"{dest}: unknown output format {dest.suffix!r} (use .png, .jpg or .webp)")
    atomic_write(dest, lambda fh: save_as(img, fh, fmt, icc_profile))


def write_stdout(img: Image.Image, fmt: str, icc_profile: bytes | None) -> None:
    """Encode `img` as `fmt` to standard output in one write (nothing else goes there)."""
    sys.stdout.buffer.write(encode(img, fmt, icc_profile))
    sys.stdout.buffer.flush()


def encode(img: Image.Image, fmt: str, icc_profile: bytes | None = None) -> bytes:
    """`img` encoded in memory as `save_as` writes it (`sr-serve` answers with these bytes)."""
    buf = io.BytesIO()
    save_as(img, buf, fmt, icc_profile)
    return buf.getvalue()


def save_as(img: Image.Image, fh: BinaryIO, fmt: str, icc_profile: bytes | None = None) -> None:
    """Write `img` to `fh` as `fmt` (PNG, JPEG, WEBP) with SAVE_OPTIONS, modes the format lacks converted.

    `icc_profile` is embedded only where it describes the written mode (`icc_fits`).
    """
    img = fit_format(img, fmt)
    extra = {"icc_profile": icc_profile} if icc_profile and icc_fits(icc_profile, img.mode) else {}
    img.save(fh, format=fmt, **SAVE_OPTIONS[fmt], **extra)


#: ICC colour space signature (header bytes 16..20) -> the PIL modes whose pixels it describes.
ICC_SPACES = {b"RGB ": ("RGB", "RGBA"), b"GRAY": ("L", "LA", "I;16"), b"CMYK": ("CMYK",)}


def icc_fits(profile: bytes, mode: str) -> bool:
    """Whether an ICC profile's colour space is that of `mode` (a CMYK profile must not tag RGB pixels)."""
    return len(profile) >= 128 and mode in ICC_SPACES.get(profile[16:20], ())


def fit_format(img: Image.Image, fmt: str) -> Image.Image:
    """Convert modes a format cannot store to the nearest one it can (only what is needed)."""
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


def lanczos_resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize with Lanczos in the image's own mode (16-bit grey through float, which Pillow filters)."""
    if img.mode == "I;16":
        grey = Image.fromarray(np.asarray(img, np.float32)).resize(size, Image.Resampling.LANCZOS)
        return Image.fromarray(np.clip(np.rint(np.asarray(grey)), 0, 65535).astype(np.uint16))
    if img.mode in ("LA", "RGBA", "CMYK"):  # Pillow filters these per band
        return Image.merge(img.mode, [b.resize(size, Image.Resampling.LANCZOS) for b in img.split()])
    return img.resize(size, Image.Resampling.LANCZOS)


def sniff_format(data: bytes) -> str | None:
    """PNG, JPEG or WEBP from an encoded image's first bytes, else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None
