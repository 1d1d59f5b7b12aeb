"""The launcher's side of the fork server (see `forkserver`): what `qemu-system-x86_64` runs
when WHIMBREL_QMPSIM_FORKSERVER names the server's socket.

It sends the request and waits for the daemon's readiness, then exits 0, or 1 with the
daemon's error (a bad command line included: the forked child checks it), as QEMU's launching
process does. It is started once per VM, so it imports next to nothing: `_socket` rather
than `socket` and a NUL-separated request rather than JSON (the two cost a VM start ~30 ms of
CPU). A launch that does not daemonize (-version, no -daemonize) runs here, as without the
server. A server that does not answer fails the launch loudly: falling back to a VM per
interpreter would hide the memory the server is there to save.

The descriptors the command line names as /proc/self/fd/N (hostd opens each disk itself and
passes it so) travel with the request (SCM_RIGHTS): the server's child puts each back at N,
as a QEMU launched directly would have inherited it.
"""

from __future__ import annotations

import _socket
import os
import sys

__all__ = ["MAX_FDS", "encode", "launch", "named_descriptors"]

SERVER = "WHIMBREL_QMPSIM_FORKSERVER"
PROGRAM = "qemu-system-x86_64"


FD_PATH = "/proc/self/fd/"
# At most this many descriptors travel with a request (hostd passes one per disk, ≤ 32).
MAX_FDS = 64


def encode(argv: list[str], env: dict[str, str], cwd: str, fds: list[int]) -> bytes:
    """cwd, argc, argv..., the passed descriptors' numbers (comma-separated), KEY=VALUE...
    separated by NULs (none of them can hold one)."""
    numbers = ",".join(str(fd) for fd in fds)
    fields = [cwd, str(len(argv)), *argv, numbers, *(f"{k}={v}" for k, v in env.items())]
    return b"\0".join(os.fsencode(f) for f in fields)


def named_descriptors(argv: list[str]) -> list[int]:
    """The open descriptors `argv` names as /proc/self/fd/N, each once, in order (one not
    open stays behind, so the daemon fails to open it as QEMU would)."""
    fds: list[int] = []
    for arg in argv:
        start = arg.find(FD_PATH)
        while start != -1:
            digits = start + len(FD_PATH)
            end = digits
            while end < len(arg) and arg[end].isdigit():
                end += 1
            if end > digits and int(arg[digits:end]) not in fds and _is_open(int(arg[digits:end])):
                fds.append(int(arg[digits:end]))
            start = arg.find(FD_PATH, end)
    return fds


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _send(conn: _socket.socket, data: bytes, fds: list[int]) -> None:
    """`data` with `fds` attached to its first bytes."""
    rights = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)
    ancillary = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)] if fds else []
    sent = conn.sendmsg([data], ancillary)
    conn.sendall(data[sent:])


def launch(argv: list[str]) -> int:
    if "-daemonize" not in argv or {"-version", "-h", "-help"} & set(argv):
        from .main import main

        return main(argv)
    path = os.environ[SERVER]
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        fds = named_descriptors(argv)
        if len(fds) > MAX_FDS:
            raise OSError(f"more than {MAX_FDS} descriptors named on the command line")
        conn.connect(path)
        _send(conn, encode(argv, dict(os.environ), os.getcwd(), fds), fds)
        conn.shutdown(_socket.SHUT_WR)
        chunks = []
        while chunk := conn.recv(4096):
            chunks.append(chunk)
    except OSError as err:
        print(f"{PROGRAM}: qmpsim fork server {path}: {err}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    report = b"".join(chunks)
    if report == b"\0":
        return 0
    message = report.decode(errors="replace").rstrip("\n") or "the VM exited before it was ready"
    print(message, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:]))
