"""A tiny real training run: the loss goes down, a resumed run matches an uninterrupted one
step for step, and a 2-process DDP run (gloo, CPU) completes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sr_train.checkpoint import load_checkpoint, save_checkpoint
from sr_train.model import VDVAESR, VDVAESRConfig, preset
from sr_train.train import TrainConfig, train

TINY = VDVAESRConfig(
    name="tiny-32",
    hr_size=32,
    lr_size=8,
    width=8,
    zdim=2,
    num_mixtures=2,
    lr_skip=True,
    enc_blocks="32x1,32d2,16x1,16d2,8x1,8d2,4x1,4d4,1x1",
    dec_blocks="1x1,4m1,8m4,16m8,32m16",
    lr_enc_blocks="8x1,8d2,4x1,4d4,1x1",
)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photos (scikit-image's samples), downscaled so 32px crops hold structure."""
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(data, name)()).reduce(4).save(root / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("init") / "tiny"
    save_checkpoint(path, VDVAESR(TINY))
    return path


def config(photos, init, run_dir, steps, **kw):
    return TrainConfig(
        data=str(photos),
        run_dir=str(run_dir),
        init_checkpoint=str(init),
        steps=steps,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        log_every=1,
        save_every=3,
        threads=1,
        **kw,
    )


def read_log(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "log.csv") as f:
        return list(csv.DictReader(f))


def fixed_batch_elbo(checkpoint: Path, photos: Path) -> float:
    """Mean ELBO on the same 8 crops and the same posterior noise: no batch-to-batch noise."""
    from sr_train.checkpoint import load_checkpoint
    from sr_train.data import RandomCropDataset

    model, _ = load_checkpoint(checkpoint)
    data = RandomCropDataset(photos, hr_size=model.config.hr_size, seed=123)
    batch = [data[i] for i in range(8)]
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(torch.stack([b["hr"] for b in batch]), torch.stack([b["lr"] for b in batch]))
    return out["elbo"].mean().item()


@pytest.mark.slow
def test_loss_goes_down(photos, init, tmp_path):
    train(config(photos, init, tmp_path / "run", steps=40))
    assert len(read_log(tmp_path / "run")) == 40
    before = fixed_batch_elbo(init, photos)
    after = fixed_batch_elbo(tmp_path / "run" / "latest", photos)
    assert after < before - 0.3, (before, after)


def test_periodic_validation_writes_psnr_of_the_ema_model(photos, init, tmp_path):
    train(config(photos, init, tmp_path / "run", steps=2, val_images=str(photos), val_every=2))
    with open(tmp_path / "run" / "val.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["2"]
    assert 10 < float(rows[0]["psnr_y"]) < 60 and 0 < float(rows[0]["ssim_y"]) <= 1


def test_best_ema_keeps_the_step_that_validated_best(photos, init, tmp_path):
    from sr_train.checkpoint import read_checkpoint_meta
    from sr_train.train import keep_if_best

    run = tmp_path / "run"
    train(config(photos, init, run, steps=3, val_images=str(photos), val_every=1))
    with open(run / "val.csv") as f:
        rows = list(csv.DictReader(f))
    best = max(rows, key=lambda r: float(r["psnr_y"]))
    meta = read_checkpoint_meta(run / "best-ema")
    assert (meta["step"], meta["val_psnr_y"]) == (int(best["step"]), pytest.approx(float(best["psnr_y"])))
    model, _ = load_checkpoint(run / "best-ema")
    t = float(best["temperature"])
    assert not keep_if_best(run / "best-ema", model, 9, float(best["psnr_y"]) - 1.0, t)  # worse: kept
    assert read_checkpoint_meta(run / "best-ema")["step"] == int(best["step"])
    assert keep_if_best(run / "best-ema", model, 9, float(best["psnr_y"]) + 1.0, t)  # better: replaced
    assert read_checkpoint_meta(run / "best-ema")["step"] == 9
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("best-ema")) == ["best-ema"]


def test_resume_matches_uninterrupted_run_step_for_step(photos, init, tmp_path):
    train(config(photos, init, tmp_path / "whole", steps=6))
    train(config(photos, init, tmp_path / "split", steps=3))
    train(config(photos, init, tmp_path / "split", steps=6))
    whole, split = read_log(tmp_path / "whole"), read_log(tmp_path / "split")
    keys = ("step", "elbo", "distortion", "rate", "grad_norm", "skips")
    assert [[r[k] for k in keys] for r in whole] == [[r[k] for k in keys] for r in split]
    for sub in ("latest", "ema"):
        a = load_file(tmp_path / "whole" / sub / "model.safetensors")
        b = load_file(tmp_path / "split" / sub / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), sub


def test_skip_threshold_skips_and_counts(photos, init, tmp_path):
    result = train(config(photos, init, tmp_path / "run", steps=3, skip_threshold=1e-9))
    assert result["skips"] == 3
    before = load_file(init / "model.safetensors")
    after = load_file(tmp_path / "run" / "latest" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_frozen_hr_encoder_and_decoder_blocks_stay_put(photos, init, tmp_path):
    train(config(photos, init, tmp_path / "run", steps=3, freeze_hr_encoder=True, train_decoder_blocks="4"))
    before = load_file(init / "model.safetensors")
    after = load_file(tmp_path / "run" / "latest" / "model.safetensors")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and not any(k.startswith("hr_encoder.") for k in moved)
    assert not any(
        k.startswith(f"decoder.dec_blocks.{i}.") and not k.endswith("lr_gate") for k in moved for i in range(4)
    )
    assert any(k.startswith("decoder.dec_blocks.4.") for k in moved)


def test_skip_objective_trains_only_the_lr_path(photos, tmp_path):
    """The conditioning warm-up moves the LR encoder and upsampler, nothing the ELBO alone owns."""
    torch.manual_seed(0)
    init = tmp_path / "init"
    save_checkpoint(init, VDVAESR(VDVAESRConfig(**{**TINY.to_dict(), "skip_upsampler_width": 8})))
    result = train(config(photos, init, tmp_path / "run", steps=4, objective="skip"))
    assert result["step"] == 4 and "loss" in read_log(tmp_path / "run")[0]
    before = load_file(init / "model.safetensors")
    after = load_file(tmp_path / "run" / "latest" / "model.safetensors")
    moved = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"lr_encoder", "skip_upsampler"}


def test_skip_objective_with_a_frozen_lr_encoder_trains_only_the_upsampler(photos, tmp_path):
    """Growing the upsampler must leave the prior's conditioning features where the decoder learnt them."""
    torch.manual_seed(0)
    init = tmp_path / "init"
    save_checkpoint(init, VDVAESR(VDVAESRConfig(**{**TINY.to_dict(), "skip_upsampler_width": 8})))
    train(config(photos, init, tmp_path / "run", steps=3, objective="skip", freeze_lr_encoder=True))
    before = load_file(init / "model.safetensors")
    after = load_file(tmp_path / "run" / "latest" / "model.safetensors")
    moved = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"skip_upsampler"}


def test_bf16_autocast_trains_with_an_fp32_loss(photos, init, tmp_path):
    result = train(config(photos, init, tmp_path / "run", steps=3, precision="bf16", device="cpu"))
    assert result["skips"] == 0 and np.isfinite(result["elbo"])
    rows = read_log(tmp_path / "run")
    assert len(rows) == 3 and all(np.isfinite(float(r["elbo"])) for r in rows)


def test_max_minutes_stops_early_with_a_resumable_checkpoint(photos, init, tmp_path):
    result = train(config(photos, init, tmp_path / "run", steps=50, max_minutes=0.0))
    assert result["step"] == 0
    result = train(config(photos, init, tmp_path / "run", steps=2))  # resumes from the saved step 0
    assert result["step"] == 2 and [r["step"] for r in read_log(tmp_path / "run")] == ["1", "2"]


def test_kl_warmup_weights_the_rate_and_logs_the_true_elbo(photos, init, tmp_path):
    from sr_train.train import kl_weight

    cfg = config(photos, init, tmp_path / "run", steps=4, kl_warmup_steps=4)
    assert [kl_weight(s, cfg) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    train(cfg)
    rows = read_log(tmp_path / "run")
    assert [float(r["kl_weight"]) for r in rows] == [0.25, 0.5, 0.75, 1.0]
    assert all(float(r["elbo"]) == pytest.approx(float(r["distortion"]) + float(r["rate"]), rel=1e-5) for r in rows)


def test_rate_weight_scales_the_rate_and_the_warm_up_ramps_to_it(photos, init, tmp_path):
    from sr_train.train import kl_weight

    cfg = config(photos, init, tmp_path / "run", steps=2, kl_warmup_steps=2, rate_weight=0.1)
    assert [kl_weight(s, cfg) for s in range(3)] == pytest.approx([0.05, 0.1, 0.1])
    train(cfg)
    assert [float(r["kl_weight"]) for r in read_log(tmp_path / "run")] == pytest.approx([0.05, 0.1])


def test_bad_device_and_precision_are_value_errors(photos, init, tmp_path):
    with pytest.raises(ValueError, match="precision"):
        train(config(photos, init, tmp_path / "a", steps=1, precision="fp8"))
    with pytest.raises(ValueError, match="device"):
        train(config(photos, init, tmp_path / "b", steps=1, device="tpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_cuda_training_matches_its_resume(photos, init, tmp_path):
    """On the GPU, batches and model live on the device and resuming restores the CUDA RNG too
    (cuDNN autotuning may pick other kernels, hence a tolerance instead of equality)."""
    kw = {"device": "cuda", "precision": "bf16"}
    train(config(photos, init, tmp_path / "whole", steps=4, **kw))
    train(config(photos, init, tmp_path / "split", steps=3, **kw))
    train(config(photos, init, tmp_path / "split", steps=4, **kw))
    whole, split = (float(read_log(tmp_path / d)[-1]["elbo"]) for d in ("whole", "split"))
    assert whole == pytest.approx(split, abs=1e-3)


@pytest.mark.slow
def test_ddp_two_processes_gloo(photos, init, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "sr_train.cli",
        "train",
        "--data",
        str(photos),
        "--run-dir",
        str(tmp_path / "ddp"),
        "--init-checkpoint",
        str(init),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--log-every",
        "1",
        "--threads",
        "1",
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_log(tmp_path / "ddp")] == ["1", "2", "3"]
    assert (tmp_path / "ddp" / "ema" / "model.safetensors").exists()


def _saved_run(run: Path) -> Path:
    """A run directory as train() leaves it at step 3 (latest/ with state, ema/), without training."""
    from sr_train.train import save_train_state

    torch.manual_seed(0)
    model = VDVAESR(TINY)
    save_checkpoint(run / "latest", model, step=3)
    save_checkpoint(run / "ema", model, step=3, ema=True)
    save_train_state(run / "latest", torch.optim.AdamW(model.parameters()), {"step": 3, "skips": 0})
    return run


@pytest.mark.parametrize("lost", ["latest/train_state.json", "latest"])
def test_a_partial_run_is_refused_never_overwritten(photos, init, tmp_path, lost):
    import shutil

    run = _saved_run(tmp_path / "run")
    target = run / lost
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    ema_before = (run / "ema" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="refusing to resume or to overwrite"):
        train(config(photos, None, run, steps=1))
    assert (run / "ema" / "model.safetensors").read_bytes() == ema_before


@pytest.mark.parametrize(
    ("name", "data"), [("train_state.json", b"{not json"), ("train_state.safetensors", b"\x08" + bytes(20))]
)
def test_a_damaged_train_state_is_an_error_naming_the_file(photos, tmp_path, name, data):
    run = _saved_run(tmp_path / "run")
    (run / "latest" / name).write_bytes(data)
    with pytest.raises(ValueError, match=f"{name}: damaged training state"):
        train(config(photos, None, run, steps=4))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "--steps: must be >= 1"),
        (["--steps", "-5"], "--steps: must be >= 1"),
        (["--batch-size", "0"], "--batch-size: must be >= 1"),
    ],
)
def test_sr_train_refuses_bad_counts(tmp_path, capsys, args, message):
    from sr_train.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(tmp_path), "--run-dir", str(tmp_path / "run"), *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_sr_train_errors_are_one_line_naming_the_problem(photos, tmp_path, capsys):
    from sr_train.cli import main

    (tmp_path / "file").write_text("not a folder")
    assert main(["train", "--data", str(photos), "--run-dir", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    (tmp_path / "x.th").write_text("not a state dict")
    assert (
        main(
            [
                "train",
                "--data",
                str(photos),
                "--run-dir",
                str(tmp_path / "new"),
                "--init-vdvae",
                str(tmp_path / "x.th"),
                "--steps",
                "1",
            ]
        )
        == 2
    )
    assert "x.th: not a readable PyTorch state dict" in capsys.readouterr().err
    run = _saved_run(tmp_path / "run")
    assert main(["train", "--data", str(photos), "--run-dir", str(run), "--preset", "paper-256"]) == 2
    assert "tiny-32 run" in capsys.readouterr().err


def test_posterior_init_log_std_starts_every_posterior_sure(photos, tmp_path):
    from sr_train.train import build_model

    cfg = TrainConfig(data=str(photos), run_dir=str(tmp_path / "run"), preset="fc-256", posterior_init_log_std=-2.0)
    model = build_model(cfg)
    hr = torch.rand(1, 3, 64, 64)
    lr = torch.nn.functional.avg_pool2d(hr, 4)
    stats = model.posterior_pass(hr, lr)[1]
    for block, s in zip(model.decoder.blocks(), stats, strict=True):
        # KL of N(qm, e^-2) against the fresh prior N(0, 1): 1.5 + e^-4 / 2 + qm^2 / 2 per element
        assert s["kl"].min().item() >= 1.5, block.res
    plain = build_model(TrainConfig(data=str(photos), run_dir=str(tmp_path / "r2"), preset="fc-256"))
    assert min(s["kl"].mean().item() for s in plain.posterior_pass(hr, lr)[1]) < 1.5


@pytest.mark.parametrize(
    "option", [{"posterior_init_log_std": -2.0}, {"head_init_std": 0.05}, {"posterior_input": "residual"}]
)
def test_decoder_init_options_refuse_a_trained_decoder(photos, init, tmp_path, option):
    with pytest.raises(ValueError, match="sets up a new model"):
        train(config(photos, init, tmp_path / "run", steps=1, **option))


@pytest.mark.parametrize(
    ("option", "message"),
    [({"head_init_std": 0.05}, "--init-grow brings a trained one"), ({"init_transfer": "x"}, "does not combine")],
)
def test_init_grow_refuses_options_that_would_replace_its_weights(tmp_path, option, message):
    from sr_train.train import check_config

    cfg = TrainConfig(data="d", run_dir=str(tmp_path / "run"), preset="fc-256-deep", init_grow="ckpt", **option)
    with pytest.raises(ValueError, match=message):
        check_config(cfg)


def test_head_init_std_sets_the_output_convs_scale(photos, tmp_path):
    from sr_train.train import build_model

    def head_std(**kw):
        cfg = TrainConfig(data=str(photos), run_dir=str(tmp_path / "run"), preset="fc-256", **kw)
        return build_model(cfg).decoder.out_conv.weight.std().item()

    assert head_std() < 0.002
    assert head_std(head_init_std=0.05) == pytest.approx(0.05, rel=0.2)


def test_a_residual_posterior_reads_the_hr_image_minus_the_skip(photos, tmp_path):
    from sr_train.model import RESIDUAL_INPUT_GAIN
    from sr_train.train import build_model

    cfg = TrainConfig(data=str(photos), run_dir=str(tmp_path / "run"), preset="fc-256", posterior_input="residual")
    model = build_model(cfg)
    assert model.config.posterior_input == "residual"
    hr = torch.rand(2, 3, 64, 64)
    lr = torch.nn.functional.avg_pool2d(hr, 4)
    got = model.posterior_input(hr, lr, None)
    assert torch.allclose(got, (hr * 2 - 1 - model.mean_base(lr)) * RESIDUAL_INPUT_GAIN)
    assert model(hr, lr)["rate"].isfinite().all()
    with pytest.raises(ValueError, match="posterior_input"):
        preset("small-256", lr_skip=False, skip_upsampler_width=0, posterior_input="residual")
