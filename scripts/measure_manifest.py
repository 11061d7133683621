"""Fill the measured columns of sr_train/training_photos.tsv from the source files.

A curator adds a row with source, package, path, name and licence (the other
columns may be anything, e.g. 0 or empty); this script reads every listed
file out of the cached ``.deb`` (or the installed wheel) and rewrites w, h,
quality, blockiness (``fetch_data.measure``), downscale (``rule_downscale``),
split (``split_for``, Debian rows; wheel rows stay val) and sha256, so none of
them is typed by hand. It prints what changed and the rows that break a rule
(fewer than 512 px on the short side after the downscale).

    python scripts/measure_manifest.py --cache data/cache/debs [--cache DIR2 ...] [--write]

Without ``--write`` it only reports. A ``.deb`` missing from every cache is
downloaded into the first one with ``apt-get download``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
from pathlib import Path

from sr_train import fetch_data as fd

MIN_SIDE = 512


def _deb(package: str, caches: list[Path]) -> Path:
    for cache in caches:
        found = sorted(cache.glob(f"{package}_*.deb"))
        if found:
            return found[-1]
    return fd.apt_download(package, caches[0])


def measured(photos: list[fd.Photo], caches: list[Path]) -> list[fd.Photo]:
    """The rows with their measured columns filled in (same order)."""
    got: dict[int, fd.Measure] = {}
    for package in dict.fromkeys(p.package for p in photos if p.source == "deb"):
        rows: dict[str, list[int]] = {}
        for i, p in enumerate(photos):
            if p.source == "deb" and p.package == package:
                rows.setdefault(p.file, []).append(i)
        for path, data in fd.iter_deb_files(_deb(package, caches), rows):
            for i in rows.pop(path):
                member = photos[i].member
                got[i] = fd.measure(fd.eet_entry(data, member) if member else data)
        if rows:
            raise fd.FetchError(f"{package}: not found: {', '.join(rows)}")
    for i, p in enumerate(photos):
        if p.source == "wheel":
            got[i] = fd.measure(fd._wheel_file(p).read_bytes())
    out = []
    for i, p in enumerate(photos):
        m = got[i]
        split = fd.split_for(p.path) if p.source == "deb" else "val"
        ds = fd.rule_downscale(p.source, split, m.quality, m.blockiness)
        out.append(dataclasses.replace(p, w=m.w, h=m.h, quality=m.quality, blockiness=m.blockiness,
                                       downscale=ds, split=split, sha256=m.sha256))  # fmt: skip
    return out


def write_manifest(photos: list[fd.Photo], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(fd._COLUMNS)
        for p in photos:
            row = {**dataclasses.asdict(p)}
            row["quality"] = "" if p.quality is None else p.quality
            row["blockiness"] = "" if p.blockiness is None else f"{p.blockiness:.3f}"
            w.writerow([row[c] for c in fd._COLUMNS])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, action="append", required=True, help="folder of .deb files")
    ap.add_argument("--manifest", type=Path, default=fd.DEFAULT_MANIFEST)
    ap.add_argument("--write", action="store_true", help="rewrite the manifest (else only report)")
    args = ap.parse_args(argv)
    old = fd.read_manifest(args.manifest)
    new = measured(old, args.cache)
    bad = 0
    for a, b in zip(old, new, strict=True):
        changed = [f"{f.name} {getattr(a, f.name)} -> {getattr(b, f.name)}" for f in dataclasses.fields(a)
                   if getattr(a, f.name) != getattr(b, f.name)]  # fmt: skip
        if changed:
            print(f"{b.name}: " + "; ".join(changed))
        if b.source == "deb" and min(b.out_size) < MIN_SIDE:
            print(f"{b.name}: RULE BROKEN: {b.out_size} after downscale {b.downscale} (< {MIN_SIDE} px)")
            bad += 1
    for split in ("train", "val"):
        px = sum(p.out_size[0] * p.out_size[1] for p in new if p.split == split)
        print(f"{split}: {sum(p.split == split for p in new)} photos, {px / 1e6:.1f} MP")
    if args.write:
        write_manifest(new, args.manifest)
        print(f"wrote {args.manifest}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
