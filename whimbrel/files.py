"""Small file helpers shared by the coordinator and hostd.

Files in a directory others can write to (the lockspace shared by the hosts) are opened
relative to the directory's descriptor, by a name of one component, with O_NOFOLLOW: a symlink
or hard link planted there is refused, never followed to a file elsewhere.

UnsafeFile     (an OSError) a name or a file refused: a symlink, a non-regular file, a link
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

__all__ = ["UnsafeFile", "open_beneath", "open_dir", "open_in", "write_atomically"]


class UnsafeFile(OSError):
    pass


def open_dir(path: Path) -> int:
    """A descriptor of directory `path` (its own name may be a symlink an operator chose)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_in(dir_fd: int, name: str, flags: int, mode: int = 0o600) -> int:
    """Open `name` in the directory `dir_fd`: one path component, not dot-leading, never
    through a symlink, and only a regular file with one link."""
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        raise UnsafeFile(errno.EINVAL, f"{name!r} is not a plain file name")
    try:
        # O_NONBLOCK: opening a FIFO planted in its place would otherwise wait for a writer
        # (it is refused below); on a regular file the flag changes nothing.
        fd = os.open(
            name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode, dir_fd=dir_fd
        )
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafeFile(errno.ELOOP, f"{name} is a symlink, refused") from err
        raise
    st = os.fstat(fd)
    # A hard link to a file elsewhere is as bad as a symlink (O_NOFOLLOW does not see it).
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        what = "has other hard links" if stat.S_ISREG(st.st_mode) else "is not a regular file"
        raise UnsafeFile(errno.EPERM, f"{name} {what}, refused")
    return fd


def open_beneath(root: Path, path: Path, flags: int, *, block: bool = False) -> int:
    """Open `path`, which lies under the directory `root`, one component at a time from `root`
    and never through a symlink: a directory swapped for a symlink after `path` was checked
    (on storage others write to) is refused, not followed out of `root`. Only a regular file
    with one link, or with `block` a block device."""
    parts = path.relative_to(root).parts
    if not parts or any(part in (".", "..") for part in parts):
        raise UnsafeFile(errno.EINVAL, f"{path} is not a file under {root}")
    directory = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            below = os.open(
                part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory
            )
            os.close(directory)
            directory = below
        # O_NONBLOCK: a FIFO in the file's place must not hold the open (it is refused below).
        fd = os.open(
            parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=directory
        )
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeFile(err.errno, f"{path}: a symlink on the way, refused") from err
        raise
    finally:
        os.close(directory)
    try:
        st = os.fstat(fd)
        regular = stat.S_ISREG(st.st_mode) and st.st_nlink == 1
        if not (regular or (block and stat.S_ISBLK(st.st_mode))):
            raise UnsafeFile(errno.EPERM, f"{path} is no longer the file that was checked, refused")
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_atomically(path: Path, data: bytes, tmp: Path | None = None, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new file, never a mix:
    write a temporary file, fsync it, rename it over, fsync the directory.

    The temporary file is created in `path`'s directory, exclusively and never through a
    symlink (O_EXCL, O_NOFOLLOW), with `mode`: readable by the owner only unless told
    otherwise, not even while it is written. A file planted at its name makes the write fail."""
    tmp_name = (tmp or path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")).name
    dir_fd = open_dir(path.parent)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp_name, flags, mode, dir_fd=dir_fd)
        try:
            with open(fd, "wb", closefd=False) as f:
                f.write(data)
                f.flush()
            # The umask may have taken bits away from `mode`, never added any; set it exactly.
            os.fchmod(fd, mode)
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name, dir_fd=dir_fd)
            raise
        finally:
            os.close(fd)
        os.replace(tmp_name, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
