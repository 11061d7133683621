"""Every kind of image in, the same kind 4x larger out; every kind of bad input refused clearly."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from doubles import photo_lr
from PIL import Image

from sr_runtime import SRInputError, Upscaler

# The test double maps a flat image to the same flat image (at temperature 0),
# so a flat input checks every conversion exactly, to the last bit.
FLAT_RGBA = (200, 120, 40, 90)


@pytest.mark.parametrize(
    ("mode", "value"),
    [("L", 77), ("LA", (77, 160)), ("RGB", FLAT_RGBA[:3]), ("RGBA", FLAT_RGBA), ("I;16", 40000)],
)
def test_pil_modes_keep_mode_size_and_values(upscaler: Upscaler, mode: str, value: object) -> None:
    img = Image.new(mode, (23, 17), value)  # type: ignore[arg-type]
    out = upscaler.run(img)
    assert isinstance(out, Image.Image)
    assert out.mode == mode and out.size == (92, 68)
    expected = np.asarray(img)[0, 0]
    assert np.array_equal(
        np.unique(np.asarray(out).reshape(-1, np.asarray(img)[0, 0].size), axis=0), np.atleast_1d(expected)[None]
    )


def test_float_and_bilevel_pil_modes(upscaler: Upscaler) -> None:
    out = upscaler.run(Image.new("F", (9, 7), 0.25))
    assert out.mode == "F" and out.size == (36, 28) and np.allclose(np.asarray(out), 0.25, atol=1e-6)
    out = upscaler.run(Image.new("1", (9, 7), 1))
    assert out.mode == "L" and np.all(np.asarray(out) == 255)


def test_palette_image_comes_back_as_rgb(upscaler: Upscaler) -> None:
    img = Image.new("P", (20, 20), 1)
    img.putpalette([0, 0, 0, *FLAT_RGBA[:3]] + [0] * 762)
    out = upscaler.run(img)
    assert out.mode == "RGB" and out.size == (80, 80)
    assert np.all(np.asarray(out) == FLAT_RGBA[:3])


def test_palette_with_transparency_keeps_alpha(upscaler: Upscaler) -> None:
    img = Image.new("P", (16, 16), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(0, (0, 0, 8, 16))
    img.info["transparency"] = 0
    out = upscaler.run(img)
    assert out.mode == "RGBA" and out.size == (64, 64)
    alpha = np.asarray(out)[:, :, 3]
    assert alpha[:, :20].max() < 20 and alpha[:, 44:].min() > 235  # transparent left, opaque right


def test_cmyk_round_trips(upscaler: Upscaler) -> None:
    img = Image.new("RGB", (20, 12), FLAT_RGBA[:3]).convert("CMYK")
    out = upscaler.run(img)
    assert out.mode == "CMYK" and out.size == (80, 48)
    assert np.abs(np.asarray(out).astype(int) - np.asarray(img)[0, 0]).max() <= 1


def test_sixteen_bit_output_keeps_sixteen_bit_precision(upscaler: Upscaler) -> None:
    ramp = (np.linspace(1000, 60000, 40)[None, :] * np.ones((30, 1))).astype(np.uint16)
    out = upscaler.run(Image.fromarray(ramp))
    assert out.mode == "I;16"
    values = np.asarray(out)
    assert values.dtype == np.uint16 and np.any(values % 257 != 0)  # not just 8-bit values scaled up
    assert abs(float(values.mean()) - float(ramp.mean())) < 300


def test_exif_orientation_is_applied(upscaler: Upscaler, tmp_path: Path) -> None:
    img = Image.new("L", (40, 20), 0)
    img.paste(255, (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = tmp_path / "rotated.png"
    img.save(path, exif=exif)
    out = upscaler.run(path)
    assert out.size == (80, 160)  # width and height swapped
    arr = np.asarray(out)
    assert arr[:60].mean() > 230 and arr[100:].mean() < 25  # white half now on top


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((13, 9), np.uint8),
        ((13, 9, 1), np.uint8),
        ((13, 9, 2), np.uint16),
        ((13, 9, 3), np.uint16),
        ((13, 9, 4), np.uint8),
        ((13, 9, 3), np.float32),
        ((13, 9), np.float64),
    ],
)
def test_arrays_keep_shape_layout_and_dtype(upscaler: Upscaler, shape: tuple[int, ...], dtype: type) -> None:
    rng = np.random.default_rng(0)
    arr: np.ndarray
    if np.issubdtype(dtype, np.floating):
        arr = rng.random(shape).astype(dtype)
    else:
        arr = rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
    out = upscaler.run(arr)
    assert isinstance(out, np.ndarray)
    assert out.dtype == dtype and out.shape == (52, 36, *shape[2:])


def test_alpha_is_upscaled_not_dropped(upscaler: Upscaler) -> None:
    arr = np.zeros((24, 24, 4), np.uint8)
    arr[..., :3] = 128
    arr[..., 3] = np.linspace(0, 255, 24).astype(np.uint8)[None, :]
    out = upscaler.run(arr)
    alpha = out[..., 3].astype(float)
    assert alpha[:, :4].mean() < 10 and alpha[:, -4:].mean() > 245
    assert np.all(np.diff(alpha.mean(axis=0)) >= -1)  # still a left-to-right ramp


def test_grayscale_photo_stays_grayscale_and_matches_the_rgb_run(upscaler: Upscaler) -> None:
    gray = np.asarray(Image.fromarray(photo_lr(48)).convert("L"))
    out = upscaler.run(gray)
    rgb = upscaler.run(np.repeat(gray[:, :, None], 3, axis=2))
    assert out.shape == (192, 192) and np.array_equal(out, rgb[:, :, 0])
    back = np.asarray(Image.fromarray(out).resize((48, 48), Image.Resampling.BOX)).astype(float)
    assert np.corrcoef(back.ravel(), gray.ravel().astype(float))[0, 1] > 0.9


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (2, 2), (5, 3), (31, 64), (65, 33)])
def test_any_size_gives_exactly_four_times(upscaler: Upscaler, size: tuple[int, int]) -> None:
    arr = np.full((*size, 3), 99, np.uint8)
    out = upscaler.run(arr)
    assert out.shape == (4 * size[0], 4 * size[1], 3) and np.all(out == 99)


def test_path_input_gives_pil_output(upscaler: Upscaler, tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    Image.fromarray(photo_lr(30)).save(path)
    out = upscaler.run(str(path))
    assert isinstance(out, Image.Image) and out.size == (120, 120) and out.mode == "RGB"


# --- bad input -------------------------------------------------------------


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG file claiming `width` x `height` pixels, with (almost) no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _bad_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.png"
    if kind == "missing":
        return path
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an image\n")
    elif kind == "truncated":
        Image.fromarray(photo_lr(64)).save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "bomb":  # 81 MP: over our default 64 MP limit, under Pillow's own
        path.write_bytes(_png_header_only(9000, 9000))
    elif kind == "huge-bomb":  # 900 MP: over Pillow's hard limit too
        path.write_bytes(_png_header_only(30000, 30000))
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "no such file"),
        ("directory", "is a directory"),
        ("empty", "empty file"),
        ("text", "not an image"),
        ("truncated", "truncated or corrupt"),
        ("bomb", "exceeds the pixel limit"),
        ("huge-bomb", "decompression bomb"),
    ],
)
def test_bad_files_raise_one_clear_error(upscaler: Upscaler, tmp_path: Path, kind: str, message: str) -> None:
    path = _bad_file(tmp_path, kind)
    with pytest.raises(SRInputError, match=message) as info:
        upscaler.run(path)
    assert str(path) in str(info.value)


def test_pillows_own_bomb_error_is_caught_above_our_limit(double_model: Path, tmp_path: Path) -> None:
    path = _bad_file(tmp_path, "huge-bomb")
    with (
        Upscaler(double_model, backend="cpu", max_pixels=10**10) as up,
        pytest.raises(SRInputError, match="too many pixels for Pillow"),
    ):
        up.run(path)


def test_pixel_limit_is_configurable(double_model: Path) -> None:
    arr = np.zeros((100, 100, 3), np.uint8)
    with Upscaler(double_model, backend="cpu", max_pixels=9_999) as up:
        with pytest.raises(SRInputError, match="pixel limit"):
            up.run(arr)
        with pytest.raises(SRInputError, match="pixel limit"):
            up.run(Image.fromarray(arr))
    with Upscaler(double_model, backend="cpu", max_pixels=10_000) as up:
        assert up.run(arr).shape == (400, 400, 3)


@pytest.mark.parametrize(
    ("arr", "message"),
    [
        (np.zeros((8, 8, 3), np.int32), "dtype int32"),
        (np.zeros((8, 8), bool), "dtype bool"),
        (np.zeros((8, 8, 5), np.uint8), "shape"),
        (np.zeros((2, 8, 8, 3), np.uint8), "shape"),
        (np.zeros(8, np.uint8), "shape"),
        (np.zeros((0, 8, 3), np.uint8), "no pixels"),
        (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
        (np.full((8, 8), np.inf), "NaN or Inf"),
        (np.full((8, 8), 1.5, np.float32), r"\[0, 1\]"),
        ([[0, 1], [1, 0]], "got list"),
    ],
)
def test_bad_arrays_raise_one_clear_error(upscaler: Upscaler, arr: object, message: str) -> None:
    with pytest.raises(SRInputError, match=message):
        upscaler.run(arr)  # type: ignore[call-overload]
