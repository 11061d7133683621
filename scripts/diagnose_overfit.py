"""Can a recipe overfit one crop, and where do its gradients go?

Trains a fresh model of ``--preset`` (or ``--checkpoint``) on the single most
detailed crop among the first 40 training crops (lowest Pillow-bicubic PSNR-Y)
and prints, every ``--every`` steps: ELBO terms, the temperature-0 PSNR-Y on
that crop, and the gradient norm of each component. A recipe that can learn
x4 detail must at least memorise one crop: its PSNR rises well above bicubic.

Usage: ``.venv/bin/python scripts/diagnose_overfit.py --preset small-256
[--set KEY=VALUE ...] [--steps 300] [--every 25] [--data data/photos/train]``.
The first small-256 recipe (bicubic skip only, mode head, 4 LR blocks at
64x64; CHANGELOG.md says what it showed)::

    --set skip_upsampler_width=0 --set head_statistic=mode \
    --set lr_enc_blocks=64x4,64d2,32x2,32d2,16x2,16d4,4x2,4d4,1x1
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from PIL import Image

from sr_train.checkpoint import load_checkpoint
from sr_train.data import RandomCropDataset
from sr_train.metrics import psnr_y
from sr_train.model import VDVAESR, preset


def to_u8(t: torch.Tensor) -> np.ndarray:
    return (t.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()


def grad_norm(params: list[torch.nn.Parameter]) -> float:
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--preset", default="small-256")
    src.add_argument("--checkpoint")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset field (ints and strings), e.g. head_statistic=mode",
    )
    parser.add_argument("--objective", choices=["elbo", "skip"], default="elbo")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--data", default="data/photos/train")
    args = parser.parse_args()

    data = RandomCropDataset(args.data, 256, seed=0)
    crops = [data[i] for i in range(40)]
    bicubic_psnr = []
    for c in crops:
        up = np.asarray(Image.fromarray(to_u8(c["lr"])).resize((256, 256), Image.Resampling.BICUBIC))
        bicubic_psnr.append(psnr_y(up, to_u8(c["hr"])))
    pick = int(np.argmin(bicubic_psnr))
    hr, lr = crops[pick]["hr"][None], crops[pick]["lr"][None]
    print(f"crop {pick}: Pillow bicubic PSNR-Y {bicubic_psnr[pick]:.2f} dB")

    torch.manual_seed(0)
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint)[0].train()
    else:
        overrides = dict(item.split("=", 1) for item in args.set)
        model = VDVAESR(preset(args.preset, **{k: int(v) if v.isdigit() else v for k, v in overrides.items()}))
    groups = {
        "hr_encoder": list(model.hr_encoder.parameters()),
        "lr_encoder": list(model.lr_encoder.parameters()),
        "decoder": [
            p for n, p in model.decoder.named_parameters() if not n.startswith("out_conv") and "lr_gate" not in n
        ],
        "gates": [p for n, p in model.decoder.named_parameters() if "lr_gate" in n],
        "head": list(model.decoder.out_conv.parameters()),
    }
    if model.skip_upsampler is not None:
        groups["upsampler"] = list(model.skip_upsampler.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.9))
    for step in range(args.steps + 1):
        out = model(hr, lr, objective=args.objective)
        loss = out["loss" if args.objective == "skip" else "elbo"].mean()
        opt.zero_grad()
        loss.backward()
        if step % args.every == 0:
            model.eval()
            with torch.no_grad():
                sr = model.sample(lr, torch.zeros(1, model.noise_dim))
            model.train()
            terms = " ".join(f"{k} {v.mean().item():.4f}" for k, v in out.items())
            grads = " ".join(f"{k}={grad_norm(p):.3g}" for k, p in groups.items())
            print(f"step {step:4d} {terms} psnr_t0 {psnr_y(to_u8(sr[0]), to_u8(hr[0])):.2f} | grad {grads}", flush=True)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 200.0)
        opt.step()


if __name__ == "__main__":
    main()
