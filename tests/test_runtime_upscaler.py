"""Upscaler: model lookup, backend choice, precision, samples/std map, threads, TensorRT engine cache."""
# ruff: noqa: F811  (pytest fixtures imported from conftest_runtime are redefined as arguments)

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest_runtime import double_model, photo_lr, upscaler  # noqa: F401  (pytest fixtures)

from sr_runtime import BackendUnavailable, RunStats, SRModelError, Upscaler
from sr_runtime.backends.trt_engine import EngineTarget, find_engine
from sr_runtime.model import MODEL_DIR_ENV, default_model_dir


def test_default_model_is_the_shipped_one_or_the_env_override(monkeypatch: pytest.MonkeyPatch,
                                                              double_model: Path) -> None:
    monkeypatch.delenv(MODEL_DIR_ENV, raising=False)
    assert default_model_dir() == Path(__file__).resolve().parent.parent / "engines" / "vdvae-sr-256"
    monkeypatch.setenv(MODEL_DIR_ENV, str(double_model))
    with Upscaler() as up:
        assert up.spec.name == "test-double"


def test_missing_model_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(MODEL_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(SRModelError, match="no model manifest.*SR_MODEL_DIR"):
        Upscaler()


def test_corrupt_onnx_is_refused_by_its_checksum(double_model: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(double_model, tmp_path / "copy"))
    onnx_file = copy / "model.fp32.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-10])
    with pytest.raises(SRModelError, match="sha256"):
        Upscaler(copy, backend="cpu")


def test_manifest_of_another_format_is_refused(double_model: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(double_model, tmp_path / "copy"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format"] = "something-else/9"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SRModelError, match="format"):
        Upscaler(copy)


def test_auto_reports_what_really_runs(upscaler: Upscaler, double_model: Path) -> None:
    import onnxruntime as ort

    with Upscaler(double_model) as auto:
        if "CUDAExecutionProvider" not in ort.get_available_providers() and \
                importlib.util.find_spec("cuda") is None:
            assert auto.backend == "onnxruntime-cpu" and auto.precision == "fp32"
        assert auto.backend in ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")
    assert upscaler.backend == "onnxruntime-cpu"


def test_a_named_backend_that_cannot_run_raises(double_model: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here: the CUDA backend may well run")
    with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider"):
        Upscaler(double_model, backend="cuda")


def test_unknown_backend_and_precision_are_value_errors(double_model: Path) -> None:
    with pytest.raises(ValueError, match="backend"):
        Upscaler(double_model, backend="vulkan")
    with pytest.raises(ValueError, match="precision"):
        Upscaler(double_model, precision="int8")
    with pytest.raises(ValueError, match="batch_size"):
        Upscaler(double_model, batch_size=99)


def test_fp16_model_stays_close_to_fp32(double_model: Path) -> None:
    photo = photo_lr(48)
    with Upscaler(double_model, backend="cpu", precision="fp16") as half:
        assert half.precision == "fp16"
        out16 = half.run(photo).astype(float)
    with Upscaler(double_model, backend="cpu", precision="fp32") as full:
        out32 = full.run(photo).astype(float)
    psnr = 10 * np.log10(255**2 / np.mean((out16 - out32) ** 2))
    assert psnr > 45


def test_batch_size_does_not_change_the_result(double_model: Path) -> None:
    photo = photo_lr(80)
    outs = []
    for batch in (1, 3, 8):
        with Upscaler(double_model, backend="cpu", temperature=0.7, seed=3, batch_size=batch) as up:
            stats = RunStats()
            outs.append(up.run(photo, stats=stats))
            assert stats.batches >= stats.tiles / batch
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


def test_samples_return_a_std_map_where_noise_matters(double_model: Path) -> None:
    photo = photo_lr(40)
    with Upscaler(double_model, backend="cpu", temperature=0.8, seed=1) as up:
        calls: list[tuple[int, int]] = []
        mean, std = up.run(photo, samples=4, progress=lambda d, t: calls.append((d, t)))
        single = up.run(photo)
    assert mean.shape == single.shape == (160, 160, 3) and std.shape == (160, 160)
    assert std.dtype == np.float32 and 0.02 < float(std.mean()) < 0.2  # 0.1 * 0.8 noise, clipped at 0/1
    assert calls[-1][0] == calls[-1][1]  # progress reached the total over all samples
    # Averaging 4 different samples cancels noise: smoother than one sample.
    assert np.abs(np.diff(mean.astype(float), axis=1)).mean() < np.abs(np.diff(single.astype(float), axis=1)).mean()


def test_samples_need_temperature_and_fit_the_bank(upscaler: Upscaler, double_model: Path) -> None:
    with pytest.raises(ValueError, match="temperature > 0"):
        upscaler.run(photo_lr(8), samples=2)
    with Upscaler(double_model, backend="cpu", temperature=0.5, noise_rows=4) as up, \
            pytest.raises(ValueError, match="samples must be in"):
        up.run(photo_lr(8), samples=5)


def test_one_upscaler_shared_by_threads_gives_the_same_results(double_model: Path) -> None:
    images = [photo_lr(n) for n in (40, 56, 72, 88)]
    with Upscaler(double_model, backend="cpu", temperature=0.5, seed=9) as up:
        expected = [up.run(img) for img in images]
        results: dict[int, np.ndarray] = {}

        def work(i: int) -> None:
            for _ in range(3):
                results[i] = up.run(images[i])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(np.array_equal(results[i], expected[i]) for i in range(len(images)))


@pytest.mark.gpu
def test_onnxruntime_cuda_matches_cpu(double_model: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here (onnxruntime-gpu not installed)")
    photo = photo_lr(64)
    try:
        gpu = Upscaler(double_model, backend="cuda", precision="fp32", temperature=0.5, seed=2)
    except BackendUnavailable as exc:
        pytest.skip(f"CUDA backend cannot run here: {exc}")
    with gpu, Upscaler(double_model, backend="cpu", temperature=0.5, seed=2) as cpu:
        assert gpu.backend == "onnxruntime-cuda"
        diff = np.abs(gpu.run(photo).astype(int) - cpu.run(photo).astype(int))
    assert diff.max() <= 1  # same noise rows bound by pointer on the GPU as sliced on the CPU


# --- TensorRT ----------------------------------------------------------------

TARGET = EngineTarget("abc", "10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0", "fp16", 8)
GOOD = {"onnx_sha256": "abc", "tensorrt_version": "10.13.0.35", "gpu_name": "NVIDIA H100 80GB HBM3",
        "compute_capability": [9, 0], "precision": "fp16", "batch": {"min": 1, "opt": 4, "max": 16}}


@pytest.mark.parametrize(
    ("change", "reason"),
    [({}, None), ({"tensorrt_version": "10.12.0"}, "tensorrt_version"), ({"gpu_name": "NVIDIA A10"}, "gpu_name"),
     ({"compute_capability": "8.6"}, "compute_capability"), ({"onnx_sha256": "def"}, "onnx_sha256"),
     ({"precision": "fp32"}, "precision"), ({"batch": {"max": 4}}, "batch max")],
)
def test_engine_manifest_must_match_gpu_tensorrt_and_onnx(change: dict, reason: str | None) -> None:
    mismatch = TARGET.mismatch({**GOOD, **change})
    if reason is None:
        assert mismatch is None
    else:
        assert mismatch is not None and reason in mismatch


def test_engine_cache_skips_stale_engines(tmp_path: Path) -> None:
    (tmp_path / "a.engine").write_bytes(b"stale")
    (tmp_path / "a.engine.json").write_text(json.dumps({**GOOD, "tensorrt_version": "8.6.1"}))
    (tmp_path / "b.engine").write_bytes(b"no manifest")
    (tmp_path / "c.engine").write_bytes(b"corrupt")
    (tmp_path / "c.engine.json").write_text(json.dumps({**GOOD, "engine_sha256": hashlib.sha256(b"good").hexdigest()}))
    good = tmp_path / "key" / "model.fp16.engine"  # sr_export's layout: <cache>/<key>/model.<precision>.engine
    good.parent.mkdir()
    good.write_bytes(b"good")
    good.with_name(good.name + ".json").write_text(
        json.dumps({**GOOD, "engine_sha256": hashlib.sha256(b"good").hexdigest()}))
    engine, rejected = find_engine([tmp_path / "missing", tmp_path], TARGET)
    assert engine == good
    assert len(rejected) == 3 and "8.6.1" in rejected[0] and "no readable manifest" in rejected[1]
    assert "does not match the sha256" in rejected[2]


def _tensorrt_gpu_reason() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return "tensorrt is not installed"
    if not hasattr(tensorrt, "Runtime"):
        return "only the tensorrt type stubs are installed, not TensorRT"
    if importlib.util.find_spec("cuda") is None:
        return "cuda-python is not installed"
    return None


@pytest.mark.gpu
def test_tensorrt_backend_matches_onnxruntime(double_model: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    reason = _tensorrt_gpu_reason()
    if reason:
        pytest.skip(f"TensorRT backend not testable here: {reason}")
    monkeypatch.setenv("SR_ENGINE_CACHE", str(tmp_path / "cache"))
    photo = photo_lr(64)
    try:
        trt_up = Upscaler(double_model, backend="tensorrt", precision="fp32", temperature=0.5, seed=2)
    except BackendUnavailable as exc:
        pytest.skip(f"TensorRT backend cannot run here: {exc}")
    with trt_up, Upscaler(double_model, backend="cpu", temperature=0.5, seed=2) as cpu:
        assert trt_up.backend == "tensorrt"
        diff = np.abs(trt_up.run(photo).astype(int) - cpu.run(photo).astype(int))
    assert diff.max() <= 2


def test_tensorrt_without_tensorrt_falls_back_with_a_reason(double_model: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    reason = _tensorrt_gpu_reason()
    if reason is None:
        pytest.skip("TensorRT and cuda-python are installed: no fallback to see")
    with pytest.raises(BackendUnavailable):
        Upscaler(double_model, backend="tensorrt")
    with caplog.at_level("INFO", logger="sr_runtime"), Upscaler(double_model) as up:
        assert up.backend != "tensorrt"
    assert any("skipping tensorrt" in r.getMessage() for r in caplog.records)

