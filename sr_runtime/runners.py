"""The hand-off of a checked `sr-upscale` command to a runner plug-in (`--ray`), found by name.

A runner is a callable `BatchJob -> exit status` that another package registers
in the entry-point group RUNNERS (the cluster package registers "ray"). The
runtime looks it up in the installed metadata, so it never imports, or names,
a package above it.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sr_runtime.jobs import UpscaleOptions

#: Entry-point group of the runners: `--ray` runs the one named "ray".
RUNNERS = "vdvae_sr.runners"


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


Runner = Callable[[BatchJob], int]


def load_runner(name: str) -> Runner | None:
    """The runner registered as `name`, imported now; None if no installed package registers one.

    ModuleNotFoundError if it is registered but what it needs is not installed (an extra left out).
    """
    for entry in importlib.metadata.entry_points(group=RUNNERS, name=name):
        runner: Runner = entry.load()
        return runner
    return None
