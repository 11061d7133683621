"""Where `--ray ADDRESS` / `--ray-address` points, checked before `ray.init`.

`ray.init` retries an address where nothing listens for minutes, and a
SIGTERM meanwhile waits for it; a plain TCP connect answers in milliseconds
(refused) or within PROBE_TIMEOUT_S (nothing routes there).
"""

from __future__ import annotations

import os
import socket

#: Longest wait for a TCP connect to the cluster's address.
PROBE_TIMEOUT_S = 5.0


def explicit_address(address: str | None) -> str | None:
    """The host:port Ray would dial for `address` (None/auto: $RAY_ADDRESS); None where Ray finds or
    starts a cluster itself (no $RAY_ADDRESS, or `local`)."""
    if address in (None, "auto"):
        address = os.environ.get("RAY_ADDRESS") or None
    if address in (None, "auto", "local"):
        return None
    return address


def check_reachable(address: str | None, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """ConnectionError in one line if nothing accepts a connection at the address Ray would dial."""
    target = explicit_address(address)
    if target is None:
        return
    host_port = target.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError(f"{target}: expected host:port")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise ConnectionError(f"nothing answers at {host}:{port} ({reason})") from None
