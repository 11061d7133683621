"""ONNX / FP16 ONNX / TensorRT export of VDVAE-SR's conditional prior sampling path.

`sr-export` (sr_export.cli) writes the model directory that `sr_runtime`
reads: `model.fp32.onnx`, `model.fp16.onnx` and `manifest.json` (docs/design.md,
Export contract).
Engine identity and the TensorRT build live below, in the torch-free runtime
(`sr_runtime.backends.engine_identity`, `sr_runtime.backends.engine_build`),
and are imported from there: one rule set for the engine cache.
"""
