"""A training run's checkpoint as one step, and stop signals that end a run with a save.

A checkpoint is ``latest/`` (weights + optimizer/RNG state) and ``ema/``; they
must always be of the same step. Two directories cannot be renamed into place
together, so a step is staged in ``.step-<N>.tmp/``, made durable, renamed to
``.step-<N>/`` (the commit), and only then moved over the old ``latest/`` and
``ema/``. A kill before the commit leaves the previous step as it was; a kill
after it is completed by `recover` on the next start. Both hold
``<run>/checkpoint.lock``, so concurrent processes (torchrun ranks) never
interleave.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from sr_runtime.files import file_lock

PARTS = ("ema", "latest")
_STAGED = re.compile(r"\.step-(\d+)(\.tmp)?")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root`, so the commit rename never points at unwritten data."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder, name))
        _fsync(Path(folder))


def _install(run: Path, committed: Path) -> None:
    """Move a committed step's parts over the run's (idempotent: a kill anywhere in here is finished later)."""
    for part in PARTS:
        new, old = committed / part, committed / f"replaced-{part}"
        if not new.exists():
            continue
        if (run / part).exists():
            if old.exists():
                shutil.rmtree(old)
            os.rename(run / part, old)
        os.rename(new, run / part)
    _fsync(run)
    shutil.rmtree(committed)


def _recover_locked(run: Path) -> None:
    for path in sorted(run.iterdir()):
        match = _STAGED.fullmatch(path.name)
        if match is None:
            continue
        if match.group(2):  # never committed: the previous step is still whole
            shutil.rmtree(path)
        else:
            _install(run, path)


def recover(run: Path) -> None:
    """Complete a checkpoint a kill interrupted after its commit; drop one interrupted before it."""
    if run.is_dir() and any(_STAGED.fullmatch(p.name) for p in run.iterdir()):
        with file_lock(run / "checkpoint"):
            _recover_locked(run)


@contextmanager
def step_checkpoint(run: Path, step: int) -> Iterator[Path]:
    """Yield a staging directory; write ``ema/`` and ``latest/`` into it; on exit they replace the run's.

    An exception inside the block leaves the run's previous step untouched.
    """
    run.mkdir(parents=True, exist_ok=True)
    with file_lock(run / "checkpoint"):
        _recover_locked(run)
        stage, committed = run / f".step-{step}.tmp", run / f".step-{step}"
        stage.mkdir()
        try:
            yield stage
            missing = [p for p in PARTS if not (stage / p).is_dir()]
            if missing:
                raise RuntimeError(f"checkpoint of step {step} lacks {', '.join(missing)}")
            _fsync_tree(stage)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        os.rename(stage, committed)
        _fsync(run)
        _install(run, committed)


class StopSignals:
    """SIGTERM/SIGINT ask the loop to stop at the next step boundary (it saves, then exits 143/130).

    A second signal while stopping ends the process at once, as the default
    handlers would: the checkpoint being written is staged, so the last one
    stays whole.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            self.restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def __exit__(self, *exc: object) -> None:
        self.restore()
