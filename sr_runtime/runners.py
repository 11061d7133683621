"""The hand-off of a checked `sr-upscale` command to a runner (`--ray`): a callable `BatchJob -> exit status`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sr_runtime.jobs import UpscaleOptions


@dataclass(frozen=True)
class BatchJob:
    """A checked `sr-upscale` command as a runner receives it: plain data, the parser's Namespace left behind.

    `unmatched` are the inputs that named no file, (as given, why); they fail
    first, as in a local run. `address` and `workers` are `--ray` and `--workers`.
    """

    options: UpscaleOptions
    sources: tuple[Path, ...]
    unmatched: tuple[tuple[str, str], ...]
    address: str
    workers: int | None = None
