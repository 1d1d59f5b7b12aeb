"""The launcher's side of the fork server (see `forkserver`): what `qemu-system-x86_64` runs
when WHIMBREL_QMPSIM_FORKSERVER names the server's socket.

A launch that cannot daemonize (a bad command line, -version, no -daemonize) runs here, in
this process, exactly as without the server. Otherwise the server forks the VM and this
process waits for its readiness, then exits 0, or 1 with the VM's error, as QEMU's launching
process does. A server that does not answer fails the launch loudly: falling back to a VM per
interpreter would hide the memory the server is there to save.
"""

from __future__ import annotations

import json
import os
import socket
import sys

from tools.qmpsim.cmdline import PROGRAM, CmdlineError, parse
from tools.qmpsim.knobs import KnobsError, load

__all__ = ["launch"]

SERVER = "WHIMBREL_QMPSIM_FORKSERVER"


def launch(argv: list[str]) -> int:
    try:
        parsed = parse(argv)
        load(parsed.name)
        daemonize = parsed.daemonize and not parsed.version
    except (CmdlineError, KnobsError):
        daemonize = False
    if not daemonize:
        from tools.qmpsim.main import main

        return main(argv)
    path = os.environ[SERVER]
    request = {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(path)
            conn.sendall(json.dumps(request).encode())
            conn.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := conn.recv(4096):
                chunks.append(chunk)
    except OSError as err:
        print(f"{PROGRAM}: qmpsim fork server {path}: {err}", file=sys.stderr)
        return 1
    report = b"".join(chunks)
    if report == b"\0":
        return 0
    message = report.decode(errors="replace").rstrip("\n") or "the VM exited before it was ready"
    print(message, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:]))
