"""A broken model is one SRModelError: ONNX files that are not ONNX but carry a matching sha256,
and crafted manifests (wrong types, deep nesting, huge), through the API and the real CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sr_runtime import SRModelError, Upscaler
from sr_runtime.model import load_model_spec

REPO = Path(__file__).resolve().parents[1]


def _with_onnx(double_model: Path, tmp_path: Path, data: bytes) -> Path:
    """A copy of the model whose ONNX files are `data`, with the manifest's sha256 updated to match."""
    out = tmp_path / "model"
    shutil.copytree(double_model, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["onnx"].values():
        (out / entry["file"]).write_bytes(data)
        entry["sha256"] = hashlib.sha256(data).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _broken(double_model: Path, kind: str) -> bytes:
    real = (double_model / "model.fp32.onnx").read_bytes()
    return {
        "random": np.random.default_rng(0).bytes(4096),
        "truncated": real[: len(real) // 2],
        "text": b"this is not an ONNX model\n" * 20,
        "empty": b"",
    }[kind]


@pytest.mark.parametrize("kind", ["random", "truncated", "text", "empty"])
@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_an_onnx_file_that_is_not_onnx_is_a_model_error(
    double_model: Path, tmp_path: Path, kind: str, backend: str
) -> None:
    out = _with_onnx(double_model, tmp_path, _broken(double_model, kind))
    with pytest.raises(SRModelError, match=r"ONNX Runtime cannot load its ONNX file|inputs|no fp32"):
        Upscaler(out, backend=backend)


def test_the_cli_names_a_broken_model_in_one_line(double_model: Path, tmp_path: Path) -> None:
    out = _with_onnx(double_model, tmp_path, _broken(double_model, "truncated"))
    img = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (8, 8), (10, 200, 30)).save(img)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sr_runtime.cli",
            str(img),
            "-o",
            str(tmp_path / "out"),
            "--model",
            str(out),
            "--backend",
            "cpu",
            "-q",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("sr-upscale: error: model ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "change",
    [
        {"onnx": [1, 2]},
        {"onnx": "model.fp32.onnx"},
        {"onnx": {"fp32": ["model.fp32.onnx"]}},
        {"onnx": {"fp32": None}},
        {"lr_size": 32},
        {"lr_size": [32, 32, 32]},
        {"lr_size": ["a", "b"]},
        {"batch": [1, 4, 16]},
        {"scale": 4.0},
        {"noise_dim": None},
    ],
)
def test_a_crafted_manifest_is_a_model_error(double_model: Path, tmp_path: Path, change: dict) -> None:
    out = tmp_path / "model"
    shutil.copytree(double_model, out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, **change}))
    with pytest.raises(SRModelError, match="not a valid model manifest"):
        load_model_spec(out)


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000])
def test_deeply_nested_json_is_a_model_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(SRModelError, match=r"nested too deeply|not a valid model manifest"):
        load_model_spec(tmp_path)


def test_a_huge_manifest_is_refused_unread(tmp_path: Path) -> None:
    with open(tmp_path / "manifest.json", "wb") as fh:
        fh.truncate(64 << 20)  # sparse: no disk used
    with pytest.raises(SRModelError, match="over"):
        load_model_spec(tmp_path)
