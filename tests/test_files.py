"""The one file-helper module: atomic writes under the umask, checksums, the cross-process lock."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

import pytest

from sr_runtime.files import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    file_lock,
    sha256_file,
    stale_temp_files,
)

TRY_LOCK = "import fcntl, sys; fcntl.flock(open(sys.argv[1], 'a'), fcntl.LOCK_EX | fcntl.LOCK_NB)"


def test_atomic_writes_follow_the_umask_and_leave_no_temporary(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        path = atomic_write_json(tmp_path / "new" / "manifest.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.read_text() == '{\n "a": 1\n}\n'
    assert list(path.parent.iterdir()) == [path]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = atomic_write_bytes(tmp_path / "engine", b"old")

    def fail_halfway(fh: BinaryIO) -> None:
        fh.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail_halfway)
    assert path.read_bytes() == b"old" and list(tmp_path.iterdir()) == [path]


def test_sha256_of_a_file_spanning_several_chunks(tmp_path: Path) -> None:
    data = os.urandom(3 * 2**20 + 5)
    assert sha256_file(atomic_write_bytes(tmp_path / "blob", data)) == hashlib.sha256(data).hexdigest()


def test_file_lock_keeps_another_process_out_until_released(tmp_path: Path) -> None:
    target = tmp_path / "trt.timing.cache"
    with file_lock(target):
        held = subprocess.run([sys.executable, "-c", TRY_LOCK, f"{target}.lock"], capture_output=True, check=False)
    released = subprocess.run([sys.executable, "-c", TRY_LOCK, f"{target}.lock"], capture_output=True, check=False)
    assert held.returncode != 0 and b"BlockingIOError" in held.stderr
    assert released.returncode == 0


def test_stale_temp_files_finds_what_a_killed_writer_left_and_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "a[1].png"  # glob characters in the name must not widen the match
    code = (
        "import os, signal, sys; from sr_runtime.files import atomic_write; "
        "atomic_write(sys.argv[1], lambda fh: (fh.write(b'half'), fh.flush(), "
        "os.kill(os.getpid(), signal.SIGKILL)))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(target)], timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL
    (tmp_path / f".{target.name}.notes.tmp").write_text("someone else's")
    (tmp_path / ".a1.png.0123456789ab.tmp").write_text("another target's")
    [left] = stale_temp_files(target)
    assert left.read_bytes() == b"half" and not target.exists()
