"""One input file's job: decode, upscale, write atomically, or one failure line; and the options it runs with.

The library core every driver shares: `sr-upscale` runs its files through
`run_files` (the next file decodes and the previous one is written while the
backend works on the current one), a runner (`sr-upscale --ray`, see `runners`)
runs `run_file` on workers elsewhere, and `sr-serve` encodes its answers with
the same format helpers. Both paths do a file in the same three stages
(`read_input`, `upscale_input`, `write_outputs`), so every option behaves the
same either way. `UpscaleOptions` is plain, frozen data, so a driver ships it to
another process as it is; the command line it came from stays with the CLI.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO, TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from sr_runtime.errors import SRInputError
from sr_runtime.files import atomic_write, is_symlink_loop, name_too_long, printable, resolved
from sr_runtime.imaging import open_image, open_image_bytes
from sr_runtime.memory import LARGE_OUTPUT_PIXELS, release_free_memory
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

T = TypeVar("T")


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
    tile: int = 0  # fully convolutional models: at most tile x tile LR pixels per call; 0 = the default budget
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
            frame_pixels=self.tile * self.tile if self.tile else None,
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
    """What upscaling one file has to tell: returned, not printed, so a worker's reach the driver.

    `seconds` is this file's own work (read + upscale + write), not the time it
    waited for a stage; `stages` says when each stage ran (`time.perf_counter()`
    of the process that ran it), which is how a pipelined run's overlap shows.
    """

    warnings: list[str]
    timing: str | None = None
    seconds: float = 0.0
    backend_seconds: float = 0.0
    tiles: int = 0
    stages: StageTimes | None = None

    def report(self) -> None:
        """Decoder warnings to the `sr_runtime` log, the --timings line to stderr on its own line."""
        for warning in self.warnings:
            logging.getLogger("sr_runtime").warning("%s", printable(warning))
        if self.timing:
            tqdm.write(f"sr-upscale: {printable(self.timing)}", file=sys.stderr)


@dataclass(frozen=True)
class StageTimes:
    """(start, end) `time.perf_counter()` of one file's three stages: read and decode, upscale, encode and write."""

    read: tuple[float, float]
    upscale: tuple[float, float]
    write: tuple[float, float]

    def seconds(self) -> dict[str, float]:
        """Each stage's duration, by name."""
        return {
            name: end - start
            for name, (start, end) in (("read", self.read), ("upscale", self.upscale), ("write", self.write))
        }


@dataclass(frozen=True)
class FileResult:
    """One file's end as `run_file` returns it: its notes, or its failure line."""

    notes: FileNotes | None = None
    failure: str | None = None


class DecoderWarnings:
    """Decoder warnings kept with the file whose decode raised them, on whichever thread it decodes.

    `warnings.catch_warnings` is process-wide (before Python 3.14): entered around
    a decode on a helper thread it would also catch the main thread's warnings and
    race with its restore. So one `catch_warnings` spans a whole job, entered and
    left by the driver's thread (`installed`), and its hook routes each warning by
    the thread that raised it: into the list of a `recording` on that thread, else
    on to the previous hook.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        with warnings.catch_warnings():
            warnings.simplefilter("always")  # every file's warning, not only the first at each place
            forward = warnings.showwarning

            def show(
                message: Warning | str,
                category: type[Warning],
                filename: str,
                lineno: int,
                file: TextIO | None = None,
                line: str | None = None,
            ) -> None:
                records: list[str] | None = getattr(self._local, "records", None)
                if records is None:
                    forward(message, category, filename, lineno, file, line)
                else:
                    records.append(str(message).strip())

            warnings.showwarning = show
            yield

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[str]]:
        """The warnings raised on this thread meanwhile (only while `installed`)."""
        records: list[str] = []
        self._local.records = records
        try:
            yield records
        finally:
            self._local.records = None


@dataclass(frozen=True)
class DecodedInput:
    """Stage 1 of a file: its image decoded, the format it came in, its decoder warnings (named)."""

    image: Image.Image
    in_format: str | None
    warnings: list[str]
    span: tuple[float, float]


@dataclass(frozen=True)
class UpscaledInput:
    """Stage 2 of a file: the x4 image and its std map, with what stage 1 and the backend reported."""

    decoded: DecodedInput
    image: Image.Image
    std: np.ndarray
    stats: RunStats
    span: tuple[float, float]


def read_input(upscaler: Upscaler, src: Path, warned: DecoderWarnings) -> DecodedInput:
    """Read and decode `src` (`-`: standard input) within the Upscaler's pixel limit; SRInputError if unusable."""
    t0 = time.perf_counter()
    with warned.recording() as caught:
        if src == STDIO:
            data = sys.stdin.buffer.read()
            img = open_image_bytes(data, "-", upscaler.max_pixels)
            in_format = sniff_format(data)
        else:
            img = open_image(src, upscaler.max_pixels)
            in_format = FORMATS.get(src.suffix.lower().lstrip("."))
    named = [f"{src}: {message}" for message in dict.fromkeys(caught)]
    return DecodedInput(img, in_format, named, (t0, time.perf_counter()))


def upscale_input(upscaler: Upscaler, src: Path, decoded: DecodedInput, options: UpscaleOptions) -> UpscaledInput:
    """The backend's part: x4 (with `options.samples`), with its per-file progress bar of tiles."""
    t0 = time.perf_counter()
    stats = RunStats()
    with tqdm(desc=src.name, unit="tile", leave=False, disable=options.quiet or None) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        out, std = upscaler.run(decoded.image, options.samples, progress=progress, stats=stats)
    return UpscaledInput(decoded, out, std, stats, (t0, time.perf_counter()))


def is_large(done: UpscaledInput) -> bool:
    """Whether the x4 image is large enough that its freed memory should go back to the OS once it is gone."""
    return done.image.width * done.image.height >= LARGE_OUTPUT_PIXELS


def write_outputs(src: Path, targets: tuple[Path, ...], options: UpscaleOptions, done: UpscaledInput) -> FileNotes:
    """Std map, --outscale, encode, write each target atomically (or to standard output); the file's notes."""
    t0 = time.perf_counter()
    decoded, out = done.decoded, done.image
    std_img = std_map_image(done.std) if options.std_map else None
    if options.outscale not in (None, 4.0):
        img = decoded.image
        size = (max(1, round(img.width * options.outscale)), max(1, round(img.height * options.outscale)))
        out = lanczos_resize(out, size)
        std_img = None if std_img is None else lanczos_resize(std_img, size)
    icc = decoded.image.info.get("icc_profile")
    if targets[0] == STDIO:
        write_stdout(out, FORMATS[options.ext] if options.ext else decoded.in_format or "PNG", icc)
    else:
        save_atomic(out, targets[0], icc)
    if std_img is not None:
        save_atomic(std_img, targets[1])
    stages = StageTimes(decoded.span, done.span, (t0, time.perf_counter()))
    seconds = sum(stages.seconds().values())
    backend = done.stats.backend_seconds
    notes = FileNotes(list(decoded.warnings), None, seconds, backend, done.stats.tiles, stages)
    if options.timings:
        share = 1.0 - backend / seconds if seconds > 0 else 0.0
        notes.timing = (
            f"{src} -> {targets[0]}: {seconds:.2f} s wall, backend {backend:.2f} s "
            f"({done.stats.tiles} tiles), {share:.1%} outside the backend"
        )
    return notes


def upscale_file(upscaler: Upscaler, src: Path, targets: tuple[Path, ...], options: UpscaleOptions) -> FileNotes:
    """Read `src`, upscale it, write its `output_targets` atomically: the whole of one input's work.

    Raises what FILE_ERRORS names for this file alone; `run_file` turns that into its line.
    """
    warned = DecoderWarnings()
    with warned.installed():
        decoded = read_input(upscaler, src, warned)
    done = upscale_input(upscaler, src, decoded, options)
    del decoded
    large = is_large(done)
    notes = write_outputs(src, targets, options, done)
    del done  # the file's last reference: its images are freed here
    if large:  # a worker lives on: give the image's pages back
        release_free_memory()
    return notes


def run_file(upscaler: Upscaler, src: Path, targets: tuple[Path, ...], options: UpscaleOptions) -> FileResult:
    """`upscale_file`, its failure as a result: for a driver (a worker) that must answer for every file."""
    try:
        return FileResult(notes=upscale_file(upscaler, src, targets, options))
    except FILE_ERRORS as exc:
        return FileResult(failure=failure_line(src, exc))


@dataclass(frozen=True)
class FileOutcome:
    """What became of one input of `run_files`: done (its notes), skipped (--no-clobber) or failed (its line)."""

    src: Path
    dest: Path
    status: str
    notes: FileNotes | None = None
    failure: str | None = None


@dataclass
class _Slot:
    """One admitted input of `run_files`, from its checks to its outcome."""

    src: Path
    dest: Path
    targets: tuple[Path, ...]
    outcome: FileOutcome | None = None
    decoding: Future[DecodedInput] | None = None
    upscaled: UpscaledInput | None = None  # from its upscale until its write takes it
    writing: Future[None] | None = None
    write_result: FileNotes | BaseException | None = None

    def fail(self, exc: BaseException) -> None:
        self.outcome = FileOutcome(self.src, self.dest, "failed", failure=failure_line(self.src, exc))

    def write(self, options: UpscaleOptions) -> None:
        """The write stage (on the writer thread); its notes or error stay with the slot.

        So the driver finds them even when an interrupt stopped it between
        handing the write over and keeping the future. The upscaled images are
        taken off the slot, so once written nothing else holds them and a large
        one's memory goes back to the OS here.
        """
        done, self.upscaled = self.upscaled, None
        assert done is not None
        large = is_large(done)
        try:
            self.write_result = write_outputs(self.src, self.targets, options, done)
        except BaseException as exc:  # noqa: BLE001 -- kept for the driver's thread, which reports or raises it
            self.write_result = exc
        del done
        if large and isinstance(self.write_result, FileNotes):
            release_free_memory()


class _RunNow:
    """An executor that runs each call at once on the calling thread: `run_files` without overlap."""

    def submit(self, fn: Callable[..., T], /, *args: object) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args))
        except FILE_ERRORS as exc:
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Nothing runs in the background."""


def run_files(
    upscaler: Upscaler,
    sources: Sequence[Path],
    options: UpscaleOptions,
    on_outcome: Callable[[FileOutcome], None],
    *,
    overlap: bool = True,
) -> None:
    """Upscale `sources` in order, calling `on_outcome` for each, in input order, as it ends.

    With `overlap` (the default) the next file is read and decoded on one helper
    thread and the previous one encoded and written on another while the backend
    works on the current one: at most one file decoded ahead and one being
    written, so memory stays that of ~two images. Each file runs the same stages
    as `run_file`, so its outputs are byte for byte those of a run without
    overlap. Checks (`check_targets`, --no-clobber) run in input order on the
    calling thread; a file whose outputs are those of a file still in flight
    waits for it, so it is judged as if the files ran one at a time. An
    interrupt (Ctrl-C, SIGTERM's SystemExit) lets the file being written finish
    and reports it before it propagates; the files behind it write nothing.
    """
    _FileRun(upscaler, sources, options, on_outcome, overlap).run()


class _FileRun:
    """The state of one `run_files` call: the admitted slots, in input order, not yet reported."""

    def __init__(
        self,
        upscaler: Upscaler,
        sources: Sequence[Path],
        options: UpscaleOptions,
        on_outcome: Callable[[FileOutcome], None],
        overlap: bool,
    ) -> None:
        self.upscaler, self.options, self.on_outcome, self.overlap = upscaler, options, on_outcome, overlap
        self.upcoming = deque(sources)
        self.inputs = {resolved(p) for p in sources}
        self.written: set[Path] = set()
        self.slots: deque[_Slot] = deque()
        self.warned = DecoderWarnings()

    def run(self) -> None:
        decoder: ThreadPoolExecutor | _RunNow = _RunNow()
        writer: ThreadPoolExecutor | _RunNow = _RunNow()
        if self.overlap:
            decoder = ThreadPoolExecutor(1, thread_name_prefix="sr-read")
            writer = ThreadPoolExecutor(1, thread_name_prefix="sr-write")
        try:
            # The writer's thread exists before any write is handed to it: a hand-over that an interrupt
            # cuts short then never leaves a thread the executor does not know, so `shutdown` waits for it.
            writer.submit(int).result()
            with self.warned.installed():
                self._loop(decoder, writer)
        except BaseException:
            decoder.shutdown(wait=False, cancel_futures=True)  # a decode ahead is dropped: it writes nothing
            writer.shutdown(wait=True)  # a write handed over finishes (atomically) ...
            self._settle_writes()  # ... and is reported
            self._report_finished()
            raise
        finally:
            decoder.shutdown(wait=False, cancel_futures=True)
            writer.shutdown(wait=True)

    def _loop(self, decoder: ThreadPoolExecutor | _RunNow, writer: ThreadPoolExecutor | _RunNow) -> None:
        while True:
            current = self._next_decoding(decoder)
            if current is None:
                break
            if self.overlap:
                self._admit_one_ahead(decoder, current)
            self._upscale(current, writer)
            self._report_finished()
        self._settle_writes()
        self._report_finished()

    def _next_decoding(self, decoder: ThreadPoolExecutor | _RunNow) -> _Slot | None:
        """The first admitted slot still to upscale, admitting (and if needed waiting for a clash) until one is."""
        while True:
            waiting = next((s for s in self.slots if s.decoding is not None), None)
            if waiting is not None:
                return waiting
            if not self.upcoming:
                return None
            if not self._admit(decoder):
                self._settle_writes()  # its outputs are a file in flight's: judge it once that one is written
                self._report_finished()

    def _admit_one_ahead(self, decoder: ThreadPoolExecutor | _RunNow, current: _Slot) -> None:
        """Admit files until one besides `current` is decoding (or the next must wait for a file in flight)."""
        while self.upcoming and not any(s is not current and s.decoding is not None for s in self.slots):
            if not self._admit(decoder):
                return

    def _admit(self, decoder: ThreadPoolExecutor | _RunNow) -> bool:
        """Check the next input and start its decode, or give it its skipped/failed outcome.

        False, admitting nothing, when one of its outputs is an output of a file
        still in flight: whether it exists or was claimed is known once that file ends.
        """
        src = self.upcoming[0]
        dest = output_path(src, self.options)
        targets = output_targets(dest, self.options)
        in_flight = {resolved(t) for s in self.slots if s.outcome is None for t in s.targets if t != STDIO}
        if any(resolved(t) in in_flight for t in targets if t != STDIO):
            return False
        self.upcoming.popleft()
        slot = _Slot(src, dest, targets)
        self.slots.append(slot)
        if self.options.no_clobber and dest != STDIO and any(t.exists() for t in targets):
            slot.outcome = FileOutcome(src, dest, "skipped")
            return True
        if dest != STDIO:
            try:
                check_targets(src, targets, self.inputs, self.written)
            except FILE_ERRORS as exc:
                slot.fail(exc)
                return True
        slot.decoding = decoder.submit(read_input, self.upscaler, src, self.warned)
        return True

    def _upscale(self, slot: _Slot, writer: ThreadPoolExecutor | _RunNow) -> None:
        """The backend on `slot` (this thread), then its write handed on once the previous write is done."""
        assert slot.decoding is not None
        try:
            decoded = slot.decoding.result()
            slot.decoding = None  # the decoded image is not kept past its upscale
            slot.upscaled = upscale_input(self.upscaler, slot.src, decoded, self.options)
        except FILE_ERRORS as exc:
            slot.decoding = None
            slot.fail(exc)
            return
        del decoded  # the slot's upscaled input holds it until the write
        self._settle_writes()  # one file being written at a time
        slot.writing = writer.submit(slot.write, self.options)

    def _settle_writes(self) -> None:
        """Wait for the write handed over, if any, and give its slot its outcome (or raise its interrupt)."""
        for slot in self.slots:
            if slot.outcome is not None or (slot.writing is None and slot.write_result is None):
                continue
            if slot.writing is not None:
                slot.writing.result()  # never raises: the write keeps its error on the slot
            result, slot.writing, slot.write_result = slot.write_result, None, None
            if isinstance(result, FileNotes):
                slot.outcome = FileOutcome(slot.src, slot.dest, "done", notes=result)
                self.written.update(resolved(t) for t in slot.targets if t != STDIO)
            elif isinstance(result, FILE_ERRORS):
                slot.fail(result)
            elif result is not None:
                raise result

    def _report_finished(self) -> None:
        """Hand the leading slots that have ended to `on_outcome`, in input order."""
        while self.slots:
            head = self.slots[0]
            if head.outcome is None and head.writing is not None and head.writing.done():
                self._settle_writes()
            if head.outcome is None:
                return
            self.slots.popleft()
            self.on_outcome(head.outcome)


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
