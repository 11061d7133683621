"""Training runs that cannot be lost or silently poisoned: a kill at any file operation of a
checkpoint leaves the last good step resumable, SIGTERM/SIGINT save and exit 143/130, bad
arguments are one line and exit 2, and non-finite weights are never saved."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import config, init, photos  # noqa: F401 -- fixtures

from sr_train.checkpoint import read_checkpoint_meta
from sr_train.train import TrainingStopped, check_run_dir, train, weights_finite

REPO = Path(__file__).resolve().parents[1]

#: The os functions through which every file and directory of a checkpoint is created, renamed or removed.
MUTATING = ("open", "replace", "rename", "mkdir", "unlink", "rmdir")


def _snapshot_before_every_write(monkeypatch: pytest.MonkeyPatch, run: Path, shots: Path) -> list[Path]:
    """Copy `run` just before each mutating os call: each copy is what a kill at that moment leaves."""
    taken: list[Path] = []
    busy = False

    def wrap(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def hooked(*args: Any, **kwargs: Any) -> Any:
            nonlocal busy
            writes = name != "open" or (len(args) > 1 and args[1] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writes and not busy and run.is_dir():
                busy = True
                try:
                    dest = shots / f"{len(taken):03d}"
                    shutil.copytree(run, dest, symlinks=True)
                    taken.append(dest)
                finally:
                    busy = False
            return real(*args, **kwargs)

        return hooked

    for name in MUTATING:
        monkeypatch.setattr(os, name, wrap(name, getattr(os, name)))
    return taken


@pytest.mark.slow
def test_a_kill_at_any_write_of_a_checkpoint_resumes_at_the_last_good_step(photos, init, tmp_path, monkeypatch):  # noqa: F811
    run = tmp_path / "run"
    train(config(photos, init, run, steps=3))
    good = {3: (run / "latest" / "model.safetensors").read_bytes()}
    with monkeypatch.context() as patch:
        shots = _snapshot_before_every_write(patch, run, tmp_path / "shots")
        train(config(photos, init, run, steps=6))  # one checkpoint, at step 6
    good[6] = (run / "latest" / "model.safetensors").read_bytes()
    assert len(shots) > 15, "the hook saw too few writes to mean anything"

    resumed = []
    for shot in shots:
        assert check_run_dir(shot), shot
        step = read_checkpoint_meta(shot / "latest")["step"]
        assert (shot / "latest" / "model.safetensors").read_bytes() == good[step], shot
        result = train(config(photos, None, shot, steps=step))  # loads latest/, ema/ and the optimizer state
        assert result["step"] == step and not [p for p in shot.iterdir() if p.name.startswith(".step-")]
        resumed.append(step)
    assert resumed[0] == 3 and resumed[-1] == 6 and resumed == sorted(resumed), resumed


def _sr_train(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "sr_train.cli", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_a_checkpoint_and_exits_cleanly(photos, init, tmp_path, sig, code):  # noqa: F811
    run = tmp_path / "run"
    proc = _sr_train(
        "--data",
        str(photos),
        "--run-dir",
        str(run),
        "--init-checkpoint",
        str(init),
        "--steps",
        "100000",
        "--save-every",
        "100000",
        "--log-every",
        "1",
        "--batch-size",
        "2",
        "--threads",
        "1",
    )
    deadline = time.monotonic() + 120
    while not (run / "log.csv").exists() or len((run / "log.csv").read_text().splitlines()) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and f"stopped by {sig.name}" in err, err
    step = read_checkpoint_meta(run / "latest")["step"]
    assert step >= 2 and read_checkpoint_meta(run / "ema")["step"] == step
    assert f"at step {step}," in err
    assert train(config(photos, None, run, steps=step + 1))["step"] == step + 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "inf"], "--lr must be a finite number in (0, 1]"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--lr", "1e30"], "--lr must be a finite number"),
        (["--lr", "0"], "--lr must be a finite number"),
        (["--grad-clip", "nan"], "--grad-clip must be a finite number"),
        (["--grad-clip", "-1"], "--grad-clip must be a finite number in (0, inf)"),
        (["--ema-rate", "nan"], "--ema-rate must be a finite number in [0, 1)"),
        (["--ema-rate", "1.5"], "--ema-rate"),
        (["--ema-rate", "-1"], "--ema-rate"),
        (["--ema-rate", "1"], "--ema-rate"),
        (["--val-temperature", "nan"], "--val-temperature must be a finite number in [0, 2]"),
        (["--skip-threshold=-inf"], "--skip-threshold"),
        (["--weight-decay", "inf"], "--weight-decay"),
        (["--max-minutes", "nan"], "--max-minutes"),
        (["--free-bits", "nan"], "--free-bits must be a finite number in [0, 100]"),
        (["--free-bits=-1"], "--free-bits"),
        (["--rate-weight", "0"], "--rate-weight must be a finite number in (0, 10]"),
        (["--rate-weight", "nan"], "--rate-weight"),
        (["--train-decoder-blocks", "0-10000000000"], "'0-10000000000' is not a range from 0"),
        (["--train-decoder-blocks", "3-1"], "'3-1' is not a range"),
        (["--train-decoder-blocks", "a"], "'a' is not N or N-M"),
    ],
)
def test_bad_training_arguments_are_one_line_and_exit_2_before_anything_runs(
    photos,  # noqa: F811 -- the fixture imported from test_train
    tmp_path,
    capsys,
    args,
    message,
):
    from sr_train.cli import main

    run = tmp_path / "run"
    assert main(["train", "--data", str(photos), "--run-dir", str(run), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not run.exists()


def test_decoder_blocks_past_the_models_count_are_refused(photos, init, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match=r"this model has \d+ blocks"):
        train(config(photos, init, tmp_path / "run", steps=1, train_decoder_blocks="0-99"))


def _poisoned(init: Path, tmp_path: Path, value: float) -> Path:  # noqa: F811
    """A copy of `init` with one weight tensor set to `value`."""
    bad = tmp_path / "poisoned"
    shutil.copytree(init, bad)
    weights = load_file(bad / "model.safetensors")
    name = next(k for k in weights if k.startswith("decoder.") and k.endswith("weight"))
    weights[name] = torch.full_like(weights[name], value)
    save_file(weights, bad / "model.safetensors")
    meta = read_checkpoint_meta(bad)
    from sr_runtime.files import atomic_write_json, sha256_file

    atomic_write_json(bad / "config.json", {**meta, "weights_sha256": sha256_file(bad / "model.safetensors")})
    return bad


@pytest.mark.parametrize("save_every", [3, 1000])
def test_non_finite_weights_stop_the_run_and_are_never_saved(photos, init, tmp_path, save_every):  # noqa: F811
    """NaN weights make every update non-finite: the run stops (at the first save, or after the
    limit of skipped updates in a row) and writes no checkpoint."""
    bad = _poisoned(init, tmp_path, float("nan"))
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped, match=r"not finite|in a row skipped"):
        train(dataclasses.replace(config(photos, bad, run, steps=200), save_every=save_every))
    assert not (run / "latest").exists() and not (run / "ema").exists()


def test_the_cli_reports_a_stopped_run_in_one_line_with_exit_1(photos, init, tmp_path, capsys):  # noqa: F811
    from sr_train.cli import main

    bad = _poisoned(init, tmp_path, float("nan"))
    assert (
        main(
            [
                "train",
                "--data",
                str(photos),
                "--run-dir",
                str(tmp_path / "run"),
                "--init-checkpoint",
                str(bad),
                "--steps",
                "5",
                "--save-every",
                "2",
                "--threads",
                "1",
                "--batch-size",
                "2",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("sr-train: error: the weights at step 2 are not finite"), err
    assert "Traceback" not in err


def test_weights_finite_catches_nan_inf_and_overflowing_norms():
    ok = [torch.randn(100), torch.zeros(3, 3)]
    assert weights_finite(ok)
    assert not weights_finite([*ok, torch.tensor([1.0, float("nan")])])
    assert not weights_finite([*ok, torch.tensor([float("-inf")])])
    assert not weights_finite([*ok, torch.full((1000,), 1e30)])  # an update at lr 1e30
    assert weights_finite([])  # every parameter frozen


def test_an_allocation_failure_is_one_line_naming_the_batch_size(photos, tmp_path):  # noqa: F811
    from sr_train.train import TrainConfig, memory_errors

    cfg = TrainConfig(data=str(photos), run_dir=str(tmp_path), batch_size=3000)
    with (
        pytest.raises(TrainingStopped, match=r"out of memory \(.*\); --batch-size 3000 may be too large"),
        memory_errors(cfg),
    ):
        torch.empty(2**62, dtype=torch.uint8)  # what the CPU allocator refuses outright
    with pytest.raises(RuntimeError, match="unrelated"), memory_errors(cfg):  # passed through as it was
        raise RuntimeError("unrelated")
