"""The training loop, VDVAE's recipe: AdamW (betas 0.9, 0.9), linear warmup, EMA,
gradient clipping, and the skip threshold (an update whose gradient norm is
above it, or whose loss is NaN, is skipped and counted).

A run directory holds ``latest/`` (raw weights + optimizer/RNG state, to
resume exactly), ``ema/`` (the weights to ship), ``best-ema/`` (the EMA weights
that scored the best validation PSNR-Y so far), ``log.csv`` and ``val.csv``.
Resuming continues step for step: the data is a pure function of the global
sample number (sr_train.data), and the torch RNG that draws the posterior
noise is saved with the optimizer.

Multi-GPU/CPU data parallelism: launch with ``torchrun --nproc_per_node K``;
each rank takes every K-th sample and DDP averages the gradients.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from sr_runtime.files import atomic_write_bytes, atomic_write_json

from .checkpoint import (
    CONFIG,
    WEIGHTS,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from .data import CropSampler, RandomCropDataset
from .model import VDVAESR, preset
from .runs import StopSignals, recover, step_checkpoint
from .vdvae_import import import_vdvae_weights

TRAIN_STATE = "train_state"
#: This many skipped updates in a row stop the run: its weights or data are broken, not unlucky.
MAX_SKIPS_IN_A_ROW = 50


class TrainingStopped(ValueError):
    """The run cannot go on (diverged weights, out of memory); its last checkpoint is kept as it was."""


@dataclass
class TrainConfig:
    data: str
    run_dir: str
    preset: str = "small-256"
    init_checkpoint: str | None = None  # start from these weights (ours)
    init_vdvae: str | None = None  # official VDVAE weights for HR encoder + decoder
    freeze_hr_encoder: bool = False
    freeze_lr_encoder: bool = False  # keep the prior's conditioning features as they are
    train_decoder_blocks: str | None = None  # e.g. "0-10,40" ; None = all
    objective: str = "elbo"  # "elbo" (VDVAE's loss) or "skip" (L1 of the LR skip: conditioning warm-up)
    kl_warmup_steps: int = 0  # the rate's weight ramps 0 -> 1 over these steps (against posterior collapse)
    free_bits: float = 0.0  # nats per latent channel and position that cost nothing (against posterior collapse)
    rate_weight: float = 1.0  # beta: the rate's weight in the loss (< 1 buys latents that carry more; 1 = the ELBO)
    prior_l1_weight: float = 0.0  # + this x L1 of the temperature-0 (prior mean) output: keeps t = 0 the best guess
    max_log_scale: float | None = None  # cap on the DMoL log-scales in the loss: residual texture must go through z
    init_transfer: str | None = None  # copy the encoders and skip upsampler of this checkpoint where shapes match
    init_grow: str | None = None  # every tensor of this checkpoint; the preset's added blocks start as identities
    posterior_init_log_std: float | None = None  # a new decoder's posteriors start this sure: z starts as a signal
    posterior_input: str | None = None  # a new model's HR encoder reads "hr" or "residual" (default: the preset's)
    head_init_std: float | None = None  # a new decoder's output conv ~ N(0, this): z reaches the output from step 0
    crop_size: int | None = None  # HR training crop (fully convolutional models; default: the preset's hr_size)
    scale_aug: tuple[float, float] | None = None  # HR photo downscaled by a random factor in [lo, hi] before cropping
    steps: int = 1000
    batch_size: int = 4  # per rank
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.9)
    ema_rate: float = 0.999
    grad_clip: float = 200.0
    skip_threshold: float = 1000.0
    seed: int = 0
    log_every: int = 10
    save_every: int = 100
    val_every: int = 250
    val_images: str | None = None
    val_temperature: float = 0.1
    num_workers: int = 0
    threads: int | None = None
    max_minutes: float | None = None  # stop (and save) after this wall time: time-boxed runs resume later
    device: str = "auto"  # auto (CUDA when present), cpu, cuda; under torchrun one GPU per rank
    precision: str = "fp32"  # fp32, bf16 or fp16 autocast (fp16 with a gradient scaler); the loss stays fp32


def check_config(cfg: TrainConfig) -> None:
    """Refuse values that would only fail later or silently ruin the run (NaN lr, negative clip, ...)."""

    def bounded(
        name: str, value: float | None, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
    ) -> None:
        if value is None:
            return
        ok = (
            math.isfinite(value)
            and (value > lo if lo_open else value >= lo)
            and (value < hi if hi_open else value <= hi)
        )
        if not ok:
            interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number in {interval}, got {value!r}")

    bounded("lr", cfg.lr, 0, 1, lo_open=True)
    bounded("grad_clip", cfg.grad_clip, 0, math.inf, lo_open=True, hi_open=True)
    bounded("skip_threshold", cfg.skip_threshold, 0, math.inf, lo_open=True, hi_open=True)
    bounded("ema_rate", cfg.ema_rate, 0, 1, hi_open=True)
    bounded("weight_decay", cfg.weight_decay, 0, 1)
    bounded("val_temperature", cfg.val_temperature, 0, 2)
    bounded("free_bits", cfg.free_bits, 0, 100)
    bounded("rate_weight", cfg.rate_weight, 0, 10, lo_open=True)
    bounded("prior_l1_weight", cfg.prior_l1_weight, 0, 1e6)
    bounded("max_log_scale", cfg.max_log_scale, -7, 0)
    bounded("posterior_init_log_std", cfg.posterior_init_log_std, -7, 0)
    bounded("head_init_std", cfg.head_init_std, 0, 1)
    for name in ("posterior_init_log_std", "head_init_std", "posterior_input"):
        for trained in ("init_checkpoint", "init_grow"):
            if getattr(cfg, name) is not None and getattr(cfg, trained):
                flag, source = ("--" + n.replace("_", "-") for n in (name, trained))
                raise ValueError(f"{flag} sets up a new model; {source} brings a trained one")
    if cfg.init_grow and (cfg.init_checkpoint or cfg.init_transfer or cfg.init_vdvae):
        raise ValueError("--init-grow brings every weight; it does not combine with the other --init-* flags")
    bounded("max_minutes", cfg.max_minutes, 0, math.inf, hi_open=True)
    for beta in cfg.adam_betas:
        bounded("adam_betas", beta, 0, 1, hi_open=True)
    for name in ("steps", "batch_size", "log_every", "save_every", "val_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.train_decoder_blocks is not None:
        parse_block_ranges(cfg.train_decoder_blocks, None)


# ---------------------------------------------------------------------------
# Optimizer/RNG state without pickle: tensors in safetensors, the rest in JSON
# ---------------------------------------------------------------------------


def save_train_state(root: Path, optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for idx, slots in state["state"].items():
        for name, value in slots.items():
            tensors[f"opt.{idx}.{name}"] = value.detach().cpu().contiguous()
    atomic_write_bytes(root / f"{TRAIN_STATE}.safetensors", save_tensors(tensors))
    body = {"param_groups": state["param_groups"], **meta}
    atomic_write_json(root / f"{TRAIN_STATE}.json", body)


def load_train_state(root: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the optimizer and RNG; ValueError naming the file when either file is damaged."""
    body_path, tensors_path = root / f"{TRAIN_STATE}.json", root / f"{TRAIN_STATE}.safetensors"
    try:
        body = json.loads(body_path.read_text())
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("step"), int)
            or not isinstance(body.get("skips"), int)
        ):
            raise ValueError("not an object with integer step and skips")  # noqa: TRY004 -- reported below
        param_groups = body.pop("param_groups")
    except (OSError, UnicodeDecodeError, ValueError, KeyError) as e:
        raise ValueError(f"{body_path}: damaged training state ({type(e).__name__}: {e})") from None
    try:
        tensors = load_file(str(tensors_path))
        slots: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, idx, name = key.split(".", 2)
                slots.setdefault(int(idx), {})[name] = value
        optimizer.load_state_dict({"state": slots, "param_groups": param_groups})
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
    except Exception as e:  # noqa: BLE001 -- safetensors, torch and a hostile file raise many kinds
        raise ValueError(f"{tensors_path}: damaged training state ({type(e).__name__}: {e})") from None
    return body


def check_run_dir(run: Path) -> bool:
    """Whether `run` holds a run to resume; ValueError for a partial one, which must not be overwritten.

    A run is `latest/` (weights + training state) and `ema/`. Any of their files
    without the rest means a damaged run: starting afresh would overwrite it.
    """
    if run.exists() and not run.is_dir():
        raise ValueError(f"--run-dir {run} is a file, not a directory")
    recover(run)
    parts = [
        run / "latest" / f"{TRAIN_STATE}.json",
        run / "latest" / f"{TRAIN_STATE}.safetensors",
        *(run / d / f for d in ("latest", "ema") for f in (CONFIG, WEIGHTS)),
    ]
    present = [p for p in parts if p.exists()]
    if present and len(present) < len(parts):
        missing = ", ".join(str(p.relative_to(run)) for p in parts if not p.exists())
        raise ValueError(
            f"{run} holds part of a training run but lacks {missing}: refusing to resume or to "
            "overwrite it (start from its weights with --init-checkpoint and a new --run-dir)"
        )
    return bool(present)


# ---------------------------------------------------------------------------
# Model set-up: init, transfer learning, freezing
# ---------------------------------------------------------------------------


def parse_block_ranges(spec: str, count: int | None) -> set[int]:
    """'0-3,7' -> {0, 1, 2, 3, 7}; ValueError for bad syntax or, given the model's `count`, a block past it."""
    out: set[int] = set()
    for part in filter(None, spec.split(",")):
        lo_text, _, hi_text = part.partition("-")
        try:
            lo, hi = int(lo_text), int(hi_text or lo_text)
        except ValueError:
            raise ValueError(f"--train-decoder-blocks {spec!r}: {part!r} is not N or N-M") from None
        if not 0 <= lo <= hi or (count is not None and hi >= count) or hi > 100_000:
            top = "a model's block count" if count is None else f"{count - 1} (this model has {count} blocks)"
            raise ValueError(f"--train-decoder-blocks {spec!r}: {part!r} is not a range from 0 to {top}")
        out.update(range(lo, hi + 1))
    return out


def build_model(cfg: TrainConfig) -> VDVAESR:
    """A new run's starting weights (preset, our checkpoint, official VDVAE), recipe's freezing applied."""
    if cfg.init_checkpoint:
        model, _ = load_checkpoint(cfg.init_checkpoint)
        model.train()
    else:
        torch.manual_seed(cfg.seed)
        overrides = {} if cfg.posterior_input is None else {"posterior_input": cfg.posterior_input}
        model = VDVAESR(preset(cfg.preset, **overrides))
    if cfg.init_vdvae:
        import_vdvae_weights(model, cfg.init_vdvae)
    if cfg.init_transfer:
        transfer_weights(model, cfg.init_transfer)
    if cfg.init_grow:
        grow_from(model, cfg.init_grow)
    if cfg.posterior_init_log_std is not None:
        init_posterior_log_std(model, cfg.posterior_init_log_std)
    if cfg.head_init_std is not None:
        with torch.no_grad():
            # An LR-skip model's head starts at std 1e-3 so that it outputs the skip alone; then
            # z reaches the output only through a product of two near-zero weights (z_proj and
            # this), and the decoder learns to ignore z before that product can grow.
            model.decoder.out_conv.weight.normal_(0.0, cfg.head_init_std)
    apply_freezing(model, cfg)
    return model


def init_posterior_log_std(model: VDVAESR, log_std: float) -> None:
    """Start every posterior at log-std ``log_std`` (its last conv's log-std half: zero weights, that bias).

    A fresh posterior has std ~1: its z is mostly noise, and the decoder learns to
    ignore the latents (fastest at the HR levels, where nothing averages the noise
    out) before the posterior learns to say anything. Started sure, z is a signal
    of the HR image from the first step and the KL term widens it where it is not
    worth its cost.
    """
    with torch.no_grad():
        for block in model.decoder.blocks():
            last = block.posterior.c4
            zdim = block.zdim
            last.weight[zdim:].zero_()
            if last.bias is None:
                raise ValueError(f"--posterior-init-log-std: the posterior at {block.res} has no bias to set")
            last.bias[zdim:].fill_(log_std)


TRANSFERABLE = ("lr_encoder.", "hr_encoder.", "skip_upsampler.")


def transfer_weights(model: VDVAESR, checkpoint: str) -> None:
    """Start a new architecture from another checkpoint's encoders and skip upsampler.

    Encoder blocks are addressed by position in the layer string, so a preset whose
    encoder strings are a prefix of the source's takes those blocks as they are.
    Every other tensor keeps its fresh initialisation; the counts are printed.
    """
    source, _ = load_checkpoint(checkpoint)
    src = source.state_dict()
    own = model.state_dict()
    taken = {k: v for k, v in src.items() if k.startswith(TRANSFERABLE) and k in own and own[k].shape == v.shape}
    if not taken:
        raise ValueError(f"--init-transfer {checkpoint}: no encoder or skip-upsampler tensor matches this preset")
    model.load_state_dict(taken, strict=False)
    left = [k for k in own if k.startswith(TRANSFERABLE) and k not in taken]
    print(f"init-transfer: {len(taken)} tensors from {checkpoint}; {len(left)} encoder/upsampler tensors kept fresh")


GROWABLE = frozenset({"name", "skip_upsampler_blocks"})


def grow_from(model: VDVAESR, checkpoint: str) -> None:
    """Start a grown model (e.g. fc-256-deep) from a trained smaller one (fc-256) it extends.

    Every tensor of the checkpoint must exist in the new model with its shape, and the
    configs may differ only in what adds blocks that start as identities; so the grown
    model computes exactly what the checkpoint did, and training goes on from there.
    """
    source, _ = load_checkpoint(checkpoint)
    old, new = asdict(source.config), asdict(model.config)
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in GROWABLE)
    if differ:
        detail = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in differ)
        raise ValueError(f"--init-grow {checkpoint}: configs differ beyond added blocks ({detail})")
    own, theirs = model.state_dict(), source.state_dict()
    bad = [k for k, v in theirs.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise ValueError(f"--init-grow {checkpoint}: {len(bad)} tensors have no place in this preset, e.g. {bad[0]}")
    model.load_state_dict(theirs, strict=False)
    added = len(own) - len(theirs)
    print(f"init-grow: every tensor of {checkpoint}; {added} added tensors start as identities")


def apply_freezing(model: VDVAESR, cfg: TrainConfig) -> None:
    """Which parameters train is part of the recipe, not of the weights: applied on start and on resume."""
    if cfg.freeze_hr_encoder:
        model.hr_encoder.requires_grad_(False)
    if cfg.freeze_lr_encoder:
        model.lr_encoder.requires_grad_(False)
    if cfg.train_decoder_blocks is not None:
        chosen = parse_block_ranges(cfg.train_decoder_blocks, len(model.decoder.dec_blocks))
        for i, block in enumerate(model.decoder.dec_blocks):
            if i not in chosen:
                for name, p in block.named_parameters():
                    p.requires_grad_(name == "lr_gate")  # the SR gates always learn
    # The 1x1 bias is VDVAE's unconditional start; in SR the LR encoder replaces it.
    if "1" in model.decoder.bias_xs:
        model.decoder.bias_xs["1"].requires_grad_(False)
    if cfg.objective == "skip":  # only the LR encoder and the upsampler feed the skip
        for name, p in model.named_parameters():
            trains = ("skip_upsampler.",) if cfg.freeze_lr_encoder else ("lr_encoder.", "skip_upsampler.")
            p.requires_grad_(name.startswith(trains))


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


def distributed_env(device: torch.device) -> tuple[int, int]:
    """(rank, world_size), initialising the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(requested: str) -> torch.device:
    """'auto' -> CUDA when present; under torchrun each rank takes the GPU of its LOCAL_RANK."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {requested!r}")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: this torch build or machine has no CUDA GPU")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # fixed crop size: the autotuned kernels are reused every step
    return device


def kl_weight(step: int, cfg: TrainConfig) -> float:
    """The optimised loss is distortion + w * rate: w is --rate-weight, ramped up from 0 over the KL
    warm-up steps (the logged ELBO keeps w = 1)."""
    ramp = min(1.0, (step + 1) / cfg.kl_warmup_steps) if cfg.kl_warmup_steps > 0 else 1.0
    return cfg.rate_weight * ramp


def lr_at(step: int, cfg: TrainConfig) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, rate: float) -> None:
    for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
        pe.mul_(rate).add_(p.detach(), alpha=1 - rate)


def append_csv(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def validate(ema: VDVAESR, images: dict[str, Any], temperature: float, seed: int) -> dict[str, float]:
    """PSNR/SSIM-Y of the EMA model on the evaluation protocol's crops (docs/design.md)."""
    from .evaluate import evaluate_model, model_sample_fn

    result = evaluate_model(model_sample_fn(ema), images, ema.config.hr_size, [temperature], seed)
    row = result["model"][0]
    return {"psnr_y": row["psnr_y"], "ssim_y": row["ssim_y"], "bicubic_psnr_y": result["bicubic"]["psnr_y"]}


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns the final step, skips, last losses and the signal that stopped it.

    SIGTERM/SIGINT stop it at the next step with a checkpoint; a diverged run or
    an allocation failure is a `TrainingStopped` and saves nothing.
    """
    check_config(cfg)
    with StopSignals() as signals, memory_errors(cfg), ExitStack() as cleanup:
        return _train(cfg, signals, cleanup)


def _train(cfg: TrainConfig, signals: StopSignals, cleanup: ExitStack) -> dict[str, Any]:
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    device = pick_device(cfg.device)
    rank, world = distributed_env(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Path(cfg.run_dir)
    latest, ema_dir = run / "latest", run / "ema"
    resuming = check_run_dir(run)
    if resuming:
        model = load_checkpoint(latest)[0].train()
        apply_freezing(model, cfg)
    else:
        model = build_model(cfg)
    ema = load_checkpoint(ema_dir)[0] if resuming else copy.deepcopy(model)
    model.to(device)
    ema.to(device).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    step, skips = 0, 0
    if resuming:
        meta = load_train_state(latest, optimizer)
        step, skips = meta["step"], meta["skips"]
        steps_saved = {read_checkpoint_meta(d)["step"] for d in (latest, ema_dir)}
        if steps_saved != {step}:
            raise ValueError(
                f"{run}: latest/, ema/ and the optimizer state disagree on the step ({steps_saved}, {step})"
            )
    else:
        torch.manual_seed(cfg.seed + rank)
    # The skip objective leaves the LR encoder's coarse blocks out of the loss.
    net: nn.Module = (
        nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=cfg.objective == "skip",
        )
        if world > 1
        else model
    )
    low_precision = PRECISIONS[cfg.precision] if cfg.precision != "fp32" else None
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    if cfg.crop_size is not None and not model.config.fully_convolutional and cfg.crop_size != model.config.hr_size:
        raise ValueError(f"--crop-size: {model.config.name} is fixed-size ({model.config.hr_size}px crops only)")
    dataset = RandomCropDataset(
        cfg.data, hr_size=cfg.crop_size or model.config.hr_size, seed=cfg.seed, scale_range=cfg.scale_aug
    )
    sampler = CropSampler(start=step * cfg.batch_size * world, rank=rank, world_size=world)
    # Its own generator: a DataLoader otherwise draws from the global RNG, which resuming restores.
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
        pin_memory=device.type == "cuda",
    )
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run / "train_config.json", asdict(cfg))

    saved = -1

    def checkpoint() -> None:
        nonlocal saved
        if rank == 0 and saved != step:
            if not (weights_finite(list(model.parameters())) and weights_finite(list(ema.parameters()))):
                raise TrainingStopped(
                    f"the weights at step {step} are not finite; not saved, {run} keeps its last checkpoint"
                )
            with step_checkpoint(run, step) as stage:
                save_checkpoint(stage / ema_dir.name, ema, step=step, ema=True)
                save_checkpoint(stage / latest.name, model, step=step)
                save_train_state(stage / latest.name, optimizer, {"step": step, "skips": skips})
        saved = step

    val_images = None
    if rank == 0 and cfg.val_images:
        from .evaluate import load_images

        val_images = load_images(cfg.val_images)
    bar = cleanup.enter_context(
        tqdm(total=cfg.steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    )  # closed before an error is printed
    last: dict[str, float] = {}
    data = iter(loader)  # CropSampler is endless
    t0 = time.time()
    in_row, stopped_by = 0, None
    while step < cfg.steps:
        timed_out = cfg.max_minutes is not None and time.time() - t0 > cfg.max_minutes * 60
        if any_rank(timed_out or signals.signum is not None, world, device):
            why = f"--max-minutes {cfg.max_minutes} reached" if timed_out else "stop requested (signal)"
            bar.write(f"stopping at step {step}: {why}; saving")
            checkpoint()
            stopped_by = signals.signum
            break
        batch = next(data)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        hr, lr = (batch[k].to(device, non_blocking=True) for k in ("hr", "lr"))
        with torch.autocast(device.type, dtype=low_precision or torch.float32, enabled=low_precision is not None):
            out = net(
                hr,
                lr,
                objective=cfg.objective,
                free_bits=cfg.free_bits,
                prior_l1=cfg.prior_l1_weight > 0,
                max_log_scale=cfg.max_log_scale,
            )
        beta = kl_weight(step, cfg)
        if cfg.objective == "skip":
            loss = out["loss"].mean()
        else:
            loss = (out["distortion"] + beta * out.pop("rate_objective")).mean()
            if cfg.prior_l1_weight > 0:
                loss = loss + cfg.prior_l1_weight * out["prior_l1"].mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        finite = math.isfinite(loss.item()) and math.isfinite(grad_norm)
        if finite and grad_norm < cfg.skip_threshold:
            scaler.step(optimizer)
            if not weights_finite(params):
                raise TrainingStopped(
                    f"the update of step {step + 1} made the weights non-finite or huge (lr "
                    f"{lr_at(step, cfg):g}); stopped without saving, {run} keeps its last "
                    "checkpoint"
                )
            update_ema(ema, model, cfg.ema_rate)
            in_row = 0
        else:
            skips, in_row = skips + 1, in_row + 1
            if in_row >= MAX_SKIPS_IN_A_ROW:
                raise TrainingStopped(
                    f"{in_row} updates in a row skipped (non-finite loss or gradient norm >= "
                    f"--skip-threshold; last {grad_norm:g}) at step {step + 1}; stopped, "
                    f"{run} keeps its last checkpoint"
                )
        scaler.update()
        step += 1
        last = {name: value.mean().item() for name, value in out.items()} | {"grad_norm": grad_norm}
        if cfg.objective == "elbo" and (cfg.kl_warmup_steps or cfg.rate_weight != 1.0):
            last["kl_weight"] = beta
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in last.items()} | {"skips": skips})
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
            append_csv(
                run / "log.csv",
                {
                    "step": step,
                    **last,
                    "skips": skips,
                    "lr": lr_at(step - 1, cfg),
                    "seconds": round(time.time() - t0, 1),
                },
            )
        if step % cfg.save_every == 0 or step == cfg.steps:
            checkpoint()
        if val_images and (step % cfg.val_every == 0 or step == cfg.steps):
            scores = validate(ema, val_images, cfg.val_temperature, cfg.seed)
            append_csv(run / "val.csv", {"step": step, "temperature": cfg.val_temperature, **scores})
            keep_if_best(run / BEST_EMA, ema, step, scores["psnr_y"], cfg.val_temperature)
            bar.write(
                f"step {step}: EMA PSNR-Y {scores['psnr_y']:.2f} dB (bicubic {scores['bicubic_psnr_y']:.2f}),"
                f" SSIM-Y {scores['ssim_y']:.4f}"
            )
    bar.close()
    if world > 1:
        dist.barrier()
    return {"step": step, "skips": skips, **last, "signal": stopped_by}


BEST_EMA = "best-ema"


def keep_if_best(path: Path, ema: VDVAESR, step: int, psnr_y: float, temperature: float) -> bool:
    """Save the EMA to ``path`` when its validation PSNR-Y beats the one saved there (at this temperature).

    A longer run can lose t = 0 quality that an earlier step had (e.g. as the rate
    weight rises); this keeps that step's weights. Written beside and swapped in, so
    a kill leaves the previous best or the new one.
    """
    if not math.isfinite(psnr_y):
        return False
    if (path / CONFIG).is_file():
        meta = read_checkpoint_meta(path)
        if meta.get("val_temperature") == temperature and meta.get("val_psnr_y", -math.inf) >= psnr_y:
            return False
    staging, old = path.with_name(path.name + ".staging"), path.with_name(path.name + ".old")
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    save_checkpoint(staging, ema, step=step, ema=True, extra={"val_psnr_y": psnr_y, "val_temperature": temperature})
    if path.exists():
        path.rename(old)
    staging.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return True


def weights_finite(params: Sequence[Tensor]) -> bool:
    """False when a weight is NaN/Inf or so large that a tensor's norm overflows (an exploded update)."""
    if not params:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm([p.detach() for p in params]))).all())


def any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """True on every rank when it is on any: ranks must stop at the same step or DDP waits forever."""
    if world == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


@contextmanager
def memory_errors(cfg: TrainConfig) -> Iterator[None]:
    """An allocation failure becomes one line naming --batch-size, not an allocator traceback."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        reason = str(e).strip().splitlines()[0][:200]
        raise TrainingStopped(
            f"out of memory ({reason}); --batch-size {cfg.batch_size} may be too large for this machine"
        ) from None
