"""Build the project's training/validation photos on a fresh machine.

The pixels are never committed: ``training_photos.tsv`` (next to this file)
names natural photos inside Debian packages (wallpapers, and photos that
digikam-data, palapeli-data and stellarium-data ship) and inside the
scikit-image / scikit-learn wheels, with their split, sha256 and licence (as
the package's copyright file or the wheel's docs state it). This command fetches
the ``.deb`` files with ``apt-get download`` into a cache, streams only the
listed files out of ``dpkg-deb --fsys-tarfile``, and writes ground-truth PNGs
to ``<out>/{train,val}/<name>.png``, plus ``<out>/manifest.tsv``: one row per
PNG present (its size, source, sha256 and licence), so a data folder carries
its own provenance.

Some photos are downscaled x2 first (manifest column ``downscale``) to hide
compression artefacts: Pillow LANCZOS with ``reducing_gap=None``, i.e. the
exact separable filter, no draft-mode shortcut, on the largest even-sized
top-left box so that output pixels cover exactly 2x2 source pixels. Which ones
is a rule on two measurements of the source file (``measure``; both are
manifest columns, re-measured and checked on every fetch), never a hand choice
(``rule_downscale``):

* ``quality``: for a JPEG, the IJG quality (1-100) whose scaled standard
  luminance table is nearest (L1) to the file's own luma quantisation table
  (``jpeg_quality``); how coarsely the encoder quantised, read off the file.
* ``blockiness``: the mean absolute luma step across the 8x8 block boundaries
  over the mean step elsewhere, both directions averaged (``blockiness``): 1.0
  for pixels with no JPEG grid; a file saved at high quality after an earlier
  low-quality save (or a PNG converted from a JPEG) keeps the earlier grid,
  which the tables alone do not show.

A training photo is used at its native resolution when its pixels are clean:
``blockiness <= MAX_NATIVE_BLOCKINESS`` and, for a JPEG, ``quality >=
MIN_NATIVE_QUALITY``; otherwise it is downscaled x2. Validation photos keep the
treatment every reported score was measured on (Debian JPEGs x2, the rest as
they are), and the wheels' small validation photos are used as they are.

A path ``FILE::KEY`` names an image stored inside a container file of the
package: ``KEY`` is an entry of an EET file (the format of Enlightenment's
``.edj`` backgrounds, which hold each photo as a plain JPEG entry); its sha256 is
that of the entry's bytes.

The split is by image, from a hash of the path (``split_for``): it never
depends on what else the list holds. Runs are idempotent: finished PNGs and
cached ``.deb`` files are kept and skipped.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
from PIL import Image

from sr_runtime.imaging import RASTER_FORMATS

DEFAULT_MANIFEST = Path(__file__).with_name("training_photos.tsv")
DEFAULT_OUT = Path("data/photos")
DEFAULT_CACHE = Path("data/cache/debs")
VAL_FRACTION = 0.15
_COLUMNS = (
    "source", "package", "path", "w", "h", "quality", "blockiness", "downscale", "split", "name",
    "sha256", "licence",
)  # fmt: skip
OUT_MANIFEST = "manifest.tsv"  # written into the output root
_OUT_COLUMNS = (
    "split", "name", "w", "h", "source", "package", "path", "quality", "blockiness", "downscale",
    "sha256", "licence",
)  # fmt: skip

# The native-resolution rule (module docstring, ``rule_downscale``). Calibrated on
# the listed photos (docs/training.md): the Enlightenment backgrounds are quality
# 99 with blockiness 0.97-1.02; Pillow's own re-encodes of those at quality 90
# measure 1.03-2.7 (smooth sky shows the grid most), and a quality-75 file saved
# again at quality 95 keeps its quality-75 blockiness (1.1-5.6).
MIN_NATIVE_QUALITY = 90
MAX_NATIVE_BLOCKINESS = 1.2
BLOCKINESS_TOLERANCE = 0.01  # re-measured on fetch: a decoder may differ this much


MEMBER_SEP = "::"  # FILE::KEY = entry KEY of the container FILE
_EET_MAGIC = 0x1EE70F42


class FetchError(RuntimeError):
    """A source could not be fetched; the message says what to do about it."""


@dataclass(frozen=True)
class Photo:
    """One manifest row: where a photo comes from and where its PNG goes."""

    source: str  # "deb" (a Debian package) or "wheel" (an installed Python package)
    package: str
    path: str  # inside the package: filesystem path (deb) or path under the module dir
    w: int
    h: int
    downscale: int
    split: str
    name: str
    sha256: str  # of the source file's bytes; empty = not pinned
    licence: str = ""  # SPDX-style id as the package's copyright file / docs state it
    quality: int | None = None  # jpeg_quality of the source (None: not a JPEG)
    blockiness: float | None = None  # blockiness of the source (None: not measured)

    def output(self, out_root: Path) -> Path:
        return out_root / self.split / f"{self.name}.png"

    @property
    def out_size(self) -> tuple[int, int]:
        """The ground-truth PNG's (width, height): the source's, after ``downscale``."""
        return self.w // self.downscale, self.h // self.downscale

    @property
    def file(self) -> str:
        """The file inside the package (the container, for a ``FILE::KEY`` path)."""
        return self.path.split(MEMBER_SEP, 1)[0]

    @property
    def member(self) -> str:
        """The entry inside ``file`` holding the image; empty when the file is the image."""
        return self.path.split(MEMBER_SEP, 1)[1] if MEMBER_SEP in self.path else ""


def split_for(path: str, val_fraction: float = VAL_FRACTION) -> str:
    """Deterministic split by image: 'val' iff sha256(path) falls in the low fraction."""
    u = int(hashlib.sha256(path.encode()).hexdigest()[:8], 16) / 2**32
    return "val" if u < val_fraction else "train"


# libjpeg's (IJG) standard luminance quantisation table (ITU-T T.81 Annex K), natural order.
_IJG_LUMA = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip


def ijg_luma_table(quality: int) -> tuple[int, ...]:
    """The luma table libjpeg writes at ``quality`` (1-100; baseline, so capped at 255)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return tuple(min(max((q * scale + 50) // 100, 1), 255) for q in _IJG_LUMA)


_IJG_TABLES = {q: ijg_luma_table(q) for q in range(1, 101)}


def jpeg_quality(im: Image.Image) -> int | None:
    """The IJG quality whose luma table is nearest (L1; ties to the higher) to the file's.

    Exact for files libjpeg (Pillow, most tools) wrote; for other encoders' tables the
    IJG quality that quantises about as coarsely. None for an image that is not a JPEG.
    """
    tables = getattr(im, "quantization", None)
    if im.format != "JPEG" or not tables:
        return None
    layer = getattr(im, "layer", None)  # (component id, h, v, table index) per component
    key = layer[0][3] if layer and layer[0][3] in tables else min(tables)
    luma = tuple(tables[key])
    if len(luma) != 64:
        return None
    return min(_IJG_TABLES, key=lambda q: (sum(abs(a - b) for a, b in zip(luma, _IJG_TABLES[q], strict=True)), -q))


def blockiness(im: Image.Image) -> float:
    """Mean |luma step| across 8x8 block boundaries over the mean elsewhere (1.0 = no grid).

    Columns then rows, averaged; steps between pixels 7|8, 15|16, ... are the boundary
    ones (the grid of a JPEG decoded at full size, or of a PNG converted from one).
    """
    y = np.asarray(im.convert("L"), dtype=np.int16)
    ratios = []
    for a in (y, y.T):
        if a.shape[1] < 17:
            continue
        step = np.abs(np.diff(a, axis=1))
        on_edge = np.arange(step.shape[1]) % 8 == 7
        inner = float(step[:, ~on_edge].mean())
        ratios.append(float(step[:, on_edge].mean()) / inner if inner > 0 else 1.0)
    return float(np.mean(ratios)) if ratios else 1.0


@dataclass(frozen=True)
class Measure:
    """What the native-resolution rule reads off a source file."""

    fmt: str
    w: int
    h: int
    quality: int | None  # jpeg_quality
    blockiness: float
    sha256: str


def measure(data: bytes) -> Measure:
    """Measure a source file's bytes (a curator's tool, and the check on every fetch)."""
    with Image.open(io.BytesIO(data), formats=RASTER_FORMATS) as im:
        quality = jpeg_quality(im)
        fmt = im.format or ""
        return Measure(fmt, im.size[0], im.size[1], quality, round(blockiness(im), 3),
                       hashlib.sha256(data).hexdigest())  # fmt: skip


def rule_downscale(source: str, split: str, quality: int | None, blockiness: float | None) -> int:
    """1 (native resolution) or 2, by the documented rule (module docstring).

    ``quality`` None means the source is not a JPEG.
    """
    if source == "wheel":
        return 1  # the wheels' small validation photos, as they are
    if split == "val":
        return 1 if quality is None else 2  # the treatment every reported score was measured on
    clean = blockiness is not None and blockiness <= MAX_NATIVE_BLOCKINESS
    if quality is not None:
        clean = clean and quality >= MIN_NATIVE_QUALITY
    return 1 if clean else 2


def read_manifest(path: Path = DEFAULT_MANIFEST) -> list[Photo]:
    """Parse the TSV manifest; fails loudly on a malformed file."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if tuple(reader.fieldnames or ()) != _COLUMNS:
            raise ValueError(f"{path}: expected columns {_COLUMNS}, got {reader.fieldnames}")
        return [
            Photo(
                source=r["source"],
                package=r["package"],
                path=r["path"],
                w=int(r["w"]),
                h=int(r["h"]),
                quality=int(r["quality"]) if r["quality"] else None,
                blockiness=float(r["blockiness"]) if r["blockiness"] else None,
                downscale=int(r["downscale"]),
                split=r["split"],
                name=r["name"],
                sha256=r["sha256"],
                licence=r["licence"],
            )
            for r in reader
        ]


def downscale(im: Image.Image, factor: int) -> Image.Image:
    """Exact LANCZOS downscale by an integer factor (identity for factor 1)."""
    if factor == 1:
        return im
    w, h = im.size[0] // factor, im.size[1] // factor
    box = (0, 0, w * factor, h * factor)
    return im.resize((w, h), Image.Resampling.LANCZOS, box=box, reducing_gap=None)


def _save_png_atomic(im: Image.Image, dest: Path) -> None:
    """Write then rename, so an interrupted run never leaves a truncated PNG to skip."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    im.save(tmp, format="PNG")
    os.replace(tmp, dest)


def make_ground_truth(photo: Photo, data: bytes, out_root: Path, log: TextIO) -> None:
    """Check a source file against the manifest (and the rule) and write its ground-truth PNG."""
    digest = hashlib.sha256(data).hexdigest()
    if photo.sha256 and digest != photo.sha256:
        print(f"  warning: {photo.name}: source sha256 {digest} differs from the manifest", file=log)
    try:
        with Image.open(io.BytesIO(data), formats=RASTER_FORMATS) as src:
            if src.size != (photo.w, photo.h):
                print(
                    f"  warning: {photo.name}: source is {src.size}, manifest says {(photo.w, photo.h)}",
                    file=log,
                )
            quality = jpeg_quality(src)
            rgb = src.convert("RGB")
    except Exception as exc:  # noqa: BLE001 -- any decoder error fails this photo, not the run
        raise FetchError(
            f"{photo.name}: {photo.path} is not a readable raster image ({type(exc).__name__}: {exc})"
        ) from None
    block = blockiness(rgb)
    if photo.blockiness is not None and (
        quality != photo.quality or abs(block - photo.blockiness) > BLOCKINESS_TOLERANCE
    ):
        print(
            f"  warning: {photo.name}: measured quality {quality}, blockiness {block:.3f}; "
            f"the manifest says {photo.quality}, {photo.blockiness:.3f}",
            file=log,
        )
    want = rule_downscale(photo.source, photo.split, quality, block)
    if photo.blockiness is not None and want != photo.downscale:
        raise FetchError(
            f"{photo.name}: quality {quality}, blockiness {block:.3f} give downscale {want} by the "
            f"rule, the manifest says {photo.downscale}: fix the manifest row"
        )
    im = downscale(rgb, photo.downscale)
    _save_png_atomic(im, photo.output(out_root))
    print(
        f"  {photo.split:5s} {photo.name}  {src.size[0]}x{src.size[1]} -> {im.size[0]}x{im.size[1]}",
        file=log,
        flush=True,
    )


def eet_entry(data: bytes, key: str) -> bytes:
    """The bytes of entry ``key`` of an EET file (e.g. an Enlightenment ``.edj``).

    EET layout (big-endian int32): magic, entry count, dictionary count, then per
    entry (offset, size, data_size, name_offset, name_size, flags). Entries that
    are zlib-compressed (flags bit 0, compression type 0) are inflated; ciphered,
    aliased or LZ4-compressed entries are refused.
    """
    if len(data) < 12:
        raise FetchError(f"not an EET file (only {len(data)} bytes), looking for entry {key}")
    magic, count, _ = struct.unpack_from(">III", data, 0)
    if magic != _EET_MAGIC or 12 + 24 * count > len(data):
        raise FetchError(f"not an EET file (magic {magic:#x}), looking for entry {key}")
    for i in range(count):
        off, size, data_size, name_off, name_size, flags = struct.unpack_from(">6I", data, 12 + 24 * i)
        if data[name_off : name_off + name_size].rstrip(b"\0").decode(errors="replace") != key:
            continue
        if off + size > len(data):
            raise FetchError(f"EET entry {key} runs past the end of the file")
        blob = data[off : off + size]
        if flags & 0b110:
            raise FetchError(f"EET entry {key} is ciphered or an alias (flags {flags:#x})")
        if flags & 1:
            if (flags >> 3) & 0xFF:
                raise FetchError(f"EET entry {key} uses an unsupported compression ({flags:#x})")
            blob = zlib.decompress(blob)
            if len(blob) != data_size:
                raise FetchError(f"EET entry {key}: {len(blob)} bytes inflated, expected {data_size}")
        return blob
    raise FetchError(f"EET file has no entry {key}")


def _require_tool(tool: str, why: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise FetchError(f"'{tool}' not found on PATH: {why}")
    return found


def apt_download(package: str, cache: Path) -> Path:
    """The package's .deb in ``cache``, downloaded with ``apt-get download`` if missing."""
    cached = sorted(cache.glob(f"{package}_*.deb"))
    if cached:
        return cached[-1]
    apt = _require_tool(
        "apt-get",
        f"building the training set needs a Debian/Ubuntu machine; elsewhere, put "
        f"{package}_*.deb (from packages.debian.org) into {cache} and run again",
    )
    cache.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([apt, "download", package], check=False, cwd=cache, capture_output=True, text=True)
    cached = sorted(cache.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not cached:
        hint = " (try 'apt-get update' first)" if "locate" in proc.stderr else ""
        raise FetchError(f"apt-get download {package} failed{hint}: {proc.stderr.strip()}")
    return cached[-1]


def iter_deb_files(deb: Path, wanted: Iterable[str]) -> Iterable[tuple[str, bytes]]:
    """Yield (path, bytes) for the wanted paths, streamed from the .deb's data archive."""
    dpkg = _require_tool("dpkg-deb", "install dpkg to unpack .deb files")
    wanted_set = {p.lstrip("/") for p in wanted}
    with subprocess.Popen([dpkg, "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                path = member.name.removeprefix("./")
                if path in wanted_set and member.isfile():
                    f = tar.extractfile(member)
                    assert f is not None
                    yield path, f.read()
        proc.stdout.read()  # drain the tar padding so dpkg-deb does not die of SIGPIPE
        stderr = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise FetchError(f"dpkg-deb --fsys-tarfile {deb} failed: {stderr.strip()}")


def _wheel_file(photo: Photo) -> Path:
    spec = importlib.util.find_spec(photo.package)
    if spec is None or not spec.submodule_search_locations:
        raise FetchError(f"Python package '{photo.package}' is not installed: it carries validation photo {photo.name}")
    return Path(next(iter(spec.submodule_search_locations))) / photo.path


def _done(photo: Photo, out_root: Path) -> bool:
    """The PNG exists at the size the manifest asks for (a folder made by an older rule is redone)."""
    try:
        with Image.open(photo.output(out_root)) as im:
            return im.size == photo.out_size
    except (OSError, ValueError):
        return False


def fetch(photos: Sequence[Photo], out_root: Path, cache: Path, log: TextIO) -> list[str]:
    """Make every photo's PNG that does not exist yet; returns the errors (empty = done)."""
    todo = [p for p in photos if not _done(p, out_root)]
    print(f"{len(photos) - len(todo)} of {len(photos)} photos already in {out_root}", file=log)
    errors: list[str] = []
    for package in dict.fromkeys(p.package for p in todo if p.source == "deb"):
        rows: dict[str, list[Photo]] = {}
        for p in todo:
            if p.source == "deb" and p.package == package:
                rows.setdefault(p.file, []).append(p)
        print(f"[{package}] {sum(map(len, rows.values()))} photos", file=log, flush=True)
        try:
            deb = apt_download(package, cache)
            for path, data in iter_deb_files(deb, rows):
                for photo in rows.pop(path):
                    try:
                        payload = data
                        if photo.member:
                            try:
                                payload = eet_entry(data, photo.member)
                            except FetchError as e:
                                raise FetchError(f"{photo.name}: {photo.file}: {e}") from None
                        make_ground_truth(photo, payload, out_root, log)
                    except FetchError as e:
                        errors.append(str(e))
        except FetchError as e:
            errors.append(str(e))
            continue
        errors.extend(f"{package}: {p} not found in {deb.name}" for p in rows)
    for photo in (p for p in todo if p.source == "wheel"):
        try:
            make_ground_truth(photo, _wheel_file(photo).read_bytes(), out_root, log)
        except (FetchError, OSError) as e:
            errors.append(str(e))
    unknown = {p.source for p in todo} - {"deb", "wheel"}
    errors.extend(f"unknown source kind in manifest: {s}" for s in sorted(unknown))
    return errors


def write_out_manifest(photos: Sequence[Photo], out_root: Path) -> Path:
    """Write ``<out>/manifest.tsv`` for the photos whose PNG exists (sizes are the PNG's).

    Rewritten only when its content changes, so a second run leaves it untouched.
    """
    lines = ["\t".join(_OUT_COLUMNS)]
    for p in sorted(photos, key=lambda p: (p.split, p.name)):
        if p.output(out_root).exists():
            w, h = p.out_size
            quality = "" if p.quality is None else p.quality
            block = "" if p.blockiness is None else f"{p.blockiness:.3f}"
            row = (p.split, p.name, w, h, p.source, p.package, p.path, quality, block,
                   p.downscale, p.sha256, p.licence)  # fmt: skip
            lines.append("\t".join(str(v) for v in row))
    text = "\n".join(lines) + "\n"
    dest = out_root / OUT_MANIFEST
    if not dest.exists() or dest.read_text() != text:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, dest)
    return dest


def summarize(out_root: Path) -> list[str]:
    """Photos and megapixels per split and per source package, from ``<out>/manifest.tsv``.

    The sizes are the PNGs' (after any downscale): the pixels training and validation see.
    """
    path = out_root / OUT_MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run 'sr-train fetch-data --out {out_root}' first")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    per: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        for key in ((r["split"], ""), (r["split"], r["package"])):
            acc = per.setdefault(key, [0, 0, 0])
            acc[0] += 1
            acc[1] += int(r["w"]) * int(r["h"])
            acc[2] += r["downscale"] == "1"
    lines = [f"{'split':5s}  {'source':30s} {'photos':>6s} {'native':>6s} {'MP':>7s}"]
    for split in ("train", "val"):
        for (s, package), (n, px, native) in sorted(per.items()):
            if s == split and package:
                lines.append(f"{split:5s}  {package:30s} {n:6d} {native:6d} {px / 1e6:7.1f}")
        n, px, native = per.get((split, ""), [0, 0, 0])
        lines.append(f"{split:5s}  {'total':30s} {n:6d} {native:6d} {px / 1e6:7.1f}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m sr_train.fetch_data [--out DIR] [--cache DIR] [--manifest TSV] [--summary]``."""
    ap = argparse.ArgumentParser(prog="sr-train fetch-data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="ground-truth PNG root")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where .deb files are kept")
    ap.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    ap.add_argument(
        "--summary",
        action="store_true",
        help="only print the photos and megapixels per split and source of the data in --out",
    )
    args = ap.parse_args(argv)
    if args.summary:
        try:
            print("\n".join(summarize(args.out)))
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    start = time.perf_counter()
    photos = read_manifest(args.manifest)
    errors = fetch(photos, args.out, args.cache, sys.stdout)
    write_out_manifest(photos, args.out)
    counts = {s: sum(p.output(args.out).exists() for p in photos if p.split == s) for s in ("train", "val")}
    print(
        f"done in {time.perf_counter() - start:.0f} s: {counts['train']} train, "
        f"{counts['val']} val photos in {args.out}"
    )
    print("\n".join(summarize(args.out)))
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
