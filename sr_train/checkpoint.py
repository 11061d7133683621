"""The project's checkpoint format: a directory with ``model.safetensors`` + ``config.json``.

No pickle. ``config.json`` carries the model hyper-parameters (which include
the preprocessing statistics and LR/HR sizes), the training step, whether the
weights are EMA, and the sha256 of the weights file, so a half-written or
mismatched pair is detected on load. Every file is written atomically
(temp file + rename); the config goes last.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_weights

from sr_runtime.files import atomic_write_bytes, atomic_write_json, sha256_file

from .model import VDVAESR, VDVAESRConfig

FORMAT = "vdvae-sr-checkpoint/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """The path is not a readable VDVAE-SR checkpoint."""


def save_checkpoint(
    path: str | Path, model: VDVAESR, *, step: int = 0, ema: bool = False, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model``'s weights and config into the directory ``path``."""
    root = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(root / WEIGHTS, save_weights(state))
    meta = {
        "format": FORMAT,
        "model": model.config.to_dict(),
        "step": int(step),
        "weights": "ema" if ema else "raw",
        "weights_sha256": sha256_file(root / WEIGHTS),
        **(extra or {}),
    }
    atomic_write_json(root / CONFIG, meta)
    return root


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    root = Path(path)
    if not (root / CONFIG).is_file():
        raise CheckpointError(f"{root}: not a VDVAE-SR checkpoint (no {CONFIG} in that directory)")
    try:
        meta = json.loads((root / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{root / CONFIG}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{root / CONFIG}: not a VDVAE-SR checkpoint config (format != {FORMAT})")
    return meta


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[VDVAESR, dict[str, Any]]:
    """Rebuild the model from ``config.json`` and load its weights, checking every key and shape.

    The config is compared with the weights file's header before the model is
    built for real: a copied config with other sizes allocates nothing.
    """
    root = Path(path)
    meta = read_checkpoint_meta(root)
    weights = root / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{root}: {WEIGHTS} is missing")
    if not isinstance(meta.get("weights_sha256"), str) or not meta["weights_sha256"]:
        raise CheckpointError(f"{root / CONFIG}: no weights_sha256 (it ties {WEIGHTS} to this config)")
    if sha256_file(weights) != meta["weights_sha256"]:
        raise CheckpointError(f"{weights}: checksum differs from {CONFIG} (partial or mixed-up checkpoint)")
    try:
        config = VDVAESRConfig.from_dict(meta["model"])
        with torch.device("meta"):  # shapes only, no memory
            expected = {k: tuple(v.shape) for k, v in VDVAESR(config).state_dict().items()}
        with safe_open(str(weights), "pt") as header:
            stored = {k: tuple(header.get_slice(k).get_shape()) for k in header.keys()}  # noqa: SIM118 -- not a dict
    except (SafetensorError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{root}: unreadable checkpoint ({e})") from None
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    mis_shaped = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
    if missing or unexpected or mis_shaped:
        raise CheckpointError(
            f"{weights} does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatch {mis_shaped[:5]}"
        )
    model = VDVAESR(config)
    try:
        model.load_state_dict(load_file(str(weights), device=str(map_location)))
    except (SafetensorError, RuntimeError) as e:
        raise CheckpointError(f"{root}: unreadable checkpoint ({e})") from None
    return model.to(map_location).eval(), meta
