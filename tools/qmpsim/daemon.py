"""Becoming a daemon the way QEMU does, and leaving no files behind on an orderly exit.

With -daemonize the launching process waits on a pipe until the daemon has written its pidfile
and listens on its QMP socket, then exits 0 (or 1 with the daemon's error on stderr): hostd
reads the pidfile as soon as its launch returns. The daemon's stdio goes to /dev/null, or a
caller reading the launcher's output (hostd does) would wait for good. A SIGKILL leaves the
pidfile and socket behind, as it does with QEMU; any other exit removes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import sys

__all__ = ["DaemonError", "Files", "Readiness", "detach", "drop_privileges", "quiet_stdio"]


class DaemonError(Exception):
    """The daemon could not start; the message is what QEMU would print."""


class Readiness:
    """The daemon's end of the pipe its launcher waits on (a no-op without -daemonize)."""

    def __init__(self, fd: int = -1) -> None:
        self._fd = fd

    @property
    def reports(self) -> bool:
        """A launcher waits on this end and prints a failure itself."""
        return self._fd >= 0

    def ok(self) -> None:
        self._send(b"\0")

    def fail(self, message: str) -> None:
        self._send(message.encode(errors="replace") or b"failed")

    def _send(self, data: bytes) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self._fd, data)
            os.close(self._fd)
            self._fd = -1


def detach() -> Readiness:
    """Fork twice with a new session in between; returns in the daemon only. The launching
    process exits once the daemon reports through the returned Readiness."""
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        chunks = []
        while chunk := os.read(read_end, 4096):
            chunks.append(chunk)
        report = b"".join(chunks)
        if report == b"\0":
            os._exit(0)
        sys.stderr.write(report.decode(errors="replace").rstrip("\n") + "\n")
        sys.stderr.flush()
        os._exit(1)
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        # The session leader goes; the daemon can then never reacquire a terminal.
        os._exit(0)
    os.umask(0o027)
    return Readiness(write_end)


def quiet_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def drop_privileges(user: str) -> None:
    """-runas: become `user` (QEMU does so once its sockets are open)."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise DaemonError(f'User "{user}" doesn\'t exist') from None
    try:
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except PermissionError:
        raise DaemonError(f"Failed to change to user {user}: not permitted") from None


class Files:
    """The pidfile (locked, as QEMU locks it) and the QMP socket path, removed at exit."""

    def __init__(self) -> None:
        self._paths: list[str] = []
        self._pid_fd = -1

    def write_pidfile(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise DaemonError(f"cannot create PID file: {err.strerror}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DaemonError("cannot create PID file: Cannot lock pid file") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._pid_fd = fd
        self._paths.append(path)

    def remove_at_exit(self, path: str) -> None:
        self._paths.append(path)

    def remove(self) -> None:
        for path in self._paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._paths.clear()
