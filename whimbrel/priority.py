"""CPU priority of the control plane daemons.

In a post-copy switchover the guest stays paused while hostd, the coordinator and the network
hook pass the lease and networking along, and that is exactly when both QEMU processes saturate
the host's CPUs with the migration stream. Like sanlock, corosync or multipathd, the daemons
therefore run above the VMs: a nice value below 0 (`--cpu-priority`, -10 by default, where the
process may lower it; root may). They use little CPU otherwise, so the VMs lose nothing then.

On Linux with autogroup scheduling, CPU time is shared between sessions first and nice values
only rank the processes inside one session, so the session's group gets the same value. QEMU
processes are started at nice 0 again, in their own session: the VMs never inherit it.

A daemon started by init without a session of its own (as CI's runner starts the tests here) is
in the root group instead. That group's weight cannot be changed (the kernel answers EINVAL), and
needs no change: its processes compete directly with the VMs' session groups, so their own nice
value is what ranks them.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

DEFAULT = -10
PROC = Path("/proc")

log = logging.getLogger(__name__)


def add_priority_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cpu-priority",
        type=int,
        default=DEFAULT,
        metavar="NICE",
        help="nice value to run at, above the VMs (default %(default)s; 0 leaves it alone); "
        "lowering it needs root or CAP_SYS_NICE, without which the daemon runs as it is",
    )


def apply(nice: int) -> bool:
    """Run this process (and the threads and children it starts later) at `nice`; returns
    whether it could. Call before any thread starts: threads inherit it when created."""
    if not nice:
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except PermissionError:
        log.warning("cannot run at CPU priority %d (needs root or CAP_SYS_NICE): running at %d",
                    nice, os.getpriority(os.PRIO_PROCESS, 0))  # fmt: skip
        return False
    if group_nice("self") is not None:
        try:
            (PROC / "self" / "autogroup").write_text(str(nice))
        except OSError as err:
            log.warning("cannot set this session's scheduling group to %d: %s", nice, err)
    return True


def group_nice(pid: int | str) -> int | None:
    """The nice value of the autogroup process `pid` is scheduled in; None for no such group:
    a kernel without autogroups, or a process in the root group, whose line is empty."""
    try:
        line = (PROC / str(pid) / "autogroup").read_text()  # "/autogroup-N nice K\n"
    except FileNotFoundError:
        return None
    return parse_group_nice(line)


def parse_group_nice(line: str) -> int | None:
    fields = line.split()
    return int(fields[-1]) if fields else None


def at_normal_priority(argv: list[str]) -> list[str]:
    """`argv` wrapped to run at nice 0 whatever this process runs at (for QEMU)."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    return ["nice", "-n", str(-current), *argv] if current else argv
