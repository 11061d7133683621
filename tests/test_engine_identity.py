"""Engine identity and cache (pure Python, runs everywhere) and the TensorRT build (skips without TensorRT + GPU).

One checker, `EngineIdentity`, decides for the runtime and for sr-export alike.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from sr_runtime.backends import engine_build
from sr_runtime.backends.engine_identity import (
    ENGINE_CACHE_ENV,
    ENGINE_FORMAT,
    EngineIdentity,
    GpuInfo,
    check_batch,
    engine_cache_dir,
    engine_unavailable_reason,
    uses_strongly_typed,
)
from sr_runtime.files import atomic_write_bytes, atomic_write_json, sha256_file

GPU = GpuInfo(name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
IDENTITY = EngineIdentity("ab" * 32, "fp16", (1, 4, 16), GPU, "10.13.0.35")
NO_ENGINE = engine_unavailable_reason()


def current_manifest() -> dict:
    return {"format": ENGINE_FORMAT, **IDENTITY.fields()}


def test_cache_key_changes_with_every_identity_field() -> None:
    base = IDENTITY.key()
    assert base == EngineIdentity("ab" * 32, "fp16", (1, 4, 16), GPU, "10.13.0.35").key()
    assert base.startswith("fp16-b1-4-16-sm90-")
    variants = [
        {"onnx_sha256": "cd" * 32},
        {"precision": "fp32"},
        {"batch": (2, 4, 16)},
        {"batch": (1, 8, 16)},
        {"batch": (1, 4, 32)},
        {"tensorrt_version": "10.14.1"},
        {"gpu": dataclasses.replace(GPU, compute_capability="8.9")},
        {"gpu": dataclasses.replace(GPU, name="NVIDIA L4")},
    ]
    keys = {dataclasses.replace(IDENTITY, **v).key() for v in variants}
    assert len(keys) == len(variants) and base not in keys


@pytest.mark.parametrize(
    "field, value",
    [
        ("onnx_sha256", "cd" * 32),
        ("tensorrt_version", "11.0.0"),
        ("gpu_name", "NVIDIA A100"),
        ("compute_capability", "8.0"),
        ("precision", "fp32"),
        ("batch", {"min": 2, "opt": 4, "max": 16}),
        ("batch", {"min": 1, "opt": 8, "max": 16}),
        ("batch", {"min": 1, "opt": 4, "max": 8}),
        ("strongly_typed", False),
        ("format", "something/0"),
    ],
)
def test_every_stale_field_is_named_by_the_one_checker(field: str, value: object) -> None:
    assert IDENTITY.stale_reasons(current_manifest()) == []
    reasons = IDENTITY.stale_reasons({**current_manifest(), field: value})
    assert len(reasons) == 1 and reasons[0].startswith(f"{field} is {value!r}, need ")


def test_a_missing_field_is_stale() -> None:
    manifest = current_manifest()
    del manifest["strongly_typed"]
    assert IDENTITY.stale_reasons(manifest) == ["strongly_typed is None, need True"]


@pytest.mark.parametrize(
    "version, strongly",
    [("10.0.1", False), ("10.11.0.33", False), ("10.12.0.36", True), ("10.13.0.35", True), ("11.0.0", True)],
)
def test_strongly_typed_from_10_12(version: str, strongly: bool) -> None:
    assert uses_strongly_typed(version) is strongly


@pytest.mark.parametrize("batch", [(0, 1, 2), (4, 2, 8), (1, 8, 4), (1, 2)])
def test_bad_batch_profiles_are_refused(batch: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="batch"):
        check_batch(batch)


def test_cached_engine_on_disk(tmp_path: Path) -> None:
    """A current engine is found under its key; wrong bytes, another identity or no manifest make it not found."""
    engine, sidecar = IDENTITY.paths(tmp_path)
    assert engine.parent.name == IDENTITY.key()
    atomic_write_bytes(engine, b"serialized engine")
    atomic_write_json(sidecar, {**current_manifest(), "engine_sha256": sha256_file(engine)})
    assert IDENTITY.cached_engine(tmp_path) == (engine, [])
    assert dataclasses.replace(IDENTITY, tensorrt_version="10.14.0").cached_engine(tmp_path)[0] is None
    engine.write_bytes(b"truncated")
    found, why = IDENTITY.cached_engine(tmp_path)
    assert found is None and why == ["engine file does not match the sha256 in its manifest"]
    sidecar.unlink()
    assert IDENTITY.cached_engine(tmp_path) == (None, [f"no engine at {engine}"])


def test_engine_cache_dir_is_the_env_else_the_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENGINE_CACHE_ENV, str(tmp_path))
    assert engine_cache_dir() == tmp_path
    monkeypatch.delenv(ENGINE_CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert engine_cache_dir() == tmp_path / "home" / ".cache" / "sr_runtime" / "engines"


def test_type_stubs_alone_are_not_tensorrt() -> None:
    spec = importlib.util.find_spec("tensorrt")
    if spec is None:
        pytest.skip("not even the tensorrt type stubs are installed")
    import tensorrt

    if hasattr(tensorrt, "Builder"):
        pytest.skip("the real TensorRT is installed")
    assert NO_ENGINE == "TensorRT is not installed (only its type stubs are)"


def _tiny_onnx(path: Path) -> Path:
    """lr [N,3,8,8], noise [N,4] -> hr [N,3,8,8] (no torch needed): enough to exercise the build."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["noise"], ["m"], axes=[1], keepdims=1),
            helper.make_node("Unsqueeze", ["m", "axes"], ["m4"]),
            helper.make_node("Add", ["lr", "m4"], ["hr"]),
        ],
        "tiny",
        [
            helper.make_tensor_value_info("lr", TensorProto.FLOAT, ["N", 3, 8, 8]),
            helper.make_tensor_value_info("noise", TensorProto.FLOAT, ["N", 4]),
        ],
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
    first = engine_build.build_engine(onnx_path, cache, precision="fp32", batch=(1, 2, 4))
    sidecar = json.loads(first.with_name(first.name + ".json").read_text())
    assert sidecar["engine_sha256"] == sha256_file(first) and sidecar["batch"] == {"min": 1, "opt": 2, "max": 4}
    assert list(cache.glob("*.timing.cache")), "timing cache saved beside the engines"
    mtime = first.stat().st_mtime_ns
    assert engine_build.build_engine(onnx_path, cache, precision="fp32", batch=(1, 2, 4)) == first
    assert first.stat().st_mtime_ns == mtime
    other = engine_build.build_engine(onnx_path, cache, precision="fp32", batch=(1, 2, 8))
    assert other != first and other.is_file()
