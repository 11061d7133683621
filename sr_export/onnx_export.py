"""FP32 ONNX export of ``VDVAESR.sample`` (deterministic head) and the structural checks.

The graph takes ``lr`` [N,3,h,w] in [0,1] and one packed ``noise`` [N, noise_dim]
(standard normal x temperature, laid out exactly as ``model.unpack_noise``
reads it) and returns ``hr`` [N,3,4h,4w] in [0,1]. Only the batch axis is
dynamic: the decoder has fixed-size bias tensors and a 1x1 top.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from sr_runtime.files import atomic_write_bytes
from sr_train.model import VDVAESR

# Opset 17 silently produces an invalid Split for the latent chunks; 18 is the floor.
OPSET = 18
INPUT_NAMES = ("lr", "noise")
OUTPUT_NAME = "hr"


class SampleGraph(nn.Module):
    """``model.sample(lr, noise)`` as a two-input module, the shape the exporter traces."""

    def __init__(self, model: VDVAESR) -> None:
        super().__init__()
        self.model = model

    def forward(self, lr: Tensor, noise: Tensor) -> Tensor:
        return self.model.sample(lr, noise)


def export_fp32(model: VDVAESR, path: str | Path, opset: int = OPSET, example_batch: int = 2) -> onnx.ModelProto:
    """Export with the dynamo exporter; the example batch must be >= 2 or the batch axis is frozen to 1."""
    if opset < OPSET:
        raise ValueError(f"opset {opset} < {OPSET}: opset 17 emits an invalid Split for this model")
    if example_batch < 2:
        raise ValueError("example_batch must be >= 2 (a batch of 1 gets specialised into the graph)")
    cfg = model.config
    graph = SampleGraph(model).eval()
    gen = torch.Generator().manual_seed(0)
    lr = torch.rand(example_batch, 3, cfg.lr_size, cfg.lr_size, generator=gen)
    noise = torch.randn(example_batch, model.noise_dim, generator=gen)
    batch = torch.export.Dim("batch", min=1)
    return dynamo_export(graph, (lr, noise), list(INPUT_NAMES), {"lr": {0: batch}, "noise": {0: batch}}, path, opset)


def dynamo_export(
    graph: nn.Module, args: tuple[Tensor, ...], names: list[str], shapes: dict[str, Any], path: str | Path, opset: int
) -> onnx.ModelProto:
    """torch.onnx.export (dynamo) of ``graph`` to ``path``: metadata stripped, no random op, written atomically."""
    with torch.no_grad(), warnings.catch_warnings():
        # torch.export's own deprecation chatter, not about this model.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", "# The axis name", UserWarning)  # 4*h named once per input
        program = torch.onnx.export(
            graph.eval(),
            args,
            dynamo=True,
            opset_version=opset,
            input_names=names,
            output_names=[OUTPUT_NAME],
            dynamic_shapes=shapes,
            external_data=False,
            verbose=False,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    proto = program.model_proto
    strip_metadata(proto)
    assert_no_random_ops(proto)
    atomic_write_bytes(path, proto.SerializeToString())
    return proto


SCOPE_KEY = "scope"


def strip_metadata(proto: onnx.ModelProto) -> None:
    """Replace the exporter's debug metadata (two thirds of the file, with local paths) by one key.

    Each node keeps ``scope``: the PyTorch module it came from (``decoder.dec_blocks.3.resnet.c1``),
    so the FP16 pass can say which part of the model a tensor belongs to.
    """
    del proto.metadata_props[:]
    for node in proto.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        del node.metadata_props[:]
        path = [s.strip(" '\"") for s in scopes.strip("[]").split(",")]
        if len(path) >= 2 and path[-2]:
            node.metadata_props.add(key=SCOPE_KEY, value=path[-2].removeprefix("model."))
    for vi in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        del vi.metadata_props[:]


def node_scope(node: onnx.NodeProto) -> str:
    """The module path :func:`strip_metadata` recorded, or '' for glue ops outside any submodule."""
    return next((p.value for p in node.metadata_props if p.key == SCOPE_KEY), "")


RANDOM_OPS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
)


def assert_no_random_ops(proto: onnx.ModelProto) -> None:
    """No random op: the noise is an input (docs/design.md, Export contract), engines stay reproducible."""
    found = sorted({n.op_type for n in proto.graph.node if n.op_type in RANDOM_OPS})
    if found:
        raise RuntimeError(f"exported graph contains random ops {found}")


def op_histogram(proto: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type, most common first (for the summary)."""
    return dict(Counter(n.op_type for n in proto.graph.node).most_common())


@dataclass(frozen=True)
class LintResult:
    """polygraphy's verdict; ``ran`` is False (with ``detail`` saying why) where it is unavailable."""

    ran: bool
    passed: bool
    detail: str


def check_onnx(path: str | Path) -> None:
    """onnx.checker with full shape/type inference; raises onnx.checker.ValidationError."""
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def polygraphy_lint(path: str | Path, input_shapes: dict[str, tuple[int, ...]]) -> LintResult:
    """Run ``polygraphy check lint`` (it needs onnx-graphsurgeon) and read its JSON report."""
    exe = Path(sys.executable).with_name("polygraphy")
    cmd = str(exe) if exe.is_file() else shutil.which("polygraphy")
    if cmd is None:
        return LintResult(False, False, "polygraphy is not installed")
    shapes = [f"{name}:{list(shape)}".replace(" ", "") for name, shape in input_shapes.items()]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "lint.json"
        proc = subprocess.run(
            [cmd, "check", "lint", str(path), "-o", str(report), "--input-shapes", *shapes],
            capture_output=True,
            text=True,
            check=False,
        )
        if not report.is_file():
            last = (proc.stdout + proc.stderr).strip().splitlines()
            reason = next((ln for ln in reversed(last) if "required" in ln or "Error" in ln), last[-1] if last else "")
            return LintResult(False, False, f"polygraphy lint did not run: {reason.strip()}")
        data = json.loads(report.read_text())
    failing = data.get("summary", {}).get("failing", [])
    entries = data.get("lint_entries", [])
    errors = [e for e in entries if str(e.get("level", "")).lower() == "exception"]
    passed = not failing and not errors and proc.returncode == 0
    detail = f"{len(data.get('summary', {}).get('passing', []))} nodes passing, {len(failing)} failing"
    if entries:
        detail += "; " + "; ".join(str(e.get("message", e))[:120] for e in entries[:3])
    return LintResult(True, passed, detail)


# ---------------------------------------------------------------------------
# Fully convolutional models: symbolic batch, height and width
# ---------------------------------------------------------------------------

#: Example LR frame the exporter traces: non-square, neither side a power of two or 1 in any level,
#: so no dimension gets specialised into the graph.
FC_EXAMPLE_LR = (24, 40)


def noise_input_name(res: int) -> str:
    """The graph input of one latent level: ``noise_<res>`` (res as named at the training crop)."""
    return f"noise_{res}"


def fc_noise_levels(model: VDVAESR) -> list[dict[str, Any]]:
    """One entry per latent level, coarse to fine, as the manifest states them.

    ``scale`` is the map's size relative to the LR frame (0.25 = LR/4);
    ``stream`` is the level index that keys ``sr_runtime.noise.position_noise``.
    """
    cfg = model.config
    return [
        {
            "name": noise_input_name(res),
            "res": res,
            "blocks": blocks,
            "channels": cfg.zdim * blocks,
            "scale": res / cfg.lr_size,
            "stream": k,
        }
        for k, (res, blocks) in enumerate(model.noise_levels)
    ]


class FrameGraph(nn.Module):
    """``model.sample(lr, [noise_<res>, ...])``: the sampling graph with one noise map per level."""

    def __init__(self, model: VDVAESR) -> None:
        super().__init__()
        self.model = model

    def forward(self, lr: Tensor, *noise: Tensor) -> Tensor:
        return self.model.sample(lr, list(noise))


class DeterministicGraph(nn.Module):
    """``model.sample(lr, None)``: temperature 0 without noise inputs (z = prior mean, nothing to feed)."""

    def __init__(self, model: VDVAESR) -> None:
        super().__init__()
        self.model = model

    def forward(self, lr: Tensor) -> Tensor:
        return self.model.sample(lr, None)


def export_fc(
    model: VDVAESR,
    path: str | Path,
    *,
    deterministic: bool,
    opset: int = OPSET,
    example_batch: int = 2,
    example_lr: tuple[int, int] = FC_EXAMPLE_LR,
) -> onnx.ModelProto:
    """Export a fully convolutional model with symbolic batch, height and width.

    The LR height and width are declared as ``lr_multiple * h`` so every level's
    size (``h * res * lr_multiple / lr_size``) is an integer expression of the
    same symbol; the exporter then proves the graph for every multiple.
    """
    cfg = model.config
    if not cfg.fully_convolutional:
        raise ValueError(f"{cfg.name} is not fully convolutional; use export_fp32")
    if opset < OPSET:
        raise ValueError(f"opset {opset} < {OPSET}: opset 17 emits an invalid Split for this model")
    if example_batch < 2:
        raise ValueError("example_batch must be >= 2 (a batch of 1 gets specialised into the graph)")
    m = cfg.lr_multiple
    if example_lr[0] % m or example_lr[1] % m or example_lr[0] == example_lr[1]:
        raise ValueError(f"example_lr {example_lr} must be non-square multiples of {m}")
    gen = torch.Generator().manual_seed(0)
    lr = torch.rand(example_batch, 3, *example_lr, generator=gen)
    batch = torch.export.Dim("batch", min=1)
    h, w = torch.export.Dim("h", min=1), torch.export.Dim("w", min=1)
    shapes: dict[str, Any] = {"lr": {0: batch, 2: m * h, 3: m * w}}
    args: tuple[Tensor, ...] = (lr,)
    names = ["lr"]
    graph: nn.Module = DeterministicGraph(model)
    if not deterministic:
        graph = FrameGraph(model)
        levels = model.make_level_noise(example_batch, example_lr, 1.0, 0)
        # One *args entry: torch.export takes the varargs' shapes as one tuple.
        per_level = []
        for level in fc_noise_levels(model):
            f = level["res"] * m // cfg.lr_size
            per_level.append({0: batch, 2: f * h, 3: f * w})
            names.append(level["name"])
        args = (lr, *[n.contiguous() for n in levels])
        shapes["noise"] = tuple(per_level)
    return dynamo_export(graph, args, names, shapes, path, opset)


# ---------------------------------------------------------------------------
# uint8 frames in and out on the device: two tiny graphs beside a frame model
# ---------------------------------------------------------------------------

IO_OPSET = 18


def uint8_pre_graph() -> onnx.ModelProto:
    """``u8`` uint8 [N, h, w, 3] + ``pads`` int64 [8] -> ``lr`` float32 [N, 3, H, W] in [0, 1], edge-padded.

    The runtime's own conversion (x / 255, then edge padding at the bottom and
    right to the stride), as a graph so a GPU backend does it on the device
    and uploads a quarter of the bytes. ``pads`` is constant per frame shape.
    """
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Transpose", ["u8"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["nchw"], ["nchw_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["nchw_f", "inv255"], ["unit"]),  # x * float32(1/255), as the host decoder
        helper.make_node("Pad", ["unit", "pads"], ["lr"], mode="edge"),
    ]
    graph = helper.make_graph(
        nodes,
        "uint8_pre",
        [
            helper.make_tensor_value_info("u8", TensorProto.UINT8, ["N", "h", "w", 3]),
            helper.make_tensor_value_info("pads", TensorProto.INT64, [8]),
        ],
        [helper.make_tensor_value_info("lr", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor("inv255", TensorProto.FLOAT, [], [float(np.float32(1 / 255))])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", IO_OPSET)], producer_name="sr_export")


def uint8_post_graph() -> onnx.ModelProto:
    """``hr`` float32 [N, 3, H, W] + ``starts`` / ``ends`` int64 [2] (rows, cols) -> ``u8`` uint8 [N, h, w, 3].

    Crop, clip to [0, 1], x 255, round half to even (numpy's rint, which the
    host path uses), cast: the runtime's encoding of an RGB uint8 image. Also
    ``nonfinite`` (uint8 scalar, 1 if any cropped value is NaN/Inf), because a
    cast to uint8 would hide what the host path refuses.
    """
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Slice", ["hr", "starts", "ends", "axes"], ["crop"]),
        helper.make_node("Clip", ["crop", "k0", "k1"], ["unit"]),
        helper.make_node("Mul", ["unit", "k255"], ["scaled"]),
        helper.make_node("Round", ["scaled"], ["rounded"]),
        helper.make_node("Cast", ["rounded"], ["nchw_u8"], to=TensorProto.UINT8),
        helper.make_node("Transpose", ["nchw_u8"], ["u8"], perm=[0, 2, 3, 1]),
        helper.make_node("IsNaN", ["crop"], ["nan"]),
        helper.make_node("IsInf", ["crop"], ["inf"]),
        helper.make_node("Or", ["nan", "inf"], ["bad"]),
        helper.make_node("Cast", ["bad"], ["bad_u8"], to=TensorProto.UINT8),
        helper.make_node("ReduceMax", ["bad_u8"], ["nonfinite"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "uint8_post",
        [
            helper.make_tensor_value_info("hr", TensorProto.FLOAT, ["N", 3, "H", "W"]),
            helper.make_tensor_value_info("starts", TensorProto.INT64, [2]),
            helper.make_tensor_value_info("ends", TensorProto.INT64, [2]),
        ],
        [
            helper.make_tensor_value_info("u8", TensorProto.UINT8, ["N", "h", "w", 3]),
            helper.make_tensor_value_info("nonfinite", TensorProto.UINT8, []),
        ],
        [
            helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
            helper.make_tensor("k0", TensorProto.FLOAT, [], [0.0]),
            helper.make_tensor("k1", TensorProto.FLOAT, [], [1.0]),
            helper.make_tensor("k255", TensorProto.FLOAT, [], [255.0]),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", IO_OPSET)], producer_name="sr_export")
