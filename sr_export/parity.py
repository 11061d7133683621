"""ONNX Runtime vs PyTorch on identical inputs and noise (docs/design.md, Export contract).

The deterministic head takes an argmax over the mixture logits; where the top
two logits of a pixel nearly tie, float reordering in another runtime may pick
the other component and move that pixel a lot. So besides the max error over
all pixels we count such near-tie pixels and report the max error on the rest,
instead of hiding the effect behind a loose tolerance.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from sr_train.model import VDVAESR

# |top1 - top2| mixture logit gap below which the argmax counts as a near-tie.
TIE_GAP = 1e-4


@dataclass(frozen=True)
class ParityCase:
    """One (temperature, batch) comparison on the [0, 1] output."""

    temperature: float
    batch: int
    max_abs_err: float
    mean_abs_err: float
    near_tie_pixels: int
    max_abs_err_non_tie: float
    pixels: int
    shape: tuple[int, int] | None = None  # LR (h, w) where the graph takes any size

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.shape is None:
            del out["shape"]  # fixed-size graphs: their manifest stays as it was
        return out


def cpu_session(path: str | Path, optimize: bool = True) -> ort.InferenceSession:
    """ORT CPU session; ``optimize=False`` keeps every node as written (no fusions)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _sample_with_ties(
    model: VDVAESR, lr: torch.Tensor, noise: torch.Tensor | list[torch.Tensor] | None
) -> tuple[np.ndarray, np.ndarray]:
    """(model.sample output, [N,H,W] mask of pixels whose top two mixture logits are within TIE_GAP).

    The logits are caught with a hook on the head's conv, so the tie test sees
    exactly the values the argmax in ``sample`` saw.
    """
    caught: list[torch.Tensor] = []
    hook = model.decoder.out_conv.register_forward_hook(lambda _m, _i, out: caught.append(out))
    try:
        hr = model.sample(lr, noise).numpy()
    finally:
        hook.remove()
    logit_probs = caught[-1][:, : model.config.num_mixtures]
    if logit_probs.shape[1] < 2:
        return hr, np.zeros((lr.shape[0], *logit_probs.shape[2:]), dtype=bool)
    top2 = logit_probs.topk(2, dim=1).values
    return hr, ((top2[:, 0] - top2[:, 1]) < TIE_GAP).numpy()


@torch.no_grad()
def compare(
    model: VDVAESR,
    session: ort.InferenceSession,
    lr: np.ndarray,
    temperature: float,
    seed: int = 0,
) -> ParityCase:
    """Run both on ``lr`` with seeded noise x ``temperature`` and measure the output difference."""
    model = model.eval()
    noise = model.make_noise(lr.shape[0], temperature, seed).numpy().astype(np.float32)
    lr_t, noise_t = torch.from_numpy(lr), torch.from_numpy(noise)
    ref, ties = _sample_with_ties(model, lr_t, noise_t)
    out = session.run(["hr"], {"lr": lr, "noise": noise})[0]
    err = np.abs(out.astype(np.float64) - ref.astype(np.float64)).max(axis=1)  # per pixel, over RGB
    return ParityCase(
        temperature=float(temperature),
        batch=int(lr.shape[0]),
        max_abs_err=float(err.max()),
        mean_abs_err=float(err.mean()),
        near_tie_pixels=int(ties.sum()),
        max_abs_err_non_tie=float(err[~ties].max()) if (~ties).any() else 0.0,
        pixels=int(err.size),
    )


def parity_suite(
    model: VDVAESR,
    onnx_path: str | Path,
    lr_images: np.ndarray,
    temperatures: Iterable[float] = (0.0, 0.8),
    batches: Iterable[int] = (1, 3),
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[ParityCase]:
    """Every (temperature, batch) pair on the first ``batch`` images of ``lr_images`` [M,3,h,w]."""
    session = cpu_session(onnx_path)
    pairs = [(t, b) for t in temperatures for b in batches]
    cases = []
    started = time.perf_counter()
    for k, (t, b) in enumerate(pairs):
        if b > lr_images.shape[0]:
            raise ValueError(f"parity batch {b} needs {b} LR images, got {lr_images.shape[0]}")
        cases.append(compare(model, session, np.ascontiguousarray(lr_images[:b]), t, seed))
        if log is not None:
            log(f"      parity case {k + 1}/{len(pairs)} (t={t:g}, batch {b}), {time.perf_counter() - started:.0f} s")
    return cases


def parity_summary(cases: list[ParityCase]) -> dict[str, Any]:
    """The manifest's ``checks.parity_max_abs_err``: one entry per case plus the overall max."""
    out: dict[str, Any] = {f"t{c.temperature:g}_b{c.batch}": c.max_abs_err for c in cases}
    out["max"] = max(c.max_abs_err for c in cases)
    out["near_tie_pixels"] = sum(c.near_tie_pixels for c in cases)
    out["max_non_tie"] = max(c.max_abs_err_non_tie for c in cases)
    return out


def level_feeds(model: VDVAESR, n: int, lr_hw: tuple[int, int], temperature: float, seed: int) -> dict[str, np.ndarray]:
    """A fully convolutional model's noise inputs by name: the runtime's position-keyed maps x temperature."""
    levels = model.make_level_noise(n, lr_hw, temperature, seed)
    return {
        f"noise_{res}": np.ascontiguousarray(t.numpy(), np.float32)
        for (res, _), t in zip(model.noise_levels, levels, strict=True)
    }


@torch.no_grad()
def compare_frame(
    model: VDVAESR, session: ort.InferenceSession, lr: np.ndarray, temperature: float, seed: int = 0
) -> ParityCase:
    """``compare`` for a fully convolutional graph at ``lr``'s own size.

    A graph without noise inputs is the deterministic one (torch: ``noise=None``);
    otherwise both sides read the same per-level maps.
    """
    model = model.eval()
    names = {i.name for i in session.get_inputs()}
    feed: dict[str, np.ndarray] = {"lr": lr}
    noise: list[torch.Tensor] | None = None
    if names != {"lr"}:
        feed.update(level_feeds(model, lr.shape[0], (lr.shape[2], lr.shape[3]), temperature, seed))
        noise = [torch.from_numpy(feed[f"noise_{res}"]) for res, _ in model.noise_levels]
    elif temperature != 0:
        raise ValueError("the deterministic graph has no noise inputs: compare it at temperature 0")
    ref, ties = _sample_with_ties(model, torch.from_numpy(lr), noise)
    out = session.run(["hr"], feed)[0]
    err = np.abs(out.astype(np.float64) - ref.astype(np.float64)).max(axis=1)
    return ParityCase(
        temperature=float(temperature),
        batch=int(lr.shape[0]),
        max_abs_err=float(err.max()),
        mean_abs_err=float(err.mean()),
        near_tie_pixels=int(ties.sum()),
        max_abs_err_non_tie=float(err[~ties].max()) if (~ties).any() else 0.0,
        pixels=int(err.size),
        shape=(int(lr.shape[2]), int(lr.shape[3])),
    )
