"""Run our model on an official-VDVAE reference fixture and pair every output with the official one.

A fixture directory holds ``hparams.json``, ``vdvae-ref-model.th`` (an official
state dict) and ``expected.safetensors`` (inputs and official outputs; see
``tests/fixtures/vdvae_reference/README.md``). ``sr-train vdvae-parity`` prints the worst error per tensor group and
the parity test asserts on the same pairs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from .model import VDVAESR
from .vdvae_import import config_from_vdvae_hparams, import_vdvae_weights

#: The fixture vendored in the repository (not part of the installed package).
DEFAULT_REFERENCE_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "vdvae_reference"


def reference_dir() -> Path:
    """`$VDVAE_REFERENCE_DIR`, else the repository's `tests/fixtures/vdvae_reference`."""
    return Path(os.environ.get("VDVAE_REFERENCE_DIR", DEFAULT_REFERENCE_DIR))


def load_reference(root: Path) -> tuple[dict, dict[str, Tensor], VDVAESR]:
    """The fixture's hyper-parameters, tensors, and our model holding its weights."""
    if not root.is_dir():
        raise FileNotFoundError(f"VDVAE reference fixture not found at {root} (set VDVAE_REFERENCE_DIR)")
    hparams = json.loads((root / "hparams.json").read_text())
    expected = load_file(root / "expected.safetensors")
    lr = hparams["image_size"] // 4
    # The LR encoder is ours alone; any valid one will do, the paths below bypass it.
    cfg = config_from_vdvae_hparams(hparams, lr_enc_blocks=f"{lr}x1,{lr}d{lr},1x1")
    model = VDVAESR(cfg).eval()
    import_vdvae_weights(model, root / "vdvae-ref-model.th")
    return hparams, expected, model


def _per_block(expected: dict[str, Tensor], prefix: str) -> list[Tensor]:
    n = sum(k.startswith(prefix) for k in expected)
    return [expected[f"{prefix}{i}"] for i in range(n)]


@torch.no_grad()
def reference_pairs(root: Path) -> dict[str, tuple[Tensor, Tensor]]:
    """name -> (ours, official) for every output tensor the fixture holds."""
    hparams, expected, model = load_reference(root)
    x = expected["x_uint8"].permute(0, 3, 1, 2).float() / 255.0
    n = x.shape[0]

    def nhwc(t: Tensor) -> Tensor:
        return t.permute(0, 2, 3, 1)

    pairs: dict[str, tuple[Tensor, Tensor]] = {}

    acts = model.hr_encoder(model.encoder_input(x))
    for key in (k for k in expected if k.startswith("encoder_activation_")):
        pairs[key] = (acts[int(key.rsplit("_", 1)[1])], expected[key])

    px_z, stats = model.posterior_pass(x, None, eps=[None] * len(model.decoder.dec_blocks))
    losses = model.loss_from(px_z, stats, x)
    zs, kls = _per_block(expected, "posterior_mean_z_block"), _per_block(expected, "posterior_mean_kl_block")
    if len(zs) != len(stats):
        raise ValueError(f"fixture has {len(zs)} decoder blocks, the model {len(stats)}")
    for i, (z, kl) in enumerate(zip(zs, kls, strict=True)):
        pairs[f"posterior_mean_z_block{i}"] = (stats[i]["z"], z)
        pairs[f"posterior_mean_kl_block{i}"] = (stats[i]["kl"], kl)
    pairs["posterior_mean_px_z"] = (px_z, expected["posterior_mean_px_z"])
    pairs["posterior_mean_dmol_logits"] = (nhwc(model.decoder.out_conv(px_z)), expected["posterior_mean_dmol_logits"])
    pairs["posterior_mean_distortion_per_pixel"] = (
        losses["distortion"],
        expected["posterior_mean_distortion_per_pixel"],
    )
    pairs["posterior_mean_rate_per_pixel"] = (losses["rate"], expected["posterior_mean_rate_per_pixel"])
    pairs["posterior_mean_elbo"] = (losses["elbo"].mean().reshape(1), expected["posterior_mean_elbo"])

    t = float(hparams["prior_temperature"])
    px_z, _ = model.decoder(n, x, eps=[e * t for e in _per_block(expected, "prior_eps_block")])
    pairs["prior_px_z"] = (px_z, expected["prior_px_z"])
    pairs["prior_dmol_logits"] = (nhwc(model.decoder.out_conv(px_z)), expected["prior_dmol_logits"])

    px_z, _ = model.decoder(n, x, z_given=_per_block(expected, "manual_z_block"))
    pairs["manual_dmol_logits"] = (nhwc(model.decoder.out_conv(px_z)), expected["manual_dmol_logits"])
    return pairs


def group_of(name: str) -> str:
    """'posterior_mean_kl_block3' -> 'posterior_mean_kl_block*'."""
    return name.rstrip("0123456789") + "*" if name[-1].isdigit() else name


def worst_errors(pairs: dict[str, tuple[Tensor, Tensor]]) -> dict[str, float]:
    """Worst absolute error per tensor group."""
    worst: dict[str, float] = {}
    for name, (ours, official) in pairs.items():
        err = (ours - official).abs().max().item()
        worst[group_of(name)] = max(worst.get(group_of(name), 0.0), err)
    return worst
