"""Checksums, atomic writes and a file lock: the one copy every package of the project uses.

Atomic writes go through a temporary file in the target's folder and
`os.replace`, so a reader never sees half a file. The temporary file is made
with `os.open(..., 0o666)`, which honours the umask like a plain `open()`;
`tempfile.mkstemp` would leave every output readable by its owner only.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (ONNX files and engines can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


#: Random bytes in a temporary file's name (`.<name>.<hex>.tmp`), so concurrent writers never collide.
TEMP_TOKEN_BYTES = 6


#: What a temporary file's name adds to its target's: the dot, `.<hex>` and `.tmp`.
TEMP_NAME_EXTRA = 1 + 1 + 2 * TEMP_TOKEN_BYTES + 4


def name_too_long(path: str | os.PathLike[str]) -> str | None:
    """Why `path` cannot be written through `atomic_write` (its temporary name would not fit), or None.

    The limit is that of the filesystem the name will be on: its folder's, or
    while the folder is not made yet its nearest existing parent's, so the
    answer does not depend on whether an earlier file's write made the folder.
    """
    target = Path(path)
    folder = target.parent.absolute()
    while not folder.is_dir() and folder != folder.parent:  # the folder is made at the first write
        folder = folder.parent
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    length = len(os.fsencode(target.name))
    if length + TEMP_NAME_EXTRA > limit:
        return (
            f"output name is {length} bytes; with the {TEMP_NAME_EXTRA} its temporary file adds it must stay "
            f"within {limit} (the filesystem's limit): use a shorter name or --suffix"
        )
    return None


def resolved(path: str | os.PathLike[str]) -> Path:
    """`path` made absolute with symlinks resolved; a symlink loop resolves to its own absolute path."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError):  # RuntimeError before Python 3.13, OSError (ELOOP) since
        return Path(os.path.abspath(path))


def is_symlink_loop(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a symlink that never reaches a file or a missing name (a loop)."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def printable(text: str) -> str:
    """`text` with control characters escaped (`\x1b`): a file name never drives the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def stale_temp_files(path: str | os.PathLike[str]) -> list[Path]:
    """Temporary files `atomic_write` left beside `path`: only a killed process (SIGKILL) leaves them.

    Call it only while nobody else writes `path` (e.g. before redoing it).
    """
    target = Path(path)
    name = re.compile(rf"\.{re.escape(target.name)}\.[0-9a-f]{{{2 * TEMP_TOKEN_BYTES}}}\.tmp")
    found = target.parent.glob(f".{glob.escape(target.name)}.*.tmp")
    return sorted(p for p in found if name.fullmatch(p.name))


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(fh)` on a temporary file beside `path`, then rename it over `path`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(TEMP_TOKEN_BYTES)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """`data` written atomically."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Strict JSON (ValueError on NaN/Infinity, which many parsers reject) with a trailing newline, atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode("utf-8"))


@contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on `<path>.lock` (POSIX flock): one writer at a time across processes."""
    lock = Path(f"{os.fspath(path)}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
