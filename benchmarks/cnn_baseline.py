"""``python -m benchmarks.cnn_baseline``: a plain x4 CNN trained for a fixed wall time.

The yardstick for "what did VDVAE-SR's training add": ESPCN-style (Shi et al.
2016) with the same tricks as our LR skip (bicubic residual, pixel shuffle),
4 convolutions at the LR resolution, L1 loss, AdamW, trained on the same crops
(``sr_train.data.RandomCropDataset``) for the same minutes and threads as a
VDVAE-SR run, then scored with the same protocol (``evaluate_model``; docs/design.md,
Evaluation protocol).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.report import write_result
from sr_train.data import RandomCropDataset
from sr_train.evaluate import SampleFn, evaluate_model, load_images


class PlainCNN(nn.Module):
    """conv5x5(64) -> conv3x3(64) -> conv3x3(32) -> conv3x3(3*16) -> pixel shuffle, plus bicubic."""

    def __init__(self, scale: int = 4) -> None:
        super().__init__()
        self.scale = scale
        self.body = nn.Sequential(
            nn.Conv2d(3, 64, 5, padding=2),
            nn.GELU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(64, 32, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 3 * scale * scale, 3, padding=1),
        )
        last = self.body[-1]
        assert isinstance(last, nn.Conv2d) and last.bias is not None
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, lr: Tensor) -> Tensor:
        base = F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return base + F.pixel_shuffle(self.body(lr - 0.5), self.scale)


def train_for(model: PlainCNN, data: str, seconds: float, batch_size: int, lr: float, seed: int) -> dict[str, Any]:
    dataset = RandomCropDataset(data, hr_size=256, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99))
    step, start, last_loss = 0, time.time(), float("nan")
    while time.time() - start < seconds:
        items = [dataset[step * batch_size + i] for i in range(batch_size)]
        hr = torch.stack([b["hr"] for b in items])
        lr_img = torch.stack([b["lr"] for b in items])
        loss = (model(lr_img) - hr).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        last_loss = float(loss)
    return {"steps": step, "seconds": round(time.time() - start, 1), "last_loss": last_loss}


def sample_fn(model: PlainCNN) -> SampleFn:
    def sample(lr: np.ndarray, temperature: float, seed: int) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(lr)).permute(0, 3, 1, 2).float().div(255.0)
        with torch.no_grad():
            y = model(x)
        return y.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    return sample


def markdown(result: dict[str, Any]) -> str:
    """The result as the markdown table committed beside its JSON."""
    return (
        f"# Plain CNN baseline, {result['minutes']:g} min on {result['threads']} CPU thread(s), {result['date']}\n\n"
        f"{result['model']}, {result['params']:,} parameters, batch {result['batch_size']}, "
        f"{result['steps']:,} steps in {result['seconds']:.0f} s; validation photos, "
        "evaluation protocol of docs/design.md.\n\n"
        "| method | PSNR-Y (dB) | SSIM-Y | ΔPSNR-Y vs bicubic |\n|---|---|---|---|\n"
        f"| bicubic | {result['bicubic_psnr_y']:.2f} | {result['bicubic_ssim_y']:.4f} |  |\n"
        f"| plain CNN | {result['psnr_y']:.2f} | {result['ssim_y']:.4f} | {result['delta_psnr_y']:+.2f} |\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cnn_baseline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/photos/train")
    parser.add_argument("--val", default="data/photos/val")
    parser.add_argument("--minutes", type=float, default=10.0, help="wall time to train (default 10)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the result JSON here (and markdown beside it, .md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = PlainCNN()
    run = train_for(model, args.data, args.minutes * 60, args.batch_size, args.lr, args.seed)
    model.eval()
    scores = evaluate_model(sample_fn(model), load_images(args.val), 256, [0.0], args.seed)
    result = {
        "date": dt.date.today().isoformat(),
        "model": "PlainCNN (ESPCN-style, bicubic residual, L1)",
        "params": sum(p.numel() for p in model.parameters()),
        "minutes": args.minutes,
        "threads": args.threads,
        "batch_size": args.batch_size,
        **run,
        "bicubic_psnr_y": scores["bicubic"]["psnr_y"],
        "bicubic_ssim_y": scores["bicubic"]["ssim_y"],
        "psnr_y": scores["model"][0]["psnr_y"],
        "ssim_y": scores["model"][0]["ssim_y"],
    }
    result["delta_psnr_y"] = result["psnr_y"] - result["bicubic_psnr_y"]
    print(json.dumps(result, indent=1))
    if args.out:
        write_result(Path(args.out), result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
