"""Start one simulated VM: check the command line, daemonize, listen for QMP, serve.

The exit status is QEMU's: 0 after quit or a terminating signal, 1 when the command line or
the start fails, or when an incoming pre-copy fails (QEMU 7.2 exits then).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys

from . import daemon
from .cmdline import PROGRAM, VERSION, CmdlineError, Launch, parse
from .knobs import Knobs, KnobsError, load
from .machine import Machine
from .migration import Migration
from .wire import Monitor

__all__ = ["main"]


def _qmp_socket(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # QEMU replaces a stale socket file
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(1)
    except OSError as err:
        sock.close()
        raise daemon.DaemonError(
            f"-qmp unix:{path}: Failed to bind socket: {err.strerror}"
        ) from None
    sock.setblocking(False)
    return sock


def _quiet_stdio(log: str) -> None:
    """The daemon's stdio: /dev/null, with stderr (tracebacks) into the -D log when given."""
    daemon.quiet_stdio()
    if log:
        with contextlib.suppress(OSError):
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            os.dup2(fd, 2)
            os.close(fd)


async def serve(launch: Launch, knobs: Knobs, qmp: socket.socket, files: daemon.Files) -> int:
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[int] = loop.create_future()

    def end(code: int) -> None:
        if not ended.done():
            ended.set_result(code)

    monitor = Monitor({})
    machine = Machine(launch, monitor.event, lambda _reason: end(0))
    migration = Migration(launch, machine, knobs, monitor.event, end)
    monitor.commands.update(machine.commands())
    monitor.commands.update(migration.commands())

    def on_signal() -> None:
        monitor.event("SHUTDOWN", {"guest": False, "reason": "host-signal"})
        migration.shutdown()
        end(0)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, on_signal)
    await monitor.serve(qmp)
    if launch.incoming and launch.incoming != "defer":
        migration.destination.migrate_incoming({"uri": launch.incoming})
    code = await ended
    migration.shutdown()
    await monitor.close()
    files.remove()
    return code


def main(argv: list[str], launched: daemon.Readiness | None = None) -> int:
    """`launched`: this process is already the daemon, forked by the fork server, which
    reports readiness to the launcher through it (so -daemonize forks no more)."""
    try:
        launch = parse(argv)
        knobs = load(launch.name)
    except (CmdlineError, KnobsError) as err:
        print(f"{PROGRAM}: {err}", file=sys.stderr)
        return 1
    if launch.version:
        print(VERSION)
        return 0
    if launched is not None:
        readiness = launched
    else:
        readiness = daemon.detach() if launch.daemonize else daemon.Readiness()
    files = daemon.Files()
    try:
        if launch.pidfile:
            files.write_pidfile(launch.pidfile)
        qmp = _qmp_socket(launch.qmp)
        files.remove_at_exit(launch.qmp)
        if launch.runas:
            daemon.drop_privileges(launch.runas)
    except daemon.DaemonError as err:
        files.remove()
        message = f"{PROGRAM}: {err}"
        if not readiness.reports:
            # (Else the launcher prints it: two writers on one stderr interleave.)
            print(message, file=sys.stderr)
        readiness.fail(message)
        return 1
    if launch.daemonize:
        _quiet_stdio(launch.log)
    readiness.ok()
    return asyncio.run(serve(launch, knobs, qmp, files))
