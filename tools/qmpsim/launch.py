"""The launcher's side of the fork server (see `forkserver`): what `qemu-system-x86_64` runs
when WHIMBREL_QMPSIM_FORKSERVER names the server's socket.

It sends the request and waits for the daemon's readiness, then exits 0, or 1 with the
daemon's error (a bad command line included: the forked child checks it), as QEMU's launching
process does. It is started once per VM, so it imports next to nothing: `_socket` rather
than `socket` and a NUL-separated request rather than JSON (the two cost a VM start ~30 ms of
CPU). A launch that does not daemonize (-version, no -daemonize) runs here, as without the
server. A server that does not answer fails the launch loudly: falling back to a VM per
interpreter would hide the memory the server is there to save.
"""

from __future__ import annotations

import _socket
import os
import sys

__all__ = ["encode", "launch"]

SERVER = "WHIMBREL_QMPSIM_FORKSERVER"
PROGRAM = "qemu-system-x86_64"


def encode(argv: list[str], env: dict[str, str], cwd: str) -> bytes:
    """cwd, argc, argv..., KEY=VALUE... separated by NULs (none of them can hold one)."""
    fields = [cwd, str(len(argv)), *argv, *(f"{k}={v}" for k, v in env.items())]
    return b"\0".join(os.fsencode(f) for f in fields)


def launch(argv: list[str]) -> int:
    if "-daemonize" not in argv or {"-version", "-h", "-help"} & set(argv):
        from .main import main

        return main(argv)
    path = os.environ[SERVER]
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        conn.connect(path)
        conn.sendall(encode(argv, dict(os.environ), os.getcwd()))
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
