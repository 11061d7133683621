"""Parameter counts per component and generation-path cost, counted from the real modules."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .model import VDVAESR, VDVAESRConfig


@dataclass
class ModelInfo:
    params: dict[str, int]
    gmac_per_tile: float  # conditional prior sampling path, one LR tile -> one HR tile
    weight_mb_fp32: float

    def lines(self, config: VDVAESRConfig) -> list[str]:
        lr, hr = config.lr_size, config.hr_size
        out = [f"preset/config: {config.name}  ({lr}x{lr} -> {hr}x{hr})"]
        width = max(len(k) for k in self.params)
        for name, count in self.params.items():
            out.append(f"  {name:<{width}}  {count:>13,d} params")
        out.append(f"  generation path: {self.gmac_per_tile:,.2f} GMAC per {hr}x{hr} output tile")
        out.append(f"  weights (fp32): {self.weight_mb_fp32:,.1f} MB")
        return out


def parameter_groups(model: VDVAESR) -> dict[str, int]:
    """HR encoder, LR encoder, skip upsampler, decoder prior path, decoder posterior, head."""
    groups = {
        "hr_encoder": 0,
        "lr_encoder": 0,
        "skip_upsampler": 0,
        "decoder_prior_path": 0,
        "decoder_posterior": 0,
        "head": 0,
    }
    for name, p in model.named_parameters():
        if name.startswith("hr_encoder."):
            key = "hr_encoder"
        elif name.startswith(("lr_encoder.", "skip_upsampler.")):
            key = name.split(".")[0]
        elif ".posterior." in name:
            key = "decoder_posterior"
        elif name.startswith("decoder.out_conv."):
            key = "head"
        else:
            key = "decoder_prior_path"
        groups[key] += p.numel()
    groups["total"] = sum(groups.values())
    groups["generation_path"] = (
        groups["lr_encoder"] + groups["skip_upsampler"] + groups["decoder_prior_path"] + groups["head"]
    )
    return groups


def generation_gmac(model: VDVAESR) -> float:
    """Multiply-accumulates of ``sample`` on one tile, counted by torch's FLOP counter.

    Runs on whatever device the model lives on; a model built on the meta
    device costs no arithmetic, so the paper presets count in a second.
    """
    cfg = model.config
    device = next(model.parameters()).device
    lr = torch.zeros(1, 3, cfg.lr_size, cfg.lr_size, device=device)
    noise = torch.zeros(1, model.noise_dim, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.sample(lr, noise)
    return counter.get_total_flops() / 2 / 1e9


def model_info(config: VDVAESRConfig) -> ModelInfo:
    with torch.device("meta"):
        model = VDVAESR(config)
    params = parameter_groups(model)
    return ModelInfo(params=params, gmac_per_tile=generation_gmac(model), weight_mb_fp32=params["total"] * 4 / 1e6)
