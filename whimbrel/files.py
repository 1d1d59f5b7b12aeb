"""Small file helpers shared by the coordinator and hostd."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def write_atomically(path: Path, data: bytes, tmp: Path | None = None, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new file, never a mix:
    write a temporary file, fsync it, rename it over, fsync the directory.

    The temporary file is created exclusively (O_EXCL, O_NOFOLLOW) with `mode`, readable by the
    owner only unless told otherwise: a file or symlink planted at its name makes the write fail
    rather than write through it, and the data is never readable by others, not even while it
    is written."""
    tmp = tmp or path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
        # The umask may have taken bits away from `mode`, never added any; set it exactly.
        os.fchmod(fd, mode)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
