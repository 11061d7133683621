"""Torch-free runtime for VDVAE-SR x4 upscaling (ONNX Runtime / TensorRT).

from sr_runtime import Upscaler
big = Upscaler().run("photo.png")          # PIL image, 4x larger
"""

from sr_runtime.errors import BackendUnavailable, SRInputError, SRModelError
from sr_runtime.upscaler import RunStats, Upscaler

__all__ = ["BackendUnavailable", "RunStats", "SRInputError", "SRModelError", "Upscaler"]
