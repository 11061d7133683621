"""Export of a fully convolutional model: graphs of any frame size, checked against PyTorch at sizes
the export did not try, the manifest the runtime reads, and the TensorRT frame profile."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from sr_export.calibration import photo_lr_batch
from sr_export.cli import parse_frame
from sr_export.fp16 import choose_fp16, cpu_session_from_proto, psnr
from sr_export.frame_pipeline import frame_calibration, frame_check_cases
from sr_export.parity import compare_frame, cpu_session
from sr_runtime.backends.engine_build import frame_profile
from sr_runtime.backends.engine_identity import EngineIdentity, GpuInfo, check_frame_shapes
from sr_runtime.files import sha256_file
from sr_runtime.model import load_model_spec


def test_frame_manifest_states_kind_stride_radius_levels_and_graphs(exported_fc: dict[str, Any]) -> None:
    m, out = exported_fc["manifest"], exported_fc["out"]
    assert m["format"] == "vdvae-sr-onnx/2" and m["kind"] == "fully_convolutional"
    assert m["lr_multiple"] == 4 and m["receptive_radius"] == 143
    assert [(lv["name"], lv["channels"], lv["scale"]) for lv in m["noise_levels"]] == [
        ("noise_16", 8, 0.25),
        ("noise_32", 12, 0.5),
        ("noise_64", 24, 1.0),
        ("noise_128", 8, 2.0),
        ("noise_256", 4, 4.0),
    ]
    assert m["graphs"] == {"sampling": {"fp32": "model.fp32.onnx"}, "deterministic": {"fp32": "model.t0.fp32.onnx"}}
    assert set(m["io_graphs"]) == {"pre", "post"}
    for entries in (m["onnx"], m["onnx_deterministic"], m["io_graphs"]):
        for entry in entries.values():
            assert sha256_file(out / entry["file"]) == entry["sha256"]
    assert m["memory"]["bytes_per_lr_pixel"] > 1000  # a real measurement, not the 1-byte floor
    assert m["checks"]["parity_max_abs_err"]["max_non_tie"] < 1e-4
    assert {tuple(c["shape"]) for c in m["checks"]["parity_cases"]} == {(16, 16), (20, 36), (44, 28)}
    spec = load_model_spec(out)
    assert spec.fully_convolutional and spec.noise_levels[-1].size(12, 20) == (48, 80)


def test_frame_graphs_are_symbolic_and_deterministic_has_no_noise(exported_fc: dict[str, Any]) -> None:
    out = exported_fc["out"]
    t0 = onnx.load(str(out / "model.t0.fp32.onnx"))
    sampling = onnx.load(str(out / "model.fp32.onnx"))
    assert [i.name for i in t0.graph.input] == ["lr"]
    assert [i.name for i in sampling.graph.input] == [
        "lr",
        "noise_16",
        "noise_32",
        "noise_64",
        "noise_128",
        "noise_256",
    ]
    for proto in (t0, sampling):
        for vi in proto.graph.input:
            dims = vi.type.tensor_type.shape.dim
            assert all(dims[i].dim_param for i in (0, 2, 3)), vi


@pytest.mark.parametrize(("h", "w", "n"), [(12, 20, 3), (28, 8, 1), (52, 36, 2)])
def test_frame_graphs_match_torch_at_sizes_the_export_did_not_check(
    exported_fc: dict[str, Any], h: int, w: int, n: int
) -> None:
    model, out = exported_fc["model"], exported_fc["out"]
    lr = np.ascontiguousarray(photo_lr_batch(max(h, w), per_photo=1)[:n, :, :h, :w])
    cases = [
        compare_frame(model, cpu_session(out / "model.t0.fp32.onnx"), lr, 0.0),
        compare_frame(model, cpu_session(out / "model.fp32.onnx"), lr, 0.9, seed=5),
    ]
    for case in cases:
        assert case.max_abs_err_non_tie < 1e-4, case
        assert case.shape == (h, w)


def test_fp16_frame_graph_stays_close_at_sizes_it_was_not_calibrated_on(exported_fc: dict[str, Any]) -> None:
    model, out = exported_fc["model"], exported_fc["out"]
    fp32 = onnx.load(str(out / "model.t0.fp32.onnx"))
    result = choose_fp16(
        fp32, frame_calibration(model, 0, sampling=False)[:4], frame_check_cases(model, 0, sampling=False)
    )
    lr = np.ascontiguousarray(photo_lr_batch(40, per_photo=1)[:2, :, :24, :40])
    ref = cpu_session(out / "model.t0.fp32.onnx").run(["hr"], {"lr": lr})[0]
    half = cpu_session_from_proto(result.model).run(["hr"], {"lr": lr})[0]
    assert np.isfinite(half).all()
    assert min(psnr(h, r) for h, r in zip(half, ref, strict=True)) > 40.0
    assert all(vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for vi in result.model.graph.input)


def test_sampling_graph_with_zero_noise_equals_the_deterministic_graph(exported_fc: dict[str, Any]) -> None:
    out, spec = exported_fc["out"], load_model_spec(exported_fc["out"])
    lr = np.random.default_rng(0).random((1, 3, 16, 24), dtype=np.float32)
    zeros = {lv.name: np.zeros((1, lv.channels, *lv.size(16, 24)), np.float32) for lv in spec.noise_levels}
    a = ort.InferenceSession(str(out / "model.fp32.onnx")).run(["hr"], {"lr": lr, **zeros})[0]
    b = ort.InferenceSession(str(out / "model.t0.fp32.onnx")).run(["hr"], {"lr": lr})[0]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_frame_profile_from_res_and_a_fixed_video_frame() -> None:
    assert frame_profile(256, 4) == ((4, 4), (64, 64), (540, 960))
    assert frame_profile(256, 4, (958, 539)) == ((540, 960),) * 3  # WxH rounded up to the stride
    with pytest.raises(ValueError, match="multiples"):
        check_frame_shapes(((4, 4), (6, 8), (8, 8)), 4)
    assert parse_frame("960x540") == (960, 540)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_frame("960")


def test_engine_key_of_fixed_models_is_unchanged_by_frame_profiles() -> None:
    gpu = GpuInfo("NVIDIA H200", "9.0")
    fixed = EngineIdentity("a" * 64, "fp16", (1, 4, 16), gpu, "10.13.0")
    frame = EngineIdentity("a" * 64, "fp16", (1, 4, 16), gpu, "10.13.0", frame_profile(256, 4))
    assert "frame" not in fixed.fields()
    assert frame.fields()["frame"] == {"min": [4, 4], "opt": [64, 64], "max": [540, 960]}
    assert fixed.key() != frame.key()
