"""The fork server: one process that has imported qmpsim once and forks every simulated VM,
so a thousand VMs share one interpreter's pages rather than each loading its own.

`python -S -m tools.qmpsim.forkserver SOCKET [ROOM]` listens on the unix socket SOCKET. The
launcher (`launch`, what the qemu-system-x86_64 script runs when WHIMBREL_QMPSIM_FORKSERVER
names SOCKET) sends its working directory, argv and environment (`launch.encode`), then
shuts its side down. The server forks a child that becomes the daemon as -daemonize would
make it (a session of its own, umask 027, stdio to /dev/null), checks the command line as
`main` would (its error goes back over the connection), and runs `main` with the connection
as its readiness pipe; the launcher exits as QEMU's launching process does. Descriptors the
launcher passed (`launch.named_descriptors`) are put back at their numbers in the child.

The child rewrites its command line in place (the server's own argv, which ROOM pads), so
/proc/PID/cmdline shows the VM's QEMU arguments: hostd recognises its QEMU by the pidfile
path in there, when it re-attaches or refuses to start a VM twice.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gc
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from . import daemon
from .cmdline import PROGRAM, CmdlineError, parse
from .knobs import KnobsError, load
from .launch import MAX_FDS
from .main import main

__all__ = ["ROOM", "serve"]

# Bytes of command line the children may write: hostd's QEMU arguments with long paths.
ROOM = 16384


def _set_cmdline(argv: list[str]) -> None:
    """Write `argv` over this process's original argument area (truncated to its size)."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (fields 48, 49)
    data = b"\0".join(a.encode() for a in argv)[: end - start - 1]
    ctypes.memmove(start, data.ljust(end - start, b"\0"), end - start)


@dataclass(frozen=True)
class Request:
    cwd: str
    argv: list[str]
    env: dict[str, str]
    # The launcher's descriptor numbers, each with the descriptor received for it here.
    fds: dict[int, int]

    def close_fds(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def _receive(conn: socket.socket) -> Request:
    """The inverse of `launch.encode` and `launch._send`."""
    first, ancillary, flags, _ = conn.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
    received = [
        int.from_bytes(data[i : i + 4], sys.byteorder)
        for level, kind, data in ancillary
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
        for i in range(0, len(data) - len(data) % 4, 4)
    ]
    try:
        chunks = [first]
        while chunk := conn.recv(65536):
            chunks.append(chunk)
        fields = [os.fsdecode(f) for f in b"".join(chunks).split(b"\0")]
        argc = int(fields[1])
        numbers = [int(n) for n in fields[2 + argc].split(",") if n]
        duplicates = len(set(numbers)) != len(numbers)
        if flags & socket.MSG_CTRUNC or len(numbers) != len(received) or duplicates:
            raise ValueError("the descriptors do not match their numbers")
        env = dict(item.split("=", 1) for item in fields[3 + argc :] if "=" in item)
    except BaseException:
        for fd in received:
            os.close(fd)
        raise
    return Request(fields[0], fields[2 : 2 + argc], env, dict(zip(numbers, received, strict=True)))


def _place(fds: dict[int, int], keep: int) -> int:
    """In the child: each received descriptor moved to its launcher's number, inheritable as
    QEMU's would be; returns where `keep` (the connection) now is, clear of those numbers."""
    clear = max([keep, 2, *fds, *fds.values()]) + 1
    moved = fcntl.fcntl(keep, fcntl.F_DUPFD_CLOEXEC, clear)
    os.close(keep)
    staged = {}
    for number, fd in fds.items():
        staged[number] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, clear)
        os.close(fd)
    for number, fd in staged.items():
        os.dup2(fd, number, inheritable=True)
        os.close(fd)
    return moved


def _become_vm(conn: socket.socket, request: Request) -> int:
    """In the forked child: detach as -daemonize does, then run the VM."""
    os.setsid()
    os.umask(0o027)
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(request.env)
    _set_cmdline([PROGRAM, *request.argv])
    daemon.quiet_stdio()
    readiness = daemon.Readiness(_place(request.fds, conn.detach()))
    try:
        load(parse(request.argv).name)
    except (CmdlineError, KnobsError) as err:
        # What main would print on the launcher's stderr, had it run there.
        readiness.fail(f"{PROGRAM}: {err}")
        return 1
    return main(request.argv, readiness)


def serve(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(128)
    # Children are reaped by the kernel: the server never waits for a VM.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    # Everything imported so far stays out of the children's collections: a collection
    # touching those objects would copy the pages they share.
    gc.freeze()
    print(f"qmpsim fork server on {path}", flush=True)
    while True:
        conn, _ = listener.accept()
        try:
            request = _receive(conn)
        except (OSError, ValueError, IndexError):
            conn.close()
            continue
        if os.fork() == 0:
            code = 1
            try:
                listener.close()
                code = _become_vm(conn, request)
            finally:
                os._exit(code)
        conn.close()
        request.close_fds()


if __name__ == "__main__":
    serve(sys.argv[1])
