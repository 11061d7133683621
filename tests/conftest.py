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
