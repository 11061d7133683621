"""Seeded fuzz of sr-upscale: mutated files of every accepted format in one batch.

The CLI runs once, in a subprocess on this checkout's code, over good files
interleaved with mutated ones. Whatever the mutated bytes do, the batch must
end without a traceback, every good file must be written, and no temporary
file may be left. The corpus is fixed by the seed and small (a few seconds).
"""

from __future__ import annotations

import io
import logging
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sr_runtime.cli import IMAGE_SUFFIXES

SEED = 11
MUTANTS_PER_FORMAT = 6
REPO = Path(__file__).resolve().parent.parent


def _seed_files() -> dict[str, bytes]:
    """One small valid file per accepted suffix, in modes that exercise different decoder paths."""
    rng = np.random.default_rng(SEED)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the EXIF path is decoded too
    frames = [rgb.convert("P"), rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("P")]
    makers = {
        ".png": lambda fh: rgb.convert("RGBA").save(fh, format="PNG"),
        ".jpg": lambda fh: rgb.save(fh, format="JPEG", exif=exif),
        ".jpeg": lambda fh: rgb.convert("L").save(fh, format="JPEG"),
        ".webp": lambda fh: rgb.save(fh, format="WEBP"),
        ".bmp": lambda fh: rgb.save(fh, format="BMP"),
        ".tif": lambda fh: Image.fromarray(rng.integers(0, 65536, (12, 16), dtype=np.uint16)).save(fh, format="TIFF"),
        ".tiff": lambda fh: rgb.save(fh, format="TIFF", compression="tiff_lzw", exif=exif),
        ".gif": lambda fh: frames[0].save(fh, format="GIF", save_all=True, append_images=frames[1:]),
        ".ppm": lambda fh: rgb.save(fh, format="PPM"),
        ".pgm": lambda fh: rgb.convert("L").save(fh, format="PPM"),
        ".tga": lambda fh: rgb.save(fh, format="TGA", compression="tga_rle"),
    }
    assert set(makers) == IMAGE_SUFFIXES, "a new accepted format needs a seed file here"
    files = {}
    for suffix, make in makers.items():
        buf = io.BytesIO()
        make(buf)
        files[suffix] = buf.getvalue()
    return files


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """A few byte flips, insertions, deletions or a truncation, biased towards the header."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(min(len(out), 64) if rng.random() < 0.6 else len(out))
        kind = rng.random()
        if kind < 0.5:
            out[pos] = rng.randrange(256)
        elif kind < 0.7:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif kind < 0.9:
            del out[pos : pos + rng.randint(1, 8)]
        else:
            del out[max(pos, 1) :]
    return bytes(out)


def test_mutated_files_of_every_format_in_one_batch(double_model: Path, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    inputs = tmp_path / "in"
    inputs.mkdir()
    good: list[Path] = []
    paths: list[Path] = []
    for suffix, data in sorted(_seed_files().items()):
        for i in range(MUTANTS_PER_FORMAT):
            mutant = inputs / f"mutant{i}_{suffix[1:]}{suffix}"
            mutant.write_bytes(_mutate(data, rng))
            paths.append(mutant)
        original = inputs / f"good_{suffix[1:]}{suffix}"
        original.write_bytes(data)
        good.append(original)
        paths.append(original)
    out = tmp_path / "out"
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sr_runtime.cli",
            "--model",
            str(double_model),
            "-q",
            "--max-pixels",
            "100000",
            "-o",
            str(out) + "/",
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode in (0, 1), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for original in good:
        ext = original.suffix[1:] if original.suffix[1:] in ("png", "jpg", "jpeg", "webp") else "png"
        result = out / f"{original.stem}_x4.{ext}"
        assert result.is_file(), f"{original.name} was not written:\n{proc.stderr}"
        with Image.open(original) as src, Image.open(result) as big:
            assert big.size == (src.size[0] * 4, src.size[1] * 4) or big.size == (src.size[1] * 4, src.size[0] * 4)
    leftovers = [p.name for folder in (inputs, out) for p in folder.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_decoder_warnings_are_one_line_naming_the_file(
    double_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from sr_runtime.cli import main

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    data = bytearray(buf.getvalue())
    data[8] = 0x7F  # the first IFD now holds 127 entries: Pillow warns "Corrupt EXIF data" and decodes
    path = tmp_path / "odd.tif"
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="sr_runtime"), warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning escaping the CLI fails the test
        assert main(["--model", str(double_model), "-q", str(path), "-o", str(tmp_path / "out")]) == 0
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"{path}: Corrupt EXIF data.  Expecting to read 12 bytes but only got 10."]
