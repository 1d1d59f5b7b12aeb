"""CPU priority of the control plane daemons.

In a post-copy switchover the guest stays paused while hostd, the coordinator and the network
hook pass the lease and networking along, and that is exactly when both QEMU processes saturate
the host's CPUs with the migration stream. Like sanlock, corosync or multipathd, the daemons
therefore run above the VMs:

- real-time round-robin scheduling at a low priority (`--realtime-priority`, SCHED_RR 1 by
  default, as sanlock and corosync run by default): a daemon that wakes up runs at once instead
  of queueing behind the QEMU threads. Post-copy pauses (`make bench
  BENCH=switchover.pause.postcopy`), 80 to 160 each, benches interleaved: p95 9.9-10.4 ms and
  p99 11.1-12.0 ms, against 13.0 and 15.7 ms with the nice value alone;
- a nice value below 0 (`--cpu-priority`, -10 by default), which is what remains where
  real-time scheduling is refused (no CAP_SYS_NICE, a container without a real-time budget),
  and what the daemons' background threads start from.

The daemons use little CPU, and by default the kernel keeps 5% of every second of each CPU for
ordinary tasks whatever real-time tasks do (sched_rt_runtime_us), a bound on a daemon gone
wrong or a long replay of the log at the coordinator's start. Network hooks inherit the
daemon's scheduling: they are part of the handoff. QEMU does not: it is started as an ordinary
process (SCHED_OTHER, nice 0), and background threads (the SQLite checkpointer) return to
SCHED_OTHER themselves.

On Linux with autogroup scheduling, CPU time is shared between sessions first and nice values
only rank the processes inside one session. A daemon running at its nice value alone therefore
gives its session's group the same value (real-time threads are above every group and leave it
alone, and with it the other processes of the session, an operator's shell for one). QEMU
processes are started in sessions of their own: the VMs never inherit it.

A daemon started by init without a session of its own (as CI's runner starts the tests here) is
in the root group instead. That group's weight cannot be changed (the kernel answers EINVAL), and
needs no change: its processes compete directly with the VMs' session groups, so their own nice
value is what ranks them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from pathlib import Path

DEFAULT = -10
DEFAULT_REALTIME = 1
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
    parser.add_argument(
        "--realtime-priority",
        type=int,
        default=DEFAULT_REALTIME,
        choices=range(100),
        metavar="PRIO",
        help="SCHED_RR priority to run at, 1-99 (default %(default)s; 0: none, the nice value "
        "alone); refused without CAP_SYS_NICE, when the daemon runs at its nice value",
    )


def apply(nice: int, realtime: int = 0) -> bool:
    """Run this process (and the threads and children it starts later) at `nice`, and with
    SCHED_RR at priority `realtime` if not 0; returns whether the nice value could be set. Call
    before any thread starts: threads inherit both when created."""
    in_realtime = False
    if realtime:
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(realtime))
            in_realtime = True
        except OSError as err:
            log.warning("cannot run with real-time priority %d (%s): the nice value alone",
                        realtime, err.strerror)  # fmt: skip
    if not nice:
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except PermissionError:
        log.warning("cannot run at CPU priority %d (needs root or CAP_SYS_NICE): running at %d",
                    nice, os.getpriority(os.PRIO_PROCESS, 0))  # fmt: skip
        return False
    if not in_realtime and group_nice("self") is not None:
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


def as_background_thread() -> None:
    """Make the calling thread background work: SCHED_OTHER, 10 nice levels below the process
    (Linux applies both per thread)."""
    with contextlib.suppress(OSError):
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        os.nice(10)


def at_normal_priority(argv: list[str]) -> list[str]:
    """`argv` wrapped to run as an ordinary process, SCHED_OTHER at nice 0, whatever this
    process runs at (for QEMU)."""
    if os.sched_getscheduler(0) != os.SCHED_OTHER:
        argv = ["chrt", "--other", "0", *argv]
    current = os.getpriority(os.PRIO_PROCESS, 0)
    return ["nice", "-n", str(-current), *argv] if current else argv
