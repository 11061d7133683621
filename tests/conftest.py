"""Fixtures shared by the runtime tests: the test double of doubles.py, built once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
                 log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()
