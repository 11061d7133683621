"""Export checks that cannot be fooled and re-exports that cannot lose the working model: NaN
fails parity, manifests are strict JSON, a failed or interrupted re-export leaves the old
model serving, bad --batch/--seed are one line, the FP16 range measurement is bounded in
memory, and engines and timing caches are read under the cache's trust rules."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from exporting import run_cli, tiny_model
from onnx import TensorProto, helper

from sr_export.pipeline import ExportCheckFailed, ExportOptions, export_model_dir, finite_json
from sr_runtime import Upscaler
from sr_runtime.backends.engine_identity import (
    ENGINE_FORMAT,
    EngineIdentity,
    GpuInfo,
    read_timing_cache,
)
from sr_runtime.files import atomic_write_json

REPO = Path(__file__).resolve().parents[1]


def _working_model(double_model: Path, tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A copy of a complete model directory, and its files' bytes."""
    out = tmp_path / "model"
    shutil.copytree(double_model, out)
    return out, {p.name: p.read_bytes() for p in out.iterdir()}


def _assert_untouched(out: Path, before: dict[str, bytes]) -> None:
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in out.parent.iterdir() if ".export-" in p.name], "staging directory left behind"
    with Upscaler(out, backend="cpu") as up:  # still the working model
        assert up.run(np.full((8, 8, 3), 128, np.uint8)).shape == (32, 32, 3)


@pytest.mark.slow  # one real export, ~1 min on 2 cores
def test_nan_weights_fail_parity_and_leave_the_working_model(double_model: Path, tmp_path: Path) -> None:
    out, before = _working_model(double_model, tmp_path)
    model = tiny_model()
    with torch.no_grad():
        next(model.decoder.parameters()).fill_(float("nan"))
    with pytest.raises(ExportCheckFailed, match="differs from PyTorch by nan"):
        export_model_dir(model, {}, ExportOptions(out_dir=out, name="x", fp16=False), log=lambda msg: None)
    _assert_untouched(out, before)


def test_an_interrupted_reexport_leaves_the_working_model(
    double_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sr_export import pipeline

    out, before = _working_model(double_model, tmp_path)

    def interrupted_after_writing(model: object, path: Path, **kwargs: object) -> None:
        path.write_bytes(b"new fp32 graph")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "export_fp32", interrupted_after_writing)
    with pytest.raises(KeyboardInterrupt):
        export_model_dir(tiny_model(), {}, ExportOptions(out_dir=out, name="x"), log=lambda msg: None)
    _assert_untouched(out, before)


def test_manifests_are_strict_json() -> None:
    with pytest.raises(ValueError, match="JSON compliant"):
        atomic_write_json("/nonexistent/never-written.json", {"max_abs_err": math.nan})
    safe = finite_json({"a": [1.0, math.inf, {"b": -math.inf}], "c": math.nan, "d": "x", "e": 2})
    assert safe == {"a": [1.0, "inf", {"b": "-inf"}], "c": "nan", "d": "x", "e": 2}
    json.loads(json.dumps(safe, allow_nan=False))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch", "1,4,1000000"], "max 1000000 is over 256"),
        (["--seed", str(2**70)], f"--seed: must be in [0, {2**32 - 1}]"),
        (["--seed", "-1"], "--seed: must be in"),
    ],
)
def test_out_of_range_batch_and_seed_are_one_error_line(tmp_path: Path, args: list[str], message: str) -> None:
    rc, _, err = run_cli(["--preset", "small-256", "--random-weights", "--out", str(tmp_path / "x"), *args])
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()


_MEASURE = """
import resource, sys
import numpy as np
from onnx import TensorProto, helper
from sr_export.fp16 import measure_ranges

shape = [1, 16, 512, 512]  # 16 MB per tensor, 24 of them
nodes = [helper.make_node("Neg", ["x" if i == 0 else f"t{i - 1}"], [f"t{i}"]) for i in range(24)]
graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("t23", TensorProto.FLOAT, shape)])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
feeds = [{"x": np.full(shape, v, np.float32)} for v in (1.0, -3.0)]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ranges = measure_ranges(model, feeds)
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
print(grew * 1024, ranges["t0"], ranges["t23"])
"""


def test_range_measurement_memory_stays_one_inference() -> None:
    """24 tensors of 16 MB: exposing them as outputs, or ORT's default node order, keeps all 384 MB alive."""
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    grew, first, last = (float(v) for v in proc.stdout.split())
    assert first == 3.0 and last == 3.0  # max |x| over both feeds, through the chain
    assert grew < 120e6, f"peak RSS grew by {grew / 1e6:.0f} MB"  # measured: 72 MB; all alive: 460 MB


def test_range_measurement_counts_nan_and_inf_as_infinite() -> None:
    from sr_export.fp16 import measure_ranges

    nodes = [helper.make_node("Log", ["x"], ["log"]), helper.make_node("Sqrt", ["x"], ["root"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4]) for name in ("log", "root")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    finite = {"x": np.array([[1.0, 4.0, 9.0, 16.0]], np.float32)}
    assert measure_ranges(model, [finite]) == {"log": pytest.approx(np.log(16.0)), "root": 4.0, "x": 16.0}
    with_zero = {"x": np.array([[0.0, 4.0, 9.0, 16.0]], np.float32)}  # log(0) = -inf
    with_negative = {"x": np.array([[-1.0, 4.0, 9.0, 16.0]], np.float32)}  # sqrt(-1) = nan, log(-1) = nan
    ranges = measure_ranges(model, [finite, with_zero, with_negative])
    assert ranges["log"] == math.inf and ranges["root"] == math.inf and ranges["x"] == 16.0


IDENTITY = EngineIdentity("ab" * 32, "fp16", (1, 4, 16), GpuInfo("NVIDIA H100 80GB HBM3", "9.0"), "10.13.0.35")


def test_engine_bytes_are_read_once_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine, sidecar = IDENTITY.paths(tmp_path)
    engine.parent.mkdir(parents=True)
    engine.write_bytes(b"serialized engine")
    sidecar.write_text(
        json.dumps(
            {
                "format": ENGINE_FORMAT,
                **IDENTITY.fields(),
                "engine_sha256": hashlib.sha256(b"serialized engine").hexdigest(),
            }
        )
    )
    opened: list[str] = []
    real_open = __import__("os").open
    monkeypatch.setattr("os.open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    monkeypatch.setattr("builtins.open", lambda *a, **k: pytest.fail(f"opened again: {a[0]}"))
    assert IDENTITY.load_engine(tmp_path) == (b"serialized engine", [])
    assert opened.count(str(engine)) == 1
    monkeypatch.undo()
    engine.unlink()
    (tmp_path / "other").write_bytes(b"serialized engine")
    engine.symlink_to(tmp_path / "other")  # a link in the last step is refused too
    blob, why = IDENTITY.load_engine(tmp_path)
    assert blob is None and "is a symlink" in why[0]


def test_the_timing_cache_is_read_under_the_engine_caches_rules(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    timing = cache / "trt10-sm90-x.timing.cache"
    assert read_timing_cache(cache, timing) == (b"", None)
    timing.write_bytes(b"timings")
    assert read_timing_cache(cache, timing) == (b"timings", None)
    timing.chmod(0o666)
    data, why = read_timing_cache(cache, timing)
    assert data == b"" and why is not None and "writable by other users" in why
    timing.unlink()
    (tmp_path / "planted").write_bytes(b"planted timings")
    timing.symlink_to(tmp_path / "planted")
    data, why = read_timing_cache(cache, timing)
    assert data == b"" and why is not None and "is a symlink" in why


def test_the_next_export_removes_a_killed_exports_staging_directory(
    double_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sr_export import pipeline

    out, before = _working_model(double_model, tmp_path)
    child = subprocess.Popen(["true"])
    child.wait()
    killed = tmp_path / f".model.export-{child.pid}-0a1b2c.tmp"  # what SIGKILL mid-export leaves
    running = tmp_path / f".model.export-{os.getpid()}-3d4e5f.tmp"  # an export still at work
    other = tmp_path / f".other.export-{child.pid}-6a7b8c.tmp"  # another target's
    for stage in (killed, running, other):
        stage.mkdir()
        (stage / "model.fp32.onnx").write_bytes(b"half")

    def failing(*args: object, **kwargs: object) -> None:
        raise ExportCheckFailed("a check failed")

    monkeypatch.setattr(pipeline, "_export_into", failing)
    logged: list[str] = []
    with pytest.raises(ExportCheckFailed):
        export_model_dir(tiny_model(), {}, ExportOptions(out_dir=out, name="x"), log=logged.append)
    assert not killed.exists() and running.is_dir() and other.is_dir()
    assert any(str(killed) in line for line in logged)
    shutil.rmtree(running)
    shutil.rmtree(other)
    _assert_untouched(out, before)


def test_an_export_that_cannot_fit_is_refused_before_it_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sr_export import cost, pipeline

    started: list[object] = []

    def export_step(*args: object, **kwargs: object) -> None:
        started.append(args)
        raise ExportCheckFailed("stopped here by the test")

    monkeypatch.setattr(cost, "available_memory", lambda: 10**6)  # 1 MB free: nothing fits
    monkeypatch.setattr(pipeline, "export_model_dir", export_step)
    argv = ["--preset", "small-256", "--random-weights", "--out", str(tmp_path / "x")]
    rc, out, err = run_cli(argv)
    assert rc == 1 and "refusing to start" in err and "--force" in err and "Traceback" not in err, err
    assert "estimate:" in out and not started and not (tmp_path / "x").exists()
    rc, out, err = run_cli([*argv, "--force"])
    assert rc == 1 and "going on (--force)" in err and started  # it did start


@pytest.mark.parametrize("heavy", [False, True])
def test_the_estimate_counts_the_images_the_export_runs(heavy: bool) -> None:
    from sr_export.cost import calibration_crops, check_crops, ort_images
    from sr_export.pipeline import (
        CALIBRATION_TEMPERATURES,
        CHECK_TEMPERATURES,
        PARITY_IMAGES,
        calibration_feeds,
        check_cases,
    )

    calibration = calibration_feeds(64, 4, 0, calibration_crops(heavy))
    checks = check_cases(64, 4, 0, check_crops(heavy))
    images = sum(f["lr"].shape[0] for f in calibration) + 3 * sum(c["lr"].shape[0] for c in checks.values())
    counted = ort_images(heavy, len(CALIBRATION_TEMPERATURES), len(CHECK_TEMPERATURES), PARITY_IMAGES)
    assert counted == PARITY_IMAGES + images
    assert counted == (56 if heavy else 98)
