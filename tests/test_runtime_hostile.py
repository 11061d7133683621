"""Hostile and careless input to sr_runtime and sr-upscale: one clear failure, never a traceback."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from doubles import build_double, photo_lr
from PIL import EpsImagePlugin, Image

from sr_runtime import SRInputError, SRModelError, Upscaler
from sr_runtime.backends.engine_identity import ENGINE_FORMAT, EngineIdentity, GpuInfo
from sr_runtime.cli import main
from sr_runtime.upscaler import BYTES_PER_OUTPUT_PIXEL, default_max_pixels

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"


def run_cli(model: Path, *args: str) -> int:
    return main(["--model", str(model), "-q", *args])


def _ppm_with_bad_maxval() -> bytes:
    """A P6 header whose maxval line holds a non-digit byte: Pillow's PPM plugin raises ValueError in open."""
    return b"P6\n4 4\n255\xd5\n" + bytes(48)


def _jpeg_with_corrupt_exif() -> bytes:
    """A JPEG whose EXIF block is not TIFF: exif_transpose raises SyntaxError after a clean decode."""
    buf = io.BytesIO()
    Image.fromarray(photo_lr(16)).save(buf, format="JPEG", exif=b"Exif\x00\x00MM\x00\xe2\x00\x00\x00\x08")
    return buf.getvalue()


# --- 1. any decoder exception is that input's failure --------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data"), [("bad-maxval.ppm", _ppm_with_bad_maxval()), ("bad-exif.jpg", _jpeg_with_corrupt_exif())]
)
def test_any_decoder_error_is_one_failure_line_and_the_batch_goes_on(
    double_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, data: bytes
) -> None:
    bad = tmp_path / name
    bad.write_bytes(data)
    good = tmp_path / "good.png"
    Image.fromarray(photo_lr(12)).save(good)
    out = tmp_path / "out"
    assert run_cli(double_model, str(bad), str(good), "-o", str(out)) == 1
    err = capsys.readouterr().err
    assert f"failed: {bad}: " in err and "Traceback" not in err
    assert (out / "good_x4.png").is_file()


# --- 2. only raster formats reach a decoder --------------------------------------------------------


def test_eps_named_png_never_reaches_ghostscript(
    upscaler: Upscaler, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[object] = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a))
    path = tmp_path / "photo.png"
    path.write_bytes(EPS)
    with pytest.raises(SRInputError, match="not an image"):
        upscaler.run(path)
    assert calls == []


def test_training_and_evaluation_loader_refuses_eps_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sr_train.degrade import load_rgb

    calls: list[object] = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a))
    path = tmp_path / "photo.png"
    path.write_bytes(EPS)
    with pytest.raises(ValueError, match=r"photo\.png"):
        load_rgb(path)
    assert calls == []


# --- 3. CLI values are checked up front ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--temperature", "0.5", "--samples", "17"], "--samples"),
        (["--max-pixels", "inf"], "--max-pixels"),
        (["--max-pixels", "nan"], "--max-pixels"),
        (["--seed", "-1"], "--seed"),
        (["--batch-size", "0"], "--batch-size"),
        (["--temperature", "nan"], "--temperature"),
        (["--suffix", "/../escape"], "--suffix"),
    ],
)
def test_bad_values_are_one_usage_line_naming_the_flag(
    double_model: Path, tmp_path: Path, args: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "a.png"
    Image.fromarray(photo_lr(12)).save(src)
    assert run_cli(double_model, str(src), *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and "Traceback" not in err


def test_samples_limit_is_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "at most 16" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile_overlap": 2.5}, "tile_overlap must be an integer"),
        ({"batch_size": 2.7}, "batch_size must be an integer"),
        ({"max_pixels": math.nan}, "max_pixels"),
        ({"max_pixels": math.inf}, "max_pixels"),
    ],
)
def test_api_refuses_non_integers_and_nan_limits(double_model: Path, kwargs: dict, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        Upscaler(double_model, backend="cpu", **kwargs)


def test_api_refuses_non_integer_samples(double_model: Path) -> None:
    with (
        Upscaler(double_model, backend="cpu", temperature=0.5) as up,
        pytest.raises(TypeError, match="samples must be an integer"),
    ):
        up.run(np.zeros((4, 4, 3), np.uint8), 2.0)  # type: ignore[call-overload]


# --- 4. the default pixel limit follows the memory a run needs -----------------------------------------


def test_default_pixel_limit_fits_half_the_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    pages = {"SC_PHYS_PAGES": 2 * 2**30 // 4096, "SC_PAGE_SIZE": 4096}  # a 2 GiB machine
    monkeypatch.setattr("os.sysconf", lambda name: pages[name])
    limit = default_max_pixels(4)
    assert limit * 16 * BYTES_PER_OUTPUT_PIXEL <= 2**30 < (limit + 1000) * 16 * BYTES_PER_OUTPUT_PIXEL
    assert default_max_pixels(4, samples=8) < limit


def test_upscaler_default_limit_is_the_memory_one(double_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sysconf", lambda name: {"SC_PHYS_PAGES": 2**30 // 4096, "SC_PAGE_SIZE": 4096}[name])
    with Upscaler(double_model, backend="cpu") as up:
        assert up.max_pixels == default_max_pixels(4) < 2**29 // (16 * BYTES_PER_OUTPUT_PIXEL) + 1
        with pytest.raises(SRInputError, match="pixel limit"):
            up.run(Image.new("RGB", (2000, 2000)))  # 4 MP: over the 3.4 MP half of 1 GiB holds


# --- 5. manifest values are bounded and checked against the graph --------------------------------------


def _edited_model(double_model: Path, tmp_path: Path, **changes: object) -> Path:
    model = tmp_path / "model"
    shutil.copytree(double_model, model)
    manifest = json.loads((model / "manifest.json").read_text())
    for dotted, value in changes.items():
        node = manifest
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        if value is None:
            del node[leaf]
        else:
            node[leaf] = value
    (model / "manifest.json").write_text(json.dumps(manifest))
    return model


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch__max": 1000}, "batch.max"),
        ({"noise_dim": 10**12}, "noise_dim"),
        ({"scale": 2, "hr_size": [64, 64]}, "output shape"),
        ({"onnx__fp32__file": "../test-double/model.fp32.onnx"}, "plain file name"),
        ({"onnx__fp32__sha256": ""}, "sha256"),
        ({"onnx__fp32__sha256": None}, "sha256"),
    ],
)
def test_manifest_values_are_checked_before_use(
    double_model: Path, tmp_path: Path, changes: dict, message: str
) -> None:
    model = _edited_model(double_model, tmp_path, **changes)
    with pytest.raises(SRModelError, match=message):
        Upscaler(model, backend="cpu")


def test_manifest_that_is_not_an_object_is_a_model_error(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(SRModelError, match="not a JSON object"):
        Upscaler(tmp_path, backend="cpu")


def test_manifest_name_is_printed_without_terminal_escapes(
    double_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _edited_model(double_model, tmp_path, name="evil\x1b]0;owned\x07")
    src = tmp_path / "a.png"
    Image.fromarray(photo_lr(12)).save(src)
    assert run_cli(model, str(src), "-o", str(tmp_path / "out")) == 0
    assert "\x1b" not in capsys.readouterr().err


# --- 10. non-finite model output is a failure, not a black image ---------------------------------------


def _nan_model(tmp_path: Path) -> Path:
    """The test double with its output divided by zero: every pixel is Inf or NaN, as an overflowing model gives."""
    import hashlib

    import onnx

    model = build_double(tmp_path / "nan-double")
    graph = onnx.load(model / "model.fp32.onnx")
    for node in graph.graph.node:
        if node.output[0] == "hr":
            node.output[0] = "hr_finite"
    graph.graph.node.append(onnx.helper.make_node("Div", ["hr_finite", "zero"], ["hr"]))
    onnx.save(graph, model / "model.fp32.onnx")
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["onnx"]["fp32"]["sha256"] = hashlib.sha256((model / "model.fp32.onnx").read_bytes()).hexdigest()
    (model / "manifest.json").write_text(json.dumps(manifest))
    return model


def test_nan_output_fails_that_input_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _nan_model(tmp_path)
    src = tmp_path / "a.png"
    Image.fromarray(photo_lr(12)).save(src)
    out = tmp_path / "out"
    assert run_cli(model, str(src), "-o", str(out), "--temperature", "1") == 1
    err = capsys.readouterr().err
    assert f"{src}: " in err and "not finite" in err
    assert not out.exists() or not any(out.iterdir())


def test_nan_output_is_an_error_for_arrays_too(tmp_path: Path) -> None:
    with (
        Upscaler(_nan_model(tmp_path), backend="cpu", temperature=1.0) as up,
        pytest.raises(SRInputError, match="not finite"),
    ):
        up.run(np.zeros((8, 8), np.uint8))


# --- lows ----------------------------------------------------------------------------------------------


def _png_rgb48(path: Path) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + np.arange(12, dtype=">u2").tobytes() for _ in range(3))
    ihdr = struct.pack(">IIBBBBB", 4, 3, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


def test_animation_and_16_bit_colour_are_reported(
    upscaler: Upscaler, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    frames = [Image.new("RGB", (8, 8), (i * 80, 0, 0)) for i in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    _png_rgb48(tmp_path / "deep.png")
    with caplog.at_level(logging.WARNING, logger="sr_runtime"):
        upscaler.run(tmp_path / "anim.gif")
        upscaler.run(tmp_path / "deep.png")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "anim.gif: 3 frames: only the first" in text and "deep.png: 16-bit colour" in text


def test_float_range_errors_name_the_file(upscaler: Upscaler, tmp_path: Path) -> None:
    path = tmp_path / "wide.tif"
    Image.fromarray(np.full((4, 4), 2.0, np.float32)).save(path)
    with pytest.raises(SRInputError, match=r"wide\.tif: float"):
        upscaler.run(path)


def test_no_clobber_keeps_existing_outputs(double_model: Path, tmp_path: Path) -> None:
    src = tmp_path / "a.png"
    Image.fromarray(photo_lr(12)).save(src)
    out = tmp_path / "a_x4.png"
    out.write_bytes(b"mine")
    assert run_cli(double_model, str(src), "--no-clobber") == 0
    assert out.read_bytes() == b"mine"


def test_rerun_on_a_folder_skips_its_own_outputs(double_model: Path, tmp_path: Path) -> None:
    Image.fromarray(photo_lr(12)).save(tmp_path / "a.png")
    assert run_cli(double_model, str(tmp_path)) == 0
    assert run_cli(double_model, str(tmp_path)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a_x4.png"]


def test_interrupt_still_lists_the_failures_so_far(
    double_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    Image.fromarray(photo_lr(12)).save(tmp_path / "b.png")

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("sr_runtime.jobs.save_atomic", interrupted)
    assert run_cli(double_model, str(tmp_path / "a.png"), str(tmp_path / "b.png")) == 130
    err = capsys.readouterr().err
    assert "a.png: empty file" in err and "interrupted" in err


# --- 7. the engine cache trusts no planted file ---------------------------------------------------------

TRT_IDENTITY = EngineIdentity("ab" * 32, "fp16", (1, 4, 16), GpuInfo("NVIDIA H100 80GB HBM3", "9.0"), "10.13.0.35")


def _plant_engine(cache: Path, sidecar: dict) -> Path:
    engine, manifest = TRT_IDENTITY.paths(cache)
    engine.parent.mkdir(parents=True, exist_ok=True)
    engine.write_bytes(b"planted")
    manifest.write_text(json.dumps(sidecar))
    return engine


def test_engine_without_its_sha256_is_never_selected(tmp_path: Path) -> None:
    public = {"format": ENGINE_FORMAT, **TRT_IDENTITY.fields()}  # only public, guessable fields
    _plant_engine(tmp_path, public)
    engine, rejected = TRT_IDENTITY.cached_engine(tmp_path)
    assert engine is None and "sha256" in rejected[0]


def test_engine_reached_through_a_symlink_or_a_shared_directory_is_refused(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"planted").hexdigest()
    sidecar = {"format": ENGINE_FORMAT, **TRT_IDENTITY.fields(), "engine_sha256": digest}
    elsewhere = tmp_path / "elsewhere"
    planted = _plant_engine(elsewhere, sidecar)
    assert TRT_IDENTITY.cached_engine(elsewhere) == (planted, [])  # the genuine location is fine
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / planted.parent.name).symlink_to(planted.parent)  # a pre-created key directory
    engine, rejected = TRT_IDENTITY.cached_engine(cache)
    assert engine is None and "is a symlink" in rejected[0]
    planted.parent.chmod(0o777)
    engine, rejected = TRT_IDENTITY.cached_engine(elsewhere)
    assert engine is None and "writable by other users" in rejected[0]


def test_sigterm_during_a_save_finishes_that_file_and_leaves_no_temp_file(
    double_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The save runs on the writer thread, which a signal never stops: the file is completed, renamed
    into place and reported done; the run then stops with 143 and lists the failures so far."""
    import os
    import signal
    import time

    (tmp_path / "a.png").write_bytes(b"")
    Image.fromarray(photo_lr(12)).save(tmp_path / "b.png")
    real_save = Image.Image.save

    def terminated_mid_write(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        real_save(self, fp, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)  # the main thread takes the signal while this write is still going on

    monkeypatch.setattr(Image.Image, "save", terminated_mid_write)
    handler_before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    assert run_cli(double_model, str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-o", str(out)) == 143
    assert [p.name for p in out.iterdir()] == ["b_x4.png"]  # complete, and no temporary file beside it
    assert Image.open(out / "b_x4.png").size == (48, 48)
    err = capsys.readouterr().err
    assert "a.png: empty file" in err and "1 done, 1 failed" in err
    assert signal.getsignal(signal.SIGTERM) == handler_before
