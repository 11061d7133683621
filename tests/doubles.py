"""Test doubles for sr_runtime: small ONNX graphs that follow the export contract.

These are NOT the VDVAE-SR model. They stand in for it where the test is about
the runtime (tiling, noise, I/O, CLI), so the runtime can be tested without
torch and before a real model is exported. The double is

    hr = clip(0.8 * bilinear_x4(lr) + 0.2 * mean(lr over the tile) + 0.1 * noise, 0, 1)

The tile-mean term gives every tile a little tile-global context, like the
1x1 top of the real VDVAE, so blending mistakes show up as seams; the noise
term (noise reshaped to [N, 3, 4h, 4w]) makes texture depend on the noise rows.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from sr_runtime.tiling import TilePlan


def build_double(directory: Path, lr: int = 32, batch_max: int = 8, fp16: bool = False) -> Path:
    """Write manifest.json + model.fp32.onnx (+ model.fp16.onnx) of the test double into `directory`."""
    import onnx
    from onnx import TensorProto, helper

    hr = lr * 4
    noise_dim = 3 * hr * hr

    def graph(dtype: int) -> onnx.ModelProto:
        cast_in = dtype != TensorProto.FLOAT
        nodes = []
        lr_name, noise_name = "lr", "noise"
        if cast_in:
            nodes += [
                helper.make_node("Cast", ["lr"], ["lr_c"], to=dtype),
                helper.make_node("Cast", ["noise"], ["noise_c"], to=dtype),
            ]
            lr_name, noise_name = "lr_c", "noise_c"
        nodes += [
            helper.make_node(
                "Resize", [lr_name, "", "scales"], ["up"], mode="linear", coordinate_transformation_mode="half_pixel"
            ),
            helper.make_node("ReduceMean", [lr_name, "axes"], ["tile_mean"], keepdims=1),
            helper.make_node("Mul", ["up", "w_up"], ["a"]),
            helper.make_node("Mul", ["tile_mean", "w_mean"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["ab"]),
            helper.make_node("Reshape", [noise_name, "noise_shape"], ["noise_img"]),
            helper.make_node("Mul", ["noise_img", "w_noise"], ["c"]),
            helper.make_node("Add", ["ab", "c"], ["sum"]),
            helper.make_node("Clip", ["sum", "zero", "one"], ["hr_c" if cast_in else "hr"]),
        ]
        if cast_in:
            nodes.append(helper.make_node("Cast", ["hr_c"], ["hr"], to=TensorProto.FLOAT))
        np_dtype = np.float16 if cast_in else np.float32
        inits = [
            onnx.numpy_helper.from_array(np.array([1, 1, 4, 4], np.float32), "scales"),
            onnx.numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
            onnx.numpy_helper.from_array(np.array(0.8, np_dtype), "w_up"),
            onnx.numpy_helper.from_array(np.array(0.2, np_dtype), "w_mean"),
            onnx.numpy_helper.from_array(np.array(0.1, np_dtype), "w_noise"),
            onnx.numpy_helper.from_array(np.array([-1, 3, hr, hr], np.int64), "noise_shape"),
            onnx.numpy_helper.from_array(np.array(0.0, np_dtype), "zero"),
            onnx.numpy_helper.from_array(np.array(1.0, np_dtype), "one"),
        ]
        g = helper.make_graph(
            nodes,
            "sr_test_double",
            [
                helper.make_tensor_value_info("lr", TensorProto.FLOAT, ["N", 3, lr, lr]),
                helper.make_tensor_value_info("noise", TensorProto.FLOAT, ["N", noise_dim]),
            ],
            [helper.make_tensor_value_info("hr", TensorProto.FLOAT, ["N", 3, hr, hr])],
            inits,
        )
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model

    directory.mkdir(parents=True, exist_ok=True)
    entries = {}
    for precision, dtype in [("fp32", TensorProto.FLOAT)] + ([("fp16", TensorProto.FLOAT16)] if fp16 else []):
        path = directory / f"model.{precision}.onnx"
        onnx.save(graph(dtype), path)
        entries[precision] = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    manifest = {
        "format": "vdvae-sr-onnx/1",
        "name": "test-double",
        "scale": 4,
        "lr_size": [lr, lr],
        "hr_size": [hr, hr],
        "noise_dim": noise_dim,
        "batch": {"min": 1, "opt": batch_max // 2, "max": batch_max},
        "inputs": {"lr": ["N", 3, lr, lr], "noise": ["N", noise_dim]},
        "outputs": {"hr": ["N", 3, hr, hr]},
        "onnx": entries,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return directory


def photo_lr(size: int = 96, name: str = "astronaut") -> np.ndarray:
    """A real photo from scikit-image downscaled to `size`, uint8 HxWx3.

    "astronaut" (NASA, public domain) is a portrait with large structures;
    "gravel" (CC0Textures, CC0; grey) is a stationary texture, so every column
    looks alike and the seam ratio measures the tiling, not where edges fall.
    """
    from PIL import Image
    from skimage import data

    img = Image.fromarray(getattr(data, name)()).convert("RGB")
    return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS))


def seam_ratio(hr: np.ndarray, plan: TilePlan, scale: int = 4) -> float:
    """Mean |gradient| across tile borders divided by the mean |gradient| everywhere else.

    Tile borders are where a tile starts or ends in output pixels (where a
    hard-edged tiling would put a step), over both axes. Tile borders fall on
    LR pixel borders, so "everywhere else" is the other positions of the same
    phase modulo the scale: an x4 upscale's gradient varies with that phase
    even without any tiling, which would bias the ratio.
    """
    lum = hr.astype(np.float64).mean(axis=2)
    ratios = []
    for axis, starts, pad, size in (
        (1, plan.xs, plan.pad_before[1], plan.tile[1]),
        (0, plan.ys, plan.pad_before[0], plan.tile[0]),
    ):
        grad = np.abs(np.diff(lum, axis=axis)).mean(axis=1 - axis)  # grad[i] = |I[i+1] - I[i]|
        edges = {(s - pad) * scale for s in starts} | {(s + size - pad) * scale for s in starts}
        seam = sorted(e - 1 for e in edges if 1 <= e < lum.shape[axis])
        same_phase = np.arange(seam[0] % scale, len(grad), scale)
        interior = np.setdiff1d(same_phase, seam)
        assert all(e % scale == seam[0] % scale for e in seam)
        ratios.append(grad[seam].mean() / grad[interior].mean())
    return float(max(ratios))
