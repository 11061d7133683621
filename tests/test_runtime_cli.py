"""sr-upscale: outputs, naming, formats, exit codes, atomic writes; a torch-free subprocess run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from doubles import photo_lr
from PIL import Image

from sr_runtime.cli import main


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(photo_lr(24)).save(folder / "a.png")
    Image.fromarray(photo_lr(20)).save(folder / "b.jpg")
    Image.fromarray(photo_lr(16)).convert("L").save(folder / "c.webp")
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    return folder


def run_cli(double_model: Path, *args: str) -> int:
    return main(["--model", str(double_model), "-q", *args])


def test_single_file_to_named_output(double_model: Path, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "big.png"
    assert run_cli(double_model, str(photos / "a.png"), "-o", str(out)) == 0
    assert Image.open(out).size == (96, 96)
    assert [p.name for p in out.parent.iterdir()] == ["big.png"]  # no temporary file left behind


def test_folder_input_writes_suffixed_files_keeping_formats(double_model: Path, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(double_model, str(photos), "-o", str(out) + "/") == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_x4.png", "b_x4.jpg", "c_x4.webp"]
    assert Image.open(out / "b_x4.jpg").size == (80, 80)
    assert Image.open(out / "c_x4.webp").size == (64, 64)


def test_glob_next_to_inputs_with_format_and_suffix(double_model: Path, photos: Path) -> None:
    assert run_cli(double_model, str(photos / "*.png"), "-f", "jpg", "--suffix=-big") == 0
    out = Image.open(photos / "a-big.jpg")
    assert out.format == "JPEG" and out.size == (96, 96)


@pytest.mark.parametrize(
    ("mode", "ext", "saved_mode"),
    [
        ("CMYK", "png", "RGB"),
        ("CMYK", "jpg", "CMYK"),
        ("I;16", "jpg", "L"),
        ("I;16", "png", "I;16"),
        ("LA", "jpg", "L"),
        ("RGBA", "webp", "RGBA"),
        ("F", "png", "I;16"),
    ],
)
def test_every_mode_is_saved_in_every_format(
    double_model: Path, tmp_path: Path, mode: str, ext: str, saved_mode: str
) -> None:
    src = tmp_path / "src.tiff"  # TIFF holds all these modes
    base = Image.fromarray(photo_lr(12))
    gray = np.asarray(base.convert("L"))
    if mode == "I;16":
        img = Image.fromarray(gray.astype(np.uint16) * 257)
    elif mode == "F":  # float images are taken as [0, 1], like float arrays
        img = Image.fromarray(gray.astype(np.float32) / 255)
    else:
        img = base.convert("RGBA")
        img.putalpha(128)  # a real alpha: WebP drops an opaque one
        img = img.convert(mode)
    img.save(src)
    assert run_cli(double_model, str(src), "-o", str(tmp_path / "out") + "/", "-f", ext) == 0
    out = Image.open(tmp_path / "out" / f"src_x4.{ext}")
    assert out.size == (48, 48) and out.mode.replace("I;16B", "I;16") == saved_mode


def test_exit_1_names_each_failed_input_and_keeps_going(
    double_model: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = photos / "broken.png"
    broken.write_bytes(b"")
    out = tmp_path / "out"
    code = run_cli(double_model, str(photos / "a.png"), str(broken), str(photos / "gone.png"), "-o", str(out))
    err = capsys.readouterr().err
    assert code == 1
    assert (out / "a_x4.png").is_file()
    assert "broken.png: empty file" in err and "gone.png: no such file" in err
    assert "Traceback" not in err


def test_never_overwrites_an_input(double_model: Path, photos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (photos / "a.png").read_bytes()
    assert run_cli(double_model, str(photos / "a.png"), "-o", str(photos / "a.png")) == 1
    assert run_cli(double_model, str(photos / "a.png"), "--suffix", "") == 1
    assert (photos / "a.png").read_bytes() == before
    assert "refusing to overwrite" in capsys.readouterr().err


def test_two_inputs_never_share_one_output(
    double_model: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Image.fromarray(photo_lr(12)).save(photos / "a.webp")  # a.png and a.webp -> a_x4.png
    out = tmp_path / "out"
    assert run_cli(double_model, str(photos / "a.png"), str(photos / "a.webp"), "-o", str(out), "-f", "png") == 1
    assert Image.open(out / "a_x4.png").size == (96, 96)  # the first one's result survives
    assert "already written for another input" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-s", "2"], "x4 only"),
        (["--backend", "vulkan"], "invalid choice"),
        (["--temperature", "-1"], "temperature"),
        (["--std-map"], "temperature > 0"),
        (["--temperature", "0.5", "--samples", "0"], "samples"),
        (["-t", "40"], "tile overlap"),
        (["--model", "/nonexistent/model"], "no model manifest"),
    ],
)
def test_usage_errors_exit_2_without_traceback(
    double_model: Path, photos: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(double_model, str(photos / "a.png"), *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_one_file_output_for_many_inputs_is_a_usage_error(double_model: Path, photos: Path, tmp_path: Path) -> None:
    assert run_cli(double_model, str(photos), "-o", str(tmp_path / "one.png")) == 2
    assert run_cli(double_model, str(photos / "a.png"), "-o", str(tmp_path / "one.tif")) == 2


def test_output_without_extension_is_a_folder(double_model: Path, photos: Path, tmp_path: Path) -> None:
    assert run_cli(double_model, str(photos / "a.png"), "-o", str(tmp_path / "results")) == 0
    assert (tmp_path / "results" / "a_x4.png").is_file()


def test_std_map_is_written_as_16_bit(double_model: Path, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.png"
    code = run_cli(
        double_model, str(photos / "a.png"), "-o", str(out), "--temperature", "0.8", "--samples", "3", "--std-map"
    )
    assert code == 0
    std = Image.open(tmp_path / "o_std.png")
    assert std.mode == "I;16" and std.size == (96, 96)
    assert np.asarray(std).mean() > 1000  # visibly non-zero where the noise varies


def test_timings_report_the_backend_share(
    double_model: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(double_model, str(photos / "a.png"), "-o", str(tmp_path), "--timings") == 0
    assert "outside the backend" in capsys.readouterr().err


def _console_script() -> str:
    script = Path(sys.executable).with_name("sr-upscale")
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable} (pip install -e .)")
    return str(script)


def test_console_script_in_a_subprocess(double_model: Path, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.png"
    # This checkout's code, whichever checkout the console script was installed from.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run(
        [_console_script(), str(photos / "b.jpg"), "-o", str(out), "--model", str(double_model)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "backend onnxruntime-cpu" in proc.stderr and Image.open(out).size == (80, 80)
    bad = subprocess.run(
        [_console_script(), str(photos / "b.jpg"), "-s", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_runtime_works_with_torch_and_onnx_unimportable(double_model: Path, photos: Path, tmp_path: Path) -> None:
    """The runtime needs numpy, pillow, onnxruntime, tqdm: block torch (and onnx, ours) and upscale."""
    out = tmp_path / "no_torch.png"
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "onnx", "sr_train", "sr_export"):
            sys.modules[name] = None  # any import of these now raises ImportError
        from sr_runtime.cli import main
        from sr_runtime import Upscaler
        rc = main(["{photos / "a.png"}", "-o", "{out}", "--model", "{double_model}", "-q"])
        assert rc == 0, rc
        with Upscaler("{double_model}") as up:
            assert up.run(__import__("numpy").zeros((5, 5, 3), "uint8")).shape == (20, 20, 3)
        loaded = [m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "sr_train", "sr_export")
                  and sys.modules[m] is not None]
        assert not loaded, loaded
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert Image.open(out).size == (96, 96)


def test_bundled_sample_upscales(double_model: Path, tmp_path: Path) -> None:
    """The README's main command works on the bundled sample (here with the test double)."""
    sample = Path(__file__).resolve().parent.parent / "assets" / "sample.png"
    assert sample.stat().st_size < 100_000
    assert run_cli(double_model, str(sample), "-o", str(tmp_path) + "/") == 0
    assert Image.open(tmp_path / "sample_x4.png").size == (512, 512)


def test_outputs_get_the_usual_permissions_and_no_temp_files(double_model: Path, photos: Path, tmp_path: Path) -> None:
    """Atomic writes must not leave mkstemp's 0600: users expect what a plain save gives under their umask."""
    old = os.umask(0o022)
    try:
        assert run_cli(double_model, str(photos / "a.png"), "-o", str(tmp_path / "out") + "/") == 0
    finally:
        os.umask(old)
    out = tmp_path / "out" / "a_x4.png"
    assert out.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in out.parent.iterdir()] == ["a_x4.png"]
