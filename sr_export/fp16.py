"""FP16 ONNX with FP32 I/O and FP32 islands chosen by measured activation ranges.

TensorRT 11 has no FP16 builder flag: precision must live in the network
(strongly typed), so the FP16 graph is made here. Procedure:

1. ``measure_ranges``: run the FP32 graph in ONNX Runtime on calibration
   inputs (real photos at several temperatures, plus extreme images), with
   max |x| of every intermediate tensor reduced inside the graph, so a pass
   keeps no more memory than an inference.
2. ``fp32_island``: a node stays FP32 when any float tensor it reads or writes
   exceeds ``limit`` (well below FP16's 65504, leaving headroom for images the
   calibration did not see and for the precision lost at large magnitudes), or
   when it is an op this converter cannot retype.
3. ``convert_to_fp16``: every other node computes in FP16; weights feeding only
   FP16 nodes are stored as FP16; Casts are inserted at every precision
   boundary; inputs and outputs stay FP32.
4. ``choose_fp16``: verify on held-out photo crops against the FP32 graph, first
   with ``fp16_rounding_model`` (ONNX Runtime CPU runs most FP16 ops in FP32
   and so cannot show FP16 overflow by itself), then the FP16 file as written;
   if PSNR falls short or anything is non-finite, lower ``limit`` (a larger
   FP32 island) and try again.

Why not ONNX Runtime's converter (``onnxruntime.transformers.float16.
convert_float_to_float16(keep_io_types=True, node_block_list=island)``, the
code of onnxconverter-common): measured with onnxruntime 1.32 and onnx 1.23
on small-256 (then the shipped model) and the same islands, its graph fails
``onnx.checker`` (the input Casts are appended after their consumers: nodes
not topologically sorted) and strict shape inference (value_info keeps the
FP32 types of tensors it made FP16), both checks the export requires and the
TensorRT parser relies on; with a non-empty island (6 or 126 nodes) it also
scored 76 dB against FP32 where this converter scores 84 dB. It has no
rounding simulation either, which ``choose_fp16`` needs.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sr_export.onnx_export import node_scope

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = 65504.0
# Float inputs that are parameters, not data: they keep FP32 whatever the node computes in.
NON_DATA_INPUTS: dict[str, frozenset[int]] = {"Resize": frozenset({1, 2}), "Upsample": frozenset({1})}
# Ops whose output type is set by an attribute this converter knows how to retype.
RETYPED_OPS = frozenset({"Cast", "ConstantOfShape", "Constant"})
# Any other op with a type attribute stays FP32 rather than be converted wrongly.
TYPE_ATTRS = frozenset({"to", "dtype", "output_dtype"})
# Thresholds tried in order by choose_fp16: FP16 max / 16, then ever larger FP32 islands.
DEFAULT_LIMITS = (4096.0, 1024.0, 256.0, 64.0, 16.0)
PSNR_CAP_DB = 200.0
# The FP16 file names its FP32 nodes in its own metadata, so it can be re-checked without the exporter's state.
ISLAND_METADATA_KEY = "sr_export.fp32_island"


class Fp16TargetMissed(RuntimeError):
    """No FP32 island tried reached the PSNR target without NaN/Inf."""


def float_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor in the graph (after ONNX shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*g.input, *g.value_info, *g.output)}
    types.update({init.name: init.data_type for init in g.initializer})
    return types


def _named(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose nodes all have unique names (the island is a set of node names)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    seen: set[str] = set()
    for i, node in enumerate(out.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return out


def measure_ranges(
    proto: onnx.ModelProto,
    feeds: Sequence[dict[str, np.ndarray]],
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """max |x| of every float tensor (node outputs, graph inputs, initializers) over ``feeds``.

    The statistics are computed inside the graph (``range_graph``), so a run
    returns two scalars per tensor instead of the tensors: ONNX Runtime frees
    every intermediate as in a plain inference, memory stays one forward pass's
    whatever the model's size, and each feed costs one pass. Non-finite values
    count as infinite.
    """
    proto = _named(proto)
    types = float_types(proto)
    produced = [o for n in proto.graph.node for o in n.output if o and types.get(o) == FLOAT]
    ranges: dict[str, float] = dict.fromkeys(produced, 0.0)
    for init in proto.graph.initializer:
        if init.data_type == FLOAT:
            arr = numpy_helper.to_array(init)
            ranges[init.name] = float(np.abs(arr).max()) if arr.size else 0.0
    stats = range_graph(proto, produced)
    outputs = [o.name for o in stats.graph.output]
    session = cpu_session_from_proto(stats)
    del stats
    started = time.perf_counter()
    for k, feed in enumerate(feeds):
        values = session.run(outputs, feed)
        for name, peak, poison in zip(produced, values[0::2], values[1::2], strict=True):
            ranges[name] = max(ranges[name], float(peak) if np.isfinite(poison) else math.inf)
        if log is not None:
            log(f"      range pass {k + 1}/{len(feeds)}, {time.perf_counter() - started:.0f} s")
    for feed in feeds:
        for name, value in feed.items():
            ranges[name] = max(ranges.get(name, 0.0), float(np.abs(value).max()))
    return ranges


def range_graph(proto: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``proto`` whose outputs are, per tensor in ``tensors``, max |x| and sum(x * 0).

    The sum is NaN exactly when the tensor holds a NaN or an infinity (ReduceMax
    alone may skip a NaN). Each pair of reductions is placed right after the
    node that writes its tensor, so a session that runs nodes in graph order
    (``cpu_session_from_proto``) frees the tensor once its own consumers ran.
    """
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    g = model.graph
    wanted = set(tensors)
    zero = "range_stat_zero"
    g.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), zero))
    index = {name: k for k, name in enumerate(tensors)}
    nodes: list[onnx.NodeProto] = []
    for node in g.node:
        nodes.append(node)
        for out in node.output:
            if out in wanted:
                stat = f"range_stat_{index[out]}"
                nodes += [
                    helper.make_node("Abs", [out], [f"{stat}_abs"], name=f"{stat}_abs"),
                    helper.make_node("ReduceMax", [f"{stat}_abs"], [f"{stat}_max"], name=f"{stat}_max", keepdims=0),
                    helper.make_node("Mul", [out, zero], [f"{stat}_zero"], name=f"{stat}_mul"),
                    helper.make_node("ReduceSum", [f"{stat}_zero"], [f"{stat}_poison"], name=f"{stat}_sum", keepdims=0),
                ]
    del g.node[:]
    g.node.extend(nodes)
    del g.output[:]
    for k in range(len(tensors)):
        g.output.extend(helper.make_tensor_value_info(f"range_stat_{k}_{s}", FLOAT, []) for s in ("max", "poison"))
    return model


def cpu_session_from_proto(proto: onnx.ModelProto) -> Any:
    """An unoptimised ORT CPU session on an in-memory model that runs its nodes in graph order.

    ONNX Runtime's default order would run every node of a chain before the
    reductions ``range_graph`` puts beside them, keeping all their inputs
    alive; without a memory arena a run's tensors are freed when it ends.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    opts.enable_cpu_mem_arena = False
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _data_inputs(node: onnx.NodeProto) -> list[tuple[int, str]]:
    skip = NON_DATA_INPUTS.get(node.op_type, frozenset())
    return [(i, name) for i, name in enumerate(node.input) if name and i not in skip]


def fp32_island(proto: onnx.ModelProto, ranges: dict[str, float], limit: float) -> dict[str, str]:
    """Node name -> why it stays FP32: a float tensor it touches exceeds ``limit``, or an unconvertible op."""
    proto = _named(proto)
    types = float_types(proto)
    keep: dict[str, str] = {}
    for node in proto.graph.node:
        attrs = {a.name for a in node.attribute}
        if node.op_type not in RETYPED_OPS and attrs & TYPE_ATTRS:
            keep[node.name] = f"{node.op_type} has a type attribute this converter does not retype"
            continue
        touched = [t for _, t in _data_inputs(node)] + list(node.output)
        peaks = [(ranges.get(t, 0.0), t) for t in touched if types.get(t) == FLOAT]
        if peaks:
            peak, tensor = max(peaks)
            if peak > limit:
                keep[node.name] = f"max|{tensor}| = {peak:.4g} > {limit:g}"
    return keep


def convert_to_fp16(proto: onnx.ModelProto, keep_fp32: Iterable[str]) -> onnx.ModelProto:
    """FP16 everywhere except the nodes in ``keep_fp32``; FP32 graph inputs and outputs; Casts at boundaries."""
    model = _named(proto)
    keep = set(keep_fp32)
    types = float_types(model)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    graph_inputs = {i.name for i in g.input}

    def computes_fp16(node: onnx.NodeProto) -> bool:
        return node.name not in keep

    # Which precision each consumer wants from each float tensor.
    wanted: dict[str, set[int]] = {}
    for node in g.node:
        want = FLOAT16 if computes_fp16(node) else FLOAT
        for i, name in enumerate(node.input):
            if name and types.get(name) == FLOAT:
                is_data = i not in NON_DATA_INPUTS.get(node.op_type, frozenset())
                wanted.setdefault(name, set()).add(want if is_data else FLOAT)
    for out in g.output:
        wanted.setdefault(out.name, set()).add(FLOAT)

    # Weights read only in FP16 are stored in FP16 (halves the file); shared ones get a Cast.
    held: dict[str, int] = {name: FLOAT for name in graph_inputs if types.get(name) == FLOAT}
    for name, init in inits.items():
        if init.data_type != FLOAT:
            continue
        if wanted.get(name) == {FLOAT16} and name not in graph_inputs:
            arr = numpy_helper.to_array(init).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16), name))
            held[name] = FLOAT16
        else:
            held[name] = FLOAT

    casts: dict[tuple[str, int], str] = {}
    new_nodes: list[onnx.NodeProto] = []

    def as_type(name: str, dtype: int) -> str:
        if held.get(name, dtype) == dtype:
            return name
        key = (name, dtype)
        if key not in casts:
            suffix = "fp16" if dtype == FLOAT16 else "fp32"
            casts[key] = f"{name}__{suffix}"
            new_nodes.append(helper.make_node("Cast", [name], [casts[key]], name=f"Cast_{name}__{suffix}", to=dtype))
        return casts[key]

    for node in g.node:
        dtype = FLOAT16 if computes_fp16(node) else FLOAT
        for i, name in enumerate(node.input):
            if name and types.get(name) == FLOAT:
                is_data = i not in NON_DATA_INPUTS.get(node.op_type, frozenset())
                node.input[i] = as_type(name, dtype if is_data else FLOAT)
        if dtype == FLOAT16:
            _retype_attributes(node)
        for out in node.output:
            if out and types.get(out) == FLOAT:
                held[out] = dtype
        new_nodes.append(node)

    # Graph outputs stay FP32: the producer writes <name>__fp16, a final Cast restores <name>.
    for out in g.output:
        if held.get(out.name) == FLOAT16:
            inner = f"{out.name}__fp16"
            for node in new_nodes:
                node.output[:] = [inner if o == out.name else o for o in node.output]
                node.input[:] = [inner if i == out.name else i for i in node.input]
            new_nodes.append(helper.make_node("Cast", [inner], [out.name], name=f"Cast_{out.name}__out", to=FLOAT))

    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def _retype_attributes(node: onnx.NodeProto) -> None:
    """Make an FP16 node's type-bearing attributes produce FP16 instead of FP32."""
    if node.op_type == "Cast":
        for a in node.attribute:
            if a.name == "to" and a.i == FLOAT:
                a.i = FLOAT16
    elif node.op_type in ("ConstantOfShape", "Constant"):
        value = next((a for a in node.attribute if a.name == "value"), None)
        if value is None and node.op_type == "ConstantOfShape":  # default: float32 zero
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))
        elif value is not None and value.t.data_type == FLOAT:
            arr = numpy_helper.to_array(value.t).astype(np.float16)
            value.t.CopyFrom(numpy_helper.from_array(arr, value.t.name))


def fp16_rounding_model(proto: onnx.ModelProto, keep_fp32: Iterable[str]) -> onnx.ModelProto:
    """An FP32 graph that rounds, through Cast to FP16 and back, every tensor the FP16 graph stores in FP16.

    ONNX Runtime CPU has no FP16 kernels for most ops: it runs them in FP32 and
    drops the casts between neighbouring ones, so the FP16 file hides overflow
    and rounding of intermediate tensors there. This graph makes them explicit
    (FP16 storage, FP32 arithmetic, as in TensorRT's FP16 kernels), so overflow
    shows as inf and rounding error as lost PSNR.
    """
    model = _named(proto)
    keep = set(keep_fp32)
    types = float_types(model)
    g = model.graph
    fp32_sources = {i.name for i in g.input} | {i.name for i in g.initializer}
    fp32_sources |= {o for n in g.node if n.name in keep for o in n.output}
    new_nodes: list[onnx.NodeProto] = []
    rounded: dict[str, str] = {}

    def round_trip(src: str, dst: str) -> None:
        new_nodes.append(helper.make_node("Cast", [src], [f"{dst}__h"], name=f"Cast_{dst}__h", to=FLOAT16))
        new_nodes.append(helper.make_node("Cast", [f"{dst}__h"], [dst], name=f"Cast_{dst}__r", to=FLOAT))

    for node in g.node:
        if node.name in keep:
            new_nodes.append(node)
            continue
        for i, name in _data_inputs(node):
            if types.get(name) == FLOAT and name in fp32_sources:
                if name not in rounded:
                    rounded[name] = f"{name}__r"
                    round_trip(name, rounded[name])
                node.input[i] = rounded[name]
        outputs = [(k, o) for k, o in enumerate(node.output) if o and types.get(o) == FLOAT]
        for k, o in outputs:
            node.output[k] = f"{o}__exact"
        new_nodes.append(node)
        for _, o in outputs:
            round_trip(f"{o}__exact", o)
    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]
    return model


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two [0, 1] images (capped at PSNR_CAP_DB for identical ones)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_CAP_DB if mse == 0.0 else min(PSNR_CAP_DB, 10.0 * math.log10(1.0 / mse))


@dataclass
class Fp16Check:
    """FP16 vs FP32 on held-out inputs.

    The deterministic head takes an argmax over mixture logits, so where two
    logits nearly tie, any rounding can select the other component and move
    that pixel a lot. Those pixels are identified exactly (the selected
    component differs) and reported apart: ``flip_fraction`` and the PSNR over
    the pixels that chose the same component, which measures FP16 rounding
    itself. ``min_psnr_db`` is over all pixels, flips included.
    """

    min_psnr_db: float
    min_psnr_db_same_component: float
    flip_fraction: float
    max_abs_err: float
    max_abs_err_same_component: float
    all_finite: bool
    per_case_psnr_db: dict[str, float] = field(default_factory=dict)
    non_finite_cases: list[str] = field(default_factory=list)

    def ok(self, target_db: float, exclude_flips: bool = False) -> bool:
        psnr_db = self.min_psnr_db_same_component if exclude_flips else self.min_psnr_db
        return self.all_finite and psnr_db >= target_db

    def as_dict(self) -> dict[str, Any]:
        return {
            "min_psnr_db": round(self.min_psnr_db, 2),
            "min_psnr_db_same_component": round(self.min_psnr_db_same_component, 2),
            "flip_fraction": self.flip_fraction,
            "max_abs_err": self.max_abs_err,
            "max_abs_err_same_component": self.max_abs_err_same_component,
            "all_finite": self.all_finite,
            "cases_psnr_db": {k: round(v, 2) for k, v in self.per_case_psnr_db.items()},
        }


def _with_component_output(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """A copy that also outputs the head's ArgMax (the selected mixture component), if it has one."""
    argmax = [n for n in proto.graph.node if n.op_type == "ArgMax"]
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    if len(argmax) != 1:
        return model, None
    name = argmax[0].output[0]
    if name not in {o.name for o in model.graph.output}:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.INT64, None))
    return model, name


#: The FP32 graph's outputs per check case: the image and, where the head has one, the chosen mixture component.
References = dict[str, tuple[np.ndarray, np.ndarray | None]]


def reference_outputs(
    fp32: onnx.ModelProto, cases: dict[str, dict[str, np.ndarray]], log: Callable[[str], None] | None = None
) -> References:
    """The FP32 graph on every case, once: each FP16 candidate is compared with the same outputs."""
    model, comp = _with_component_output(fp32)
    names = ["hr", comp] if comp else ["hr"]
    session = cpu_session_from_proto(model)
    out: References = {}
    started = time.perf_counter()
    for k, (label, feed) in enumerate(cases.items()):
        hr, *chosen = session.run(names, feed)
        out[label] = (hr, chosen[0] if comp else None)
        if log is not None:
            log(f"      FP32 reference {k + 1}/{len(cases)}, {time.perf_counter() - started:.0f} s")
    return out


def verify_fp16(
    fp32: onnx.ModelProto,
    fp16: onnx.ModelProto,
    cases: dict[str, dict[str, np.ndarray]],
    references: References | None = None,
    log: Callable[[str], None] | None = None,
) -> Fp16Check:
    """Run ``fp16`` (the FP16 file or its rounding simulation) on every case and compare with the FP32 graph.

    ``references``: the FP32 graph's outputs on these cases (``reference_outputs``), computed here when absent.
    ONNX Runtime CPU. TensorRT's own numbers must still be checked on a GPU (README: polygraphy run --trt --onnxrt).
    """
    if references is None:
        references = reference_outputs(fp32, cases)
    test_model, comp = _with_component_output(fp16)
    names = ["hr", comp] if comp else ["hr"]
    s16 = cpu_session_from_proto(test_model)
    per_case: dict[str, float] = {}
    same_psnr: list[float] = []
    bad: list[str] = []
    flips = pixels = 0
    worst = worst_same = 0.0
    started = time.perf_counter()
    for k, (label, feed) in enumerate(cases.items()):
        ref, ref_comp = references[label]
        out, *out_comp = s16.run(names, feed)
        if log is not None:
            log(f"      FP16 check {k + 1}/{len(cases)}, {time.perf_counter() - started:.0f} s")
        if not np.isfinite(out).all():
            bad.append(label)
            continue
        flipped = (ref_comp != out_comp[0]) if comp and ref_comp is not None else np.zeros_like(out[:, 0], bool)
        err = np.abs(out.astype(np.float64) - ref).max(axis=1)
        flips += int(flipped.sum())
        pixels += err.size
        worst = max(worst, float(err.max()))
        if (~flipped).any():
            worst_same = max(worst_same, float(err[~flipped].max()))
        for i in range(out.shape[0]):
            per_case[f"{label}[{i}]"] = psnr(out[i], ref[i])
            keep = ~flipped[i]
            same_psnr.append(psnr(out[i][:, keep], ref[i][:, keep]) if keep.any() else PSNR_CAP_DB)
    return Fp16Check(
        min_psnr_db=min(per_case.values()) if per_case else -math.inf,
        min_psnr_db_same_component=min(same_psnr) if same_psnr else -math.inf,
        flip_fraction=flips / pixels if pixels else 0.0,
        max_abs_err=worst,
        max_abs_err_same_component=worst_same,
        all_finite=not bad,
        per_case_psnr_db=per_case,
        non_finite_cases=bad,
    )


@dataclass
class Fp16Result:
    """The chosen FP16 graph and the evidence for it."""

    model: onnx.ModelProto
    limit: float
    island: dict[str, str]
    simulated: Fp16Check  # FP16 rounding of every FP16 tensor made explicit (the strict check)
    ort: Fp16Check  # the FP16 ONNX file itself in ONNX Runtime CPU
    tried: list[dict[str, Any]]
    ranges: dict[str, float]  # measured max |x| per float tensor

    def island_summary(self, fp32: onnx.ModelProto) -> dict[str, Any]:
        """FP32 nodes grouped by module scope and op type (the per-node list is long)."""
        by_name = {n.name: n for n in _named(fp32).graph.node}
        scopes: Counter[str] = Counter()
        ops: Counter[str] = Counter()
        for name in self.island:
            node = by_name[name]
            scopes[_coarse_scope(node_scope(node))] += 1
            ops[node.op_type] += 1
        producer = {o: n for n in by_name.values() for o in n.output}
        largest = sorted(((v, k) for k, v in self.ranges.items() if k in producer), reverse=True)[:8]
        return {
            "limit_abs": self.limit,
            "nodes": len(self.island),
            "of_nodes": len(fp32.graph.node),
            "by_scope": dict(scopes.most_common()),
            "by_op": dict(ops.most_common()),
            "reasons": dict(sorted(self.island.items())[:20]),
            "largest_measured": [
                {"tensor": k, "max_abs": v, "op": producer[k].op_type, "scope": node_scope(producer[k])}
                for v, k in largest
            ],
        }


def _coarse_scope(scope: str) -> str:
    """decoder.dec_blocks.7.resnet.c2 -> decoder.dec_blocks.7.resnet: a readable grouping."""
    parts = scope.split(".")
    return ".".join(parts[:4]) if parts and parts[0] == "decoder" else ".".join(parts[:3]) or "(top level)"


def choose_fp16(
    fp32: onnx.ModelProto,
    calibration: Sequence[dict[str, np.ndarray]],
    held_out: dict[str, dict[str, np.ndarray]],
    target_psnr_db: float = 40.0,
    limits: Sequence[float] = DEFAULT_LIMITS,
    log: Callable[[str], None] | None = None,
) -> Fp16Result:
    """Measure ranges once, then lower the FP32 threshold until both held-out checks pass.

    The rounding simulation decides the island: no inf/NaN anywhere and the
    target PSNR on pixels that chose the same mixture component (component
    flips at near-ties are not an overflow or precision problem an island
    fixes; they are counted and reported). The FP16 file as written must then
    reach the target over all pixels in ONNX Runtime.
    """
    ranges = measure_ranges(fp32, calibration, log=log)
    references = reference_outputs(fp32, held_out, log)
    tried: list[dict[str, Any]] = []
    for limit in limits:
        island = fp32_island(fp32, ranges, limit)
        if log is not None:
            log(f"      FP32 island at |x| > {limit:g}: {len(island)} nodes; FP16 rounding simulation ...")
        simulated = verify_fp16(fp32, fp16_rounding_model(fp32, island), held_out, references, log)
        entry: dict[str, Any] = {"limit_abs": limit, "fp32_nodes": len(island), "simulated": simulated.as_dict()}
        del entry["simulated"]["cases_psnr_db"]
        tried.append(entry)
        if not simulated.ok(target_psnr_db, exclude_flips=True):
            continue
        model = convert_to_fp16(fp32, island)
        if log is not None:
            log("      the FP16 file in ONNX Runtime ...")
        ort = verify_fp16(fp32, model, held_out, references, log)
        entry["ort"] = {k: v for k, v in ort.as_dict().items() if k != "cases_psnr_db"}
        if ort.ok(target_psnr_db):
            model.metadata_props.add(key=ISLAND_METADATA_KEY, value=json.dumps(sorted(island)))
            return Fp16Result(model, limit, island, simulated, ort, tried, ranges)
    raise Fp16TargetMissed(f"no FP32 island reached {target_psnr_db} dB without NaN/Inf: {tried}")
