"""Exception types: bad user input, a missing or broken model, a backend that cannot run, a bad command line.

Callers (the CLI above all) catch these to print a one-line reason instead of a
traceback; anything else escaping the runtime is a bug.
"""

from __future__ import annotations


class SRInputError(ValueError):
    """The image given to the upscaler cannot be used (missing, corrupt, wrong shape...)."""


class SRModelError(RuntimeError):
    """The model directory is missing, incomplete or does not match its manifest."""


class BackendUnavailable(RuntimeError):
    """A backend cannot run here (no GPU, package missing...); `auto` moves on to the next."""


class UsageError(Exception):
    """Bad command line: exit status 2 (raised by `sr-upscale`'s checks and by the runners it hands off to)."""
