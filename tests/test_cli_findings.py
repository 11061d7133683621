"""sr-upscale on the inputs a hostile-input sweep found mishandled: symlink loops, colour profiles,
names that cannot fit or that carry terminal escapes, `-o` onto a file, truncated WebP, JPEGs
whose header lies, 16-bit grey+alpha, absurd temperatures and corrupt EXIF in every format."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from doubles import photo_lr
from PIL import Image, ImageCms

from sr_runtime.cli import main


def run(model: Path, *args: str) -> int:
    return main(["--model", str(model), "--backend", "cpu", "-q", *args])


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.png"
    Image.fromarray(photo_lr(12)).save(path)
    return path


def test_a_symlink_loop_input_is_a_failure_line(
    double_model: Path, tmp_path: Path, good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    assert run(double_model, str(tmp_path / "a.png"), str(good), "-o", str(tmp_path / "out")) == 1
    assert f"failed: {tmp_path / 'a.png'}: symlink loop" in capsys.readouterr().err
    assert (tmp_path / "out" / "good_x4.png").is_file()


def test_a_symlink_loop_as_the_output_is_a_failure_line(
    double_model: Path, tmp_path: Path, good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "good_x4.png").symlink_to("good_x4.png")
    assert run(double_model, str(good), "-o", str(out)) == 1
    assert "is a symlink loop" in capsys.readouterr().err
    assert (out / "good_x4.png").is_symlink()


@pytest.mark.parametrize("ext", ["png", "jpg", "webp"])
def test_the_inputs_icc_profile_is_kept(double_model: Path, tmp_path: Path, ext: str) -> None:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    profile = profile[:100] + b"wide-gamut-stand-in" + profile[119:]  # other bytes than Pillow's own sRGB
    src = tmp_path / f"p3.{ext}"
    Image.fromarray(photo_lr(12)).save(src, icc_profile=profile)
    assert run(double_model, str(src), "-o", str(tmp_path / "out")) == 0
    with Image.open(tmp_path / "out" / f"p3_x4.{ext}") as out:
        assert out.info.get("icc_profile") == profile


def test_a_cmyk_profile_never_tags_rgb_pixels() -> None:
    from sr_runtime.jobs import icc_fits

    header = bytes(16) + b"CMYK" + bytes(108)
    assert icc_fits(header, "CMYK") and not icc_fits(header, "RGB") and not icc_fits(b"short", "RGB")


def test_an_output_name_that_cannot_fit_is_refused_before_the_upscale(
    double_model: Path, tmp_path: Path, good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long_src = tmp_path / ("n" * 240 + ".png")
    Image.fromarray(photo_lr(12)).save(long_src)
    assert run(double_model, str(long_src), str(good), "-o", str(tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "output name is 247 bytes" in err and "its temporary file adds" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good_x4.png"]


def test_terminal_escapes_in_file_names_are_printed_escaped(
    double_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "x\x1b[31mred\x07.png"
    bad.write_bytes(b"not an image")
    assert run(double_model, str(bad), "-o", str(tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err
    assert "x\\x1b[31mred\\x07.png: not an image" in err


def test_o_naming_an_existing_file_without_extension_is_a_usage_error(
    double_model: Path, tmp_path: Path, good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "afile").write_text("keep me")
    assert run(double_model, str(good), "-o", str(tmp_path / "afile")) == 2
    assert "is an existing file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "keep me"


def test_a_truncated_webp_says_so(double_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    buf = io.BytesIO()
    Image.fromarray(photo_lr(32)).save(buf, format="WEBP")
    src = tmp_path / "cut.webp"
    src.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert run(double_model, str(src), "-o", str(tmp_path / "out")) == 1
    assert f"{src}: truncated or corrupt image" in capsys.readouterr().err


def test_a_jpeg_whose_header_claims_far_more_pixels_is_refused(
    double_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    buf = io.BytesIO()
    Image.fromarray(photo_lr(40)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 3000, 3000)  # height, width
    src = tmp_path / "lie.jpg"
    src.write_bytes(bytes(data))
    assert run(double_model, str(src), "-o", str(tmp_path / "out"), "--max-pixels", "1e8") == 1
    assert "header says 3000x3000" in capsys.readouterr().err
    flat = tmp_path / "flat.jpg"  # a genuine flat image compresses well, but not that well
    Image.new("L", (1200, 1200), 128).save(flat, quality=50, progressive=True, optimize=True)
    from sr_runtime.imaging import open_image

    assert open_image(flat).size == (1200, 1200)


def _png_grey_alpha_16(path: Path, w: int = 8, h: int = 8) -> None:
    """Colour type 4 (grey + alpha) at 16 bits: Pillow opens it as RGBA."""
    rows = b"".join(b"\x00" + b"".join(struct.pack(">HH", x * 8000, 60000) for x in range(w)) for _ in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 4, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_16_bit_grey_alpha_stays_grey_alpha(double_model: Path, tmp_path: Path) -> None:
    src = tmp_path / "ga.png"
    _png_grey_alpha_16(src)
    assert run(double_model, str(src), "-o", str(tmp_path / "out")) == 0
    with Image.open(tmp_path / "out" / "ga_x4.png") as out:
        assert out.mode == "LA" and out.size == (32, 32)
        assert abs(np.asarray(out)[..., 1].astype(int) - 233).max() <= 1  # 60000/65535 of 255


@pytest.mark.parametrize("value", ["1e308", "inf", "nan", "2.5", "-0.1"])
def test_an_absurd_temperature_is_one_usage_line_without_warnings(
    double_model: Path, good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run(double_model, str(good), "-o", str(tmp_path / "out"), f"--temperature={value}") == 2
    assert capsys.readouterr().err == "sr-upscale: error: --temperature must be a number in [0, 2]\n"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_corrupt_exif_is_refused_in_every_format(
    double_model: Path, tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / f"bad-exif.{fmt.lower()}"
    Image.fromarray(photo_lr(12)).save(src, format=fmt, exif=b"Exif\x00\x00" + b"\xde\xad" * 20)
    assert run(double_model, str(src), "-o", str(tmp_path / "out")) == 1
    assert f"{src}: corrupt EXIF data" in capsys.readouterr().err
