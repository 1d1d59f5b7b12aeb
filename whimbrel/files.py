"""Small file helpers shared by the coordinator and hostd."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, data: bytes, tmp: Path | None = None) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new file, never a mix:
    write a temporary file, fsync it, rename it over, fsync the directory."""
    tmp = tmp or path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
