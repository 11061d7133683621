"""Load released VDVAE weights (openai/vdvae ``*-model.th`` / ``*-model-ema.th``).

Like nanoGPT's ``from_pretrained``: every foreign key is mapped to one of ours,
and every key and shape is checked before anything is copied. The official
files are plain state dicts, so ``torch.load(weights_only=True)`` reads them
without unpickling arbitrary code.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from .model import VDVAESR, VDVAESRConfig

# Our parameters that VDVAE does not have: they are what SR adds.
SR_ONLY = re.compile(r"^(lr_encoder\.|decoder\.dec_blocks\.\d+\.lr_gate$)")


class VDVAEImportError(ValueError):
    """The state dict does not fit the model (lists every offending key)."""


def official_to_ours(key: str, bias_resolutions: list[int]) -> str:
    """Map one official key to our name (raises KeyError for keys we do not know)."""
    key = key.removeprefix("module.")  # DDP-wrapped saves
    if key.startswith("encoder."):
        return "hr_encoder." + key[len("encoder.") :]
    m = re.fullmatch(r"decoder\.dec_blocks\.(\d+)\.enc\.(.+)", key)
    if m:
        return f"decoder.dec_blocks.{m[1]}.posterior.{m[2]}"
    m = re.fullmatch(r"decoder\.bias_xs\.(\d+)", key)
    if m:
        index = int(m[1])
        if index >= len(bias_resolutions):
            raise KeyError(key)
        return f"decoder.bias_xs.{bias_resolutions[index]}"
    if key.startswith("decoder.out_net."):
        return "decoder." + key[len("decoder.out_net.") :]
    return key


def load_vdvae_state_dict(path: str | Path) -> dict[str, Tensor]:
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise VDVAEImportError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 -- the unpickler raises KeyError(<opcode>) and more on non-torch files
        raise VDVAEImportError(f"{path}: not a readable PyTorch state dict ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise VDVAEImportError(f"{path}: not a plain VDVAE state dict")
    return state


def import_vdvae_weights(model: VDVAESR, source: str | Path | dict[str, Tensor]) -> list[str]:
    """Copy official VDVAE weights into ``model``'s HR encoder and decoder.

    Returns the names of our parameters left untouched (the SR additions).
    Raises VDVAEImportError listing missing, unexpected and mis-shaped keys.
    """
    official = source if isinstance(source, dict) else load_vdvae_state_dict(source)
    ours = model.state_dict()
    bias_res = sorted(int(r) for r in model.decoder.bias_xs)
    mapped: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in official.items():
        try:
            name = official_to_ours(key, bias_res)
        except KeyError:
            unexpected.append(key)
            continue
        if name not in ours:
            unexpected.append(key)
        else:
            mapped[name] = value
    missing = [k for k in ours if k not in mapped and not SR_ONLY.match(k)]
    mis_shaped = [
        f"{k}: ours {tuple(ours[k].shape)} vs file {tuple(v.shape)}"
        for k, v in mapped.items()
        if v.shape != ours[k].shape
    ]
    if missing or unexpected or mis_shaped:
        parts = []
        if missing:
            parts.append(f"missing from the file: {missing}")
        if unexpected:
            parts.append(f"unexpected in the file: {unexpected}")
        if mis_shaped:
            parts.append(f"shape mismatch: {mis_shaped}")
        raise VDVAEImportError("VDVAE weights do not fit this model; " + "; ".join(parts))
    with torch.no_grad():
        for name, value in mapped.items():
            ours[name].copy_(value)
    return [k for k in ours if k not in mapped]


def config_from_vdvae_hparams(hparams: dict, lr_enc_blocks: str, **overrides: object) -> VDVAESRConfig:
    """A VDVAE-SR config whose HR encoder/decoder match an official run's hyper-parameters."""
    hr = int(hparams["image_size"])
    low_bit = hparams.get("low_bit_loss", hparams.get("dataset") == "ffhq_256")
    cfg = {
        "name": f"vdvae-{hparams.get('dataset', 'import')}",
        "hr_size": hr,
        "lr_size": hr // 4,
        "width": int(hparams["width"]),
        "custom_width_str": hparams.get("custom_width_str", "") or "",
        "enc_blocks": hparams["enc_blocks"],
        "dec_blocks": hparams["dec_blocks"],
        "lr_enc_blocks": lr_enc_blocks,
        "zdim": int(hparams["zdim"]),
        "bottleneck_multiple": float(hparams["bottleneck_multiple"]),
        "num_mixtures": int(hparams["num_mixtures"]),
        "no_bias_above": int(hparams["no_bias_above"]),
        "low_bit": bool(low_bit),
        "input_shift": float(hparams.get("encoder_input_shift", hparams.get("shift", 0.0))),
        "input_scale": float(hparams.get("encoder_input_scale", hparams.get("scale", 1.0))),
    }
    cfg.update(overrides)
    return VDVAESRConfig(**cfg)
