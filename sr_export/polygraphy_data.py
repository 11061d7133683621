"""Real inputs for ``polygraphy run --data-loader-script sr_export/polygraphy_data.py:load_data``.

Random uniform inputs are not what the model sees; this yields bicubic-x4 LR
crops of real photos with seeded noise at temperature 0 and 0.8, sized from
the model directory's manifest (``$SR_MODEL_DIR``, else the packaged default).
Used on a GPU host to compare the TensorRT engine with ONNX Runtime (README).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np

from sr_export.calibration import photo_lr_batch
from sr_runtime.model import default_model_dir

BATCH = 3
TEMPERATURES = (0.0, 0.8)


def load_data() -> Iterator[dict[str, np.ndarray]]:
    """One feed dict per temperature: {"lr": [3,3,h,w], "noise": [3, noise_dim]}, float32."""
    manifest = json.loads((default_model_dir() / "manifest.json").read_text(encoding="utf-8"))
    lr = photo_lr_batch(int(manifest["lr_size"][0]), per_photo=1)[:BATCH]
    rng = np.random.default_rng(0)
    for t in TEMPERATURES:
        noise = (rng.standard_normal((BATCH, int(manifest["noise_dim"]))) * t).astype(np.float32)
        yield {"lr": lr, "noise": noise}
