"""`sr-upscale --ray` hands off through a registered runner: what it receives, how it is found, what is shipped.

The hand-off is tested with a runner registered by a throwaway distribution on
sys.path, so it does not depend on how (or whether) this checkout is installed.
"""

from __future__ import annotations

import pickle
import re
import sys
import typing
from pathlib import Path

import pytest
from doubles import photo_lr
from PIL import Image

from sr_runtime import runners
from sr_runtime.cli import main
from sr_runtime.jobs import UpscaleOptions, output_path, output_targets, run_file
from sr_runtime.runners import RUNNERS, BatchJob

ROOT = Path(__file__).resolve().parent.parent
received: list[BatchJob] = []


def fake_runner(job: BatchJob) -> int:
    """What the registered test runner does: keep the job, answer a status no real run gives."""
    received.append(job)
    return 42


def register(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """A distribution on sys.path whose metadata registers `ray = value` in the RUNNERS group."""
    dist = tmp_path / "site" / "fake_runner-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-runner\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{RUNNERS}]\nray = {value}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))  # first on sys.path: found before an installed one


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(photo_lr(16)).save(folder / "a.png")
    Image.fromarray(photo_lr(12)).save(folder / "b.jpg")
    return folder


def test_ray_hands_the_checked_command_to_the_registered_runner(
    double_model: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    register(tmp_path, monkeypatch, f"{__name__}:fake_runner")
    received.clear()
    status = main(
        [
            "--model",
            str(double_model),
            "-q",
            str(photos),
            str(tmp_path / "gone-*.png"),
            "-o",
            str(tmp_path / "out"),
            "--temperature",
            "0.5",
            "--samples",
            "3",
            "--max-pixels",
            "1e6",
            "--ray",
            "10.0.0.1:6379",
            "--workers",
            "2",
        ]
    )
    assert status == 42
    (job,) = received
    assert job.sources == (photos / "a.png", photos / "b.jpg")
    assert job.unmatched == ((str(tmp_path / "gone-*.png"), "pattern matched no files"),)
    assert (job.address, job.workers) == ("10.0.0.1:6379", 2)
    assert job.options == UpscaleOptions(
        model=str(double_model),
        temperature=0.5,
        samples=3,
        max_pixels=1_000_000,
        output=str(tmp_path / "out"),
        quiet=True,
    )


def test_usage_errors_stop_before_the_hand_off(
    double_model: Path,
    photos: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    register(tmp_path, monkeypatch, f"{__name__}:fake_runner")
    received.clear()
    assert main(["--model", str(double_model), str(photos), "--ray", "no port"]) == 2
    assert main(["--model", str(double_model), "-", "-o", "-", "--ray"]) == 2
    assert not received
    assert "expected host:port" in capsys.readouterr().err


def test_no_runner_installed_is_one_line_and_exit_2(
    double_model: Path, photos: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(runners.importlib.metadata, "entry_points", lambda **kw: [])
    assert main(["--model", str(double_model), str(photos), "--ray"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "sr-upscale: error: --ray needs the cluster extra: pip install 'vdvae-sr[cluster]'"
    ]


def test_a_runner_whose_dependencies_are_missing_is_the_same_line(
    double_model: Path,
    photos: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    register(tmp_path, monkeypatch, "no_such_module_anywhere:run")
    assert main(["--model", str(double_model), str(photos), "--ray"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "sr-upscale: error: --ray needs the cluster extra: pip install 'vdvae-sr[cluster]'"
    ]


def test_pyproject_registers_the_cluster_batch_runner() -> None:
    """The entry point the package installs names a callable taking one BatchJob (needs Ray to import)."""
    tomllib = pytest.importorskip("tomllib")
    pytest.importorskip("ray", reason="Ray is not installed (the `cluster` extra)")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    value = project["entry-points"][RUNNERS]["ray"]
    assert value == "sr_cluster.batch:run"
    module, _, attr = value.partition(":")
    __import__(module)
    run = getattr(sys.modules[module], attr)
    assert typing.get_type_hints(run) == {"batch": BatchJob, "return": int}


def test_the_installed_runner_if_any_is_the_cluster_batch_one() -> None:
    """Where the installed metadata registers "ray" (an install made after the entry point was added), it is ours."""
    found = [e.value for e in runners.importlib.metadata.entry_points(group=RUNNERS, name="ray")]
    if not found:
        pytest.skip("no runner registered in the installed metadata (reinstall: pip install -e .)")
    assert "sr_cluster.batch:run" in found


def test_what_a_worker_receives_survives_pickling(double_model: Path, tmp_path: Path) -> None:
    options = UpscaleOptions(model=str(double_model), temperature=0.5, samples=2, std_map=True, outscale=2.0)
    job = BatchJob(options, (tmp_path / "a.png",), (("x", "why"),), "auto", None)
    assert pickle.loads(pickle.dumps(job)) == job


def test_run_file_does_one_file_and_answers_with_its_result(double_model: Path, photos: Path, tmp_path: Path) -> None:
    """The library's per-file job, as a worker runs it: outputs written, a failure as its line, nothing raised."""
    options = UpscaleOptions(
        model=str(double_model),
        output=str(tmp_path / "out"),
        std_map=True,
        temperature=0.5,
        samples=2,
        timings=True,
        quiet=True,
    )
    (tmp_path / "out").mkdir()
    with options.build_upscaler() as upscaler:
        src = photos / "a.png"
        targets = output_targets(output_path(src, options), options)
        assert targets == (tmp_path / "out" / "a_x4.png", tmp_path / "out" / "a_x4_std.png")
        result = run_file(upscaler, src, targets, options)
        assert result.failure is None and result.notes is not None
        assert re.match(rf"{re.escape(str(src))} -> .*a_x4.png: [\d.]+ s wall", result.notes.timing or "")
        assert Image.open(targets[0]).size == (64, 64) and Image.open(targets[1]).mode == "I;16"
        broken = photos / "broken.png"
        broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        failed = run_file(upscaler, broken, output_targets(output_path(broken, options), options), options)
    assert failed.notes is None and failed.failure is not None and failed.failure.startswith(f"{broken}: ")
