"""Upscaler: model lookup, backend choice, precision, samples/std map, threads, TensorRT engine cache."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from doubles import photo_lr

from sr_runtime import BackendUnavailable, RunStats, SRModelError, Upscaler
from sr_runtime.backends import trt_engine
from sr_runtime.backends.engine_identity import (
    ENGINE_CACHE_ENV,
    ENGINE_FORMAT,
    EngineIdentity,
    GpuInfo,
    engine_unavailable_reason,
)
from sr_runtime.files import atomic_write_bytes, atomic_write_json, sha256_file
from sr_runtime.model import MODEL_DIR_ENV, default_model_dir, load_model_spec
from sr_runtime.noise import NoiseBank
from sr_runtime.tiling import plan_tiles


def test_default_model_is_the_shipped_one_or_the_env_override(
    monkeypatch: pytest.MonkeyPatch, double_model: Path
) -> None:
    monkeypatch.delenv(MODEL_DIR_ENV, raising=False)
    assert default_model_dir() == Path(__file__).resolve().parent.parent / "sr_runtime" / "models" / "vdvae-sr-256"
    monkeypatch.setenv(MODEL_DIR_ENV, str(double_model))
    with Upscaler() as up:
        assert up.spec.name == "test-double"


def test_missing_model_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(MODEL_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(SRModelError, match=r"no model manifest.*SR_MODEL_DIR"):
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
    plan = plan_tiles(80, 80, (32, 32), 8)
    outs = []
    for batch in (1, 3, 8):
        with Upscaler(double_model, backend="cpu", temperature=0.7, seed=3, batch_size=batch) as up:
            stats = RunStats()
            outs.append(up.run(photo, stats=stats))
        bank = NoiseBank.create(up.spec.noise_dim, temperature=0.7, seed=3, max_batch=batch)
        assert stats.tiles == plan.count
        assert stats.batches == len(bank.batches(bank.tile_rows(plan.grid), batch))
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


def test_cpu_threads_set_the_session_and_not_the_result(double_model: Path) -> None:
    """A Ray worker's share of the cores (cpu_threads) reaches ONNX Runtime; pixels do not depend on it."""
    photo = photo_lr(48)
    with (
        Upscaler(double_model, backend="cpu", temperature=0.5, seed=1) as default,
        Upscaler(double_model, backend="cpu", temperature=0.5, seed=1, cpu_threads=1) as single,
    ):
        assert single._backend._session.get_session_options().intra_op_num_threads == 1  # type: ignore[attr-defined]
        assert np.array_equal(default.run(photo), single.run(photo))
    with pytest.raises(ValueError, match="cpu_threads"):
        Upscaler(double_model, backend="cpu", cpu_threads=0)


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
    with (
        Upscaler(double_model, backend="cpu", temperature=0.5, noise_rows=4) as up,
        pytest.raises(ValueError, match="samples must be in"),
    ):
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


def _gpu_backend_missing(backend: str) -> str | None:
    """Why `backend` cannot be tested here, or None where it must load."""
    if backend == "tensorrt":
        return engine_unavailable_reason()
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return None
    return "onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu not installed)"


@pytest.mark.gpu
@pytest.mark.parametrize(("backend", "tolerance"), [("onnxruntime-cuda", 1), ("tensorrt", 2)])
def test_gpu_backend_matches_cpu(
    double_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, tolerance: int
) -> None:
    """Same noise rows bound by pointer on the GPU as sliced on the CPU; 9 tiles make a padded 1-tile batch."""
    missing = _gpu_backend_missing(backend)
    if missing:
        pytest.skip(f"{backend} not testable here: {missing}")
    monkeypatch.setenv(ENGINE_CACHE_ENV, str(tmp_path / "cache"))
    photo = photo_lr(64)
    with (
        Upscaler(double_model, backend=backend, precision="fp32", temperature=0.5, seed=2) as gpu,
        Upscaler(double_model, backend="cpu", temperature=0.5, seed=2) as cpu,
    ):
        assert gpu.backend == backend
        for _ in range(2):  # the second run replays captured graphs
            diff = np.abs(gpu.run(photo).astype(int) - cpu.run(photo).astype(int))
            assert diff.max() <= tolerance


# --- TensorRT ----------------------------------------------------------------

FAKE_GPU = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
FAKE_TRT_VERSION = "10.13.0.35"


@pytest.mark.skipif(engine_unavailable_reason() is None, reason="TensorRT and a GPU are here: a real build would run")
def test_an_engine_for_batch_2_up_is_refused_where_1_tile_batches_run(
    double_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model's profile is 1..8 (a 1-tile last batch is legal); an engine built for 2..8 must never load.

    TensorRT and the GPU query are faked (only their version and name are read
    before an engine is chosen); the engine files are fakes too. One 2..8
    engine sits under its own key, a copy is mislabelled under the key the
    runtime opens: the first is never looked at, the second is refused by
    its manifest, and the rebuild fails for want of TensorRT.
    """
    monkeypatch.setattr(trt_engine, "import_tensorrt", lambda: SimpleNamespace(__version__=FAKE_TRT_VERSION))
    monkeypatch.setattr(trt_engine, "query_gpu", lambda: FAKE_GPU)
    monkeypatch.setenv(ENGINE_CACHE_ENV, str(tmp_path))
    spec = load_model_spec(double_model)
    wanted = EngineIdentity(spec.onnx_sha256["fp32"], "fp32", (1, 4, 8), FAKE_GPU, FAKE_TRT_VERSION)
    built_for_2 = dataclasses.replace(wanted, batch=(2, 4, 8))
    for engine, sidecar in (built_for_2.paths(tmp_path), wanted.paths(tmp_path)):
        atomic_write_bytes(engine, b"not a real engine")
        fields = {"format": ENGINE_FORMAT, **built_for_2.fields(), "engine_sha256": sha256_file(engine)}
        atomic_write_json(sidecar, fields)
    with pytest.raises(BackendUnavailable) as refused:
        Upscaler(double_model, backend="tensorrt", precision="fp32")
    message = str(refused.value)
    assert "batch is {'min': 2, 'opt': 4, 'max': 8}, need {'min': 1, 'opt': 4, 'max': 8}" in message
    assert "building one failed: TensorRT is not installed" in message
    assert str(built_for_2.paths(tmp_path)[0]) not in message


def test_auto_without_a_gpu_backend_runs_the_cpu_and_says_why(
    double_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import onnxruntime as ort

    reason = engine_unavailable_reason()
    if reason is None or "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a GPU backend may load here")
    with pytest.raises(BackendUnavailable, match=re.escape(reason)):
        Upscaler(double_model, backend="tensorrt")
    with caplog.at_level("INFO", logger="sr_runtime"), Upscaler(double_model) as up:
        assert (up.backend, up.precision) == ("onnxruntime-cpu", "fp32")
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    no_cuda = "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    assert skipped == [f"sr_runtime: skipping tensorrt: {reason}", f"sr_runtime: skipping onnxruntime-cuda: {no_cuda}"]


def test_one_sample_has_a_zero_std_map_without_allocating_one(upscaler: Upscaler) -> None:
    lr = photo_lr(40)
    out, std = upscaler.run(lr, samples=1)
    assert std.shape == out.shape[:2] and not std.any()
    assert std.base is not None and std.base.size == 1  # a view of one zero, not H x W floats


def test_run_many_equals_run_on_each_image(double_model: Path) -> None:
    photo = photo_lr(96)
    grey = photo[:40, :70, 0].copy()
    rgba = np.dstack([photo[:50, :45], np.full((50, 45), 200, np.uint8)])
    images = [photo[:70, :90], grey, rgba, photo[10:43, 5:38]]
    with Upscaler(double_model, backend="cpu", batch_size=8) as up:
        alone, shared = RunStats(), RunStats()
        expected = [up.run(img, stats=alone) for img in images]
        got = up.run_many(images, stats=shared)
    assert shared.tiles == alone.tiles and shared.batches < alone.batches  # tiles of several images shared calls
    for want, out in zip(expected, got, strict=True):
        assert out.shape == want.shape and out.dtype == want.dtype
        assert np.array_equal(out, want)  # the CPU backend's results do not depend on the batch (see above)


def test_run_many_at_temperature_runs_each_image_with_its_own_noise(double_model: Path) -> None:
    images = [photo_lr(70), photo_lr(50, "gravel")]
    with Upscaler(double_model, backend="cpu", temperature=0.8, seed=5) as up:
        expected = [up.run(img) for img in images]
        got = up.run_many(images)
        assert up.run_many([]) == []
    assert all(np.array_equal(out, want) for out, want in zip(got, expected, strict=True))
