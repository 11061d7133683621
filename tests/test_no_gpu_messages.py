"""Asking for CUDA on a machine without it is one line naming the device, not a blamed checkpoint
or an empty result file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sr_train.checkpoint import save_checkpoint
from sr_train.model import VDVAESR

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


@needs_no_gpu
def test_sr_eval_device_cuda_without_a_gpu_names_the_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_train import TINY

    from sr_train import evaluate

    monkeypatch.setattr(evaluate, "evaluate_model", lambda *a, **k: pytest.fail("evaluated"))
    ckpt = save_checkpoint(tmp_path / "ckpt", VDVAESR(TINY))
    assert evaluate.main(["--checkpoint", str(ckpt), "--images", str(tmp_path), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: this machine (or this torch build) has no CUDA GPU" in err
    assert "checkpoint" not in err.lower()


def test_sr_eval_refuses_a_device_torch_does_not_know(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sr_train import evaluate

    assert evaluate.main(["--bicubic", "--images", str(tmp_path), "--device", "tpu"]) == 2
    assert "--device 'tpu' is not a torch device" in capsys.readouterr().err


@needs_no_gpu
@pytest.mark.parametrize("args", [["--devices", "cuda"], ["--backends", "tensorrt,onnxruntime-cuda"]])
def test_latency_for_cuda_without_a_gpu_fails_with_a_reason_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    from benchmarks import latency

    if latency.gpu_present(False):
        pytest.skip("an NVIDIA device node exists here")
    assert latency.main(["--quick", "--out", str(tmp_path / "results"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("benchmarks.latency: error: nothing to measure") and "no CUDA GPU here" in err, err
    assert not (tmp_path / "results").exists()


def test_latency_refuses_an_unknown_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import latency

    with pytest.raises(SystemExit) as exit_info:
        latency.main(["--quick", "--devices", "gpu", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "--devices: gpu is not one of cpu, cuda" in capsys.readouterr().err
