"""GPU backends see fixed batch shapes: buckets, padding, and the bound-buffer ONNX Runtime path (on the CPU here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from doubles import build_double, photo_lr
from PIL import Image

from sr_runtime import RunStats, Upscaler
from sr_runtime import upscaler as upscaler_module
from sr_runtime.backends import batch_buckets, bucket_for
from sr_runtime.backends.onnxrt import (
    MULTI_GRAPH_SINCE,
    BucketBindings,
    OrtCpuBackend,
    OrtCudaBackend,
    version_tuple,
)
from sr_runtime.model import ModelSpec, load_model_spec
from sr_runtime.noise import NoiseBank
from sr_runtime.tiling import plan_tiles


class RecordingBackend:
    """A fake GPU backend: records every call's batch shape and noise slice, returns lr repeated 4x (nearest)."""

    name = "recording-fake"
    precision = "fp32"

    def __init__(self, bank: NoiseBank, buckets: tuple[int, ...]) -> None:
        self.batch_sizes = buckets
        self.bank_rows = bank.data.shape[0]
        self.calls: list[tuple[tuple[int, ...], int]] = []

    def run(self, lr: np.ndarray, noise_start: int, release_memory: bool = False) -> np.ndarray:
        self.calls.append((lr.shape, noise_start))
        return lr.repeat(4, axis=2).repeat(4, axis=3)

    def close(self) -> None:
        """Nothing to free."""


@pytest.fixture(scope="module")
def shipped_shape_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test double at the shipped model's tile (64 -> 256) and batch profile (1, 4, 16)."""
    directory = build_double(tmp_path_factory.mktemp("tile64") / "double-64", lr=64, batch_max=16)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["batch"] = {"min": 1, "opt": 4, "max": 16}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def recording_upscaler(model: Path, monkeypatch: pytest.MonkeyPatch, **kwargs: object) -> tuple[Upscaler, list]:
    """An Upscaler whose backend is a RecordingBackend (the backend factory is swapped for the fake)."""
    made: list[RecordingBackend] = []

    def fake_backend(
        spec: ModelSpec,
        backend: str,
        precision: str,
        bank: NoiseBank,
        buckets: tuple[int, ...],
        cpu_threads: int | None = None,
    ) -> RecordingBackend:
        made.append(RecordingBackend(bank, buckets))
        return made[-1]

    monkeypatch.setattr(upscaler_module, "create_backend", fake_backend)
    return Upscaler(model, **kwargs), made


def test_buckets_follow_the_profile_under_the_batch_size(shipped_shape_model: Path) -> None:
    spec = load_model_spec(shipped_shape_model)
    assert batch_buckets(spec, 16) == (1, 4, 16)
    assert batch_buckets(spec, 8) == (1, 4, 8)
    assert batch_buckets(spec, 4) == (1, 4)
    assert batch_buckets(spec, 1) == (1,)
    assert [bucket_for(n, (1, 4, 16)) for n in (1, 2, 4, 5, 16)] == [1, 4, 4, 16, 16]
    with pytest.raises(ValueError, match="exceeds the largest bucket 16"):
        bucket_for(17, (1, 4, 16))


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_960x540_frame_reaches_the_backend_only_in_bucket_shapes(
    shipped_shape_model: Path, monkeypatch: pytest.MonkeyPatch, temperature: float
) -> None:
    frame = np.asarray(Image.fromarray(photo_lr(256)).resize((960, 540)))
    up, made = recording_upscaler(shipped_shape_model, monkeypatch, temperature=temperature, seed=4)
    stats = RunStats()
    with up:
        out = up.run(frame, stats=stats)
    backend = made[0]
    shapes = {shape for shape, _ in backend.calls}
    assert {shape[0] for shape in shapes} <= {1, 4, 16}
    assert all(shape[1:] == (3, 64, 64) for shape in shapes)
    assert stats.tiles == 180 and stats.batches == len(backend.calls)
    assert sum(shape[0] for shape, _ in backend.calls) - stats.tiles < 16 * 2  # padding: the remainders only
    # padded noise stays in the bank
    assert all(start + shape[0] <= backend.bank_rows for shape, start in backend.calls)
    # The fake upscales by repetition; padding rows must not leak into the picture.
    expected = frame.repeat(4, axis=0).repeat(4, axis=1)
    assert out.shape == (2160, 3840, 3)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1


def test_the_cpu_backend_takes_a_remainder_unpadded(double_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    run = OrtCpuBackend.run

    def recording_run(
        self: OrtCpuBackend, lr: np.ndarray, noise_start: int, release_memory: bool = False
    ) -> np.ndarray:
        sizes.append(lr.shape[0])
        return run(self, lr, noise_start, release_memory)

    monkeypatch.setattr(OrtCpuBackend, "run", recording_run)
    with Upscaler(double_model, backend="cpu", batch_size=6) as up:
        up.run(photo_lr(56))
    assert sizes == [6, 3]  # 9 tiles; a GPU backend would get the 3 padded to its bucket 4


def test_the_last_batch_of_a_large_image_releases_the_arena(
    double_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    releases: list[bool] = []
    run = OrtCpuBackend.run

    def recording_run(
        self: OrtCpuBackend, lr: np.ndarray, noise_start: int, release_memory: bool = False
    ) -> np.ndarray:
        releases.append(release_memory)
        return run(self, lr, noise_start, release_memory)

    monkeypatch.setattr(OrtCpuBackend, "run", recording_run)
    with Upscaler(double_model, backend="cpu") as up:
        up.run(np.zeros((500, 500, 3), np.uint8))  # 4 MP out: large
        assert len(releases) > 1 and releases[-1] and not any(releases[:-1])
        releases.clear()
        up.run(np.zeros((400, 400, 3), np.uint8))  # 2.6 MP out: the arena stays for the next image
        assert releases and not any(releases)


def test_bucket_bindings_match_the_plain_cpu_session(double_model: Path) -> None:
    """The CUDA backend's binding scheme (bucket buffers, noise bound by pointer into the bank) run on the CPU."""
    spec = load_model_spec(double_model)
    bank = NoiseBank.create(spec.noise_dim, temperature=0.8, seed=5, max_batch=8)
    reference = OrtCpuBackend(spec, "fp32", bank, (1, 4, 8))
    session = ort.InferenceSession(str(spec.onnx_path("fp32")), providers=["CPUExecutionProvider"])
    bound = BucketBindings(session, spec, bank, (1, 4, 8), "cpu", cuda_graphs=False)
    lr = np.random.default_rng(0).random((8, 3, 32, 32), dtype=np.float32)
    first = bound.run(lr[:4], 5)
    kept = first.copy()
    for size, start in ((4, 5), (1, 0), (8, bank.rows - 1), (4, 0), (4, 5)):
        np.testing.assert_allclose(bound.run(lr[:size], start), reference.run(lr[:size], start), atol=1e-6)
    assert np.array_equal(first, kept)  # results are fresh arrays, not views of the bound output buffer
    with pytest.raises(ValueError, match="not one of the prepared sizes"):
        bound.run(lr[:3], 0)


def test_cuda_graphs_only_where_onnxruntime_keeps_one_per_graph_id() -> None:
    assert version_tuple("1.31.1") == (1, 31, 1) and version_tuple("1.19.0.dev20240501") == (1, 19, 0)
    assert version_tuple("1.17.3") < MULTI_GRAPH_SINCE <= version_tuple("1.18.0")


@pytest.mark.gpu
def test_onnxruntime_cuda_replays_each_bucket_and_noise_start_like_the_cpu(double_model: Path) -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here (onnxruntime-gpu not installed)")
    spec = load_model_spec(double_model)
    bank = NoiseBank.create(spec.noise_dim, temperature=0.8, seed=5, max_batch=8)
    gpu = OrtCudaBackend(spec, "fp32", bank, (1, 4, 8))
    cpu = OrtCpuBackend(spec, "fp32", bank, (1, 4, 8))
    assert gpu.cuda_graphs, "the test double has no CPU-only node: ONNX Runtime should capture it"
    lr = np.random.default_rng(1).random((8, 3, 32, 32), dtype=np.float32)
    for size, start in ((8, 0), (4, 3), (1, 0), (4, 3), (8, bank.rows - 1), (8, 0)):  # repeats replay graphs
        np.testing.assert_allclose(gpu.run(lr[:size], start), cpu.run(lr[:size], start), atol=1e-4)


def test_run_many_packs_small_images_into_bucket_batches(
    shipped_shape_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Five small images of a few tiles each: alone they make five small calls, packed one call of 16.
    images = [
        np.asarray(Image.fromarray(photo_lr(128)).resize(size))
        for size in ((40, 40), (60, 40), (40, 60), (56, 56), (20, 30))
    ]
    counts = [plan_tiles(img.shape[0], img.shape[1], (64, 64), 8).count for img in images]
    assert 1 < sum(counts) <= 16 and max(counts) < sum(counts)
    up, made = recording_upscaler(shipped_shape_model, monkeypatch, temperature=0.0)
    stats = RunStats()
    with up:
        outs = up.run_many(images, stats=stats)
    backend = made[0]
    assert [shape[0] for shape, _ in backend.calls] == [bucket_for(sum(counts), (1, 4, 16))]
    assert stats.tiles == sum(counts) and stats.batches == 1
    for img, out in zip(images, outs, strict=True):  # the fake repeats pixels: each image gets its own tiles back
        expected = img.repeat(4, axis=0).repeat(4, axis=1)
        assert out.shape == expected.shape
        assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1


def test_the_cpu_backend_defaults_to_the_measured_batch_and_other_backends_to_the_model_max(
    shipped_shape_model: Path, double_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sr_runtime.upscaler import CPU_DEFAULT_BATCH

    with Upscaler(shipped_shape_model, backend="cpu") as up:  # batch max 16
        assert (up.backend, up.batch_size) == ("onnxruntime-cpu", CPU_DEFAULT_BATCH)
    with Upscaler(shipped_shape_model, backend="cpu", batch_size=16) as up:  # asked for: kept
        assert up.batch_size == 16
    with Upscaler(double_model, backend="cpu") as up:  # batch max 8: the default is what runs
        stats = RunStats()
        up.run(photo_lr(56), stats=stats)  # 9 tiles
        assert (up.batch_size, stats.batches) == (min(8, CPU_DEFAULT_BATCH), -(-9 // min(8, CPU_DEFAULT_BATCH)))
    up, _ = recording_upscaler(shipped_shape_model, monkeypatch)  # any other backend: the model's batch max
    with up:
        assert up.batch_size == 16
