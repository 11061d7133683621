"""Does the decoder read its latents? Evidence for one checkpoint, on validation crops.

For each latent level it swaps the posterior's z (what training decodes) for the
prior mean's (what temperature 0 decodes) and reports the change in distortion
(DMoL NLL, nats per image dimension): a level the decoder reads costs nats when
swapped; a level it ignores costs nothing, whatever its KL says. It also
reports the distortion with the whole decoder state zeroed (what the decoder
adds over the LR skip at all) and the scale of the head's weights that turn the
state into the likelihood's means, scales and mixture logits.

Usage: python scripts/diagnose_latents.py CHECKPOINT [--images data/photos/val] [--n 8] [--crop 128]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sr_train.checkpoint import load_checkpoint
from sr_train.model import dmol_nll


def centre_crops(folder: Path, n: int, crop: int) -> torch.Tensor:
    """The first n images' centre crops, [n, 3, crop, crop] in [0, 1]."""
    out = []
    for path in sorted(folder.glob("*.png"))[:n]:
        with Image.open(path) as im:
            a = np.array(im.convert("RGB"))
        h, w = a.shape[:2]
        a = a[(h - crop) // 2 : (h + crop) // 2, (w - crop) // 2 : (w + crop) // 2]
        out.append(torch.from_numpy(a).permute(2, 0, 1).float() / 255.0)
    if not out:
        raise SystemExit(f"no .png images in {folder}")
    return torch.stack(out)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--images", default="data/photos/val")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--crop", type=int, default=128)
    args = p.parse_args()
    torch.manual_seed(0)
    model, _ = load_checkpoint(args.checkpoint)
    model.eval()
    hr = centre_crops(Path(args.images), args.n, args.crop)
    lr = F.interpolate(hr, scale_factor=0.25, mode="bicubic", antialias=True).clamp(0, 1)
    n, hw, mix = hr.shape[0], (hr.shape[2], hr.shape[3]), model.config.num_mixtures
    target = hr * 2 - 1
    lr_acts = model.lr_encoder(model.encoder_input(lr))
    base = model.mean_base(lr, lr_acts)
    zeros = [torch.zeros(n, c, h, w) for c, h, w in model.latent_shapes_for(hw)]
    px, stats = model.posterior_pass(hr, lr, eps=zeros, lr_acts=lr_acts)  # posterior means

    def nll(state: torch.Tensor) -> float:
        return float(dmol_nll(target, model.decoder.out_conv(state), mix, False, base).mean())

    posterior_z = [s["z"] for s in stats]
    _, prior_stats = model.decoder(n, hr, lr_acts=lr_acts, hr_hw=hw)
    prior_z = [s["z"] for s in prior_stats]
    with_posterior = nll(px)
    print(f"{args.checkpoint}: {n} crops of {args.crop}")
    print(f"distortion, posterior-mean z everywhere: {with_posterior:.4f}")
    print(f"distortion, prior-mean z everywhere (t = 0): {nll(model.decoder(n, hr, lr_acts=lr_acts, hr_hw=hw)[0]):.4f}")
    print(f"distortion, decoder state zeroed (the LR skip alone): {nll(torch.zeros_like(px)):.4f}")
    print("level  res  KL (nats/dim)  distortion change when this level's z is the prior mean")
    ndims = hr[0].numel()
    for i, block in enumerate(model.decoder.blocks()):
        zs = [prior_z[j] if j == i else posterior_z[j] for j in range(len(posterior_z))]
        swapped, _ = model.decoder(n, hr, lr_acts=lr_acts, z_given=zs, hr_hw=hw)
        kl = float(stats[i]["kl"].sum(dim=(1, 2, 3)).mean()) / ndims
        print(f"{i:5d} {block.res:4d}  {kl:13.4f}  {nll(swapped) - with_posterior:+.4f}")
    weight = model.decoder.out_conv.weight.flatten(1)
    rest = weight[mix:].reshape(3, 3, mix, -1)
    means, log_scales, coeffs = (float(rest[:, k].abs().mean()) for k in range(3))
    logits = float(weight[:mix].abs().mean())
    print(
        f"head |weight| means {means:.4f}, log-scales {log_scales:.4f}, "
        f"channel coefficients {coeffs:.4f}, mixture logits {logits:.4f}"
    )


if __name__ == "__main__":
    main()
