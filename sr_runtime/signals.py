"""SIGTERM handled as Ctrl-C is: an exit that runs `finally` blocks, so no temporary file outlives a stop."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """While active, SIGTERM raises SystemExit(143): `finally` blocks remove temp files as on Ctrl-C."""

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: signals cannot be caught here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
