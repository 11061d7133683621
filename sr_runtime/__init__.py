"""Torch-free runtime for VDVAE-SR x4 upscaling (ONNX Runtime / TensorRT)."""
