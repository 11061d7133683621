"""Session fixtures: the runtime's test double (doubles.py), a tiny model's export, a local Ray cluster.

Tests that use the slow ones (the export, Ray) are marked `slow` here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from doubles import build_double

from sr_runtime import Upscaler


@pytest.fixture(scope="session")
def double_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Model directory of the test double (fp32 and fp16 ONNX), built once per test session."""
    return build_double(tmp_path_factory.mktemp("double") / "test-double", fp16=True)


@pytest.fixture(scope="session")
def upscaler(double_model: Path) -> Iterator[Upscaler]:
    """A deterministic (temperature 0) Upscaler on the test double, shared by read-only tests."""
    with Upscaler(double_model, backend="cpu") as up:
        yield up


@pytest.fixture(scope="session")
def ray_local() -> Iterator[object]:
    """A local 2-CPU Ray cluster on the loopback address, started once per test session (~10 s)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (the `cluster` extra)")
    with pytest.MonkeyPatch.context() as env:
        # On a loaded 2-core machine the raylet's wait for its metrics agent (30 s) ran out once.
        env.setenv("RAY_agent_register_timeout_ms", "180000")
        # Serve kills a proxy whose process is not up within 5 s and fails `serve.start` with it; starting
        # one took longer than that under load. Inherited by the raylet, so by Serve's controller.
        env.setenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level="ERROR",
            log_to_driver=False,
        )
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `sr-export` of a tiny checkpoint (~1-2 min on 2 cores), shared by every test that needs an export.

    Keys: model (the torch module), ckpt (its checkpoint), out (the model
    directory), stdout (the CLI's), manifest (parsed).
    """
    from exporting import run_cli, tiny_model

    from sr_train.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("export")
    model = tiny_model()
    ckpt = save_checkpoint(root / "ckpt", model, step=123)
    out = root / "vdvae-sr-tiny"
    rc, stdout, stderr = run_cli(["--checkpoint", str(ckpt), "--out", str(out), "--batch", "1,2,4"])
    assert rc == 0, stdout + stderr
    return {
        "model": model,
        "out": out,
        "ckpt": ckpt,
        "stdout": stdout,
        "manifest": json.loads((out / "manifest.json").read_text()),
    }


@pytest.fixture(scope="session")
def exported_fc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `sr-export` of an untrained fc-256 with far-reaching random weights (~2-3 min on 2 cores).

    Keys: model (the torch module), out (the model directory), stdout, manifest (parsed).
    """
    from exporting import reaching_fc_model, run_cli

    from sr_train.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("export-fc")
    model = reaching_fc_model()
    ckpt = save_checkpoint(root / "ckpt", model, step=0)
    out = root / "fc-256"
    # FP32 only, to save a minute: the FP16 pass on frame graphs is tested on its own in test_export_frames.
    rc, stdout, stderr = run_cli(
        ["--checkpoint", str(ckpt), "--out", str(out), "--engine", "off", "--precision", "fp32"]
    )
    assert rc == 0, stdout + stderr
    return {"model": model, "out": out, "stdout": stdout, "manifest": json.loads((out / "manifest.json").read_text())}


#: Fixtures that make every test using them slow: the exports, a local Ray cluster, the benchmark smoke run.
SLOW_FIXTURES = frozenset({"exported", "exported_fc", "ray_local", "quick_result"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `slow` every test that uses a slow fixture, so `-m "not slow"` leaves it out."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
