"""sr-upscale conveniences: `-` / `-o -` pipes, --version, the summary line, --timings on their
own line above a progress bar, the --report JSON and Real-ESRGAN's --outscale."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from doubles import photo_lr
from PIL import Image

from sr_runtime.cli import main

REPO = Path(__file__).resolve().parents[1]


def cli(model: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """The real sr-upscale in its own process (pipes need real file descriptors)."""
    return subprocess.run(
        [sys.executable, "-m", "sr_runtime.cli", "--model", str(model), "--backend", "cpu", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def encoded(fmt: str, size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo_lr(size)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "flags", "expect"), [("PNG", [], "PNG"), ("JPEG", [], "JPEG"), ("PNG", ["-f", "webp"], "WEBP")]
)
def test_stdin_to_stdout(double_model: Path, fmt: str, flags: list[str], expect: str) -> None:
    proc = cli(double_model, "-", "-o", "-", "-q", *flags, stdin=encoded(fmt))
    assert proc.returncode == 0, proc.stderr.decode()
    with Image.open(io.BytesIO(proc.stdout)) as out:
        assert out.format == expect and out.size == (48, 48)
    assert b"1 done, 0 failed" in proc.stderr


def test_stdin_to_a_file_and_a_file_to_stdout(double_model: Path, tmp_path: Path) -> None:
    assert cli(double_model, "-", "-o", str(tmp_path / "x.png"), "-q", stdin=encoded("PNG")).returncode == 0
    assert Image.open(tmp_path / "x.png").size == (48, 48)
    src = tmp_path / "a.jpg"
    src.write_bytes(encoded("JPEG"))
    proc = cli(double_model, str(src), "-o", "-", "-q")
    assert proc.returncode == 0 and Image.open(io.BytesIO(proc.stdout)).format == "JPEG"


def test_broken_stdin_is_a_failure_line(double_model: Path) -> None:
    proc = cli(double_model, "-", "-o", "-", "-q", stdin=b"not an image")
    assert proc.returncode == 1 and proc.stdout == b""
    assert b"sr-upscale: failed: -: not an image" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-"], "needs -o FILE or -o -"),
        (["-", "-o", "folder/"], "needs -o FILE or -o -"),
        (["a.png", "b.png", "-o", "-"], "take exactly one input"),
        (["-", "x.png", "-o", "out/"], "take exactly one input"),
        (["a.png", "-o", "-", "--std-map", "--temperature", "0.5"], "--std-map writes a second file"),
        (["a.png", "--outscale", "0"], "--outscale must be a number in (0, 16]"),
        (["a.png", "--outscale", "nan"], "--outscale must be"),
        (["a.png", "--outscale", "17"], "--outscale must be"),
    ],
)
def test_pipe_and_outscale_misuse_is_one_usage_line(
    double_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--model", str(double_model), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sr-upscale: error: ") and message in err and err.count("\n") == 1, err


def test_version(double_model: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sr_runtime.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0 and proc.stdout.startswith("sr-upscale ") and "onnxruntime" in proc.stdout


def test_a_summary_line_ends_a_local_run(
    double_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.fromarray(photo_lr(12)).save(good)
    bad.write_bytes(b"nope")
    assert main(["--model", str(double_model), "-q", str(good), str(bad), "-o", str(tmp_path / "out")]) == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("sr-upscale: 1 done, 1 failed in ") and last.endswith(" s")


def test_timings_are_printed_on_their_own_line_above_the_progress_bar(double_model: Path, tmp_path: Path) -> None:
    """Under a terminal the bars are drawn; a timing line must start a line, not follow a bar's text."""
    for name in ("a", "b"):
        Image.fromarray(photo_lr(40)).save(tmp_path / f"{name}.png")
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm draws nothing at 0x0
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sr_runtime.cli",
            "--model",
            str(double_model),
            "--backend",
            "cpu",
            "--timings",
            str(tmp_path / "a.png"),
            str(tmp_path / "b.png"),
            "-o",
            str(tmp_path / "out"),
        ],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "100"},
    )
    os.close(follower)
    out = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=60) == 0
    os.close(leader)
    text = out.decode(errors="replace")
    assert "file/s]" in text, f"no progress bar was drawn: {text!r}"
    starts = [i for i in range(len(text)) if text.startswith("sr-upscale: " + str(tmp_path / "a.png") + " ->", i)]
    assert starts and all(text[i - 1] in "\r\n" for i in starts), repr(text)


def test_report_json(double_model: Path, tmp_path: Path) -> None:
    good, bad, old = tmp_path / "good.png", tmp_path / "bad.png", tmp_path / "old.png"
    for path in (good, old):
        Image.fromarray(photo_lr(12)).save(path)
    bad.write_bytes(b"nope")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old_x4.png").write_bytes(b"kept")
    report = tmp_path / "reports" / "run.json"
    assert (
        main(
            [
                "--model",
                str(double_model),
                "-q",
                "--no-clobber",
                str(good),
                str(bad),
                str(old),
                "-o",
                str(out),
                "--report",
                str(report),
            ]
        )
        == 1
    )
    data = json.loads(report.read_text())
    assert (data["done"], data["failed"], data["skipped"], data["exit_status"]) == (1, 1, 1, 1)
    assert data["model"] == "test-double" and data["backend"] == "onnxruntime-cpu"
    by_input = {f["input"]: f for f in data["files"]}
    assert by_input[str(good)]["status"] == "done" and by_input[str(good)]["tiles"] >= 1
    assert by_input[str(good)]["output"] == str(out / "good_x4.png") and by_input[str(good)]["seconds"] > 0
    assert by_input[str(bad)]["status"] == "failed" and "not an image" in by_input[str(bad)]["reason"]
    assert by_input[str(old)]["status"] == "skipped"


@pytest.mark.parametrize(("outscale", "size"), [(2.0, (24, 20)), (3.5, (42, 35)), (1.0, (12, 10))])
def test_outscale_resizes_the_x4_result(
    double_model: Path, tmp_path: Path, outscale: float, size: tuple[int, int]
) -> None:
    src = tmp_path / "a.png"
    Image.fromarray(photo_lr(12)[:10]).save(src)  # 12 wide, 10 high
    args = ["--model", str(double_model), "-q", str(src), "-o", str(tmp_path / "out"), "--outscale", str(outscale)]
    assert main([*args, "--temperature", "0.5", "--std-map"]) == 0
    with Image.open(tmp_path / "out" / "a_x4.png") as out, Image.open(tmp_path / "out" / "a_x4_std.png") as std:
        assert out.size == size and std.size == size
    with Image.open(tmp_path / "out" / "a_x4.png") as out:
        x4 = Image.fromarray(photo_lr(12)[:10]).resize((48, 40), Image.Resampling.BICUBIC)
        ref = np.asarray(x4.resize(size, Image.Resampling.LANCZOS), np.float32)
        assert np.abs(np.asarray(out, np.float32) - ref).mean() < 40  # the same picture, not noise


def test_outscale_keeps_16_bit_grey(double_model: Path, tmp_path: Path) -> None:
    src = tmp_path / "g16.png"
    Image.fromarray(photo_lr(12)[..., 0].astype(np.uint16) * 257).save(src)
    assert main(["--model", str(double_model), "-q", str(src), "-o", str(tmp_path / "out"), "--outscale", "2"]) == 0
    with Image.open(tmp_path / "out" / "g16_x4.png") as out:
        assert out.mode == "I;16" and out.size == (24, 24) and np.asarray(out).max() > 255


FC_256 = REPO / "engines" / "vdvae-sr-fc-256"


@pytest.mark.parametrize(
    ("model", "tile", "message"),
    [
        (None, "64", "runs fixed 32x32 LR tiles; --batch-size (tiles per backend call) is its memory control"),
        (None, "-1", "--tile must be >= 0"),
        (FC_256, "100", "--tile 100 is below model vdvae-sr-fc-256's smallest tile, 292 LR pixels"),
    ],
)
def test_tile_misuse_is_one_usage_line(
    double_model: Path, tmp_path: Path, model: Path | None, tile: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "a.png"
    Image.fromarray(photo_lr(12)).save(src)
    assert main(["--model", str(model or double_model), "-q", str(src), "--tile", tile]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "a_x4.png").exists()


def test_tile_caps_the_lr_pixels_of_one_call_of_a_fully_convolutional_model() -> None:
    from sr_runtime.cli import build_parser, options_from
    from sr_runtime.tiling import plan_frame
    from sr_runtime.upscaler import default_frame_pixels

    args = build_parser().parse_args(["a.png", "--model", str(FC_256), "--backend", "cpu", "--tile", "300"])
    options = options_from(args, samples=1)
    with options.build_upscaler() as up:
        assert up.frame_pixels == 300 * 300
        plan = plan_frame(480, 640, up.spec.lr_multiple, up.spec.receptive_radius, up.frame_pixels)
        assert not plan.whole and plan.tile[0] * plan.tile[1] <= 300 * 300 and max(plan.tile) <= 300
    default = options_from(build_parser().parse_args(["a.png", "--model", str(FC_256), "--backend", "cpu"]), 1)
    with default.build_upscaler() as up:
        assert up.frame_pixels == default_frame_pixels(up.spec, "cpu")  # 0: the memory budget, the whole frame
