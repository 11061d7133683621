"""sr_export end to end on a tiny model: the CLI writes a model directory, then each check is asserted.

One export (the slow part, ~1-2 min on 2 cores) is made per session by the
`exported` fixture of conftest.py; the tiny config's zero-initialised weights
are perturbed so the prior, the LR gates and the latent projection all
influence the output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from exporting import run_cli, tiny_model

from sr_export import cli
from sr_export.calibration import extreme_lr_batch, photo_lr_batch
from sr_export.fp16 import (
    FLOAT16,
    ISLAND_METADATA_KEY,
    convert_to_fp16,
    cpu_session_from_proto,
    fp16_rounding_model,
    fp32_island,
    psnr,
    verify_fp16,
)
from sr_export.onnx_export import RANDOM_OPS, assert_no_random_ops, export_fp32
from sr_export.parity import cpu_session, parity_suite
from sr_runtime.backends.engine_identity import engine_unavailable_reason
from sr_runtime.files import sha256_file

MANIFEST_KEYS = {
    "format",
    "name",
    "scale",
    "lr_size",
    "hr_size",
    "noise_dim",
    "batch",
    "inputs",
    "outputs",
    "onnx",
    "model_config",
    "checkpoint",
    "checks",
}
NO_ENGINE = engine_unavailable_reason()


def test_cli_writes_both_graphs_and_says_why_no_engine(exported: dict) -> None:
    out, stdout = exported["out"], exported["stdout"]
    assert (out / "model.fp32.onnx").is_file() and (out / "model.fp16.onnx").is_file()
    assert "parity" in stdout and "PSNR" in stdout
    engine_lines = [ln for ln in stdout.splitlines() if ln.startswith("engine:")]
    if NO_ENGINE is None:
        pytest.skip("TensorRT and a GPU are present: an engine was built instead")
    assert engine_lines == [f"engine: not built: {NO_ENGINE}"]
    assert "TensorRT" in NO_ENGINE or "cuda" in NO_ENGINE.lower()


def test_graphs_pass_checker_and_have_the_contracted_io(exported: dict) -> None:
    model = exported["model"]
    for name in ("model.fp32.onnx", "model.fp16.onnx"):
        proto = onnx.load(str(exported["out"] / name))
        onnx.checker.check_model(proto, full_check=True)
        assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
        assert not {n.op_type for n in proto.graph.node} & RANDOM_OPS
        io_types = {v.name: v.type.tensor_type for v in (*proto.graph.input, *proto.graph.output)}
        assert set(io_types) == {"lr", "noise", "hr"}
        assert all(t.elem_type == onnx.TensorProto.FLOAT for t in io_types.values()), name
        dims = {k: [d.dim_param or d.dim_value for d in t.shape.dim] for k, t in io_types.items()}
        assert dims["lr"][1:] == [3, 64, 64] and dims["hr"][1:] == [3, 256, 256]
        assert dims["noise"][1:] == [model.noise_dim]
        assert isinstance(dims["lr"][0], str) and dims["lr"][0] == dims["noise"][0] == dims["hr"][0]


def test_dynamic_batch_runs_at_1_and_3(exported: dict) -> None:
    session = cpu_session(exported["out"] / "model.fp32.onnx")
    dim = exported["model"].noise_dim
    for n in (1, 3):
        hr = session.run(
            ["hr"], {"lr": np.full((n, 3, 64, 64), 0.5, np.float32), "noise": np.zeros((n, dim), np.float32)}
        )[0]
        assert hr.shape == (n, 3, 256, 256)
        assert hr.min() >= 0.0 and hr.max() <= 1.0


def test_parity_with_pytorch_within_1e4(exported: dict) -> None:
    lr = photo_lr_batch(64, per_photo=1)
    cases = parity_suite(exported["model"], exported["out"] / "model.fp32.onnx", lr, (0.0, 0.8), (1, 3), seed=5)
    assert [(c.temperature, c.batch) for c in cases] == [(0.0, 1), (0.0, 3), (0.8, 1), (0.8, 3)]
    for c in cases:
        assert c.max_abs_err <= 1e-4, c  # every pixel, near-ties included
    # The noise is live: t=0.8 changes the image, so parity at 0.8 tests the noise layout.
    session = cpu_session(exported["out"] / "model.fp32.onnx")
    feed0 = {"lr": lr[:1], "noise": np.zeros((1, exported["model"].noise_dim), np.float32)}
    feed1 = {"lr": lr[:1], "noise": exported["model"].make_noise(1, 0.8, 1).numpy()}
    assert np.abs(session.run(["hr"], feed0)[0] - session.run(["hr"], feed1)[0]).max() > 1e-3


def test_manifest_schema_and_checksums(exported: dict) -> None:
    m, out, model = exported["manifest"], exported["out"], exported["model"]
    assert set(m) >= MANIFEST_KEYS
    assert m["format"] == "vdvae-sr-onnx/1" and m["name"] == "vdvae-sr-tiny" and m["scale"] == 4
    assert m["lr_size"] == [64, 64] and m["hr_size"] == [256, 256]
    assert m["noise_dim"] == model.noise_dim
    assert m["batch"] == {"min": 1, "opt": 2, "max": 4}
    assert m["inputs"] == {"lr": ["N", 3, 64, 64], "noise": ["N", model.noise_dim]}
    assert m["outputs"] == {"hr": ["N", 3, 256, 256]}
    for precision in ("fp32", "fp16"):
        entry = m["onnx"][precision]
        assert entry["file"] == f"model.{precision}.onnx"
        assert entry["sha256"] == sha256_file(out / entry["file"])
    assert m["model_config"] == model.config.to_dict()
    ckpt_meta = json.loads((exported["ckpt"] / "config.json").read_text())
    assert m["checkpoint"]["step"] == 123 and m["checkpoint"]["weights_sha256"] == ckpt_meta["weights_sha256"]
    assert m["checkpoint"]["random_weights"] is False
    checks = m["checks"]
    assert checks["parity_max_abs_err"]["max"] <= 1e-4
    assert checks["fp16_psnr_db"] >= 40.0
    assert checks["exported_with"]["opset"] >= 18 and checks["exported_with"]["torch"] == torch.__version__
    assert sum(b[0] * b[1] * b[2] for b in m["noise_layout"]["blocks"]) == model.noise_dim


def test_runtime_reads_the_manifest(exported: dict) -> None:
    """The contract with sr_runtime, checked with its own parser."""
    from sr_runtime.model import load_model_spec

    spec = load_model_spec(exported["out"])
    assert spec.noise_dim == exported["model"].noise_dim and spec.lr_size == (64, 64)
    assert (spec.batch_min, spec.batch_opt, spec.batch_max) == (1, 2, 4)
    assert spec.verify("fp16").name == "model.fp16.onnx"


def test_fp16_graph_is_really_fp16(exported: dict) -> None:
    proto = onnx.load(str(exported["out"] / "model.fp16.onnx"))
    weights = [i for i in proto.graph.initializer if i.dims and np.prod(i.dims) > 16]
    assert sum(i.data_type == FLOAT16 for i in weights) > 0.9 * len(weights)
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    fp16_weights = {i.name for i in weights if i.data_type == FLOAT16}
    assert sum(n.input[1] in fp16_weights for n in convs) > 0.9 * len(convs)


def test_fp16_finite_on_extreme_inputs(exported: dict) -> None:
    s16 = cpu_session(exported["out"] / "model.fp16.onnx")
    dim = exported["model"].noise_dim
    rng = np.random.default_rng(3)
    for label, lr in extreme_lr_batch(64, seed=9).items():
        for t in (0.0, 1.0):
            hr = s16.run(["hr"], {"lr": lr, "noise": (rng.standard_normal((1, dim)) * t).astype(np.float32)})[0]
            assert np.isfinite(hr).all(), (label, t)
            assert hr.min() >= 0.0 and hr.max() <= 1.0


def test_fp16_psnr_vs_fp32_on_a_real_photo(exported: dict) -> None:
    """The FP16 file in ORT: >= 40 dB over all pixels. The FP16 rounding simulation (what ORT CPU's FP32
    fallback hides): >= 40 dB where the same mixture component is chosen, and few component flips."""
    fp32 = onnx.load(str(exported["out"] / "model.fp32.onnx"))
    fp16 = onnx.load(str(exported["out"] / "model.fp16.onnx"))
    island = json.loads(next(p.value for p in fp16.metadata_props if p.key == ISLAND_METADATA_KEY))
    lr = photo_lr_batch(64, per_photo=1)[:1]  # astronaut
    cases = {f"t{t}": {"lr": lr, "noise": exported["model"].make_noise(1, t, 11).numpy()} for t in (0.0, 0.8)}
    in_ort = verify_fp16(fp32, fp16, cases)
    assert in_ort.ok(40.0), in_ort
    simulated = verify_fp16(fp32, fp16_rounding_model(fp32, island), cases)
    assert simulated.ok(40.0, exclude_flips=True) and simulated.flip_fraction < 0.01, simulated


def test_fp32_island_keeps_large_tensors_in_fp32(exported: dict) -> None:
    """A tensor measured beyond the limit puts its producer and consumers in FP32, with Casts around them."""
    fp32 = onnx.load(str(exported["out"] / "model.fp32.onnx"))
    conv = next(n for n in fp32.graph.node if n.op_type == "Conv")
    ranges = {conv.output[0]: 1e6}
    island = fp32_island(fp32, ranges, limit=4096.0)
    consumers = {n.name for n in fp32.graph.node if conv.output[0] in n.input}
    assert set(island) == {conv.name} | consumers
    mixed = convert_to_fp16(fp32, island)
    types = {i.name: i.data_type for i in mixed.graph.initializer}
    assert types[conv.input[1]] == onnx.TensorProto.FLOAT  # its weight stays FP32
    kept = next(n for n in mixed.graph.node if n.name == conv.name)
    assert kept.input[0].endswith("__fp32")  # fed by a Cast from the FP16 region
    dim = exported["model"].noise_dim
    feed = {"lr": photo_lr_batch(64, per_photo=1)[:1], "noise": np.zeros((1, dim), np.float32)}
    out = cpu_session_from_proto(mixed).run(["hr"], feed)[0]
    ref = cpu_session_from_proto(fp32).run(["hr"], feed)[0]
    assert psnr(out, ref) >= 40.0


def test_engine_on_fails_without_tensorrt(tmp_path: Path) -> None:
    if NO_ENGINE is None:
        pytest.skip("TensorRT and a GPU are present")
    rc, _, stderr = run_cli(["--preset", "small-256", "--random-weights", "--out", str(tmp_path), "--engine", "on"])
    assert rc != 0 and NO_ENGINE in stderr
    assert not any(tmp_path.iterdir()), "it should refuse before exporting anything"


def test_default_model_needs_a_checkpoint_or_random_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "ENGINES_DIR", tmp_path)
    rc, _, stderr = run_cli(["--res", "256", "--engine", "off"])
    assert rc != 0 and "no trained checkpoint" in stderr and "--random-weights" in stderr
    rc, _, stderr = run_cli(["--preset", "paper-256", "--out", str(tmp_path / "x")])
    assert rc != 0 and "--random-weights" in stderr
    rc, _, stderr = run_cli(["--checkpoint", str(tmp_path), "--engine", "off"])
    assert rc != 0 and "--out is required" in stderr
    rc, _, stderr = run_cli(["--batch", "4,2,8"])
    assert rc != 0 and "MIN,OPT,MAX" in stderr


def test_export_refuses_opset_17_and_batch_1_examples(tmp_path: Path) -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="opset 17"):
        export_fp32(model, tmp_path / "m.onnx", opset=17)
    with pytest.raises(ValueError, match="example_batch"):
        export_fp32(model, tmp_path / "m.onnx", example_batch=1)


def test_random_ops_are_rejected() -> None:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("RandomNormalLike", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    with pytest.raises(RuntimeError, match="RandomNormalLike"):
        assert_no_random_ops(onnx.helper.make_model(graph))


def test_polygraphy_data_loader_feeds_real_photos(exported: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from sr_export.polygraphy_data import load_data

    monkeypatch.setenv("SR_MODEL_DIR", str(exported["out"]))
    feeds = list(load_data())
    assert len(feeds) == 2 and not feeds[0]["noise"].any() and feeds[1]["noise"].std() > 0.5
    for feed in feeds:
        assert feed["lr"].shape == (3, 3, 64, 64) and feed["noise"].shape == (3, exported["model"].noise_dim)
        assert feed["lr"].dtype == feed["noise"].dtype == np.float32


def _overflowing_graph() -> onnx.ModelProto:
    """hr = ((lr * 3e4) * 4) / 1.2e5 + 0 * mean(noise): fine in FP32, inf in FP16 (1.2e5 > 65504)."""
    from onnx import TensorProto, helper, numpy_helper

    consts = {"a": 3e4, "b": 4.0, "c": 1.0 / 1.2e5, "z": 0.0}
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["lr", "a"], ["t1"], name="scale_up"),
            helper.make_node("Mul", ["t1", "b"], ["t2"], name="overflow"),
            helper.make_node("Mul", ["t2", "c"], ["t3"], name="scale_down"),
            helper.make_node("ReduceMean", ["noise"], ["m"], name="mean", axes=[1], keepdims=1),
            helper.make_node("Mul", ["m", "z"], ["m0"], name="zero"),
            helper.make_node("Unsqueeze", ["m0", "ax"], ["m4"], name="unsq"),
            helper.make_node("Add", ["t3", "m4"], ["hr"], name="out"),
        ],
        "overflow",
        [
            helper.make_tensor_value_info("lr", TensorProto.FLOAT, ["N", 3, 4, 4]),
            helper.make_tensor_value_info("noise", TensorProto.FLOAT, ["N", 2]),
        ],
        [helper.make_tensor_value_info("hr", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in consts.items()]
        + [numpy_helper.from_array(np.array([2, 3], np.int64), "ax")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fp16_islands_come_from_measured_ranges() -> None:
    """Values that overflow FP16 are found by measurement and kept in FP32; without that the output is inf."""
    from sr_export.fp16 import choose_fp16, measure_ranges

    proto = _overflowing_graph()
    rng = np.random.default_rng(0)
    feeds = [
        {"lr": rng.random((1, 3, 4, 4), dtype=np.float32), "noise": rng.standard_normal((1, 2)).astype(np.float32)}
        for _ in range(3)
    ]
    ranges = measure_ranges(proto, feeds)
    assert 1e4 < ranges["t1"] <= 3e4 and ranges["t2"] > 65504 and ranges["t3"] <= 1.0
    naive = cpu_session_from_proto(fp16_rounding_model(proto, set())).run(["hr"], feeds[0])[0]
    assert not np.isfinite(naive).all()  # all-FP16 overflows (ORT CPU's FP32 fallback alone would hide it)
    result = choose_fp16(
        proto, feeds, {"held_out": {"lr": np.ones((2, 3, 4, 4), np.float32), "noise": np.zeros((2, 2), np.float32)}}
    )
    assert set(result.island) == {"scale_up", "overflow", "scale_down"}
    assert result.simulated.all_finite and result.ort.all_finite
    assert result.simulated.min_psnr_db >= 40.0 and result.ort.min_psnr_db >= 40.0
    assert result.limit == 4096.0 and result.tried[0]["fp32_nodes"] == 3


def test_unknown_preset_and_file_out_are_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sr_export import pipeline

    monkeypatch.setattr(pipeline, "export_model_dir", lambda *a, **k: pytest.fail("exported before checking"))
    rc, _, err = run_cli(["--preset", "nope", "--random-weights", "--out", str(tmp_path / "x")])
    assert rc == 2 and "unknown preset 'nope'" in err
    (tmp_path / "file").write_text("")
    rc, _, err = run_cli(["--preset", "small-256", "--random-weights", "--out", str(tmp_path / "file")])
    assert rc == 2 and "is a file" in err and "Traceback" not in err


def test_sigterm_during_an_export_removes_its_temporary_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import signal
    import tempfile

    from sr_export import pipeline

    made: list[Path] = []

    def terminated_mid_export(*args: object, **kwargs: object) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            made.append(Path(tmp))
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(pipeline, "export_model_dir", terminated_mid_export)
    rc, _, _ = run_cli(["--preset", "small-256", "--random-weights", "--out", str(tmp_path / "x")])
    assert rc == 143 and made and not made[0].exists()
