"""The GPU frame backend's Python, run where there is no GPU: `OrtBoundFrameBackend(device="cpu")` is the
CUDA backend's code (per-shape sessions with fixed dimensions, bound buffers, device-resident noise, uint8
graphs, results copied out in the background) on ONNX Runtime's CPU provider, checked against the plain
CPU backend on the shipped fc-256. The TensorRT frame backend's tests skip without TensorRT and a GPU."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from sr_runtime import SRInputError, Upscaler
from sr_runtime.backends.engine_identity import engine_unavailable_reason
from sr_runtime.backends.onnxrt import OrtBoundFrameBackend, OrtCpuFrameBackend, frame_dimension_overrides
from sr_runtime.model import load_model_spec
from sr_runtime.noise import FrameNoise
from sr_runtime.tiling import plan_frame

FC_MODEL = Path(__file__).resolve().parent.parent / "engines" / "vdvae-sr-fc-256"

pytestmark = pytest.mark.slow  # every test here loads ONNX Runtime sessions of fc-256 (seconds each on 2 cores)


def frame(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_dimension_overrides_fix_every_input_and_refuse_a_contradiction() -> None:
    spec = load_model_spec(FC_MODEL)
    inputs = {
        "lr": ["batch", 3, "4*h", "4*w"],
        "noise_16": ["batch", 8, "h", "w"],
        "noise_256": ["batch", 4, "16*h", "16*w"],
    }
    values = frame_dimension_overrides(inputs, spec, (1, 3, 20, 28))
    assert values == {"batch": 1, "4*h": 20, "4*w": 28, "h": 5, "w": 7, "16*h": 80, "16*w": 112}
    with pytest.raises(Exception, match="would need both"):
        frame_dimension_overrides({"lr": ["b", 3, "x", "x"]}, spec, (1, 3, 20, 28))


def test_whole_frame_noise_window_is_the_cached_read_only_maps() -> None:
    """What lets a device backend upload a shape's noise once: the same objects every call, immutable."""
    spec = load_model_spec(FC_MODEL)
    noise = FrameNoise(spec.noise_levels)
    first, second = noise.window((20, 28), 3, 0.5, 0, 0, 0, 20, 28), noise.window((20, 28), 3, 0.5, 0, 0, 0, 20, 28)
    assert all(first[k] is second[k] and not first[k].flags.writeable for k in first)
    tile = noise.window((20, 28), 3, 0.5, 0, 0, 4, 20, 16)
    np.testing.assert_array_equal(tile["noise_64"], first["noise_64"][:, :, :, 4:20])


@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_bound_backend_equals_the_plain_cpu_backend(temperature: float) -> None:
    spec = load_model_spec(FC_MODEL)
    deterministic = temperature == 0
    noise = FrameNoise(spec.noise_levels) if temperature else None
    plain = OrtCpuFrameBackend(spec, "fp32", deterministic, threads=1, uint8_io=True)
    bound = OrtBoundFrameBackend(spec, "fp32", deterministic, device="cpu", threads=1, max_shapes=1)
    try:
        assert bound.uint8_io and bound.graphs_captured == {}
        img = frame(18, 27)
        plan = plan_frame(18, 27, spec.lr_multiple, spec.receptive_radius, 10**6)
        maps = noise.window(plan.padded_size, 1, temperature, 0, 0, 0, *plan.padded_size) if noise is not None else {}
        expected, finite = plain.run_u8(img[None], plan.padded_size, maps)
        assert finite
        for seed in range(3):  # the same shape again and again: bound buffers reused, results stay correct
            other = frame(18, 27, seed + 1)
            got, ok = bound.run_u8(other[None], plan.padded_size, maps)
            np.testing.assert_array_equal(got, plain.run_u8(other[None], plan.padded_size, maps)[0])
            assert ok
        np.testing.assert_array_equal(bound.run_u8(img[None], plan.padded_size, maps)[0], expected)
        # Results handed out earlier are the caller's own: later frames must not overwrite them.
        futures = [bound.submit_u8(frame(18, 27, s)[None], plan.padded_size, maps) for s in range(4)]
        outs = [f.result()[0] for f in futures]
        for s, out in enumerate(outs):
            np.testing.assert_array_equal(out, plain.run_u8(frame(18, 27, s)[None], plan.padded_size, maps)[0])
        # The float path, and a window of the noise (a tile) copied into the same bound maps.
        lr = np.random.default_rng(5).random((1, 3, 20, 28), dtype=np.float32)
        np.testing.assert_allclose(bound.run(lr, maps), plain.run(lr, maps), atol=1e-6)
        if noise is not None:
            window = noise.window((20, 40), 1, temperature, 0, 0, 12, 20, 28)
            np.testing.assert_allclose(bound.run(lr, window), plain.run(lr, window), atol=1e-6)
            np.testing.assert_allclose(bound.run(lr, maps), plain.run(lr, maps), atol=1e-6)  # and back
        # A second shape evicts the first (max_shapes=1) and still runs right.
        lr2 = np.random.default_rng(6).random((1, 3, 12, 16), dtype=np.float32)
        maps2 = noise.window((12, 16), 1, temperature, 0, 0, 0, 12, 16) if noise is not None else {}
        np.testing.assert_allclose(bound.run(lr2, maps2), plain.run(lr2, maps2), atol=1e-6)
        assert list(bound.graphs_captured) == ["12x16"]
        bound.release_memory()  # nothing to hand back: the shape's buffers stay bound
        np.testing.assert_allclose(bound.run(lr2, maps2), plain.run(lr2, maps2), atol=1e-6)
    finally:
        bound.close()


def test_upscaler_stream_through_the_bound_backend_keeps_order_and_errors() -> None:
    """run_frames with the result of frame k copied out while frame k+1 runs: same pixels, same order,
    a bad frame raises after the good one before it came out."""
    with Upscaler(FC_MODEL, backend="cpu", temperature=0.4, seed=2, uint8_io=True, cpu_threads=1) as up:
        frames = [frame(14, 22, s) for s in range(4)]
        expected = [up.run(f) for f in frames]
        spec = up.spec
        bound = OrtBoundFrameBackend(spec, "fp32", False, device="cpu", threads=1)
        up._frame_backends[False] = bound
        try:
            got = list(up.run_frames(frames))
            assert len(got) == 4
            for e, g in zip(expected, got, strict=True):
                np.testing.assert_array_equal(e, g)
            bad = np.zeros((5, 5, 7), np.uint8)
            it = up.run_frames([frames[0], bad, frames[1]])
            np.testing.assert_array_equal(next(it), expected[0])
            with pytest.raises(SRInputError):
                next(it)
            # Per-call seed and temperature through the overlapped uint8 path, as `run` gives them.
            override = {"temperature": 0.25, "seed": 7}
            streamed = list(up.run_frames(frames[:2], **override))
            for f, g in zip(frames[:2], streamed, strict=True):
                np.testing.assert_array_equal(up.run(f, **override), g)
            # Two threads sharing one Upscaler: the per-instance lock serialises the device work.
            results: dict[int, np.ndarray] = {}

            def work(k: int) -> None:
                results[k] = up.run(frames[k])

            threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for k in range(4):
                np.testing.assert_array_equal(results[k], expected[k])
        finally:
            bound.close()


@pytest.mark.gpu
@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="no onnxruntime CUDAExecutionProvider here: the CUDA frame backend runs in scripts/gpu_check.sh",
)
@pytest.mark.parametrize(("precision", "nhwc"), [("fp32", False), ("fp16", False), ("fp16", True)])
def test_cuda_frame_backend_streams_like_the_cpu(precision: str, nhwc: bool) -> None:
    """Whole frames on the GPU (uint8 graphs, CUDA graph per shape, overlapped copies) against the CPU."""
    frames = [frame(36, 52, s) for s in range(3)]
    with (
        Upscaler(FC_MODEL, backend="cpu", temperature=0.6) as cpu,
        Upscaler(FC_MODEL, backend="cuda", precision=precision, temperature=0.6, prefer_nhwc=nhwc) as gpu,
    ):
        assert gpu._uint8_io
        expected = [cpu.run(f) for f in frames]
        streamed = list(gpu.run_frames(frames + frames))
        tolerance = 1 if precision == "fp32" else 8
        for k, out in enumerate(streamed):
            assert np.abs(out.astype(int) - expected[k % 3].astype(int)).max() <= tolerance
        np.testing.assert_array_equal(streamed[:3], streamed[3:])  # replayed graph, same noise: identical
        assert gpu.loaded_graphs == ("sampling",)


@pytest.mark.gpu
def test_tensorrt_frame_backend_runs_like_onnxruntime() -> None:
    why = engine_unavailable_reason()
    if why is not None:
        pytest.skip(f"TensorRT frame backend needs TensorRT and a GPU: {why}")
    img = frame(36, 52)
    with (
        Upscaler(FC_MODEL, backend="cpu") as cpu,
        Upscaler(FC_MODEL, backend="tensorrt", precision="fp32") as trt,
    ):
        a, b = cpu.run(img), trt.run(img)
        assert trt.backend == "tensorrt"
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
        np.testing.assert_array_equal(b, trt.run(img))
