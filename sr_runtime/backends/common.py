"""What the backend registry and its implementations share: a leaf module, so the registry can import
its implementations lazily without them importing it back.
"""

from __future__ import annotations

from sr_runtime.model import ModelSpec

PRECISIONS = ("auto", "fp32", "fp16")


def resolve_precision(spec: ModelSpec, precision: str, gpu: bool) -> str:
    """ "auto" means fp16 on GPUs when the model ships an fp16 ONNX, fp32 otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        spec.onnx_path(precision)  # SRModelError now rather than a fallback later
        return precision
    fp16 = spec.onnx_files.get("fp16")
    return "fp16" if gpu and fp16 is not None and fp16.is_file() else "fp32"
