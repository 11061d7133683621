"""ONNX / FP16 ONNX / TensorRT export of VDVAE-SR's conditional prior sampling path.

`sr-export` (sr_export.cli) writes the model directory that `sr_runtime`
reads: `model.fp32.onnx`, `model.fp16.onnx` and `manifest.json` (DESIGN §5).
`sr_export.tensorrt` and `sr_export.files` import neither torch nor TensorRT at
module level, so the torch-free runtime can use them to build engines lazily.
"""
