"""Engine cache logic (pure Python, runs everywhere) and the TensorRT build (skips without TensorRT + GPU)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sr_export import tensorrt as sx
from sr_export.files import atomic_write_bytes, atomic_write_json, sha256_file

GPU = sx.GpuInfo(name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
ARGS: dict = {"onnx_sha256": "ab" * 32, "precision": "fp16", "batch": (1, 4, 16), "gpu": GPU,
              "trt_version": "10.13.0.35"}
NO_ENGINE = sx.engine_unavailable_reason()


def manifest_for(**overrides: object) -> dict:
    args = {**ARGS, **overrides}
    return {"format": sx.ENGINE_FORMAT, **sx.build_identity(**args)}


def test_cache_key_changes_with_every_build_input() -> None:
    base = sx.engine_cache_key(**ARGS)
    assert base == sx.engine_cache_key(**ARGS)
    assert base.startswith("fp16-b1-4-16-sm90-")
    variants = [
        {"onnx_sha256": "cd" * 32}, {"precision": "fp32"}, {"batch": (1, 4, 32)}, {"trt_version": "10.14.1"},
        {"gpu": GPU.__class__(GPU.name, "8.9")}, {"gpu": dataclasses.replace(GPU, name="NVIDIA L4")},
    ]
    keys = {sx.engine_cache_key(**{**ARGS, **v}) for v in variants}
    assert len(keys) == len(variants) and base not in keys


@pytest.mark.parametrize("field, value", [
    ("onnx_sha256", "cd" * 32), ("tensorrt_version", "11.0.0"), ("gpu_name", "NVIDIA A100"),
    ("compute_capability", "8.0"), ("precision", "fp32"), ("batch", {"min": 1, "opt": 4, "max": 8}),
    ("format", "something/0"),
])
def test_stale_manifest_means_rebuild(field: str, value: object) -> None:
    assert sx.is_engine_current(manifest_for(), **ARGS)
    stale = {**manifest_for(), field: value}
    assert not sx.is_engine_current(stale, **ARGS)
    assert any(field in r for r in sx.stale_reasons(stale, **ARGS))


def test_missing_fields_are_stale() -> None:
    assert not sx.is_engine_current({}, **ARGS)


@pytest.mark.parametrize("version, strongly", [("10.0.1", False), ("10.11.0.33", False), ("10.12.0.36", True),
                                               ("10.13.0.35", True), ("11.0.0", True)])
def test_strongly_typed_from_10_12(version: str, strongly: bool) -> None:
    assert sx.uses_strongly_typed(version) is strongly


@pytest.mark.parametrize("batch", [(0, 1, 2), (4, 2, 8), (1, 8, 4), (1, 2)])
def test_bad_batch_profiles_are_refused(batch: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        sx.check_batch(batch)


def test_cached_engine_on_disk(tmp_path: Path) -> None:
    """A current engine is found; wrong bytes, a foreign GPU or another TensorRT make it not found."""
    key = sx.engine_cache_key(**ARGS)
    engine, sidecar = sx.engine_paths(tmp_path, key, "fp16")
    atomic_write_bytes(engine, b"serialized engine")
    atomic_write_json(sidecar, {**manifest_for(), "engine_sha256": sha256_file(engine)})
    found, why = sx.cached_engine(tmp_path, **ARGS)
    assert found == engine and why == []
    assert sx.cached_engine(tmp_path, **{**ARGS, "trt_version": "10.14.0"})[0] is None
    assert sx.cached_engine(tmp_path, **{**ARGS, "gpu": sx.GpuInfo("NVIDIA L4", "8.9")})[0] is None
    engine.write_bytes(b"truncated")
    found, why = sx.cached_engine(tmp_path, **ARGS)
    assert found is None and "sha256" in why[0]
    sidecar.unlink()
    assert sx.cached_engine(tmp_path, **ARGS)[0] is None


def test_sidecar_fits_the_runtime_engine_check() -> None:
    """sr_runtime loads an engine only if its sidecar matches its EngineTarget: our manifest must."""
    from sr_runtime.backends.trt_engine import EngineTarget

    target = EngineTarget(onnx_sha256=ARGS["onnx_sha256"], tensorrt_version=ARGS["trt_version"],
                          gpu_name=GPU.name, compute_capability=GPU.compute_capability, precision="fp16", batch=16)
    assert target.mismatch(manifest_for()) is None
    assert target.mismatch(manifest_for(trt_version="10.14.0")) is not None


def test_default_cache_dir_follows_the_runtime_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(sx.ENGINE_CACHE_ENV, str(tmp_path))
    assert sx.default_cache_dir() == tmp_path


def test_no_engine_reason_is_one_line() -> None:
    if NO_ENGINE is None:
        pytest.skip("TensorRT and a GPU are present")
    assert "\n" not in NO_ENGINE and NO_ENGINE


def _stubs_dir() -> Path | None:
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).parent


@pytest.mark.slow
def test_tensorrt_module_typechecks_against_the_stubs(tmp_path: Path) -> None:
    """mypy against tensorrt-stubs. The installed stubs are invisible to mypy (no py.typed, not a -stubs
    package) and have two syntax errors (a parameter named `in`, a non-default after a default), so
    a patched copy is put on MYPYPATH; errors inside the stubs themselves are ignored."""
    site = _stubs_dir()
    if site is None or not (site / "tensorrt" / "__init__.pyi").is_file() or importlib.util.find_spec("mypy") is None:
        pytest.skip("tensorrt-stubs or mypy not installed")
    stubs = tmp_path / "stubs"
    for pkg in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(site / pkg, stubs / pkg, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    bindings = stubs / "tensorrt_bindings" / "tensorrt.pyi"
    text = re.sub(r"\bin: ", "in_: ", bindings.read_text())
    text = text.replace("channel_axis: int) -> IScaleLayer", "channel_axis: int = ...) -> IScaleLayer")
    bindings.write_text(text)
    config = tmp_path / "mypy.ini"
    config.write_text(f"[mypy]\nmypy_path = {stubs}\nignore_missing_imports = True\n"
                      "[mypy-tensorrt.*]\nignore_errors = True\n[mypy-tensorrt_bindings.*]\nignore_errors = True\n")
    target = Path(sx.__file__)
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--config-file", str(config),
                           "--cache-dir", str(tmp_path / "cache"), str(target)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The check is real: a wrong call into TensorRT is caught.
    bad = tmp_path / "bad.py"
    bad.write_text("import tensorrt as trt\ntrt.Builder(trt.Logger(trt.Logger.WARNING)).create_network('x')\n")
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--config-file", str(config),
                           "--cache-dir", str(tmp_path / "cache"), str(bad)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "create_network" in proc.stdout


def _tiny_onnx(path: Path) -> Path:
    """lr [N,3,8,8], noise [N,4] -> hr [N,3,8,8] (no torch needed): enough to exercise the build."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["noise"], ["m"], axes=[1], keepdims=1),
         helper.make_node("Unsqueeze", ["m", "axes"], ["m4"]),
         helper.make_node("Add", ["lr", "m4"], ["hr"])],
        "tiny",
        [helper.make_tensor_value_info("lr", TensorProto.FLOAT, ["N", 3, 8, 8]),
         helper.make_tensor_value_info("noise", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("hr", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.gpu
@pytest.mark.skipif(NO_ENGINE is not None, reason=f"no TensorRT engine can be built here: {NO_ENGINE}")
def test_build_engine_builds_once_then_reuses(tmp_path: Path) -> None:
    onnx_path = _tiny_onnx(tmp_path / "model.fp32.onnx")
    cache = tmp_path / "cache"
    first = sx.build_engine(onnx_path, cache, precision="fp32", batch=(1, 2, 4))
    sidecar = json.loads(first.with_name(first.name + ".json").read_text())
    assert sidecar["engine_sha256"] == sha256_file(first) and sidecar["batch"] == {"min": 1, "opt": 2, "max": 4}
    assert list(cache.glob("*.timing.cache")), "timing cache saved beside the engines"
    mtime = first.stat().st_mtime_ns
    assert sx.build_engine(onnx_path, cache, precision="fp32", batch=(1, 2, 4)) == first
    assert first.stat().st_mtime_ns == mtime
    other = sx.build_engine(onnx_path, cache, precision="fp32", batch=(1, 2, 8))
    assert other != first and other.is_file()
