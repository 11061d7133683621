"""The models a benchmark runs: the same weights as a PyTorch module and as a runtime model directory.

- ``default``: the shipped model (ONNX + manifest in ``sr_runtime/models/vdvae-sr-256``,
  weights from ``engines/vdvae-sr-256/checkpoint/``). Where either is missing
  (an installed package has no checkpoint), a random-weights ``small-256``
  stand-in: latency does not depend on the weights' values, and the results
  say "random" wherever that is the case.
- a preset name (e.g. ``paper-256``): random weights, for cost only.
- ``tiny``: a few-block 16 -> 64 model for the CI smoke run (exports quickly).

Random-weights models are exported once with ``sr_export`` into a cache
directory keyed by config and seed; the PyTorch twin is rebuilt from the same
seed, and :func:`parity` checks that both really hold the same weights.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sr_runtime.model import packaged_model_dir
from sr_train.info import model_info
from sr_train.model import VDVAESR, VDVAESRConfig, preset

REPO = Path(__file__).resolve().parent.parent
SHIPPED_DIR = packaged_model_dir()
SHIPPED_CHECKPOINT = REPO / "engines" / "vdvae-sr-256" / "checkpoint"
DEFAULT_PRESET = "small-256"
DEFAULT_CACHE = Path.home() / ".cache" / "vdvae-sr" / "bench-models"
#: |ONNX Runtime - PyTorch| above this is a differing pixel; argmax near-ties of the
#: deterministic head make a few (sr_export reports them too), different weights make most.
PARITY_ABS = 1e-3
PARITY_MAX_FRACTION = 0.01

Log = Callable[[str], None]


@dataclass
class BenchModel:
    """One model, runnable by PyTorch (``module``) and by sr_runtime (``model_dir``)."""

    key: str
    weights: str
    trained: bool
    module: VDVAESR
    model_dir: Path
    gmac_per_tile: float

    @property
    def config(self) -> VDVAESRConfig:
        return self.module.config

    @property
    def resolution(self) -> str:
        c = self.config
        return f"{c.lr_size}x{c.lr_size}->{c.hr_size}x{c.hr_size}"

    def has_onnx(self, precision: str) -> bool:
        manifest = json.loads((self.model_dir / "manifest.json").read_text())
        return precision in manifest["onnx"]

    def describe(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "config": self.config.name,
            "weights": self.weights,
            "trained": self.trained,
            "resolution": self.resolution,
            "gmac_per_tile": self.gmac_per_tile,
            "model_dir": str(self.model_dir),
            "generation_params": sum(
                p.numel()
                for n, p in self.module.named_parameters()
                if not n.startswith("hr_encoder.") and ".posterior." not in n
            ),
        }


def tiny_config() -> VDVAESRConfig:
    """A valid VDVAE-SR small enough to export and run in seconds (smoke tests only)."""
    return dataclasses.replace(
        preset(DEFAULT_PRESET),
        name="tiny-64",
        hr_size=64,
        lr_size=16,
        width=16,
        custom_width_str="",
        enc_blocks="64d4,16d4,4d4,1x1",
        dec_blocks="1x1,4m1,16m4,32m16,64m32",
        lr_enc_blocks="16d4,4d4,1x1",
        zdim=4,
        num_mixtures=2,
    )


def _cached(out: Path, config: VDVAESRConfig, seed: int, fp16: bool) -> bool:
    """Whether ``out`` already holds an export of exactly this random model."""
    path = out / "manifest.json"
    if not path.is_file():
        return False
    m = json.loads(path.read_text())
    ckpt = m.get("checkpoint", {})
    return (
        m.get("model_config") == config.to_dict()
        and ckpt.get("random_weights") is True
        and ckpt.get("seed") == seed
        and (not fp16 or "fp16" in m.get("onnx", {}))
    )


def random_model(config: VDVAESRConfig, key: str, cache: Path, seed: int, fp16_max_gmac: float, log: Log) -> BenchModel:
    """Random weights from ``seed``, exported with sr_export unless the cache already has them.

    The FP16 graph is made only for models up to ``fp16_max_gmac`` per tile:
    its calibration runs the FP32 graph many times, which costs too long on a
    CPU for the paper-size models.
    """
    gmac = model_info(config).gmac_per_tile
    fp16 = gmac <= fp16_max_gmac
    torch.manual_seed(seed)
    module = VDVAESR(config).eval()
    out = cache / f"{config.name}-seed{seed}"
    if not _cached(out, config, seed, fp16):
        from sr_export.pipeline import ExportOptions, export_model_dir

        log(f"exporting random-weights {config.name} to {out} (once; cached) ...")
        info = {"random_weights": True, "preset": config.name, "seed": seed, "step": None, "weights_sha256": None}
        export_model_dir(module, info, ExportOptions(out_dir=out, name=out.name, fp16=fp16, seed=seed), log=log)
    return BenchModel(
        key=key,
        weights=f"random (seed {seed}): latency/cost only, output is not super-resolution",
        trained=False,
        module=module,
        model_dir=out,
        gmac_per_tile=gmac,
    )


def shipped_model(cache: Path, seed: int, fp16_max_gmac: float, log: Log) -> BenchModel:
    """The shipped default with its trained weights, or the clearly labelled random stand-in."""
    manifest_path, ckpt = SHIPPED_DIR / "manifest.json", SHIPPED_CHECKPOINT
    if not (manifest_path.is_file() and (ckpt / "config.json").is_file()):
        log(
            f"no shipped model at {SHIPPED_DIR} with its checkpoint {ckpt}: "
            f"using a random-weights {DEFAULT_PRESET} stand-in"
        )
        return random_model(preset(DEFAULT_PRESET), "default", cache, seed, fp16_max_gmac, log)
    from sr_train.checkpoint import load_checkpoint

    module, meta = load_checkpoint(ckpt)
    shipped = json.loads(manifest_path.read_text()).get("checkpoint", {})
    if shipped.get("weights_sha256") != meta.get("weights_sha256"):
        raise ValueError(
            f"{SHIPPED_DIR}: the ONNX files were exported from other weights than {ckpt} "
            "(manifest checkpoint.weights_sha256 differs); re-run sr-export --res 256"
        )
    return BenchModel(
        key="default",
        weights=f"trained ({meta.get('weights', '?')}, step {meta.get('step', '?')})",
        trained=True,
        module=module.eval(),
        model_dir=SHIPPED_DIR,
        gmac_per_tile=model_info(module.config).gmac_per_tile,
    )


def load_model(name: str, cache: Path, seed: int, fp16_max_gmac: float, log: Log) -> BenchModel:
    """``default``, ``tiny`` or a preset name (random weights)."""
    if name == "default":
        return shipped_model(cache, seed, fp16_max_gmac, log)
    config = tiny_config() if name == "tiny" else preset(name)
    return random_model(config, name, cache, seed, fp16_max_gmac, log)


def parity(model: BenchModel, seed: int = 0) -> dict[str, float]:
    """ORT CPU fp32 vs PyTorch on one random tile: proof both backends run the same weights.

    Raises ValueError when more than PARITY_MAX_FRACTION of the pixels differ
    (a stale export cache, or a shipped ONNX that is not the checkpoint).
    """
    from sr_runtime.backends import create_backend
    from sr_runtime.model import load_model_spec
    from sr_runtime.noise import NoiseBank

    spec = load_model_spec(model.model_dir)
    bank = NoiseBank.create(spec.noise_dim, temperature=0.0, seed=seed, max_batch=1)
    backend = create_backend(spec, "onnxruntime-cpu", "fp32", bank, (1,))
    lr = np.random.default_rng(seed).random((1, 3, *spec.lr_size), dtype=np.float32)
    try:
        ort_out = backend.run(lr, 0)
    finally:
        backend.close()
    with torch.inference_mode():
        ref = model.module.sample(torch.from_numpy(lr), torch.zeros(1, spec.noise_dim)).numpy()
    err = np.abs(ort_out - ref)
    result = {"max_abs_err": float(err.max()), "fraction_over_1e-3": float((err > PARITY_ABS).mean())}
    if result["fraction_over_1e-3"] > PARITY_MAX_FRACTION:
        raise ValueError(
            f"{model.model_dir}: ONNX Runtime and PyTorch disagree ({result}); they do not hold "
            "the same weights (delete the export cache, or re-export)"
        )
    return result
